"""Builds the HTML report of a search (or tree) output: one file, inline CSS and JS, no network.

The records travel as JSON inside the page, cut into chunks of about `CHUNK_BYTES`. The page parses the small
index (ids, statuses, counts) at load and a chunk only when a record in it is shown, so a 10,000-record output
of 10k-token traces opens in seconds and shows one page of records at a time. When the records' data is larger
than `max_inline_bytes`, the chunks go to `<report stem>_data/chunk-NNNNNN.js` beside the page instead (loaded
by `<script src>`, which browsers allow from `file://`, unlike `fetch`), so the page itself stays small.

All text is put on the page with `textContent` by the page's script, never parsed as HTML, and the JSON inside
`<script>` elements has every "<" written as "\\u003c", so a trace holding `</script>` or `<script>` is text.
"""
from __future__ import annotations

import dataclasses
import datetime
import html
import json
import os
import pathlib
import time
from typing import Any, Sequence

from retro_jax import jsonl
from retro_jax.search import runner, traces
from retro_jax.view import records
from retro_jax.view.histogram import length_histogram_svg

CHUNK_BYTES = 512 * 1024  # a chunk is parsed whole when one of its records is shown
DEFAULT_MAX_INLINE_BYTES = 100 * 2**20
RECORDS_PER_PAGE = 25
_STATIC = pathlib.Path(__file__).with_name("static")


class ViewInputError(ValueError):
  """The input cannot be viewed at all (no such file, no record in it)."""


@dataclasses.dataclass(frozen=True)
class ReportSummary:
  records: int
  unreadable_lines: int
  statuses: dict
  html_bytes: int
  data_bytes: int
  chunks: int
  data_dir: str | None
  build_seconds: float


def script_json(payload: Any) -> str:
  """JSON that can sit inside a `<script>` element: no "<" can close it or open a comment. ASCII-only: twice as
  fast to write as UTF-8 (measured), and no raw line separators reach a script."""
  return json.dumps(payload, separators=(",", ":")).replace("<", "\\u003c")


def read_run_summary(output_path: str) -> dict | None:
  """The run summary the search writes beside its output, when it is there and readable."""
  path = runner.default_summary_path(output_path)
  try:
    with open(path, encoding="utf-8") as file:
      summary = json.load(file)
  except (OSError, json.JSONDecodeError):
    return None
  return summary if isinstance(summary, dict) else None


def run_keywords(summary: dict | None) -> tuple[str, ...]:
  """The run's transition keywords (its summary records them), else the search's defaults."""
  keywords = ((summary or {}).get("search_config") or {}).get("keywords")
  if isinstance(keywords, list) and all(isinstance(k, str) for k in keywords):
    return tuple(keywords)
  return traces.DEFAULT_KEYWORDS


class _ChunkWriter:
  """Collects record details into chunks; keeps them in memory until they outgrow `max_inline_bytes`, then
  writes every chunk to `data_dir` as a script."""

  def __init__(self, data_dir: str, max_inline_bytes: int):
    self.data_dir = data_dir
    self.max_inline_bytes = max_inline_bytes
    self.inline: list[str] | None = []
    self.count = 0
    self.data_bytes = 0
    self._records: list[str] = []
    self._bytes = 0
    self._start = 0

  def add(self, detail: dict) -> None:
    encoded = script_json(detail)
    self._records.append(encoded)
    self._bytes += len(encoded)
    if self._bytes >= CHUNK_BYTES:
      self.flush()

  def flush(self) -> None:
    if not self._records:
      return
    chunk = '{"start":%d,"records":[%s]}' % (self._start, ",".join(self._records))
    self._start += len(self._records)
    self._records, self._bytes = [], 0
    self.data_bytes += len(chunk)
    if self.inline is not None:
      self.inline.append(chunk)
      if self.data_bytes > self.max_inline_bytes:
        self._go_external()
    else:
      self._write_file(self.count, chunk)
    self.count += 1

  def _go_external(self) -> None:
    os.makedirs(self.data_dir, exist_ok=True)
    for stale in pathlib.Path(self.data_dir).glob("chunk-*.js"):
      stale.unlink()
    for index, chunk in enumerate(self.inline):
      self._write_file(index, chunk)
    self.inline = None

  def _write_file(self, index: int, chunk: str) -> None:
    with open(os.path.join(self.data_dir, f"chunk-{index:06d}.js"), "w", encoding="utf-8") as file:
      file.write(f"retroViewChunk({index},{chunk});\n")


def _summary_tables(summary: dict | None) -> tuple[dict, dict]:
  """(settings, figures) of the run summary: its search config, and its other scalar entries."""
  if summary is None:
    return {}, {}
  settings = summary.get("search_config") or summary.get("config") or {}
  figures = {k: v for k, v in summary.items() if k not in ("search_config", "config")}
  return (settings if isinstance(settings, dict) else {}), figures


def _table(rows: dict) -> str:
  def show(value: Any) -> str:
    if isinstance(value, float):
      return f"{value:.4g}"
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
  body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(show(v))}</td></tr>" for k, v in rows.items())
  return f'<table class="kv">{body}</table>'


