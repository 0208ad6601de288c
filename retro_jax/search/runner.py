"""Runs Retro-Search over a whole input: many records in flight over one engine, resumable JSONL output.

Pieces `generate.py` reuses: reading input rows (JSONL or an HF dataset) with a field mapping, the resumable
writer, and `drive_jobs`, which keeps the engine's decode slots full with requests from many state machines.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import os
import pathlib
import statistics
import time
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import tqdm

from retro_jax import jsonl
from retro_jax.engine.requests import GenerationRequest, GenerationResult, RequestQueue, TextGenerator
from retro_jax.grading import Grader
from retro_jax.search import traces
from retro_jax.search.retro_search import RecordSearch, SearchConfig, SearchContext, SearchRecord

RecordId = str | int


class RecordError(ValueError):
  """A record the search cannot take; it becomes an output line with status "error" and this reason."""


# ---- input ----


@dataclasses.dataclass(frozen=True)
class FieldMap:
  """Where each field lives in an input record; dotted paths reach into nested records
  ("conversations.1.value"). An empty `id` numbers records by position ("row-<index>")."""

  id: str = "id"
  question: str = "question"
  answer: str = "answer"
  trace: str = "trace"


InputRow = jsonl.Line  # one input record: a JSONL line, or a dataset row (then `error` is None)


def get_field(data: Any, path: str) -> Any:
  """`data[path]`, else the dotted path followed through dicts and lists; KeyError when it is not there."""
  if isinstance(data, dict) and path in data:
    return data[path]
  value = data
  for part in path.split("."):
    try:
      value = value[int(part)] if isinstance(value, list) and part.isdigit() else value[part]
    except (KeyError, IndexError, TypeError) as error:
      raise KeyError(path) from error
  return value


def open_input(spec: str, hf_split: str = "train", hf_subset: str = "") -> tuple[Iterator[InputRow], int]:
  """Rows and their count from a JSONL path, or from a Hugging Face dataset written "hf:<name>"."""
  if spec.startswith("hf:"):
    try:
      import datasets  # pylint: disable=import-outside-toplevel  # optional: pip install 'retro_jax[hf]'
    except ImportError as error:
      raise ImportError("reading an HF dataset needs `datasets`: pip install 'retro_jax[hf]'") from error
    dataset = datasets.load_dataset(spec[len("hf:"):], hf_subset or None, split=hf_split)
    return (InputRow(i, dict(row)) for i, row in enumerate(dataset)), len(dataset)
  return jsonl.read_lines(spec), jsonl.count_lines(spec)


def identify(row: InputRow, id_field: str) -> tuple[RecordId, str | None]:
  """The row's id and, when it cannot carry its own id, the reason; such rows are named "row-<index>"."""
  fallback = f"row-{row.index}"
  if row.error is not None:
    return fallback, row.error
  if not id_field:
    return fallback, None
  try:
    value = get_field(row.data, id_field)
  except KeyError:
    return fallback, f"missing field {id_field!r}"
  if isinstance(value, bool) or not isinstance(value, (str, int)):
    return fallback, f"field {id_field!r} is not a string or an integer"
  return value, None


def text_field(data: dict, path: str, allow_numbers: bool = False) -> str:
  try:
    value = get_field(data, path)
  except KeyError as error:
    raise RecordError(f"missing field {path!r}") from error
  if allow_numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
    return str(value)
  if not isinstance(value, str):
    raise RecordError(f"field {path!r} is not a string")
  return value


def error_record(record_id: RecordId, row: InputRow, reason: str, retry_on_resume: bool = False) -> dict:
  """The output line of a record that could not be run. `retry_on_resume` marks errors a resumed run with other
  settings may not repeat (a prompt over the sequence limit): the writer drops them on open, so they run again."""
  record = {"id": record_id, "status": "error", "reason": reason, "row": row.index}
  if retry_on_resume:
    record["retry_on_resume"] = True
  return record


