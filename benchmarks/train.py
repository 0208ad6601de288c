"""Training-step benchmark: tokens/s and MFU of the SFT step (the trainer's own jitted, donated step). Writes one
JSON file; it is not a test.

Each case builds a random-weight model of a given shape with float32 master weights, a batch of full rows
(every position a real token, the first quarter of each row prompt, the rest loss), compiles the step once
(compile time reported apart), then times `--steps` steps. tokens/s counts every trained position; MFU is
model FLOPs (retro_jax.train.metrics.training_flops_per_token: 6 x matmul weights + causal attention, no remat
overhead) over the peak:
- GPU / TPU: the spec-sheet dense bf16 peak of the device (metrics.PEAK_BF16_FLOPS);
- CPU: no spec sheet applies, so the peak is *measured*: the best float32 matmul rate of this machine
  (a 2048^3 jitted matmul), which makes the CPU MFU "fraction of what this CPU's matmul reaches".

Cases (`shape@positions x rows`): "tiny" is the bundled tiny reasoner's shape, read from its config.json (d 192,
4 layers, 6 query / 2 KV heads, MLP 512, vocab 405, 1.65M parameters) in float32,
at 512 and 256 positions per row (same tokens per step: the dense attention's share shows); these are the CPU
cases. "0.5b" / "1.5b" are Qwen2.5-0.5B / 1.5B shapes at 2048 and 4096 positions in bfloat16 with "dots"
remat: GPU-only, recorded as skipped where no GPU is present.

The same command on CPU and on a GPU machine (on 2 CPU cores shared with other jobs, load average 16 to 20, it took
3 min 56 s; the JSON records the load, and its steps, not its best-of-5 matmul peak, slow down under contention):
  python benchmarks/train.py --out runs/benchmarks/train_cpu.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from importlib import metadata

import jax
import jax.numpy as jnp
import numpy as np

from retro_jax import sharding
from retro_jax.demo import DEFAULT_MODEL
from retro_jax.jsonl import write_json
from retro_jax.models.config import SHAPES as PUBLISHED_SHAPES
from retro_jax.models.config import Qwen2Config
from retro_jax.train import config as config_lib
from retro_jax.train import data, input_pipeline, metrics, sft, trainer

SHAPES = {
    "0.5b": PUBLISHED_SHAPES["qwen2.5-0.5b"],
    "1.5b": PUBLISHED_SHAPES["qwen2.5-1.5b"],
}
GPU_ONLY = {"0.5b", "1.5b"}
DEFAULT_CASES = ["tiny@512x16", "tiny@256x32", "0.5b@2048x16", "0.5b@4096x8", "1.5b@2048x8", "1.5b@4096x4"]


def measured_matmul_peak(n: int = 2048, repeats: int = 5) -> float:
  """Best float32 FLOP/s of one jitted n^3 matmul on the default device (the CPU's practical peak)."""
  a = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * n ** 3 / best


def run_case(shape_name: str, seq_len: int, rows: int, *, dtype: str, remat: str, steps: int,
             peak: float | None, peak_source: str) -> dict:
  config = config_lib.sft_config()
  config.init, config.compute_dtype, config.remat = "scratch", dtype, remat
  config.data.seq_len, config.batch_size, config.loss_chunk_size = seq_len, rows, min(seq_len, 1024)
  if shape_name == "tiny":  # read from the bundled model, so the benchmark follows it
    model_config = Qwen2Config.from_pretrained(DEFAULT_MODEL).replace(param_dtype="float32", dtype=dtype)
  else:
    model_config = Qwen2Config(**SHAPES[shape_name], param_dtype="float32", dtype=dtype)
  s = trainer.Setup(config=config, mesh=sharding.make_mesh(1, 1, 1), tokenizer=None, model_config=model_config,
                    base_dir="")
  rng = np.random.default_rng(0)
  prompt = seq_len // 4
  examples = [data.SFTExample(tokens=rng.integers(0, model_config.vocab_size, seq_len + 1).astype(np.int32),
                              loss_mask=np.r_[np.zeros(prompt), np.ones(seq_len + 1 - prompt)].astype(np.int32))
              for _ in range(rows)]
  task = sft.build_task(s, examples, [], stats={})
  graphdef, params, param_sh = trainer.init_params(s, abstract=False)
  schedule, tx = trainer.schedule_and_optimizer(config, total_steps=steps + 1)
  state_sh = trainer.state_shardings(tx, params, param_sh, s.mesh)
  state = jax.jit(trainer.initial_state_fn(tx, 0), out_shardings=state_sh, donate_argnums=(0,))(params)
  host_batch = {k: np.stack([task.make_row(i)[k] for i in range(rows)])[None] for k in task.make_row(0)}
  batch = input_pipeline.to_global(host_batch, s.mesh, batch_axis=1)
  step = trainer.make_train_step(graphdef, task, tx, schedule, state_sh,
                                 input_pipeline.batch_shardings(host_batch, s.mesh, batch_axis=1), s.mesh)
  start = time.perf_counter()
  state, sums = step(state, batch)
  jax.block_until_ready(state)
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(steps):
    state, sums = step(state, batch)
  jax.block_until_ready(state)
  elapsed = time.perf_counter() - start
  tokens_per_second = steps * rows * seq_len / elapsed
  flops_per_token = metrics.training_flops_per_token(model_config, seq_len)
  return {
      "case": f"{shape_name}@{seq_len}x{rows}", "shape": shape_name, "params": model_config.num_params,
      "seq_len": seq_len, "rows": rows, "tokens_per_step": rows * seq_len, "compute_dtype": dtype,
      "param_dtype": "float32", "remat": remat, "steps_timed": steps, "compile_s": round(compile_s, 2),
      "step_s": elapsed / steps, "tokens_per_second": tokens_per_second, "flops_per_token": flops_per_token,
      "model_tflops_per_second": tokens_per_second * flops_per_token / 1e12,
      "peak_flops_per_device": peak, "peak_source": peak_source,
      "mfu": metrics.mfu(tokens_per_second, flops_per_token, 1, peak),
      "final_loss": float(sums["nll"] / sums["loss_tokens"]),
  }


def environment() -> dict:
  versions = {name: metadata.version(name) for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint",
                                                          "grain", "numpy")}
  device = jax.devices()[0]
  return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "python": sys.version.split()[0],
          "versions": versions, "machine": {"platform": platform.platform(), "processor": platform.processor(),
                                            "cpu_count": os.cpu_count(), "loadavg_1_5_15min": os.getloadavg(),
                                            "backend": jax.default_backend(),
                                            "device_kind": device.device_kind, "device_count": jax.device_count()}}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="shape@positions x rows, e.g. 1.5b@4096x4")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--out", default="runs/benchmarks/train_cpu.json")
  args = parser.parse_args(argv)
  on_cpu = jax.default_backend() == "cpu"
  peak = measured_matmul_peak() if on_cpu else metrics.peak_flops_per_device()
  peak_source = "measured float32 2048^3 matmul" if on_cpu else "spec sheet, dense bf16"
  results = []
  for case in args.cases:
    shape, sizes = case.split("@")
    seq_len, rows = (int(x) for x in sizes.split("x"))
    if shape in GPU_ONLY and on_cpu:
      results.append({"case": case, "skipped": "GPU-only case (bf16 at 2-4k positions): no accelerator here"})
      continue
    dtype, remat = ("float32", "none") if shape == "tiny" else ("bfloat16", "dots")
    result = run_case(shape, seq_len, rows, dtype=dtype, remat=remat, steps=args.steps, peak=peak,
                      peak_source=peak_source)
    print(json.dumps(result), flush=True)
    results.append(result)
  report = dict(environment(), benchmark="train_step", results=results)
  write_json(args.out, report)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
