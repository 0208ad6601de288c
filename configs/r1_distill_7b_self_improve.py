"""Retro-Search self-improvement: DeepSeek-R1-Distill-Qwen-7B fine-tuned on its own revised traces.

Paper setting (Lu et al., 2025, section 1 of retro_jax/search/README.md): the model that wrote the traces revises
them (M̂ = M), then is fine-tuned on the revised traces; reported: -31.2% length, +7.7% accuracy. Optimizer
settings below are our choices for a full fine-tune of a 7B model on long traces, not the paper's.

Hardware: TPU v5p-32 = 16 chips (95 GB HBM, 459 bf16 TFLOP/s each), 4 hosts of 4 chips.
Mesh data=1 x fsdp=4 x tensor=4 = 16 chips:
- tensor=4 is the most the model allows (4 KV heads) and stays inside one host (4 chips), so each host
  feeds one distinct slice of the batch (the batch is split over data x fsdp = 4 = hosts);
- memory per chip: 7.62B params x 16 bytes (float32 master + Adam m, v + float32 grads) / 16 = 7.6 GB.
  Activations, one 16k row per chip per micro-batch with full remat: 28 saved layer inputs x 16384 x 3584 x
  2 B = 3.3 GB, plus one layer's attention scores, 7 local heads x 16384^2 x 4 B = 7.5 GB (dense attention,
  no flash kernel in this repo yet), well under 95 GB.
Batch: 64 rows x 16384 positions = 1.05M tokens per optimizer step, as 16 micro-batches of 4 rows (one row
per fsdp shard). Model FLOPs at 16k: 52 GFLOP per token, so a step is ~5.5e16 FLOP: ~19 s at 40% MFU.
Data: Retro-Search output of R1-Distill-Qwen-7B on its own correct traces, `revised_trace` field; traces
longer than 16384 tokens are dropped (counted and reported).

    retro-jax sft --config configs/r1_distill_7b_self_improve.py --config.workdir=/mnt/disks/runs/r1_7b_si
"""
from retro_jax.train.config import pod_long_trace_sft_config

# Hub id deepseek-ai/DeepSeek-R1-Distill-Qwen-7B, downloaded beforehand (training never reads the hub).
MODEL_DIR = "/mnt/disks/models/DeepSeek-R1-Distill-Qwen-7B"
TRAIN_PATH = "/mnt/disks/data/r1_distill_7b/search_output.jsonl"


def get_config():
  c = pod_long_trace_sft_config(MODEL_DIR, TRAIN_PATH)
  c.data.eval_fraction = 0.01
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 4, 4
  c.batch_size = 64
  c.grad_accum_steps = 16
  c.optim.warmup_ratio = 0.03
  c.optim.min_lr_ratio = 0.0
  c.checkpoint_every_steps = 50
  return c
