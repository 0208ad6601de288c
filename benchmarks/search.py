"""Retro-Search throughput and the two [ext] savings, measured where both can fire.

The workload is long traces with many thought switches and a reviser whose rollouts never finish, which is
where the savings matter: a rollout that runs on past the current suffix cannot win, so the length bound stops
it there; and every boundary of a record prefills a longer prefix of the same trace, so prefix reuse computes
each token once instead of once per boundary. The bundled tiny reasoner's 75-token traces exercise neither.

- Traces: synthetic, built here from a seed (question, gold answer, `--steps` reasoning steps of which
  `--switches` open with a transition keyword, a boxed answer); each is >= 1,000 tokens of the tokenizer.
- Reviser: a random-weight Qwen2 of `--shape` ("tiny": the bundled reasoner's architecture, d 192 / 4 layers;
  "qwen2.5-0.5b": that architecture) with the bundled reasoner's tokenizer (406 ids) and no EOS token, so
  every rollout runs to its token budget and is graded R = 0: the search keeps every original trace.
- The four combinations (prefix reuse on/off x length-bounded rollouts on/off) share one compiled engine, each
  with its own driver (its own prefix cache). Untimed warm-up first: the engine's decode programs for every
  attention bucket, then a pass over the same records with 16-token rollouts per reuse setting (the prefill
  programs, reused-prefix ones included).

Checks, over every rollout (keyed by its request's seed and prompt):
- prefix reuse changes no sampled token (reused KV must equal recomputed KV up to float rounding);
- a bounded rollout is the start of the same unbounded rollout (the bound only cuts, it never changes a token);
- the output records are the same in all four runs.

records/s is wall-clock on whatever else the machine runs: the JSON records os.getloadavg() before and after.

    python benchmarks/search.py --out benchmarks/results/search_cpu.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import sys
import tempfile
import time
from importlib import metadata

import jax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from retro_jax import demo  # noqa: E402
from retro_jax.engine.driver import Driver  # noqa: E402
from retro_jax.engine.qwen2_engine import Qwen2Engine  # noqa: E402
from retro_jax.grading import Grader  # noqa: E402
from retro_jax.jsonl import write_json  # noqa: E402
from retro_jax.models.config import Qwen2Config, shape_config  # noqa: E402
from retro_jax.models.qwen2 import Qwen2ForCausalLM  # noqa: E402
from retro_jax.search import runner, traces  # noqa: E402
from retro_jax.search.retro_search import SearchConfig  # noqa: E402
from retro_jax.tokenization import load_tokenizer  # noqa: E402

_OPENERS = ("First", "Next", "Then", "So", "Now", "Here", "Also", "Therefore")
_SWITCHES = ("Wait", "Alternatively", "Hmm", "Hold on", "However", "Actually", "Let me check", "But wait")


def synthetic_record(index: int, steps: int, switches: int, rng: random.Random) -> dict:
  """A correct trace of `steps` steps, `switches` of them (never step 0) opening a new thought."""
  a, b = rng.randrange(100, 1000), rng.randrange(100, 1000)
  switch_at = set(rng.sample(range(1, steps), switches))
  body = []
  for i in range(steps):
    x, y = rng.randrange(10, 100), rng.randrange(10, 100)
    opener = rng.choice(_SWITCHES) + "," if i in switch_at else rng.choice(_OPENERS)
    body.append(f"{opener} the partial sum {x} plus {y} is {x + y}; the units digit {(x + y) % 10} stays and I "
                f"carry into the next column of {a} plus {b}.")
  trace = "<think>\n" + "\n\n".join(body) + f"\n</think>\n\nThe sum is \\boxed{{{a + b}}}."
  return {"id": f"long-{index}", "question": f"What is {a} + {b}?", "answer": str(a + b), "trace": trace}


class RecordingGenerator:
  """Passes a driver through and keeps every rollout's tokens, keyed by (seed, prompt), for the checks."""

  def __init__(self, driver: Driver):
    self.driver = driver
    self.rollouts: dict[tuple[int, tuple[int, ...]], list[tuple[int, ...]]] = {}

  def encode(self, text):
    return self.driver.encode(text)

  def decode(self, tokens):
    return self.driver.decode(tokens)

  def generate(self, requests):
    raise NotImplementedError("the search only streams")

  def stream(self, queue):
    for result in self.driver.stream(queue):
      key = (result.request.seed, result.request.prompt_tokens)
      self.rollouts[key] = [sample.tokens for sample in result.samples]
      yield result


