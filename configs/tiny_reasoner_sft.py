"""SFT of the bundled tiny reasoner on 2 CPU cores (the demo's trainer settings).

    retro-jax sft --config configs/tiny_reasoner_sft.py --config.data.train_path=out/search.jsonl \
        --config.workdir=out/sft_revised                          # fine-tune on revised traces
    retro-jax sft --config configs/tiny_reasoner_sft.py --config.data.trace_field=trace ...   # the control
    retro-jax sft --config configs/tiny_reasoner_sft.py:scratch \
        --config.data.train_path=out/task/train_traces.jsonl --config.workdir=out/tiny_reasoner   # build it

Variants (`get_config(variant)`, the text after ":" on the command line):
- "finetune" (default): start from the shipped tiny reasoner; train on Retro-Search output (`revised_trace`).
- "scratch": random init of a ~3M-parameter Qwen2 (d 256, 4 layers, 8 q / 2 kv heads, tied embeddings) with
  the shipped tokenizer, on the task's written traces (`trace`).
Traces of the arithmetic task are ~110 tokens on average (max ~290), so 512-position packed rows hold ~4.
"""
import os

import retro_jax
from retro_jax.train.config import sft_config

TINY_REASONER_DIR = os.path.join(os.path.dirname(retro_jax.__file__), "assets", "tiny_reasoner")


def get_config(variant: str = "finetune"):
  c = sft_config()
  c.compute_dtype = "float32"  # bfloat16 matmuls are emulated on CPUs and slower than float32
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.data.seq_len = 512
  c.data.eval_fraction = 0.05
  c.batch_size = 16  # rows of 512 positions: ~8k tokens per step
  c.loss_chunk_size = 512
  c.optim.decay = "cosine"
  c.optim.max_grad_norm = 1.0
  c.log_every_steps = 20
  c.checkpoint_every_steps = 200
  c.async_checkpointing = False  # tiny state: a synchronous save costs nothing and keeps runs simple
  if variant == "finetune":
    c.model_dir = TINY_REASONER_DIR
    c.data.trace_field = "revised_trace"
    c.num_epochs = 3.0
    c.optim.learning_rate = 3e-4
    c.optim.warmup_ratio = 0.05
  elif variant == "scratch":
    c.init = "scratch"
    c.tokenizer_dir = TINY_REASONER_DIR
    c.data.trace_field = "trace"
    c.num_epochs = 2.0
    c.optim.learning_rate = 2e-3
    c.optim.warmup_ratio = 0.02
    c.optim.weight_decay = 0.01
  else:
    raise ValueError(f"unknown variant {variant!r}: use 'finetune' or 'scratch'")
  return c
