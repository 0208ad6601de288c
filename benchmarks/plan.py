"""Plans every pod config in configs/ with `retro-jax plan` and keeps the results. Writes JSON; it is not a test.

Each case is the CLI command a user would run before renting the pod (AOT compile for the config's TPU
topology on this machine; no TPU, no weights), run as its own process so one case's memory is freed before the
next. A case's plan JSON is kept in `--out_dir` and reused when it exists (a killed run resumes; `--force`
replans). The summary puts each plan next to the peer a user would otherwise pick: the hand arithmetic the
config's docstring quoted before the plan existed.

    python benchmarks/plan.py --out_dir benchmarks/results     # 7.5, 1.5 and 6.7 min for the three cases on 2 cores
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata

# (name, command line after `retro-jax plan`, the docstring's hand estimate of the train step's bytes per chip)
CASES = {
    "r1_distill_7b_self_improve": (
        ["--config", "configs/r1_distill_7b_self_improve.py"],
        # 7.6 GB of params + Adam + grads, 3.3 GB of saved layer inputs, 7.5 GB of one layer's attention scores
        {"train_step_bytes": (7.6 + 3.3 + 7.5) * 1e9}),
    "r1_distill_7b_search": (
        ["--command", "search", "--model", "/mnt/disks/models/DeepSeek-R1-Distill-Qwen-7B", "--topology",
         "v5p:2x2x1", "--config.engine.dtype=bfloat16"], {}),
    "qwen25_32b_weak_to_strong": (
        ["--config", "configs/qwen25_32b_weak_to_strong.py"],
        # 4.1 GB of params + Adam + grads, 10.7 GB of saved layer inputs, 10.7 GB of one layer's attention scores
        {"train_step_bytes": (4.1 + 10.7 + 10.7) * 1e9}),
}


def run_case(name: str, argv: list[str], out_dir: str, force: bool) -> dict:
  out = os.path.join(out_dir, f"plan_{name}.json")
  if os.path.exists(out) and not force:
    print(f"[bench] {name}: reusing {out}", flush=True)
    return {"plan_json": out, "reused": True}
  command = [sys.executable, "-m", "retro_jax.cli", "plan", *argv, "--output", out]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  print(f"[bench] {name}: {' '.join(command[1:])}", flush=True)
  start = time.perf_counter()
  proc = subprocess.run(command, env=env, check=False)
  return {"plan_json": out, "reused": False, "exit_code": proc.returncode, "wall_s": time.perf_counter() - start}


def summarize(name: str, run: dict, hand: dict) -> dict:
  with open(run["plan_json"], encoding="utf-8") as f:
    plan = json.load(f)
  programs = {p["name"]: p for p in plan["programs"]}
  out = {"command": CASES[name][0], **run, "fits": plan["fits"], "topology": plan["topology"]["name"],
         "mesh": plan["mesh"], "model": plan["model"]["source"],
         "programs": {n: {k: p[k] for k in ("total_bytes", "argument_bytes", "temp_bytes", "flops", "roofline_s",
                                           "compile_s")} for n, p in programs.items()}}
  if "training" in plan:
    out["training"] = plan["training"]
  if "serving" in plan:
    out["serving"] = plan["serving"]
  if hand:
    out["hand_estimate"] = hand
    out["hand_estimate_vs_plan"] = hand["train_step_bytes"] / programs["train_step"]["total_bytes"]
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out_dir", default="benchmarks/results")
  parser.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
  parser.add_argument("--force", action="store_true", help="replan cases whose plan JSON exists")
  args = parser.parse_args()
  os.makedirs(args.out_dir, exist_ok=True)
  results = {}
  for name in args.cases.split(","):
    if name not in CASES:
      raise SystemExit(f"unknown case {name!r}; known: {', '.join(CASES)}")
    run = run_case(name, CASES[name][0], args.out_dir, args.force)
    if not os.path.exists(run["plan_json"]):
      results[name] = dict(run, error="no plan written (see the output above)")
      continue
    results[name] = summarize(name, run, CASES[name][1])
  report = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "python": platform.python_version(),
      "versions": {p: metadata.version(p) for p in ("jax", "jaxlib", "libtpu", "flax", "optax")},
      "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
      "benchmark": "plan",
      "results": results,
  }
  out = os.path.join(args.out_dir, "plan_pod_configs.json")
  with open(out, "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  print(f"[bench] wrote {out}")


if __name__ == "__main__":
  main()
