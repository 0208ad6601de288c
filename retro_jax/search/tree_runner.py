"""`retro-jax tree` over a whole problem set: many trees in flight over one engine, resumable JSONL output.

The Retro-Search runner's pieces do the work: input rows and field mapping, the resumable writer (a tree is
written whole when it finishes, so a killed run loses only the trees still growing, and a resumed run grows them
again from their seeds, identically) and `drive_jobs`, which keeps the decode slots full with node requests of up
to `max_trees_in_flight` trees. With a second model (the paper's "multi-model collaboration"), `TwoModelGenerator`
serves the node types the config names from it and the rest from the first.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import statistics
import time
from typing import Callable, Iterable, Iterator, Sequence

from retro_jax.engine.requests import GenerationRequest, GenerationResult, RequestQueue, TextGenerator
from retro_jax.grading import Grader
from retro_jax import jsonl
from retro_jax.search import runner
from retro_jax.search.tree import ANSWER, TreeConfig, TreeContext, TreeProblem, TreeSearch


class TwoModelGenerator:
  """One `TextGenerator` face over two: a request the trees counted in `second_model_requests` goes to `second`,
  every other one to `first`. The two streams are interleaved, one result at a time; a stream that ran dry is
  started again when requests for its model arrive. Encoding is the trees' business (each type's prompt is encoded
  by the tokenizer of the model that writes it), so `encode` / `decode` here are the first model's."""

  def __init__(self, first: TextGenerator, second: TextGenerator, second_model_requests: collections.Counter):
    self.first, self.second = first, second
    self._second_requests = second_model_requests

  def encode(self, text: str) -> list[int]:
    return self.first.encode(text)

  def decode(self, tokens: Sequence[int]) -> str:
    return self.first.decode(tokens)

  def _model(self, request: GenerationRequest) -> TextGenerator:
    key = dataclasses.replace(request, request_id=None)
    if self._second_requests[key] > 0:
      self._second_requests[key] -= 1
      return self.second
    return self.first

  def stream(self, queue: RequestQueue) -> Iterator[GenerationResult]:
    models = (self.first, self.second)
    queues = {id(model): RequestQueue() for model in models}
    streams: dict[int, Iterator[GenerationResult]] = {}
    while True:
      while (request := queue.get()) is not None:
        queues[id(self._model(request))].put(request)
      if not streams and not any(len(q) for q in queues.values()):
        return
      for model in models:
        key = id(model)
        if key not in streams and len(queues[key]):
          streams[key] = model.stream(queues[key])
        if key in streams:
          result = next(streams[key], None)
          if result is None:
            del streams[key]
          else:
            yield result

  def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
    routed = [self._model(request) for request in requests]
    results = {}
    for model in (self.first, self.second):
      indices = [i for i, chosen in enumerate(routed) if chosen is model]
      if indices:
        results.update(zip(indices, model.generate([requests[i] for i in indices])))
    return [results[i] for i in range(len(requests))]


def _tree_jobs(rows: Iterable[runner.InputRow], writer: runner.ResumableJsonlWriter, context: TreeContext,
               render_prompt: Callable[[str], str], fields: runner.FieldMap,
               duplicates: collections.Counter) -> Iterator[runner.Job]:
  """One job per row not yet in the output: a TreeSearch, or a FinishedJob holding an error record."""
  seen: set[runner.RecordId] = set()
  limit = context.config.max_prompt_tokens
  for row in rows:
    record_id, problem = runner.identify(row, fields.id)
    if record_id in seen:  # the same id again: its first record is the one kept
      duplicates["ids"] += 1
      continue
    seen.add(record_id)
    if record_id in writer:
      continue
    if problem is None:
      try:
        question = runner.text_field(row.data, fields.question)
        answer = runner.text_field(row.data, fields.answer, allow_numbers=True)
        prompt_text = render_prompt(question)
        if limit and len(context.encode(prompt_text)) > limit:
          raise runner.RecordError(f"prompt is over max_prompt_tokens={limit}")
      except runner.RecordError as error:
        problem = str(error)
    if problem is not None:
      yield runner.FinishedJob([runner.error_record(record_id, row, problem)])
      continue
    yield TreeSearch(context, TreeProblem(record_id, question, answer, prompt_text))


