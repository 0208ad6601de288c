"""`retro-jax build-tiny-reasoner`: rebuild the bundled tiny reasoner from scratch with the project's own trainer.

The tiny reasoner is a ~1.65M-parameter Qwen2-architecture model trained (SFT, random init) on synthetic R1-style
arithmetic traces that over-think and under-think at known rates (tasks/trace_writer.py). It imitates that
switching, which is what gives Retro-Search something to revise in the laptop demo. Nothing is downloaded: the
tokenizer is trained here and the weights come from `train.sft.run_sft` with `init="scratch"`. The build takes
about 28 minutes on 2 CPU cores, so it checkpoints as it goes and a re-run resumes it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from typing import Callable

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


def default_workdir(num_train_problems: int, num_train_steps: int, seed: int) -> str:
  """Where an unfinished build keeps its checkpoints: per recipe, so a changed recipe never resumes another's."""
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(cache, "retro_jax", f"tiny_reasoner_build_p{num_train_problems}_s{num_train_steps}_seed{seed}")


def _log(message: str) -> None:
  print(f"[build] {message}", flush=True)


def build_tiny_reasoner(output_dir: str = DEFAULT_OUTPUT, *, num_train_problems: int = 20000,
                        num_train_steps: int = 800, seed: int = 0, workdir: str | None = None,
                        checkpoint_every_steps: int = 100, trace_config: TraceConfig = TraceConfig(),
                        on_step: Callable[[int, dict | None], None] | None = None) -> dict:
  """Writes the five bundled files and `build_summary.json` to `output_dir`; returns that summary plus `output_dir`
  (or, for a stopped build, the trainer's summary with `preempted=True`).

  The run lives in `workdir` (default: a per-recipe folder under ~/.cache/retro_jax) and checkpoints every
  `checkpoint_every_steps` and on SIGTERM, so a killed build loses at most that many steps: the same command
  resumes it. The tokenizer and task files are deterministic, so they are simply rewritten on a resume. A
  finished build deletes its workdir. A stopped build returns `preempted=True` and writes nothing to `output_dir`.
  """
  from retro_jax.train.sft import run_sft  # pylint: disable=import-outside-toplevel

  if num_train_problems < 1 or num_train_steps < 1:
    raise ValueError(f"need at least one problem and one step, got {num_train_problems} problems, "
                     f"{num_train_steps} steps")
  start = time.time()
  work = workdir or default_workdir(num_train_problems, num_train_steps, seed)
  _log(f"working in {work} (the trainer resumes from a checkpoint it finds there)")
  tokenizer_dir = os.path.join(work, "tokenizer")
  task_tokenizer.build_tokenizer(tokenizer_dir, seed=seed)
  with open(os.path.join(tokenizer_dir, "generation_config.json"), "w", encoding="utf-8") as f:
    json.dump({"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2, "temperature": 0.6, "top_p": 0.95,
               "do_sample": True}, f, indent=2)
  _log(f"writing {num_train_problems} synthetic problems with R1-style traces")
  paths = write_task_files(os.path.join(work, "task"), seed=seed, n_train=num_train_problems, n_eval=0,
                           trace_config=trace_config)
  export_dir = os.path.join(work, "export")
  config = tiny_reasoner_sft_config(tokenizer_dir=tokenizer_dir, train_path=str(paths["train_traces"]),
                                    workdir=os.path.join(work, "run"), export_dir=export_dir,
                                    num_train_steps=num_train_steps, seed=seed)
  config.checkpoint_every_steps = checkpoint_every_steps
  _log(f"training {num_train_steps} steps of {config.batch_size} rows x {config.data.seq_len} tokens from random "
       f"init (about 2 s a step on 2 CPU cores); a log line every {config.log_every_steps} steps")
  summary = run_sft(config, on_step=on_step)
  if summary["preempted"]:
    _log(f"stopped at step {summary['step']}; run the same command again to resume from its checkpoint")
    return summary
  os.makedirs(output_dir, exist_ok=True)
  for name in BUNDLED_FILES:
    source = os.path.join(export_dir, name)
    if not os.path.exists(source):
      source = os.path.join(tokenizer_dir, name)
    shutil.copyfile(source, os.path.join(output_dir, name))
  _remove_work(work)
  summary = _build_summary(summary, num_train_problems=num_train_problems, seed=seed,
                           build_seconds=time.time() - start)
  with open(os.path.join(output_dir, "build_summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
    f.write("\n")
  return dict(summary, output_dir=output_dir)


WORK_FOLDERS = ("tokenizer", "task", "run", "export")


def _remove_work(work: str) -> None:
  """Deletes what the build wrote in `work` (only that: a user's --workdir may hold other things)."""
  for name in WORK_FOLDERS:
    shutil.rmtree(os.path.join(work, name), ignore_errors=True)
  if os.path.isdir(work) and not os.listdir(work):
    os.rmdir(work)


def _build_summary(run: dict, *, num_train_problems: int, seed: int, build_seconds: float) -> dict:
  """What `build_summary.json` records: the recipe, the result and the machine it was built on."""
  import jax  # pylint: disable=import-outside-toplevel

  train, evaluation = run.get("train") or {}, run.get("eval") or {}
  return {
      "num_train_problems": num_train_problems, "total_steps": run["total_steps"], "seed": seed,
      "final_train_loss": train.get("loss"), "eval_loss": evaluation.get("loss"),
      "step_seconds": train.get("step_seconds"), "tokens_per_second": train.get("tokens_per_second"),
      "build_seconds": round(build_seconds, 1), "resumed": run["resumed_from"] is not None,
      "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                  "jax": jax.__version__, "backend": jax.default_backend()},
  }


def argument_parser() -> argparse.ArgumentParser:
  """The command's flags (also what `--dry-run` parses)."""
  parser = argparse.ArgumentParser(prog="retro-jax build-tiny-reasoner", description=__doc__.splitlines()[0])
  parser.add_argument("--output", default=DEFAULT_OUTPUT, help="where the HF-format model goes")
  parser.add_argument("--steps", type=int, default=800, help="optimizer steps (batch 32 rows of 256 tokens)")
  parser.add_argument("--problems", type=int, default=20000, help="synthetic training problems")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workdir", default=None,
                      help="checkpoints of an unfinished build (default: a per-recipe folder under ~/.cache/retro_jax)")
  return parser


def main(argv: list[str]) -> int:
  parser = argument_parser()
  args = parser.parse_args(argv)
  if args.steps < 1 or args.problems < 1:
    parser.error("--steps and --problems must be at least 1")
  summary = build_tiny_reasoner(args.output, num_train_problems=args.problems, num_train_steps=args.steps,
                                seed=args.seed, workdir=args.workdir)
  if summary.get("preempted"):
    from retro_jax.train.cli import EXIT_PREEMPTED  # pylint: disable=import-outside-toplevel
    return EXIT_PREEMPTED
  _log(f"tiny reasoner written to {args.output} in {summary['build_seconds']} s")
  return 0
