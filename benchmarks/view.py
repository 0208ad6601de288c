"""`retro-jax view` at scale: build time, file sizes and browser load time for a large synthetic search output.

Writes a search output of `--records` synthetic records whose traces are ~`--trace_tokens` tokens long (4
characters a token; statuses mixed as in a real run), then in one process:
- reads it with `json.loads` line by line: the floor any report builder pays, and what a user otherwise does;
- builds the report as `retro-jax view` does (records over 100 MB go to chunk files beside the page), timing
  it (wall and CPU time: on a shared machine the CPU time is the idle-machine figure) and its peak memory;
- loads it in headless Chromium (first page in file order, a page sorted by savings, which opens chunks all
  over the file, and one record's permalink), recording the browser's wall time to the rendered view, and the
  wall time on a blank page (the browser's own start-up, to subtract);
- optionally (`--single_file_mb`) the same records inlined in one HTML file, for the size and load time of
  the self-contained variant.

    python benchmarks/view.py --out benchmarks/results/view_cpu.json                # 10,000 x 10k tokens
    python benchmarks/view.py --records 200 --trace_tokens 2000 --out /tmp/view.json  # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from retro_jax import jsonl  # noqa: E402
from retro_jax.view import browser, report  # noqa: E402

CHARS_PER_TOKEN = 4
_WORDS = ("so", "the", "sum", "is", "we", "get", "then", "x", "=", "<", "&", "\\frac{a}{b}", "$", "+", "2", "17",
          "check", "factor", "term", "root", "n", "because", "each", "side", "gives", "which", "means", "value")
_SWITCHES = ("Wait,", "Alternatively,", "Hmm,", "But wait,", "Let me check")


def _step_pool(rng: random.Random, size: int = 4000) -> list[str]:
  """Steps of ~40 to ~110 tokens; one in eight opens a new thought."""
  pool = []
  for _ in range(size):
    words = rng.choices(_WORDS, k=rng.randint(30, 90))
    if rng.random() < 0.125:
      words.insert(0, rng.choice(_SWITCHES))
    pool.append(" ".join(words) + ".")
  return pool


def _trace(steps: list[str], answer: str) -> str:
  return "<think>\n" + "\n\n".join(steps) + f"\n</think>\n\nThe answer is \\boxed{{{answer}}}."


def write_synthetic_output(path: str, records: int, trace_tokens: int, seed: int = 0) -> None:
  rng = random.Random(seed)
  pool = _step_pool(rng)
  plain = [step for step in pool if not step.startswith(_SWITCHES)]  # a rollout never opens with a switch
  target_chars = trace_tokens * CHARS_PER_TOKEN
  with open(path, "w", encoding="utf-8") as file:
    for i in range(records):
      status = rng.choices(("revised", "unchanged", "skipped_incorrect", "error"), (45, 40, 10, 5))[0]
      if status == "error":
        file.write(json.dumps({"id": f"r{i}", "status": "error", "reason": "empty trace", "row": i}) + "\n")
        continue
      steps, size = [], 0
      while size < target_chars:
        steps.append(rng.choice(pool))
        size += len(steps[-1]) + 2
      switches = [b for b in range(1, len(steps)) if steps[b].startswith(_SWITCHES)] or [len(steps) // 2]
      answer = str(rng.randint(0, 999))
      original = _trace(steps, answer)
      revised, accepted, steps_after = original, [], len(steps)
      if status == "revised":
        cut = rng.choice(switches)
        new = [rng.choice(plain) for _ in range(rng.randint(1, max(1, (len(steps) - cut) // 2)))]
        revised, accepted, steps_after = _trace(steps[:cut] + new, answer), [cut], cut + len(new)
      record = {"id": f"r{i}", "question": f"Problem {i}: find x when x < {i} & x^2 = {answer}.", "answer": answer,
                "trace": original, "revised_trace": revised, "status": status, "reason": None,
                "tokens_before": len(original) // CHARS_PER_TOKEN, "tokens_after": len(revised) // CHARS_PER_TOKEN,
                "steps_before": len(steps), "steps_after": steps_after,
                "accepted_boundaries": accepted}
      file.write(json.dumps(record, ensure_ascii=False) + "\n")


def _browser_load(page: str, fragment: str, timeout_s: float = 300) -> dict:
  """Chromium's wall time to load `page` at `fragment` and dump the DOM once the view is rendered. (The page's
  own clock is not used: under --virtual-time-budget it runs on virtual time.)"""
  started = time.perf_counter()
  try:
    dom = browser.dump_dom(browser.file_url(page, fragment), budget_ms=60_000, timeout_s=timeout_s)
  except RuntimeError as error:  # a page too large to load is a result, not a crash of the benchmark
    return {"view": fragment or "first page", "browser_wall_s": round(time.perf_counter() - started, 2),
            "ready": False, "error": str(error)[:300]}
  wall = time.perf_counter() - started
  body = dom[dom.find("<body"):dom.find(">", dom.find("<body")) + 1]
  return {"view": fragment or "first page", "browser_wall_s": round(wall, 2), "ready": 'data-ready="1"' in body,
          "records_shown": int(body.split('data-shown="')[1].split('"')[0]) if "data-shown" in body else 0}


def _blank_page_wall(work: str) -> float:
  """Chromium's wall time on an empty page: its start-up and shut-down, the part of a load not due to the page."""
  blank = os.path.join(work, "blank.html")
  with open(blank, "w", encoding="utf-8") as file:
    file.write("<!DOCTYPE html><html><body data-ready=1></body></html>")
  return min(_browser_load(blank, "")["browser_wall_s"] for _ in range(2))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--records", type=int, default=10_000)
  parser.add_argument("--trace_tokens", type=int, default=10_000)
  parser.add_argument("--single_file_mb", type=float, default=0,
                      help="also build the one-file variant when its data is at most this many MB (0: skip)")
  parser.add_argument("--workdir", default="", help="where the synthetic output and reports go (default: a tmp dir)")
  parser.add_argument("--out", default="benchmarks/results/view_cpu.json")
  args = parser.parse_args()
  work = args.workdir or tempfile.mkdtemp(prefix="retro_view_bench_")
  os.makedirs(work, exist_ok=True)
  source = os.path.join(work, "search.jsonl")
  started = time.perf_counter()
  write_synthetic_output(source, args.records, args.trace_tokens)
  result = {
      "benchmark": "view",
      "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "chromium": _chromium_version(),
                  "load_average_at_start": os.getloadavg()},
      "versions": {"python": platform.python_version()},
      "settings": {"records": args.records, "trace_tokens": args.trace_tokens, "chars_per_token": CHARS_PER_TOKEN,
                   "chunk_bytes": report.CHUNK_BYTES, "max_inline_bytes": report.DEFAULT_MAX_INLINE_BYTES,
                   "records_per_page": report.RECORDS_PER_PAGE},
      "input": {"bytes": os.path.getsize(source), "write_s": round(time.perf_counter() - started, 1)},
  }
  started = time.perf_counter()
  lines = sum(1 for _ in jsonl.read_jsonl(source))
  result["peer_read_jsonl_s"] = round(time.perf_counter() - started, 2)
  page = os.path.join(work, "report.html")
  cpu_before = _cpu_seconds()
  built = report.build_report(source, page)
  result["build"] = {"seconds": round(built.build_seconds, 2), "cpu_seconds": round(_cpu_seconds() - cpu_before, 2),
                     "records": built.records, "lines": lines,
                     "html_bytes": built.html_bytes, "data_bytes": built.data_bytes, "chunks": built.chunks,
                     "out_of_line": built.data_dir is not None,
                     "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
  print(json.dumps(result, indent=2), flush=True)
  result["browser_blank_page_wall_s"] = _blank_page_wall(work)
  result["browser"] = [_browser_load(page, view) for view in ("", "sort=tokens_saved", f"record=r{args.records // 2}")]
  if args.single_file_mb and built.data_bytes <= args.single_file_mb * 2**20:
    single = os.path.join(work, "single.html")
    cpu_before = _cpu_seconds()
    one = report.build_report(source, single, max_inline_bytes=built.data_bytes + 1)
    result["single_file"] = {"seconds": round(one.build_seconds, 2), "cpu_seconds": round(_cpu_seconds() - cpu_before, 2),
                             "html_bytes": one.html_bytes,
                             "browser": [_browser_load(single, "")]}
  result["machine"]["load_average_at_end"] = os.getloadavg()  # other work on the machine slows every figure
  jsonl.write_json(args.out, result)
  print(json.dumps(result, indent=2))


def _cpu_seconds() -> float:
  """User + system CPU time of this process: the build's wall time on an idle core (it is single-threaded),
  whatever else the machine is running."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _chromium_version() -> str:
  import subprocess  # pylint: disable=import-outside-toplevel
  try:
    return subprocess.run([browser.chromium_path(), "--version"], capture_output=True, text=True,
                          check=False).stdout.strip()
  except browser.BrowserMissing:
    return "missing"


if __name__ == "__main__":
  main()
