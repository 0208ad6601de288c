"""Retro-Search throughput: records/s and tokens generated per record, with and without the two [ext] savings.

Runs the same input through the search four times (prefix reuse on/off x length-bounded rollouts on/off) in one
process and writes JSON with the machine, versions, settings and figures. It also checks the claims behind the
extensions: prefix reuse must not change any output (same revised traces, same sampled tokens), and with the
value in tokens the length bound must not change which candidate wins.

    python benchmarks/search.py --out runs/benchmarks/search_cpu.json            # bundled tiny reasoner
    python benchmarks/search.py --model DIR --records traces.jsonl --value_unit tokens
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from retro_jax import demo  # noqa: E402
from retro_jax.engine.serving import load_text_generator  # noqa: E402
from retro_jax.grading import Grader  # noqa: E402
from retro_jax.search import generate, runner  # noqa: E402
from retro_jax.search.retro_search import SearchConfig  # noqa: E402
from retro_jax.tasks.arithmetic import make_splits  # noqa: E402
from retro_jax.tokenization import load_tokenizer  # noqa: E402


def _write_problems(path: str, n: int, seed: int) -> None:
  _, problems = make_splits(seed, 0, n)
  with open(path, "w", encoding="utf-8") as f:
    for p in problems:
      f.write(json.dumps(p.to_record()) + "\n")


def _sample_traces(args, work: str, grader, tokenizer) -> str:
  """Traces of the model itself on fresh problems (what self-improvement searches)."""
  problems = os.path.join(work, "problems.jsonl")
  _write_problems(problems, args.num_records, args.seed)
  traces = os.path.join(work, "traces.jsonl")
  generator = load_text_generator(args.model, max_concurrent_decodes=args.slots, max_seq_len=args.max_seq_len,
                                  progress=False)
  rows, total = runner.open_input(problems, "train", "")
  generate.run_generate(rows, generator=generator, render_prompt=tokenizer.render_prompt, grader=grader,
                        output_path=traces, total=total, progress=False,
                        config=generate.GenerateConfig(num_samples=1, max_new_tokens=args.max_new_tokens,
                                                       seed=args.seed))
  return traces


def _run(args, traces: str, grader, tokenizer, *, prefix_reuse: bool, length_bound: bool, work: str) -> dict:
  generator = load_text_generator(args.model, max_concurrent_decodes=args.slots, max_seq_len=args.max_seq_len,
                                  prefix_cache_bytes=(256 << 20) if prefix_reuse else 0, progress=False)
  config = SearchConfig(max_rollout_tokens=args.max_new_tokens, value_unit=args.value_unit,
                        length_bounded_rollouts=length_bound, seed=args.seed)
  out = os.path.join(work, f"search_reuse{int(prefix_reuse)}_bound{int(length_bound)}.jsonl")
  rows, total = runner.open_input(traces, "train", "")
  warm_rows, _ = runner.open_input(traces, "train", "")  # one warm-up record: compile outside the timing
  runner.run_search(warm_rows, generator=generator, render_prompt=tokenizer.render_prompt, grader=grader,
                    output_path=out + ".warmup", config=config, limit=1, progress=False)
  stats_before = dict(vars(generator.stats))
  start = time.perf_counter()
  summary = runner.run_search(rows, generator=generator, render_prompt=tokenizer.render_prompt, grader=grader,
                              output_path=out, total=total, config=config, progress=False)
  wall = time.perf_counter() - start
  stats = {k: v - stats_before[k] for k, v in vars(generator.stats).items()}
  records = [json.loads(line) for line in open(out, encoding="utf-8")]
  return {
      "prefix_reuse": prefix_reuse, "length_bounded_rollouts": length_bound, "wall_s": wall,
      "records": len(records), "records_per_s": len(records) / wall,
      "rollouts": summary["rollouts"], "tokens_generated_per_record": summary["tokens_generated"] / len(records),
      "prompt_tokens": stats["prompt_tokens"], "prefill_tokens_computed": stats["prompt_tokens_computed"],
      "revised": summary["revised"], "tokens_after_mean": summary["tokens_after_mean"],
      "outputs": {r["id"]: r["revised_trace"] for r in records},
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default=demo.DEFAULT_MODEL)
  parser.add_argument("--records", default="", help="trace records JSONL; default: sample the model's own")
  parser.add_argument("--num_records", type=int, default=128)
  parser.add_argument("--slots", type=int, default=32)
  parser.add_argument("--max_new_tokens", type=int, default=320)
  parser.add_argument("--max_seq_len", type=int, default=512)
  parser.add_argument("--value_unit", default="tokens", choices=("tokens", "steps"))
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="runs/benchmarks/search.json")
  args = parser.parse_args()
  tokenizer = load_tokenizer(args.model)
  with tempfile.TemporaryDirectory() as work, Grader() as grader:
    traces = args.records or _sample_traces(args, work, grader, tokenizer)
    runs = [_run(args, traces, grader, tokenizer, prefix_reuse=reuse, length_bound=bound, work=work)
            for reuse in (True, False) for bound in (True, False)]
  by_key = {(r["prefix_reuse"], r["length_bounded_rollouts"]): r for r in runs}
  checks = {
      # Prefix reuse must not change a single output.
      "prefix_reuse_changes_no_output": all(by_key[(True, b)]["outputs"] == by_key[(False, b)]["outputs"]
                                            for b in (True, False)),
  }
  if args.value_unit == "tokens":  # the spec's guarantee holds for the token unit only
    checks["length_bound_keeps_the_winners"] = by_key[(True, True)]["outputs"] == by_key[(True, False)]["outputs"]
  for r in runs:
    del r["outputs"]
  result = {
      "benchmark": "retro_search", "machine": {"platform": platform.platform(), "processor": platform.processor(),
                                               "cpu_count": os.cpu_count(), "devices": [str(d) for d in jax.devices()]},
      "versions": {"python": platform.python_version(), "jax": jax.__version__},
      "settings": {k: v for k, v in vars(args).items() if k != "out"}, "runs": runs, "checks": checks,
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  print(f"{'reuse':>6} {'bound':>6} {'rec/s':>8} {'gen tok/rec':>12} {'prefill computed':>17} {'wall s':>8}")
  for r in runs:
    print(f"{r['prefix_reuse']!s:>6} {r['length_bounded_rollouts']!s:>6} {r['records_per_s']:8.2f} "
          f"{r['tokens_generated_per_record']:12.1f} {r['prefill_tokens_computed']:>8}/{r['prompt_tokens']:<8} "
          f"{r['wall_s']:8.1f}")
  print("checks:", checks, "\nwritten:", args.out)


if __name__ == "__main__":
  main()
