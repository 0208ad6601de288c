"""Retro-Search self-improvement: DeepSeek-R1-Distill-Qwen-7B fine-tuned on its own revised traces.

Paper setting (Lu et al., 2025, section 1 of retro_jax/search/README.md): the model that wrote the traces revises
them (M̂ = M), then is fine-tuned on the revised traces; reported: -31.2% length, +7.7% accuracy. Optimizer
settings below are our choices for a full fine-tune of a 7B model on long traces, not the paper's.

Hardware: TPU v5p-32 = 16 chips (95 GB HBM, 459 bf16 TFLOP/s each), 4 hosts of 4 chips.
Mesh data=1 x fsdp=4 x tensor=4 = 16 chips:
- tensor=4 is the most the model allows (4 KV heads) and stays inside one host (4 chips), so each host
  feeds one distinct slice of the batch (the batch is split over data x fsdp = 4 = hosts);
- memory per chip, measured (AOT compile for v5p:2x2x4 on a CPU machine, libtpu 0.0.42.1; the qwen2.5-7b shape;
  benchmarks/results/plan_r1_distill_7b_self_improve.json):

      retro-jax plan --config configs/r1_distill_7b_self_improve.py

  train step 16.3 GB of 95 (5.7 GB of float32 params + Adam moments, 10.6 GB of temporaries: one 16k row per
  chip with full remat and splash attention, the float32 gradient accumulator, the update); eval step 7.8 GB
  (with the optimizer state still resident).
Batch: 64 rows x 16384 positions = 1.05M tokens per optimizer step, as 16 micro-batches of 4 rows (one row
per fsdp shard). Model FLOPs at 16k: 52 GFLOP per token; at 40% MFU a step takes 18.7 s (56k tokens/s). The
roofline of the compiled step (XLA's 3.2 PFLOP and 9.9 TB moved per chip, every layer counted) is 7.0 s.
The search that revises the traces runs this model on one v5p host per engine replica (4 chips, tensor 4);
with the search defaults (64 slots x 32,768 tokens) in bfloat16 it plans (benchmarks/results/
plan_r1_distill_7b_search.json) at 3.8 GB of weights and 30.1 GB of KV cache per chip; the generate step peaks
at 34.2 GB of 95 and the 32k prefill at 36.2 GB (with the decode state resident):

    retro-jax plan --command search --model /mnt/disks/models/DeepSeek-R1-Distill-Qwen-7B --topology v5p:2x2x1 \
        --config.engine.dtype=bfloat16
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
