"""R1-Distill-Qwen-7B SFT on revised traces up to 32k tokens, on TPU v5p-32 (16 chips).

The self-improvement run of r1_distill_7b_self_improve.py with rows of 32,768 positions instead of 16,384, so
R1 traces up to 32k tokens are kept rather than dropped. What makes 32k fit (issue 13): attention never builds
the [t, t] scores (splash attention on TPU, attention.py), the 28 layers are one scanned layer with full remat,
and the residual stream remat keeps between layers is split over "tensor" (sharding.TRAIN_RULES "layer_seq").

Mesh data=1 x fsdp=4 x tensor=4 = 16 chips (tensor 4 = the model's KV heads, inside one 4-chip host); one row
per fsdp shard per micro-batch. Measured by AOT compiling this step for v5p:2x2x4 on a CPU host
(benchmarks/train_memory_aot.py, results in benchmarks/results/train_memory_aot.json): see the README section
"Long traces" for the temp bytes per device at 16k and 32k.
Batch: 32 rows x 32,768 positions = 1.05M tokens per optimizer step (as at 16k), 8 micro-batches of 4 rows.

    retro-jax sft --config configs/r1_distill_7b_sft_32k_v5p.py --config.workdir=/mnt/disks/runs/r1_7b_32k
"""
from retro_jax.train.config import pod_long_trace_sft_config

# Hub id deepseek-ai/DeepSeek-R1-Distill-Qwen-7B, downloaded beforehand (training never reads the hub).
MODEL_DIR = "/mnt/disks/models/DeepSeek-R1-Distill-Qwen-7B"
TRAIN_PATH = "/mnt/disks/data/r1_distill_7b/search_output.jsonl"


def get_config():
  c = pod_long_trace_sft_config(MODEL_DIR, TRAIN_PATH)
  c.data.seq_len = 32768
  c.data.eval_fraction = 0.01
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 4, 4
  c.batch_size = 32
  c.grad_accum_steps = 8
  c.loss_chunk_size = 2048
  c.optim.warmup_ratio = 0.03
  c.checkpoint_every_steps = 50
  return c