def prompt_problem(prompt_tokens: int, max_seq_len: int | None) -> str | None:
  """Why a prompt of this many tokens cannot run (it leaves no position to generate), or None."""
  if max_seq_len is None or prompt_tokens < max_seq_len:
    return None
  return (f"prompt of {prompt_tokens} tokens does not fit engine.max_seq_len={max_seq_len} (no room to generate); "
          "raise --config.engine.max_seq_len (up to the model's positions) or shorten the question")


def clamp_budget(prompt_tokens: int, max_new_tokens: int, max_seq_len: int | None) -> tuple[int, bool]:
  """(the token budget that fits after the prompt, whether it had to be cut): a cut budget ends with
  finish_reason "length" where the sequence limit is reached, and runs count it."""
  if max_seq_len is None or prompt_tokens + max_new_tokens <= max_seq_len:
    return max_new_tokens, False
  return max_seq_len - prompt_tokens, True


# ---- resumable output ----


class ResumableJsonlWriter:
  """Append-only JSONL output keyed by "id"; the file itself is the checkpoint of a run.

  Each batch of records is appended with one write, flushed and fsynced, so a killed job loses at most the line
  it was writing. On open, a last line without its newline (cut by the kill) is truncated away and every id
  already in the file is loaded: a restart skips them, and `write` never writes an id twice.
  """

  def __init__(self, path: str):
    self.path = path
    self._ids: set[RecordId] = set()
    if os.path.exists(path):
      self._drop_cut_last_line()
      records = list(jsonl.read_jsonl(path))
      kept = [record for record in records if not record.get("retry_on_resume")]
      if len(kept) < len(records):  # errors of an earlier run's settings (over-long prompts): run them again
        jsonl.write_jsonl(path, kept)
      self._ids = {record["id"] for record in kept}
    self._file = open(path, "a", encoding="utf-8")  # pylint: disable=consider-using-with

  def _drop_cut_last_line(self) -> None:
    with open(self.path, "rb+") as file:
      content = file.read()
      if content and not content.endswith(b"\n"):
        file.truncate(content.rfind(b"\n") + 1)

  def __contains__(self, record_id: RecordId) -> bool:
    return record_id in self._ids

  def __len__(self) -> int:
    return len(self._ids)

  def __enter__(self) -> ResumableJsonlWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def close(self) -> None:
    self._file.close()

  def write(self, records: Sequence[dict]) -> list[dict]:
    """Appends the records whose id is new, durably; returns them."""
    new, ids = [], set()
    for record in records:
      if record["id"] not in self._ids and record["id"] not in ids:
        new.append(record)
        ids.add(record["id"])
    if new:
      self._file.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in new))
      self._file.flush()
      os.fsync(self._file.fileno())
      self._ids |= ids
    return new


# ---- multiplexing state machines over one engine ----


class Job(Protocol):
  """A state machine that asks for one request at a time; `next_request()` returns None once it is done."""

  def next_request(self) -> GenerationRequest | None:
    ...

  def on_result(self, result: GenerationResult) -> None:
    ...

  def outputs(self) -> list[dict]:
    ...


@dataclasses.dataclass(frozen=True)
class FinishedJob:
  """A job decided without the model (bad input, nothing to search)."""

  records: list[dict]

  def next_request(self) -> None:
    return None

  def on_result(self, result: GenerationResult) -> None:
    raise RuntimeError("a finished job got a result")

  def outputs(self) -> list[dict]:
    return self.records


def drive_jobs(jobs: Iterable[Job], generator: TextGenerator, on_finished: Callable[[Job], None],
               max_in_flight: int) -> None:
  """Runs every job to completion through one `generator.stream`.

  Each job has at most one request out. After every result the job's follow-up request (or a new job's first)
  goes back into the queue at once, so the engine's decode slots stay full with work from up to
  `max_in_flight` jobs. Request ids route results back; a job never sees another job's results.
  """
  jobs = iter(jobs)
  queue = RequestQueue()
  pending: dict[int, Job] = {}
  request_ids = itertools.count()

  def submit(job: Job) -> None:
    request = job.next_request()
    if request is None:
      on_finished(job)
      return
    request_id = next(request_ids)
    pending[request_id] = job
    queue.put(dataclasses.replace(request, request_id=request_id))

  def fill() -> None:
    while len(pending) < max_in_flight:
      job = next(jobs, None)
      if job is None:
        return
      submit(job)

  fill()
  for result in generator.stream(queue):
    job = pending.pop(result.request.request_id)
    job.on_result(result)
    submit(job)
    fill()
  if pending:
    raise RuntimeError(f"the generator stopped with {len(pending)} requests unanswered")


