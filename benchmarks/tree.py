"""Tree-CoT throughput: trees/s, rollouts/s and the prefill the prefix cache saves, against one tree at a time.

One process, one problem set, three runs of `run_trees` with the tiny-reasoner tree config:
- `many_trees`: up to `--in_flight` trees multiplexed over the engine's decode slots, prefix cache on;
- `one_tree_at_a_time`: the same engine, one tree in flight (the loop of the paper's released code, which
  grows one tree at a time against a server);
- `many_trees_no_prefix_cache`: as the first, with the prefix cache off, to count the prefill it saves.
Each run is preceded by an untimed warm-up tree (compiles). The trees must be identical in all three runs:
neither batching nor the prefix cache may change a node.

    python benchmarks/tree.py --out benchmarks/results/tree_cpu.json
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from retro_jax.demo_treecot import tiny_tree_config  # noqa: E402
from retro_jax.engine.serving import load_text_generator  # noqa: E402
from retro_jax.grading import Grader  # noqa: E402
from retro_jax import jsonl  # noqa: E402
from retro_jax.search import runner, tree_runner  # noqa: E402
from retro_jax.search.tree_cli import tree_config  # noqa: E402
from retro_jax.tasks.arithmetic import make_splits, write_problems  # noqa: E402
from retro_jax.tokenization import load_tokenizer  # noqa: E402


def _run(name: str, args, config, problems: str, warmup: str, grader, work: str, *, in_flight: int,
         prefix_cache: bool) -> dict:
  generator = load_text_generator(config.model, max_concurrent_decodes=args.slots,
                                  max_seq_len=config.engine.max_seq_len,
                                  prefix_cache_bytes=(256 << 20) if prefix_cache else 0, progress=False)
  render = load_tokenizer(config.model).render_prompt
  settings = tree_config(config)

  def grow(path: str, output: str) -> dict:
    rows, total = runner.open_input(path)
    return tree_runner.run_trees(rows, generator=generator, render_prompt=render, grader=grader, output_path=output,
                                 config=settings, max_trees_in_flight=in_flight, total=total, progress=False)

  grow(warmup, os.path.join(work, f"{name}.warmup.jsonl"))
  before = dict(vars(generator.stats))
  start = time.perf_counter()
  summary = grow(problems, os.path.join(work, f"{name}.jsonl"))
  wall = time.perf_counter() - start
  stats = {k: v - before[k] for k, v in vars(generator.stats).items()}
  trees = {r["id"]: r["nodes"] for r in jsonl.read_jsonl(os.path.join(work, f"{name}.jsonl"))}
  return {
      "name": name, "trees_in_flight": in_flight, "prefix_cache": prefix_cache, "wall_s": wall,
      "trees": summary["records"], "trees_per_s": summary["records"] / wall, "rollouts": summary["rollouts"],
      "rollouts_per_s": summary["rollouts"] / wall, "requests": summary["requests"],
      "samples": stats["samples"], "generated_tokens": stats["generated_tokens"],
      "generated_tokens_per_s": stats["generated_tokens"] / wall, "prompt_tokens": stats["prompt_tokens"],
      "prefill_tokens_computed": stats["prompt_tokens_computed"],
      "prefill_saved_fraction": 1 - stats["prompt_tokens_computed"] / max(1, stats["prompt_tokens"]),
      "success": summary["success"], "failure": summary["failure"], "_trees": trees,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_problems", type=int, default=32)
  parser.add_argument("--slots", type=int, default=32)
  parser.add_argument("--in_flight", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="runs/benchmarks/tree.json")
  args = parser.parse_args()
  config = tiny_tree_config(args.seed)
  train, held_out = make_splits(2000 + args.seed, args.num_problems, 1)
  with tempfile.TemporaryDirectory() as work, Grader() as grader:
    problems, warmup = os.path.join(work, "problems.jsonl"), os.path.join(work, "warmup.jsonl")
    write_problems(problems, train)
    write_problems(warmup, held_out)
    runs = [_run("many_trees", args, config, problems, warmup, grader, work, in_flight=args.in_flight,
                 prefix_cache=True),
            _run("one_tree_at_a_time", args, config, problems, warmup, grader, work, in_flight=1, prefix_cache=True),
            _run("many_trees_no_prefix_cache", args, config, problems, warmup, grader, work, in_flight=args.in_flight,
                 prefix_cache=False)]
  trees = [run.pop("_trees") for run in runs]
  checks = {"trees_identical_in_all_runs": all(t == trees[0] for t in trees[1:])}
  many, one = runs[0], runs[1]
  result = {
      "benchmark": "tree_cot",
      "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
                  "devices": [str(d) for d in jax.devices()]},
      "versions": {"python": platform.python_version(), "jax": jax.__version__},
      "settings": {**{k: v for k, v in vars(args).items() if k != "out"}, "config": "configs/tiny_reasoner_tree.py",
                   "tree": config.tree.to_dict()},
      "runs": runs, "speedup_many_over_one": many["trees_per_s"] / one["trees_per_s"], "checks": checks,
  }
  jsonl.write_json(args.out, result)
  print(f"{'run':<28} {'trees/s':>8} {'rollouts/s':>11} {'gen tok/s':>10} {'prefill computed':>18} {'wall s':>8}")
  for r in runs:
    print(f"{r['name']:<28} {r['trees_per_s']:8.3f} {r['rollouts_per_s']:11.2f} {r['generated_tokens_per_s']:10.1f} "
          f"{r['prefill_tokens_computed']:>8}/{r['prompt_tokens']:<9} {r['wall_s']:8.1f}")
  print(f"speedup (many trees / one at a time): {result['speedup_many_over_one']:.2f}x", "\nchecks:", checks,
        "\nwritten:", args.out)


if __name__ == "__main__":
  main()
