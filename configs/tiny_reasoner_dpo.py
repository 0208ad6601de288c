"""CoT-aware DPO of the bundled tiny reasoner on Retro-Search pairs (2 CPU cores).

A Retro-Search output record is a ready-made preference pair: the revised trace (shorter, still correct) is
chosen over the original. Both share the trace up to the first accepted boundary, which is exactly what
shared-prefix masking drops from the DPO term. Keep only records with status "revised" (an unchanged record
has chosen == rejected and gives DPO nothing to learn).

    retro-jax dpo --config configs/tiny_reasoner_dpo.py --config.data.train_path=out/revised_only.jsonl \
        --config.workdir=out/dpo
"""
import os

import retro_jax
from retro_jax.train.config import dpo_config

TINY_REASONER_DIR = os.path.join(os.path.dirname(retro_jax.__file__), "assets", "tiny_reasoner")


def get_config():
  c = dpo_config()
  c.model_dir = TINY_REASONER_DIR
  c.compute_dtype = "float32"  # bfloat16 matmuls are emulated on CPUs and slower than float32
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.data.chosen_field = "revised_trace"
  c.data.rejected_field = "trace"
  c.data.seq_len = 320  # one pair side per row (pairs are not packed); the task's traces are < 300 tokens
  c.data.eval_fraction = 0.05
  c.batch_size = 16  # pairs
  c.num_epochs = 2.0
  c.loss_chunk_size = 512
  c.optim.learning_rate = 1e-5
  c.optim.warmup_ratio = 0.1
  c.dpo.beta = 0.1
  c.dpo.label_smoothing = 0.0
  c.dpo.mask_shared_prefix = True
  c.dpo.sft_weight = 1.0  # L_DPO + α·L_SFT keeps the chosen traces' likelihood up while the margin grows
  c.log_every_steps = 10
  c.checkpoint_every_steps = 200
  c.async_checkpointing = False
  return c