def run_trees(rows: Iterable[runner.InputRow], *, generator: TextGenerator, render_prompt: Callable[[str], str],
              grader: Grader, output_path: str, config: TreeConfig = TreeConfig(),
              fields: runner.FieldMap = runner.FieldMap(), limit: int = 0, max_trees_in_flight: int = 256,
              total: int | None = None, summary_path: str | None = None, progress: bool = True,
              second_generator: TextGenerator | None = None) -> dict:
  """Grows a tree for every problem (the first `limit` when > 0) not already in `output_path`; returns the run
  summary, which is also written as JSON (default: next to the output) and printed as a table.
  `second_generator` writes the node types in `config.second_model_types` (required when there are any)."""
  if config.second_model_types and second_generator is None:
    raise ValueError(f"second_model_types {config.second_model_types} need a second model")
  if limit > 0:
    rows = itertools.islice(rows, limit)
    total = min(total, limit) if total is not None else limit
  context = TreeContext(config, generator.encode, grader.grade_many,
                        second_encode=second_generator.encode if second_generator else None)
  if second_generator is not None:
    generator = TwoModelGenerator(generator, second_generator, context.second_model_requests)
  started = time.monotonic()
  duplicates: collections.Counter = collections.Counter()
  statuses: collections.Counter = collections.Counter()
  with runner.ResumableJsonlWriter(output_path) as writer, runner.progress_bar(total, len(writer), progress) as bar:

    def on_finished(job: runner.Job) -> None:
      for record in writer.write(job.outputs()):
        statuses[record["status"]] += 1
        bar.update(1)
      grown = statuses["success"] + statuses["failure"]
      bar.set_postfix(success=f"{statuses['success'] / max(1, grown):.1%}", errors=statuses["error"], refresh=False)

    jobs = _tree_jobs(rows, writer, context, render_prompt, fields, duplicates)
    runner.drive_jobs(jobs, generator, on_finished, max_trees_in_flight)
  summary = summarize_trees(output_path)
  summary.update(duplicate_ids_skipped=duplicates["ids"], trees_this_run=sum(statuses.values()),
                 wall_time_s=time.monotonic() - started, grading=dict(grader.counts))
  jsonl.write_json(summary_path or runner.default_summary_path(output_path), summary)
  print(runner.format_table("tree-CoT", summary))
  return summary


def summarize_trees(output_path: str) -> dict:
  """Counts over every tree in the output file (earlier runs included)."""
  records = list(jsonl.read_jsonl(output_path))
  trees = [r for r in records if r["status"] != "error"]
  answers = [n for t in trees for n in t["nodes"] if n["type"] == ANSWER]
  statuses = collections.Counter(r["status"] for r in records)
  prompt_tokens = sum(t["prompt_tokens"] for t in trees)
  computed = sum(t["prompt_tokens_computed"] for t in trees)
  return {
      "records": len(records), "success": statuses["success"], "failure": statuses["failure"],
      "error": statuses["error"], "rollouts": sum(t["rollouts"] for t in trees),
      "rollouts_mean": statistics.fmean(t["rollouts"] for t in trees) if trees else None,
      "nodes_mean": statistics.fmean(len(t["nodes"]) for t in trees) if trees else None,
      "answer_nodes": len(answers), "correct_answer_nodes": sum(bool(n["correct"]) for n in answers),
      "requests": sum(t["requests"] for t in trees), "tokens_generated": sum(t["tokens_generated"] for t in trees),
      "prompt_tokens": prompt_tokens, "prompt_tokens_computed": computed,
      "prefill_saved_fraction": 1 - computed / prompt_tokens if prompt_tokens else None,
  }
