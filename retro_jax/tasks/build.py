"""`retro-jax build-tiny-reasoner`: rebuild the bundled tiny reasoner from scratch with the project's own trainer.

The tiny reasoner is a ~1.65M-parameter Qwen2-architecture model trained (SFT, random init) on synthetic R1-style
arithmetic traces that over-think and under-think at known rates (tasks/trace_writer.py). It imitates that
switching, which is what gives Retro-Search something to revise in the laptop demo. Nothing is downloaded: the
tokenizer is trained here and the weights come from `train.sft.run_sft` with `init="scratch"`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import ml_collections

from retro_jax.tasks import tokenizer as task_tokenizer
from retro_jax.tasks.trace_writer import TraceConfig, write_task_files

DEFAULT_OUTPUT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "tiny_reasoner")
BUNDLED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json")


def local_cpu_sft_config(*, workdir: str, export_dir: str, seed: int, log_every_steps: int
                         ) -> ml_collections.ConfigDict:
  """SFT settings for a short single-process CPU run (the tiny reasoner's build, the demo's fine-tunes): one
  device, float32 compute (CPUs have no fast bf16 matmul, and it keeps runs deterministic), no periodic
  checkpoints or TensorBoard, an HF export at the end."""
  from retro_jax.train.config import sft_config  # deferred: the trainer pulls in orbax and grain

  c = sft_config()
  c.compute_dtype = "float32"
  c.mesh.update(data=1, fsdp=1, tensor=1)
  c.seed = seed
  c.workdir = workdir
  c.checkpoint_every_steps = 0  # a SIGTERM still saves; a finished stage is skipped by its export
  c.async_checkpointing = False
  c.log_every_steps = log_every_steps
  c.eval_at_start = False
  c.export_dir = export_dir
  c.tensorboard = False
  return c


def tiny_reasoner_sft_config(*, tokenizer_dir: str, train_path: str, workdir: str, export_dir: str,
                             num_train_steps: int, seed: int) -> ml_collections.ConfigDict:
  """The from-scratch SFT recipe (1.65M params, 800 steps of 32 rows x 256 tokens)."""
  c = local_cpu_sft_config(workdir=workdir, export_dir=export_dir, seed=seed, log_every_steps=50)
  c.init = "scratch"
  c.tokenizer_dir = tokenizer_dir
  c.model.update(hidden_size=192, intermediate_size=512, num_layers=4, num_heads=6, num_kv_heads=2, head_dim=32,
                 tie_word_embeddings=True, max_position_embeddings=512)  # 1.65M params
  c.data.train_path = train_path
  c.data.trace_field = "trace"
  c.data.seq_len = 256  # a trace is ~110 tokens: two per row; dense attention makes 512 2x slower per token
  c.data.eval_fraction = 0.02
  c.batch_size = 32
  c.num_train_steps = num_train_steps
  c.optim.update(learning_rate=3e-3, warmup_steps=50, decay="cosine", min_lr_ratio=0.05, weight_decay=0.01,
                 b2=0.98)
  c.export_dtype = "float32"
  return c


def build_tiny_reasoner(output_dir: str = DEFAULT_OUTPUT, *, num_train_problems: int = 20000,
                        num_train_steps: int = 800, seed: int = 0,
                        trace_config: TraceConfig = TraceConfig()) -> dict:
  """Writes the five bundled files to `output_dir`; returns the training summary plus the build's wall time."""
  from retro_jax.train.sft import run_sft  # pylint: disable=import-outside-toplevel

  start = time.time()
  with tempfile.TemporaryDirectory(prefix="tiny_reasoner_") as work:
    tokenizer_dir = os.path.join(work, "tokenizer")
    task_tokenizer.build_tokenizer(tokenizer_dir, seed=seed)
    with open(os.path.join(tokenizer_dir, "generation_config.json"), "w", encoding="utf-8") as f:
      json.dump({"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2, "temperature": 0.6, "top_p": 0.95,
                 "do_sample": True}, f, indent=2)
    paths = write_task_files(os.path.join(work, "task"), seed=seed, n_train=num_train_problems, n_eval=0,
                             trace_config=trace_config)
    export_dir = os.path.join(work, "export")
    config = tiny_reasoner_sft_config(tokenizer_dir=tokenizer_dir, train_path=str(paths["train_traces"]),
                                      workdir=os.path.join(work, "run"), export_dir=export_dir,
                                      num_train_steps=num_train_steps, seed=seed)
    summary = run_sft(config)
    os.makedirs(output_dir, exist_ok=True)
    for name in BUNDLED_FILES:
      source = os.path.join(export_dir, name)
      if not os.path.exists(source):
        source = os.path.join(tokenizer_dir, name)
      shutil.copyfile(source, os.path.join(output_dir, name))
  summary = dict(summary, build_seconds=round(time.time() - start, 1), output_dir=output_dir)
  with open(os.path.join(output_dir, "build_summary.json"), "w", encoding="utf-8") as f:
    json.dump({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))}, f, indent=2)
  return summary


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="retro-jax build-tiny-reasoner", description=__doc__.splitlines()[0])
  parser.add_argument("--output", default=DEFAULT_OUTPUT, help="where the HF-format model goes")
  parser.add_argument("--steps", type=int, default=800, help="optimizer steps (batch 32 rows of 256 tokens)")
  parser.add_argument("--problems", type=int, default=20000, help="synthetic training problems")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  summary = build_tiny_reasoner(args.output, num_train_problems=args.problems, num_train_steps=args.steps,
                                seed=args.seed)
  print(f"tiny reasoner written to {args.output} in {summary['build_seconds']} s")
  return 0
