"""Step 1 of the self-improvement loop: sample k traces per problem, grade them, write search input records.

Each problem is one request with n = k samples (the engine shares its prompt's prefill across them), seeded
from the run seed and the problem id, so a resumed run regenerates a half-written problem identically and the
resumable writer keeps only the samples that were missing. Every sample is written, correct or not, with
`correct` set: `search` passes incorrect traces through as "skipped_incorrect" unless told to revise them.

A prompt that leaves no room under the engine's sequence limit is an error record that a resume runs again (with
a larger limit); a token budget that does not fit after the prompt is cut to what fits, the record says
`budget_clamped`, and the summary counts them.

`trace` is the completion exactly as generated. The thinking opener ("<think>\\n") belongs to the rendered
prompt of R1-style templates, so it is not in the trace; `search` reads traces with or without it.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import statistics
import time
from typing import Any, Callable, Iterable, Iterator

from retro_jax import jsonl
from retro_jax.engine.requests import GenerationRequest, GenerationResult, SamplingParams, TextGenerator
from retro_jax.grading import Grader
from retro_jax.search import runner
from retro_jax.search.retro_search import derive_seed


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  num_samples: int = 4  # k traces per problem
  max_new_tokens: int = 16384
  temperature: float = 0.6  # R1-distill's recommended sampling
  top_p: float = 0.95
  top_k: int = 0
  seed: int = 0

  @property
  def sampling(self) -> SamplingParams:
    return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)


def sample_id(problem_id: runner.RecordId, sample_index: int) -> str:
  return f"{problem_id}#{sample_index}"


@dataclasses.dataclass
class _SampleJob:
  """One problem: a single request for k samples, then k graded trace records."""

  problem_id: runner.RecordId
  question: str
  answer: str
  request: GenerationRequest | None
  grader: Grader
  budget_clamped: bool = False
  records: list[dict] = dataclasses.field(default_factory=list)

  def next_request(self) -> GenerationRequest | None:
    return self.request

  def on_result(self, result: GenerationResult) -> None:
    self.request = None
    grades = self.grader.grade_many([(self.answer, sample.text) for sample in result.samples])
    for index, (sample, grade) in enumerate(zip(result.samples, grades)):
      self.records.append({
          "id": sample_id(self.problem_id, index),
          "problem_id": self.problem_id,
          "question": self.question,
          "answer": self.answer,
          "trace": sample.text,
          "correct": grade.correct,
          "grade_status": grade.status,
          "predicted": grade.predicted,
          "sample_index": index,
          "finish_reason": sample.finish_reason,
          "num_tokens": len(sample.tokens),
          "budget_clamped": self.budget_clamped,
      })

  def outputs(self) -> list[dict]:
    return self.records


def _sample_jobs(rows: Iterable[runner.InputRow], writer: runner.ResumableJsonlWriter, generator: TextGenerator,
                 render_prompt: Callable[[str], str], grader: Grader, fields: runner.FieldMap,
                 config: GenerateConfig) -> Iterator[runner.Job]:
  for row in rows:
    problem_id, problem = runner.identify(row, fields.id)
    if all(sample_id(problem_id, i) in writer for i in range(config.num_samples)) or problem_id in writer:
      yield runner.FinishedJob([])  # done in an earlier run; counted by the progress bar all the same
      continue
    if problem is not None:
      yield runner.FinishedJob([runner.error_record(problem_id, row, problem)])
      continue
    try:
      question = runner.text_field(row.data, fields.question)
      answer = runner.text_field(row.data, fields.answer, allow_numbers=True)
    except runner.RecordError as error:
      yield runner.FinishedJob([runner.error_record(problem_id, row, str(error))])
      continue
    prompt_tokens = tuple(generator.encode(render_prompt(question)))
    limit = runner.sequence_limit(generator)
    too_long = runner.prompt_problem(len(prompt_tokens), limit)
    if too_long:
      yield runner.FinishedJob([runner.error_record(problem_id, row, too_long, retry_on_resume=True)])
      continue
    budget, clamped = runner.clamp_budget(len(prompt_tokens), config.max_new_tokens, limit)
    request = GenerationRequest(prompt_tokens=prompt_tokens, max_new_tokens=budget, sampling=config.sampling,
                                seed=derive_seed(config.seed, problem_id, "generate"), n=config.num_samples)
    yield _SampleJob(problem_id, question, answer, request, grader, budget_clamped=clamped)


def run_generate(rows: Iterable[runner.InputRow], *, generator: TextGenerator,
                 render_prompt: Callable[[str], str], grader: Grader, output_path: str,
                 config: GenerateConfig = GenerateConfig(), fields: runner.FieldMap = runner.FieldMap(),
                 limit: int = 0, max_problems_in_flight: int = 256, total: int | None = None,
                 summary_path: str | None = None, progress: bool = True) -> dict:
  """Samples every problem (the first `limit` when > 0) not fully in `output_path`; returns the pass-rate
  summary, also written as JSON and printed. The progress bar counts problems."""
  if limit > 0:
    rows = itertools.islice(rows, limit)
    total = min(total, limit) if total is not None else limit
  started = time.monotonic()
  with runner.ResumableJsonlWriter(output_path) as writer, runner.progress_bar(total, 0, progress) as bar:

    def on_finished(job: runner.Job) -> None:
      writer.write(job.outputs())
      bar.update(1)

    jobs = _sample_jobs(rows, writer, generator, render_prompt, grader, fields, config)
    runner.drive_jobs(jobs, generator, on_finished, max_problems_in_flight)
  summary = summarize_generate(output_path, time.monotonic() - started, grader.counts)
  jsonl.write_json(summary_path or runner.default_summary_path(output_path), summary)
  print(runner.format_table("generate", summary))
  return summary


def summarize_generate(output_path: str, wall_time_s: float, grading_counts: collections.Counter) -> dict:
  """Pass rate over samples (pass@1 estimated from k samples), pass@k over problems, lengths, truncation."""
  records = list(jsonl.read_jsonl(output_path))
  samples = [record for record in records if record.get("status") != "error"]
  by_problem: dict[Any, list[bool]] = collections.defaultdict(list)
  for record in samples:
    by_problem[record["problem_id"]].append(record["correct"])
  return {
      "problems": len(by_problem),
      "samples": len(samples),
      "errors": len(records) - len(samples),
      "correct_samples": sum(record["correct"] for record in samples),
      "pass_rate": _fraction([record["correct"] for record in samples]),
      "pass_at_k": _fraction([any(flags) for flags in by_problem.values()]),
      "mean_tokens": _fraction([record["num_tokens"] for record in samples]),
      "truncation_rate": _fraction([record["finish_reason"] == "length" for record in samples]),
      "budget_clamped": sum(bool(record.get("budget_clamped")) for record in samples),
      "errors_too_long": sum(bool(record.get("retry_on_resume")) for record in records),
      "wall_time_s": wall_time_s,
      "grading": dict(grading_counts),
  }


def _fraction(values: list) -> float | None:
  return statistics.fmean(values) if values else None