def _model(args, vocab_size: int) -> Qwen2ForCausalLM:
  changes = dict(vocab_size=vocab_size, max_position_embeddings=args.max_seq_len, eos_token_ids=())
  if args.shape == "tiny":
    config = Qwen2Config.from_pretrained(demo.DEFAULT_MODEL).replace(**changes)
  else:
    config = shape_config(args.shape, **changes)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Qwen2ForCausalLM(config, nnx.Rngs(args.seed))))
  return nnx.merge(graphdef, jax.jit(lambda: nnx.state(Qwen2ForCausalLM(config, nnx.Rngs(args.seed))))())


def _search(engine, tokenizer, grader, records_path, out, config, *, prefix_reuse: bool):
  driver = Driver(engine, tokenizer, prefix_cache_bytes=(1 << 30) if prefix_reuse else 0, progress=False)
  recorder = RecordingGenerator(driver)
  rows, total = runner.open_input(records_path)
  start = time.perf_counter()
  summary = runner.run_search(rows, generator=recorder, render_prompt=tokenizer.render_prompt, grader=grader,
                              output_path=out, total=total, config=config, progress=False)
  return time.perf_counter() - start, summary, driver.stats, recorder.rollouts


def _is_start_of(bounded: dict, unbounded: dict) -> bool:
  return bounded.keys() == unbounded.keys() and all(
      len(b) <= len(u) and u[:len(b)] == b
      for key in bounded for b, u in zip(bounded[key], unbounded[key], strict=True))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", default="tiny", choices=("tiny", "qwen2.5-0.5b"))
  parser.add_argument("--num_records", type=int, default=8)
  parser.add_argument("--steps", type=int, default=12, help="reasoning steps per trace")
  parser.add_argument("--switches", type=int, default=10, help="steps that open a new thought (boundaries)")
  parser.add_argument("--rollouts_per_boundary", type=int, default=2)
  parser.add_argument("--max_rollout_tokens", type=int, default=1024)
  parser.add_argument("--max_seq_len", type=int, default=4096)
  parser.add_argument("--slots", type=int, default=16)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="runs/benchmarks/search.json")
  args = parser.parse_args()
  load_before = os.getloadavg()
  tokenizer = load_tokenizer(demo.DEFAULT_MODEL)
  rng = random.Random(args.seed)
  timed = [synthetic_record(i, args.steps, args.switches, rng) for i in range(args.num_records)]
  trace_tokens = [len(tokenizer.encode(r["trace"])) for r in timed]
  switches = [traces.count_thoughts(traces.parse_trace(r["trace"]), traces.DEFAULT_KEYWORDS) - 1 for r in timed]
  model = _model(args, len(tokenizer.hf))
  engine = Qwen2Engine(model, max_concurrent_decodes=args.slots, max_seq_len=args.max_seq_len, eos_token_ids=())
  config = dict(max_rollout_tokens=args.max_rollout_tokens, value_unit="tokens",
                rollouts_per_boundary=args.rollouts_per_boundary, seed=args.seed)
  runs, rollouts, outputs = [], {}, {}
  with tempfile.TemporaryDirectory() as work, Grader() as grader:
    def write(name, rows):
      path = os.path.join(work, name)
      with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
      return path

    timed_path = write("timed.jsonl", timed)
    Driver(engine, tokenizer, prefix_cache_bytes=0, progress=False).warmup(prefill_lengths=engine.prefill_buckets[:1])
    for reuse in (True, False):
      _search(engine, tokenizer, grader, timed_path, os.path.join(work, f"warmup{reuse}.jsonl"),
              SearchConfig(**{**config, "max_rollout_tokens": 16}), prefix_reuse=reuse)
    for reuse in (True, False):
      for bound in (True, False):
        out = os.path.join(work, f"search_reuse{int(reuse)}_bound{int(bound)}.jsonl")
        wall, summary, stats, rollouts[(reuse, bound)] = _search(
            engine, tokenizer, grader, timed_path, out, SearchConfig(**config, length_bounded_rollouts=bound),
            prefix_reuse=reuse)
        outputs[(reuse, bound)] = {  # by id: records finish in a different order in each run
            r["id"]: {k: v for k, v in r.items() if k not in ("rollouts", "tokens_generated")}
            for r in map(json.loads, open(out, encoding="utf-8"))}
        n = summary["records"]
        runs.append({
            "prefix_reuse": reuse, "length_bounded_rollouts": bound, "wall_s": round(wall, 2),
            "records": n, "records_per_s": round(n / wall, 4), "rollouts": summary["rollouts"],
            "generated_tokens_per_record": summary["tokens_generated"] / n,
            "prompt_tokens": stats.prompt_tokens, "prefill_tokens_computed": stats.prompt_tokens_computed,
            "prefill_s": round(stats.prefill_seconds, 2), "decode_s": round(stats.decode_seconds, 2),
            "statuses": {s: summary[s] for s in ("revised", "unchanged", "skipped_incorrect", "error")},
        })
  by_key = {(r["prefix_reuse"], r["length_bounded_rollouts"]): r for r in runs}
  checks = {
      "prefix_reuse_changes_no_rollout": all(rollouts[(True, b)] == rollouts[(False, b)] for b in (True, False)),
      "bounded_rollouts_are_starts_of_unbounded": all(_is_start_of(rollouts[(r, True)], rollouts[(r, False)])
                                                      for r in (True, False)),
      "outputs_equal_across_runs": all(o == outputs[(True, True)] for o in outputs.values()),
  }
  savings = {
      "prefill_tokens_computed_without_over_with_reuse": {
          f"bound_{b}": by_key[(False, b)]["prefill_tokens_computed"] / by_key[(True, b)]["prefill_tokens_computed"]
          for b in (True, False)},
      "generated_tokens_per_record_without_over_with_bound": {
          f"reuse_{r}": by_key[(r, False)]["generated_tokens_per_record"]
                        / by_key[(r, True)]["generated_tokens_per_record"] for r in (True, False)},
      "records_per_s_both_on_over_both_off": by_key[(True, True)]["records_per_s"]
                                             / by_key[(False, False)]["records_per_s"],
  }
  result = {
      "benchmark": "retro_search", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                  "devices": [str(d) for d in jax.devices()],
                  "loadavg_1_5_15min_before": load_before, "loadavg_1_5_15min_after": os.getloadavg()},
      "versions": {"python": platform.python_version(), "jax": jax.__version__, "flax": metadata.version("flax")},
      "settings": {k: v for k, v in vars(args).items() if k != "out"},
      "workload": {"reviser": f"random-weight Qwen2, shape {args.shape}, vocab {len(tokenizer.hf)}, no EOS",
                   "trace_tokens_min_mean_max": [min(trace_tokens), sum(trace_tokens) / len(trace_tokens),
                                                 max(trace_tokens)],
                   "thought_switches_min_max": [min(switches), max(switches)]},
      "runs": runs, "savings": savings, "checks": checks,
  }
  write_json(args.out, result)
  print(f"{'reuse':>6} {'bound':>6} {'rec/s':>8} {'gen tok/rec':>12} {'prefill computed / prompt':>26} {'wall s':>8}")
  for r in runs:
    print(f"{r['prefix_reuse']!s:>6} {r['length_bounded_rollouts']!s:>6} {r['records_per_s']:8.3f} "
          f"{r['generated_tokens_per_record']:12.1f} {r['prefill_tokens_computed']:>12}/{r['prompt_tokens']:<13} "
          f"{r['wall_s']:8.1f}")
  print("savings:", json.dumps(savings), "\nchecks:", checks, "\nwritten:", args.out)


if __name__ == "__main__":
  main()
