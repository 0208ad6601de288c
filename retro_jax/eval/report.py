"""Summaries, markdown tables and plots of evaluation runs, alone or side by side.

A summary JSON is self-contained (metrics per benchmark and mode, the seven-benchmark average, the response
lengths behind the histograms), so `retro-jax eval --compare a.json b.json` needs nothing but the JSON files:
this is how "before and after Retro-Search SFT" is shown. Plots go through matplotlib's object API on the Agg
canvas (no pyplot, no display, no global backend switch), so they render the same on a headless TPU VM, in CI
and inside a notebook.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

from retro_jax.eval import benchmarks as benchmarks_lib
from retro_jax.eval import metrics

SUMMARY_FILE = "summary.json"
TABLE_FILE = "results.md"
ACCURACY_PLOT_FILE = "accuracy_vs_length.png"
HISTOGRAM_PLOT_FILE = "length_histogram.png"
COMPARISON_PREFIX = "comparison"
_MISSING = "–"


def _spec_info(name: str) -> tuple[str, bool]:
  try:
    spec = benchmarks_lib.get_spec(name)
    return spec.display_name, spec.in_average
  except benchmarks_lib.BenchmarkError:
    return name, False


def headline_mode(entry: Mapping[str, Any]) -> str:
  """The mode whose numbers lead a report: the k-sample run when there is one (the field's pass@1)."""
  return "sampled" if "sampled" in entry else "greedy"


def build_summary(rows_by_benchmark: Mapping[str, Sequence[Mapping[str, Any]]], *, name: str,
                  config: Mapping[str, Any] | None = None, wall_time_s: float | None = None) -> dict[str, Any]:
  """The summary of one run from its per-sample rows (benchmarks without rows are left out)."""
  entries: dict[str, dict[str, Any]] = {}
  lengths: dict[str, list[int]] = {}
  for benchmark, rows in rows_by_benchmark.items():
    if not rows:
      continue
    display_name, in_average = _spec_info(benchmark)
    entry = {"display_name": display_name, "in_average": in_average, **metrics.benchmark_metrics(rows)}
    entries[benchmark] = entry
    lengths[benchmark] = [int(r["length"]) for r in rows if r["mode"] == headline_mode(entry)]
  summary: dict[str, Any] = {"name": name, "config": dict(config or {}), "benchmarks": entries}
  average = field_average(entries)
  if average:
    summary["average"] = average
  if wall_time_s is not None:
    summary["wall_time_s"] = wall_time_s  # of the last (possibly resumed) session only
  summary["lengths"] = lengths
  return summary


def field_average(entries: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  """Macro average over the field benchmarks present (`{}` when none is): the "Average" row of a table."""
  names = [b for b in benchmarks_lib.FIELD_BENCHMARKS if b in entries]
  if not names:
    return {}
  modes = [{m: entries[b][m] for m in ("greedy", "sampled") if m in entries[b]} for b in names]
  return {"benchmarks": names, **metrics.average_metrics(modes)}


def _average_label(average: Mapping[str, Any]) -> str:
  count, total = len(average["benchmarks"]), len(benchmarks_lib.FIELD_BENCHMARKS)
  return f"**Average ({total})**" if count == total else f"**Average ({count} of {total})**"


def _percent(value: float | None) -> str:
  return _MISSING if value is None else f"{100 * value:.1f}"


def _number(value: float | None, digits: int = 0) -> str:
  return _MISSING if value is None else f"{value:.{digits}f}"


def _get(entry: Mapping[str, Any] | None, mode: str, key: str) -> Any:
  if entry is None or mode not in entry:
    return None
  return entry[mode].get(key)


def _headline(entry: Mapping[str, Any] | None, key: str) -> Any:
  return None if entry is None else _get(entry, headline_mode(entry), key)


def markdown_table(summary: Mapping[str, Any]) -> str:
  """Benchmarks x metrics of one run, with the seven-benchmark average as the last row."""
  rows = [(entry["display_name"], entry) for entry in summary["benchmarks"].values()]
  if "average" in summary:
    rows.append((_average_label(summary["average"]), summary["average"]))
  has_greedy = any("greedy" in e for _, e in rows)
  has_sampled = any("sampled" in e for _, e in rows)
  k = summary.get("config", {}).get("k") or max((_get(e, "sampled", "samples_per_question") or 1) for _, e in rows)
  header = ["Benchmark", "N"] + (["Greedy acc"] if has_greedy else [])
  if has_sampled:
    header += [f"pass@1 (k={k})"] + ([f"pass@{k}"] if k > 1 else [])
  header += ["Mean len", "Median len", "Trunc. %", "Switches"]
  lines = [f"### {summary['name']}", "", "| " + " | ".join(header) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
  for label, entry in rows:
    cells = [label, _number(_headline(entry, "num_questions"))]
    if has_greedy:
      cells.append(_percent(_get(entry, "greedy", "accuracy")))
    if has_sampled:
      accuracy, std = _get(entry, "sampled", "accuracy"), _get(entry, "sampled", "accuracy_std")
      cells.append(_MISSING if accuracy is None else f"{100 * accuracy:.1f} ± {100 * std:.1f}")
      if k > 1:
        cells.append(_percent((_get(entry, "sampled", "pass_at_k") or {}).get(str(k))))
    cells += [_number(_headline(entry, "mean_length")), _number(_headline(entry, "median_length")),
              _percent(_headline(entry, "truncation_rate")), _number(_headline(entry, "mean_thought_switches"), 2)]
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", _legend(summary.get("config", {}), has_sampled)]
  return "\n".join(lines) + "\n"


def _legend(config: Mapping[str, Any], has_sampled: bool) -> str:
  parts = ["Accuracies in %."]
  if has_sampled:
    sampling = (f" (temperature {config['temperature']}, top-p {config['top_p']})"
                if "temperature" in config else "")
    parts.append(f"pass@1: mean over k samples{sampling} ± std over samples; pass@k unbiased (Chen et al., 2021).")
  parts.append("Lengths in model tokens, of the sampled responses when there are any. "
               "Trunc.: budget reached without an answer. Switches: thought switches per response.")
  return " ".join(parts)


def _unique(names: Sequence[str]) -> list[str]:
  seen: dict[str, int] = {}
  unique = []
  for name in names:
    seen[name] = seen.get(name, 0) + 1
    unique.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
  return unique


def compare_table(summaries: Sequence[Mapping[str, Any]], names: Sequence[str] | None = None) -> str:
  """Runs side by side: per benchmark, each run's accuracy, mean length, switches and truncation, with the change
  of every later run against the first (accuracy in points, length in %). The average row is recomputed over
  the field benchmarks that every run has, so it compares like with like."""
  if not summaries:
    raise ValueError("nothing to compare")
  names = _unique(list(names) if names else [s["name"] for s in summaries])
  if len(names) != len(summaries):
    raise ValueError(f"{len(names)} names for {len(summaries)} runs")
  order = list(dict.fromkeys(b for s in summaries for b in s["benchmarks"]))
  rows = [(_display(summaries, b), [s["benchmarks"].get(b) for s in summaries]) for b in order]
  shared = {b: None for b in order if all(b in s["benchmarks"] for s in summaries)}
  averages = [field_average({b: s["benchmarks"][b] for b in shared}) for s in summaries]
  if averages[0]:
    rows.append((_average_label(averages[0]), averages))

  def every_run_has(mode: str) -> bool:
    return all(any(mode in e for e in s["benchmarks"].values()) for s in summaries)

  columns: list[tuple[str, Any]] = []  # (metric label, getter(entry) -> value)
  if every_run_has("sampled"):
    columns.append(("pass@1", lambda e: _get(e, "sampled", "accuracy")))
  if every_run_has("greedy"):
    columns.append(("Greedy acc", lambda e: _get(e, "greedy", "accuracy")))
  columns += [("Mean len", lambda e: _headline(e, "mean_length")),
              ("Switches", lambda e: _headline(e, "mean_thought_switches")),
              ("Trunc. %", lambda e: _headline(e, "truncation_rate"))]
  formats = {"Mean len": _number, "Switches": lambda v: _number(v, 2)}
  header = ["Benchmark"]
  for label, _ in columns:
    header += [f"{label} {n}" for n in names]
    if label in ("pass@1", "Greedy acc", "Mean len"):
      header += [f"Δ{'%' if label == 'Mean len' else ''} {label} {n}" for n in names[1:]]
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
  for label, entries in rows:
    cells = [label]
    for metric, getter in columns:
      values = [getter(e) for e in entries]
      cells += [formats.get(metric, _percent)(v) for v in values]
      if metric in ("pass@1", "Greedy acc"):
        cells += [_MISSING if None in (v, values[0]) else f"{100 * (v - values[0]):+.1f}" for v in values[1:]]
      elif metric == "Mean len":
        cells += [_MISSING if None in (v, values[0]) or not values[0] else f"{100 * (v / values[0] - 1):+.1f}%"
                  for v in values[1:]]
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "Accuracies in %; Δ: change against the first run (accuracy in points, mean length in %). "
            "Lengths in model tokens."]
  return "\n".join(lines) + "\n"


def _display(summaries: Sequence[Mapping[str, Any]], benchmark: str) -> str:
  return next(s["benchmarks"][benchmark]["display_name"] for s in summaries if benchmark in s["benchmarks"])


def _point(entry: Mapping[str, Any] | None) -> tuple[float, float] | None:
  """(mean length, accuracy in %) of a benchmark entry or average, None when it is missing."""
  accuracy = _headline(entry, "accuracy")
  return None if accuracy is None else (_headline(entry, "mean_length"), 100 * accuracy)


def _arrows(axes, points: Sequence[tuple[float, float] | None]) -> None:
  for start, end in zip(points, points[1:]):
    if start is not None and end is not None:
      axes.annotate("", xy=end, xytext=start, arrowprops={"arrowstyle": "->", "color": "0.6", "lw": 1})


def plot_accuracy_vs_length(summaries: Sequence[Mapping[str, Any]], names: Sequence[str], path: str) -> None:
  """Accuracy against mean response length, one point per benchmark and run; arrows join a benchmark's points
  from each run to the next, so a before/after shift (shorter and more accurate: up and left) reads at once."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  figure = Figure(figsize=(7.5, 5.5))
  axes = figure.add_subplot()
  colors = [f"C{i % 10}" for i in range(len(summaries))]
  order = list(dict.fromkeys(b for s in summaries for b in s["benchmarks"]))
  for benchmark in order:
    points = [_point(s["benchmarks"].get(benchmark)) for s in summaries]
    _arrows(axes, points)
    first = next((point for point in points if point is not None), None)
    if first is not None:
      axes.annotate(_display(summaries, benchmark), first, textcoords="offset points", xytext=(5, 5), fontsize=8)
  _arrows(axes, [_point(s.get("average")) for s in summaries])
  for summary, name, color in zip(summaries, names, colors):
    points = [p for p in map(_point, summary["benchmarks"].values()) if p is not None]
    axes.scatter([x for x, _ in points], [y for _, y in points], color=color, label=name, zorder=3)
    average = _point(summary.get("average"))
    if average is not None:
      axes.scatter([average[0]], [average[1]], color=color, marker="*", s=200, zorder=3, edgecolors="black",
                   label=f"{name} (average)")
  axes.set_xlabel("mean response length (model tokens)")
  axes.set_ylabel("accuracy (%): pass@1, or greedy without samples")
  axes.set_title("Accuracy against response length")
  axes.grid(alpha=0.3)
  axes.legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=120)


def plot_length_histograms(summaries: Sequence[Mapping[str, Any]], names: Sequence[str], path: str) -> None:
  """Response-length histograms, one panel per benchmark, runs overlaid on shared bins with their means."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  order = [b for b in dict.fromkeys(b for s in summaries for b in s.get("lengths", {})) if
           any(s.get("lengths", {}).get(b) for s in summaries)]
  columns = min(3, max(1, len(order)))
  panel_rows = max(1, math.ceil(len(order) / columns))
  figure = Figure(figsize=(4.5 * columns, 3.2 * panel_rows))
  for index, benchmark in enumerate(order):
    axes = figure.add_subplot(panel_rows, columns, index + 1)
    data = [s.get("lengths", {}).get(benchmark) or [] for s in summaries]
    edges = np.histogram_bin_edges(np.concatenate([np.asarray(d, dtype=float) for d in data if d]), bins=30)
    for lengths, name, color_index in zip(data, names, range(len(names))):
      if lengths:
        axes.hist(lengths, bins=edges, alpha=0.5, color=f"C{color_index % 10}", label=name)
        axes.axvline(float(np.mean(lengths)), color=f"C{color_index % 10}", linestyle="--", linewidth=1)
    axes.set_title(_display(summaries, benchmark), fontsize=10)
    axes.set_xlabel("response length (model tokens)", fontsize=8)
    axes.set_ylabel("responses", fontsize=8)
    axes.legend(fontsize=7)
  if not order:
    figure.add_subplot().text(0.5, 0.5, "no responses", ha="center", va="center")
  figure.tight_layout()
  figure.savefig(path, dpi=100)


def write_report(summary: Mapping[str, Any], output_dir: str, *, print_table: bool = True) -> dict[str, str]:
  """Writes the summary JSON, the markdown table and both plots of one run; returns their paths by kind."""
  os.makedirs(output_dir, exist_ok=True)
  paths = {"summary": os.path.join(output_dir, SUMMARY_FILE), "table": os.path.join(output_dir, TABLE_FILE),
           "accuracy_plot": os.path.join(output_dir, ACCURACY_PLOT_FILE),
           "histogram_plot": os.path.join(output_dir, HISTOGRAM_PLOT_FILE)}
  with open(paths["summary"], "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  table = markdown_table(summary)
  with open(paths["table"], "w", encoding="utf-8") as f:
    f.write(table)
  plot_accuracy_vs_length([summary], [summary["name"]], paths["accuracy_plot"])
  plot_length_histograms([summary], [summary["name"]], paths["histogram_plot"])
  if print_table:
    print(table)
  return paths


def load_summary(path: str) -> dict[str, Any]:
  with open(path, encoding="utf-8") as f:
    summary = json.load(f)
  if not isinstance(summary, dict) or "benchmarks" not in summary:
    raise ValueError(f"{path} is not an evaluation summary (no 'benchmarks')")
  return summary


def compare(summaries: Sequence[Mapping[str, Any]], names: Sequence[str] | None = None,
            output_dir: str | None = None) -> str:
  """The side-by-side markdown table of several runs; with `output_dir`, also writes it and the comparison plots
  (`comparison.md`, `comparison_accuracy_vs_length.png`, `comparison_length_histogram.png`)."""
  names = _unique(list(names) if names else [s["name"] for s in summaries])
  table = compare_table(summaries, names)
  if output_dir:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, f"{COMPARISON_PREFIX}.md"), "w", encoding="utf-8") as f:
      f.write(table)
    plot_accuracy_vs_length(summaries, names, os.path.join(output_dir, f"{COMPARISON_PREFIX}_{ACCURACY_PLOT_FILE}"))
    plot_length_histograms(summaries, names, os.path.join(output_dir, f"{COMPARISON_PREFIX}_{HISTOGRAM_PLOT_FILE}"))
  return table
