"""Metrics of the field's evaluation protocol, computed from per-sample outcomes.

Every number is computed from the rows of the per-sample JSONL (see `runner.py`), never kept in memory during a
run, so a resumed run reports exactly what an uninterrupted one would. A row is a mapping with at least
`question_id`, `sample_index`, `correct`, `length`, `finish_reason`, `extracted_answer`, `thought_switches`.

- accuracy: mean over questions of (correct samples / samples). With one greedy sample per question this is
  greedy accuracy; with k sampled ones it is pass@1 estimated as the mean over the k samples.
- accuracy_std: the spread of that estimate between runs: the accuracy of sample index j over all questions,
  for j = 0..k-1, then its (population) std. It is 0 with one sample.
- pass@k: the unbiased estimator of Chen et al. (2021), averaged over questions.
- truncation_rate: responses that hit the token budget (finish_reason "length") without a final answer. A
  response that wrote its boxed answer and was cut during the trailing text is answered, not truncated.
- lengths are in the model's own tokens, the unit of the paper's length results.
"""
from __future__ import annotations

import collections
import math
import statistics
from typing import Any, Iterable, Mapping, Sequence

Row = Mapping[str, Any]


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

  Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the binomials (they overflow floats for
  n in the hundreds) and is exact when fewer than k samples are wrong.
  """
  if not 0 <= c <= n:
    raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
  if not 1 <= k <= n:
    raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
  if n - c < k:
    return 1.0
  product = 1.0
  for i in range(n - c + 1, n + 1):
    product *= 1.0 - k / i
  return 1.0 - product


def default_k_values(n: int) -> list[int]:
  """Powers of two up to n, and n itself: the pass@k columns papers report."""
  values = [2**i for i in range(int(math.log2(n)) + 1)] if n >= 1 else []
  return values + ([n] if n not in values else [])


def truncated(row: Row) -> bool:
  return row["finish_reason"] == "length" and row.get("extracted_answer") is None


def group_by_question(rows: Iterable[Row]) -> dict[str, list[Row]]:
  groups: dict[str, list[Row]] = collections.defaultdict(list)
  for row in rows:
    groups[str(row["question_id"])].append(row)
  return dict(groups)


def accuracy_with_std(groups: Mapping[str, Sequence[Row]]) -> tuple[float, float]:
  """(mean over questions of the fraction correct, std over sample indices of the per-index accuracy)."""
  accuracy = statistics.fmean(sum(bool(r["correct"]) for r in g) / len(g) for g in groups.values())
  by_index: dict[int, list[bool]] = collections.defaultdict(list)
  for group in groups.values():
    for row in group:
      by_index[int(row["sample_index"])].append(bool(row["correct"]))
  per_index = [statistics.fmean(v) for _, v in sorted(by_index.items())]
  return accuracy, (statistics.pstdev(per_index) if len(per_index) > 1 else 0.0)


def mode_metrics(rows: Sequence[Row], k_values: Sequence[int] | None = None) -> dict[str, Any]:
  """Metrics of one decoding mode (all greedy rows, or all sampled rows) of one benchmark.

  `pass_at_k` holds every k in `k_values` (default: powers of two up to the samples per question) that is at
  most the smallest number of samples any question has.
  """
  if not rows:
    raise ValueError("no rows to summarise")
  groups = group_by_question(rows)
  n_min = min(len(g) for g in groups.values())
  accuracy, accuracy_std = accuracy_with_std(groups)
  wanted = default_k_values(n_min) if k_values is None else k_values
  pass_k = {str(k): statistics.fmean(pass_at_k(len(g), sum(bool(r["correct"]) for r in g), k)
                                     for g in groups.values())
            for k in sorted(set(wanted)) if 1 <= k <= n_min}
  lengths = [int(r["length"]) for r in rows]
  return {
      "num_questions": len(groups),
      "num_samples": len(rows),
      "samples_per_question": n_min,
      "accuracy": accuracy,
      "accuracy_std": accuracy_std,
      "pass_at_k": pass_k,
      "mean_length": statistics.fmean(lengths),
      "median_length": float(statistics.median(lengths)),
      "truncation_rate": statistics.fmean(truncated(r) for r in rows),
      "no_answer_rate": statistics.fmean(r.get("extracted_answer") is None for r in rows),
      "mean_thought_switches": statistics.fmean(int(r["thought_switches"]) for r in rows),
      "grading_timeouts": sum(r.get("grade_status") == "timeout" for r in rows),
      "grading_parse_errors": sum(r.get("grade_status") == "parse_error" for r in rows),
  }


def benchmark_metrics(rows: Iterable[Row], k_values: Sequence[int] | None = None) -> dict[str, dict[str, Any]]:
  """Per-mode metrics of one benchmark: `{"greedy": {...}, "sampled": {...}}` for the modes present."""
  by_mode: dict[str, list[Row]] = collections.defaultdict(list)
  for row in rows:
    by_mode[row["mode"]].append(row)
  return {mode: mode_metrics(mode_rows, k_values) for mode, mode_rows in sorted(by_mode.items())}


COUNT_KEYS = frozenset({"num_questions", "num_samples", "grading_timeouts", "grading_parse_errors"})


def average_metrics(per_benchmark: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Macro average (each benchmark weighs the same, as in the papers' "average" column) of every numeric
  metric that all the given benchmark summaries share, nested dicts (modes, pass@k) included; counts are
  summed instead."""
  if not per_benchmark:
    return {}
  average: dict[str, Any] = {}
  for key in per_benchmark[0]:
    values = [summary.get(key) for summary in per_benchmark]
    if all(isinstance(v, Mapping) for v in values):
      nested = average_metrics(values)
      if nested:
        average[key] = nested
    elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
      average[key] = sum(values) if key in COUNT_KEYS else statistics.fmean(values)
  return average
