"""Retro-Search with DeepSeek-R1-Distill-Qwen-7B (or -32B) as the reviser on one TPU v5p host (4 chips).

The engine runs bfloat16 with tensor parallelism over the host's 4 chips (the 7B model's 4 KV heads; 4 of the
32B's 8), rollouts up to 32,768 tokens, and as many decode slots as the KV budget holds
(`max_concurrent_decodes` 0, kv_budget.py): half of each chip's memory left after its share of the weights.
What that gives, from kv_budget's own arithmetic with a v5p chip's 95 GB (a plan compile of the serving
programs is `retro-jax plan`'s job and is not quoted here):
- R1-Distill-Qwen-7B: 3.8 GB of weights per chip, 14,336 B of KV per position per chip: 64 slots x 32,768
  tokens take 30.1 GB of a 45.6 GB budget: all 64 slots (the paged pool is capped at what dense rows would take);
- R1-Distill-Qwen-32B (--config.model=/mnt/disks/models/DeepSeek-R1-Distill-Qwen-32B): 16.4 GB of weights and
  65,536 B per position per chip: 64 x 32k would need 137 GB of dense rows (18 slots would fit the 39.3 GB
  budget), but the KV is a paged pool (`engine.kv_page_size` 16, engine/paging.py): 37,479 pages of 16 positions
  (599,664 positions, 39.3 GB) shared by 64 slots, which take pages as their rollouts grow; when the pool runs
  out, rollouts wait or the newest is preempted and recomputed later (kv_budget.describe's arithmetic).
`engine.tensor` is the per-replica chip count of the multi-host rollout work (issue of the pod helper); without
it the engine runs on one chip and the budget shrinks the slots accordingly, with a start-up line saying so.

    retro-jax search --config configs/r1_distill_search_v5p_host.py --input traces.jsonl --output revised.jsonl
"""
from retro_jax.search.cli import default_search_config

# Hub id deepseek-ai/DeepSeek-R1-Distill-Qwen-7B, downloaded beforehand (nothing reads the hub at run time).
MODEL_DIR = "/mnt/disks/models/DeepSeek-R1-Distill-Qwen-7B"


def get_config():
  c = default_search_config()
  c.model = MODEL_DIR
  c.engine.dtype = "bfloat16"
  c.engine.max_seq_len = 32768
  c.engine.max_concurrent_decodes = 0  # as many as the budget holds (at most 64)
  c.engine.kv_memory_fraction = 0.5
  c.engine.tensor = 4  # chips per engine replica: the whole host
  c.max_records_in_flight = 256
  return c
