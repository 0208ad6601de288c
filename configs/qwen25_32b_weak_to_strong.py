"""Retro-Search weak-to-strong: Qwen2.5-32B fine-tuned on R1 traces revised by R1-Distill-Qwen-32B.

Paper setting (Lu et al., 2025, section 1 of retro_jax/search/README.md): a smaller model revises DeepSeek-R1-671B
traces of OpenThoughts-114k; Qwen2.5-32B fine-tuned on the result: -11.3% length, +2.4% accuracy against
fine-tuning on the original traces (the control: --config.data.trace_field=trace). Optimizer settings are our
choices, in the range the OpenThoughts / Sky-T1 32B recipes use.

Hardware: TPU v5p-256 = 128 chips (95 GB HBM, 459 bf16 TFLOP/s each), 32 hosts of 4 chips.
Mesh data=1 x fsdp=32 x tensor=4 = 128 chips:
- tensor=4 divides the 8 KV heads and 40 query heads and stays inside one host; the batch is split over
  fsdp = 32 = hosts, so each host feeds one distinct row per micro-batch (tensor=8 would span two hosts that
  would then have to feed identical rows);
- memory per chip, measured at full depth (AOT compile for v5p:4x4x8 on a 2-core CPU machine in 135 s, libtpu
  0.0.42.1, the qwen2.5-32b shape; benchmarks/results/plan_qwen25_32b_weak_to_strong.json):

      retro-jax plan --config configs/qwen25_32b_weak_to_strong.py

  train step 14.8 GB of 95 (3.1 GB of float32 params + Adam moments, 11.7 GB of temporaries: one 16k row per
  chip with full remat and splash attention, the gradient accumulator, the update); eval step 5.0 GB.
Batch: 128 rows x 16384 positions = 2.1M tokens per optimizer step, as 4 micro-batches of 32 rows (one per
fsdp shard). Model FLOPs at 16k: 224 GFLOP per token, ~4.7e17 FLOP per step: ~20 s at 40% MFU. 114k traces
of ~6-8k tokens pack into roughly 50k rows, ~400 steps per epoch.
Data: revised traces in `<think>` style (convert OpenThoughts' `<|begin_of_thought|>` markers first: the
prompt ends with `<think>\\n`), `revised_trace` field; the Qwen2.5 ChatML template comes from the tokenizer.

    retro-jax sft --config configs/qwen25_32b_weak_to_strong.py --config.workdir=/mnt/disks/runs/q32b_w2s
"""
from retro_jax.train.config import pod_long_trace_sft_config

# Hub id Qwen/Qwen2.5-32B-Instruct, downloaded beforehand (training never reads the hub).
MODEL_DIR = "/mnt/disks/models/Qwen2.5-32B-Instruct"
TRAIN_PATH = "/mnt/disks/data/openthoughts114k_revised_by_r1_distill_32b/search_output.jsonl"


def get_config():
  c = pod_long_trace_sft_config(MODEL_DIR, TRAIN_PATH)
  c.data.eval_fraction = 0.005
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 32, 4
  c.batch_size = 128
  c.grad_accum_steps = 4
  c.optim.warmup_ratio = 0.1
  c.checkpoint_every_steps = 25
  return c