def sequence_limit(generator: TextGenerator) -> int | None:
  """The generator's prompt + generated token limit (`max_seq_len`), None for one without a limit."""
  return getattr(generator, "max_seq_len", None)


def progress_bar(total: int | None, initial: int, enabled: bool) -> tqdm.tqdm:
  return tqdm.tqdm(total=total, initial=initial, unit="rec", dynamic_ncols=True, disable=not enabled)


# ---- the search ----


class _RunStats:
  """Counts for this run's progress bar and summary (the summary's record counts come from the file)."""

  def __init__(self):
    self.started = time.monotonic()
    self.statuses: collections.Counter[str] = collections.Counter()
    self.duplicates = 0

  def acceptance(self) -> float:
    searched = sum(n for status, n in self.statuses.items() if status != "error")
    return (self.statuses["revised"] + self.statuses["recovered"]) / max(1, searched)


class RetryableRecordError(RecordError):
  """A record that does not fit this run's sequence limit: written as an error that a resume runs again."""


def _search_job(row: InputRow, fields: FieldMap, render_prompt: Callable[[str], str], context: SearchContext,
                record_id: RecordId, grader: Grader) -> Job:
  """The record's search; or, for an incorrect trace the search skips, its finished record.

  Correctness comes before parsing: an incorrect trace whose thinking never closes is `skipped_incorrect` (with
  the reason), like any incorrect trace; only a trace the search would revise must parse.
  """
  question = text_field(row.data, fields.question)
  answer = text_field(row.data, fields.answer, allow_numbers=True)
  trace_text = text_field(row.data, fields.trace)
  if not trace_text.strip():
    raise RecordError("empty trace")
  prompt_text = render_prompt(question)
  prompt_tokens = len(context.encode(prompt_text))
  limit = context.config.max_prompt_tokens
  if limit and prompt_tokens > limit:
    raise RecordError(f"prompt is over max_prompt_tokens={limit}")
  too_long = prompt_problem(prompt_tokens, context.max_seq_len)
  if too_long:
    raise RetryableRecordError(too_long)
  grade = grader.grade(answer, trace_text)
  try:
    trace = traces.parse_trace(trace_text)
  except traces.TraceFormatError as error:
    if grade.correct or context.config.revise_incorrect:
      raise RecordError(str(error)) from None
    unclosed = traces.parse_trace(trace_text, require_close=False)
    (output,) = RecordSearch(context, SearchRecord(record_id, question, answer, unclosed, prompt_text),
                             grade).outputs()
    return FinishedJob([dict(output, reason=f"{error}; not searched, as the answer is incorrect")])
  return RecordSearch(context, SearchRecord(record_id, question, answer, trace, prompt_text), grade)


def _search_jobs(rows: Iterable[InputRow], writer: ResumableJsonlWriter, context: SearchContext,
                 render_prompt: Callable[[str], str], grader: Grader, fields: FieldMap,
                 stats: _RunStats) -> Iterator[Job]:
  """One job per row not yet in the output: a RecordSearch, or a FinishedJob holding its record."""
  seen: set[RecordId] = set()
  for row in rows:
    record_id, problem = identify(row, fields.id)
    if record_id in seen:  # the same id again in the input: its first record is the one kept
      stats.duplicates += 1
      continue
    seen.add(record_id)
    if record_id in writer:  # finished by an earlier run
      continue
    if problem is not None:
      yield FinishedJob([error_record(record_id, row, problem)])
      continue
    try:
      yield _search_job(row, fields, render_prompt, context, record_id, grader)
    except RecordError as error:
      retry = isinstance(error, RetryableRecordError)
      yield FinishedJob([error_record(record_id, row, str(error), retry_on_resume=retry)])