def _figure(value: float | None, decimals: int) -> str:
  return "" if value is None else f"{value:.{decimals}f}"


def _header_html(stats: records.RunStatistics, summary: dict | None, source: str) -> str:
  """The summary header: statuses (buttons that filter), savings, histograms, the run's settings."""
  statuses = "".join(
      f'<button type="button" class="status-count s-{html.escape(status)}" data-status="{html.escape(status)}">'
      f'<b>{count}</b> {html.escape(status)}</button>' for status, count in stats.statuses.most_common())
  savings = "".join(
      f"<tr><th>{html.escape(row['label'])}</th><td>{row['records']}</td><td>{_figure(row['mean'], 2)}</td>"
      f"<td>{_figure(row['median'], 1)}</td></tr>" for row in stats.savings())
  settings, figures = _summary_tables(summary)
  parts = [f'<div class="statuses" id="status-counts">{statuses}</div>']
  if stats.tokens_before:
    parts.append('<div class="figures"><table class="savings"><tr><th></th><th>records</th><th>mean</th>'
                 f'<th>median</th></tr>{savings}</table>'
                 f'{length_histogram_svg(stats.tokens_before, stats.tokens_after)}'
                 f'{length_histogram_svg(stats.steps_before, stats.steps_after, unit="steps") if stats.steps_before else ""}'
                 '</div>')
  if summary is None:
    parts.append(f"<p class=note>No run summary beside {html.escape(source)} "
                 f"({html.escape(os.path.basename(runner.default_summary_path(source)))}).</p>")
  else:
    parts.append(f"<details class=settings><summary>run settings and summary</summary><div class=kvs>"
                 f"{_table(settings) if settings else ''}{_table(figures)}</div></details>")
  return "\n".join(parts)


def _page_html(title: str, header: str, config: dict, index: list[dict], inline_chunks: Sequence[str] | None) -> str:
  css = (_STATIC / "report.css").read_text(encoding="utf-8")
  js = (_STATIC / "report.js").read_text(encoding="utf-8")
  chunks = "".join(f'<script type="application/json" id="chunk-{i}">{chunk}</script>\n'
                   for i, chunk in enumerate(inline_chunks or ()))
  return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
          f'<meta name="viewport" content="width=device-width, initial-scale=1">'
          f"<title>{html.escape(title)}</title><style>{css}</style></head><body>\n"
          f'<header><h1>{html.escape(title)}</h1>{header}</header>\n'
          '<nav id="controls"></nav><main id="records"></main><nav id="pager"></nav>\n'
          f'<script type="application/json" id="view-config">{script_json(config)}</script>\n'
          f'<script type="application/json" id="view-index">{script_json(index)}</script>\n'
          f"{chunks}<script>{js}</script></body></html>\n")


def build_report(input_path: str, output_path: str, *, title: str = "",
                 max_inline_bytes: int = DEFAULT_MAX_INLINE_BYTES) -> ReportSummary:
  """Writes the report of `input_path` (a search or tree output JSONL) to `output_path`."""
  started = time.perf_counter()
  if not os.path.isfile(input_path):
    raise ViewInputError(f"no such file: {input_path}")
  summary = read_run_summary(input_path)
  keywords = run_keywords(summary)
  output = pathlib.Path(output_path)
  output.parent.mkdir(parents=True, exist_ok=True)
  data_dir = output.with_name(output.stem + "_data")
  chunks = _ChunkWriter(str(data_dir), max_inline_bytes)
  stats = records.RunStatistics()
  index: list[dict] = []
  unreadable = 0
  for row in jsonl.read_lines(input_path):
    kind = records.record_kind(row.data) if row.error is None else "other"
    if kind == "search":
      detail = records.search_detail(row.data, keywords)
    elif kind == "tree":
      detail = records.tree_detail(row.data)
    else:
      unreadable += row.error is not None
      detail = records.other_detail(row.data, row.error or "")
    entry = records.index_entry(len(index), row.index, row.data, kind, chunks.count)
    chunks.add(detail)
    index.append(entry)
    stats.add(entry)
  chunks.flush()
  if not index:
    raise ViewInputError(f"{input_path} holds no records")
  config = {"chunks": chunks.count, "perPage": RECORDS_PER_PAGE, "source": os.path.basename(input_path),
            "dataDir": None if chunks.inline is not None else data_dir.name,
            "generated": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
  kind = "Tree-CoT" if any(entry["kind"] == "tree" for entry in index) else "Retro-Search"
  page = _page_html(title or f"{kind} report: {os.path.basename(input_path)}",
                    _header_html(stats, summary, input_path), config, index, chunks.inline)
  temporary = f"{output}.tmp"
  with open(temporary, "w", encoding="utf-8") as file:
    file.write(page)
  os.replace(temporary, output)
  return ReportSummary(records=len(index), unreadable_lines=unreadable, statuses=dict(stats.statuses),
                       html_bytes=os.path.getsize(output), data_bytes=chunks.data_bytes, chunks=chunks.count,
                       data_dir=None if chunks.inline is not None else str(data_dir),
                       build_seconds=time.perf_counter() - started)
