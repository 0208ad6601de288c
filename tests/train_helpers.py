"""Fixtures of the trainer tests: a tiny random Qwen2 HF directory (char tokenizer + weights) and JSONL data.

Everything is built locally (no hub): the tokenizer by `hf_fixtures.save_char_tokenizer`, the weights with our
own initialiser and `save_pretrained` (no torch needed to start a run).
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import random
import shutil
import tempfile

from flax import nnx

from retro_jax.checkpoint import save_pretrained
from retro_jax.models.config import Qwen2Config
from retro_jax.models.qwen2 import Qwen2ForCausalLM
from tests.hf_fixtures import save_char_tokenizer

VOCAB_SIZE = 96  # >= the char tokenizer's ids, and even, so "vocab" splits over tensor=2


def tiny_config(vocab_size: int, **changes) -> Qwen2Config:
  base = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
              num_kv_heads=2, head_dim=8, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=0,
              eos_token_ids=(1,))
  base.update(changes)
  return Qwen2Config(**base)


@functools.cache
def shared_base_model_dir() -> str:
  """A stand-in base checkpoint (char tokenizer, random tiny Qwen2 weights, generation_config.json), built once
  per test process; tests only read it (runs write to their own workdirs)."""
  out = tempfile.mkdtemp(prefix="retro_jax_train_base_")
  atexit.register(shutil.rmtree, out, ignore_errors=True)
  save_char_tokenizer(out)
  save_pretrained(Qwen2ForCausalLM(tiny_config(VOCAB_SIZE), nnx.Rngs(0)), out)
  with open(os.path.join(out, "generation_config.json"), "w", encoding="utf-8") as f:
    json.dump({"bos_token_id": 0, "eos_token_id": 1, "temperature": 0.6}, f)
  return out


def arithmetic_records(n: int, seed: int = 0) -> list[dict]:
  """Tiny R1-style (question, trace) records: a sum, its thinking and a boxed answer."""
  rng = random.Random(seed)
  out = []
  for i in range(n):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    trace = f"<think>\n{a}+{b}={a + b}\n</think>\n\n\\boxed{{{a + b}}}"
    out.append({"id": f"q{i}", "question": f"{a}+{b}?", "trace": trace, "revised_trace": trace})
  return out


def write_jsonl(path: str, records: list, extra_lines: tuple[str, ...] = ()) -> str:
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
    for line in extra_lines:
      f.write(line + "\n")
  return path