def default_summary_path(output_path: str) -> str:
  return str(pathlib.Path(output_path).with_suffix(".summary.json"))


def run_search(rows: Iterable[InputRow], *, generator: TextGenerator, render_prompt: Callable[[str], str],
               grader: Grader, output_path: str, config: SearchConfig = SearchConfig(),
               fields: FieldMap = FieldMap(), limit: int = 0, max_records_in_flight: int = 256,
               total: int | None = None, summary_path: str | None = None, progress: bool = True) -> dict:
  """Searches every row (the first `limit` when > 0) not already in `output_path`; returns the run summary,
  which is also written as JSON (`summary_path`, default next to the output) and printed as a table."""
  if limit > 0:
    rows = itertools.islice(rows, limit)
    total = min(total, limit) if total is not None else limit
  context = SearchContext.create(config, generator.encode, grader.grade_many, sequence_limit(generator))
  stats = _RunStats()
  with ResumableJsonlWriter(output_path) as writer, progress_bar(total, len(writer), progress) as bar:

    def on_finished(job: Job) -> None:
      for record in writer.write(job.outputs()):
        stats.statuses[record["status"]] += 1
        bar.update(1)
      bar.set_postfix(accept=f"{stats.acceptance():.1%}", errors=stats.statuses["error"], refresh=False)

    jobs = _search_jobs(rows, writer, context, render_prompt, grader, fields, stats)
    drive_jobs(jobs, generator, on_finished, max_records_in_flight)
  summary = summarize_search(output_path, stats, grader.counts)
  summary["search_config"] = {**dataclasses.asdict(config), "keywords": list(config.keywords)}  # for `view`
  jsonl.write_json(summary_path or default_summary_path(output_path), summary)
  print(format_table("retro-search", summary))
  return summary


# ---- summary ----


def _mean_median(values: Sequence[float]) -> tuple[float | None, float | None]:
  return (statistics.fmean(values), statistics.median(values)) if values else (None, None)


def summarize_search(output_path: str, stats: _RunStats, grading_counts: collections.Counter) -> dict:
  """Spec section 5's run summary, over every record in the output file (earlier runs included)."""
  records = list(jsonl.read_jsonl(output_path))
  statuses = collections.Counter(record["status"] for record in records)
  searched = [record for record in records if record["status"] != "error"]
  summary: dict[str, Any] = {"records": len(records)}
  for status in ("revised", "unchanged", "recovered", "skipped_incorrect", "error"):
    summary[status] = statuses[status]
  for field in ("tokens", "steps", "thoughts"):
    for when in ("before", "after"):
      mean, median = _mean_median([record[f"{field}_{when}"] for record in searched
                                   if record[f"{field}_{when}"] is not None])
      summary[f"{field}_{when}_mean"], summary[f"{field}_{when}_median"] = mean, median
  for when in ("before", "after"):
    summary[f"accuracy_{when}"] = (statistics.fmean(record[f"correct_{when}"] for record in searched)
                                   if searched else None)
  for field, key in (("boundaries_tried", "boundaries_tried"), ("rollouts", "num_rollouts"),
                     ("tokens_generated", "tokens_generated"), ("budgets_clamped", "budgets_clamped")):
    summary[field] = sum(record.get(key, 0) for record in searched)
  summary["errors_too_long"] = sum(bool(record.get("retry_on_resume")) for record in records)
  summary["duplicate_ids_skipped"] = stats.duplicates
  summary["records_this_run"] = sum(stats.statuses.values())
  summary["wall_time_s"] = time.monotonic() - stats.started
  summary["grading"] = dict(grading_counts)
  return summary


def format_table(title: str, summary: dict) -> str:
  rows = [(key, f"{value:.4g}" if isinstance(value, float) else str(value)) for key, value in summary.items()]
  width = max(len(key) for key, _ in rows)
  return "\n".join([title, "-" * (width + 14)] + [f"{key:<{width}}  {value}" for key, value in rows])
