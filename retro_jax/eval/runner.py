"""Runs a model over benchmarks and writes one JSONL line per sampled response, resumably.

A unit of work is one (question, mode): mode "greedy" draws one sample at temperature 0, mode "sampled" draws
k samples with the model's recommended sampling (R1-distill: temperature 0.6, top-p 0.95). All units of a
benchmark go into one request queue, so the engine keeps its decode slots full across questions.

Resumability goes through the same writer as `retro-jax search` (`ResumableJsonlWriter`): the lines of a unit
are appended with one write, flushed and fsynced, and a line cut by a kill is dropped on restart. Each line is
keyed by `question_id/mode/sample_index`; a restart skips the units whose samples are all in the file, asks for
the others again and writes only their missing samples, so no sample is ever written twice. Every request's
seed comes from (run seed, benchmark, question id), never from its place in the queue, and sample i of a
request draws from its own key, so a resumed run draws the samples an uninterrupted one would. Settings that
change samples (k, sampling, token budget, seed, prompt, model) are kept in `run_config.json`; a resume with
other settings is refused rather than mixing two runs in one file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable, Mapping, Sequence

import tqdm

from retro_jax import jsonl
from retro_jax.engine.requests import (GREEDY, GenerationRequest, GenerationResult, RequestQueue, SamplingParams,
                                       TextGenerator)
from retro_jax.eval import benchmarks as benchmarks_lib
from retro_jax.eval import report
from retro_jax.grading import GradeResult
from retro_jax.search import runner as search_runner
from retro_jax.search.traces import count_thought_switches
from retro_jax.user_errors import UserError

GradeMany = Callable[[Sequence[tuple[str, str]]], list[GradeResult]]
MODES = ("greedy", "sampled")
SAMPLES_DIR = "samples"
RUN_CONFIG_FILE = "run_config.json"


class EvalError(UserError):
  """An evaluation cannot run as asked (duplicate ids, an output directory holding another run)."""


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """One evaluation run. `prompt_template` None uses each benchmark's own (see `BenchmarkSpec`)."""

  output_dir: str
  name: str = "model"  # the run's name in tables and plots
  model: str = ""  # what was evaluated (a model directory); part of the resume check
  modes: tuple[str, ...] = MODES
  k: int = 4  # samples per question in mode "sampled"
  temperature: float = 0.6
  top_p: float = 0.95
  max_new_tokens: int = 32768
  seed: int = 0
  prompt_template: str | None = None
  grading_workers: int = 2
  grading_timeout_s: float = 5.0
  progress: bool = True

  def __post_init__(self):
    unknown = set(self.modes) - set(MODES)
    if unknown or not self.modes:
      raise ValueError(f"modes must be a non-empty subset of {MODES}, got {self.modes}")
    if self.k < 1:
      raise ValueError(f"k must be >= 1, got {self.k}")

  def samples_per_unit(self, mode: str) -> int:
    return 1 if mode == "greedy" else self.k

  def sampling(self, mode: str) -> SamplingParams:
    return GREEDY if mode == "greedy" else SamplingParams(temperature=self.temperature, top_p=self.top_p)

  def resume_key(self) -> dict[str, Any]:
    """The settings that change which samples a unit holds; a resumed run must match them."""
    return {"model": self.model, "k": self.k, "temperature": self.temperature, "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens, "seed": self.seed, "prompt_template": self.prompt_template}


def sample_path(output_dir: str, benchmark: str) -> str:
  return os.path.join(output_dir, SAMPLES_DIR, f"{benchmark}.jsonl")


def request_seed(seed: int, benchmark: str, question_id: str) -> int:
  """A question's seed from what identifies it, not from its place in the queue (stable across resumes)."""
  digest = hashlib.sha256(f"{seed}\0{benchmark}\0{question_id}".encode()).digest()
  return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def sample_id(question_id: str, mode: str, index: int) -> str:
  """The key of one sample line: the resumable writer never writes a key twice."""
  return f"{question_id}/{mode}/{index}"


def read_samples(path: str) -> list[dict]:
  """The sample lines of a benchmark file ([] before its first unit)."""
  return list(jsonl.read_jsonl(path)) if os.path.exists(path) else []


def check_run_config(config: EvalConfig) -> None:
  """Writes `run_config.json`, or checks that the run being resumed used the same sample-changing settings."""
  os.makedirs(config.output_dir, exist_ok=True)
  path = os.path.join(config.output_dir, RUN_CONFIG_FILE)
  key = config.resume_key()
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      previous = json.load(f)
    if previous != key:
      changed = {name: (previous.get(name), value) for name, value in key.items() if previous.get(name) != value}
      raise EvalError(f"{config.output_dir} holds a run with other settings {changed} (old, new)",
                      "resume with the same settings or use another output directory")
    return
  with open(path, "w", encoding="utf-8") as f:
    json.dump(key, f, indent=2)


def _as_problem(record: benchmarks_lib.Problem | Mapping[str, Any]) -> benchmarks_lib.Problem:
  if isinstance(record, benchmarks_lib.Problem):
    return record
  return benchmarks_lib.Problem(id=str(record["id"]), question=str(record["question"]),
                                answer=str(record["answer"]))


def _prompt_template(config: EvalConfig, benchmark: str) -> str:
  if config.prompt_template is not None:
    return config.prompt_template
  try:
    return benchmarks_lib.get_spec(benchmark).prompt_template
  except benchmarks_lib.BenchmarkError:
    return "{question}"  # custom benchmarks: the question as written


def prompt_tokens(tokenizer, benchmark: str, question: str, config: EvalConfig) -> tuple[int, ...]:
  """The rendered chat prompt (ending with the thinking opener) of one question, as tokens."""
  user_turn = _prompt_template(config, benchmark).replace("{question}", question)
  return tuple(tokenizer.encode(tokenizer.render_prompt(user_turn)))


def longest_prompt(tokenizer, benchmark_records: Mapping[str, Sequence[Any]], config: EvalConfig) -> int:
  """Tokens of the longest prompt: with the token budget, the sequence length the server must hold."""
  return max((len(prompt_tokens(tokenizer, name, _as_problem(p).question, config))
              for name, problems in benchmark_records.items() for p in problems), default=0)


class _Progress:
  """A tqdm bar over samples, showing samples/s and the accuracy so far of each mode (resumed units included)."""

  def __init__(self, benchmark: str, total: int, done_rows: Sequence[dict], enabled: bool):
    self.bar = tqdm.tqdm(total=total, desc=f"eval {benchmark}", unit="sample", disable=not enabled, dynamic_ncols=True)
    self.correct = {mode: 0 for mode in MODES}
    self.seen = {mode: 0 for mode in MODES}
    self.update(done_rows, advance=False)

  def update(self, rows: Sequence[dict], advance: bool = True) -> None:
    for row in rows:
      self.seen[row["mode"]] += 1
      self.correct[row["mode"]] += bool(row["correct"])
    labels = {"greedy": "greedy_acc", "sampled": "pass@1"}
    self.bar.set_postfix({labels[m]: f"{self.correct[m] / self.seen[m]:.3f}" for m in MODES if self.seen[m]},
                         refresh=False)
    if advance:
      self.bar.update(len(rows))

  def close(self) -> None:
    self.bar.close()


def run_benchmark(generator: TextGenerator, tokenizer, benchmark: str,
                  problems: Sequence[benchmarks_lib.Problem | Mapping[str, Any]], config: EvalConfig,
                  grade_many: GradeMany, bad_records: list[dict] | None = None) -> list[dict]:
  """Generates and grades every unfinished unit of one benchmark; returns all its rows (resumed ones too).

  A question whose prompt leaves no room under the generator's sequence limit is not run: it is appended to
  `bad_records` (else EvalError), and a resume with a larger limit runs it. A budget that does not fit after its
  prompt is cut to what fits; its rows say `budget_clamped`.
  """
  problems = [_as_problem(p) for p in problems]
  limit = search_runner.sequence_limit(generator)
  if len({p.id for p in problems}) != len(problems):
    raise EvalError(f"{benchmark}: duplicate question ids")
  path = sample_path(config.output_dir, benchmark)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  queue = RequestQueue()
  pending = 0
  with search_runner.ResumableJsonlWriter(path) as writer:
    for problem in problems:
      for mode in config.modes:
        n = config.samples_per_unit(mode)
        missing = sum(sample_id(problem.id, mode, i) not in writer for i in range(n))
        if not missing:
          continue
        tokens = prompt_tokens(tokenizer, benchmark, problem.question, config)
        too_long = search_runner.prompt_problem(len(tokens), limit)
        if too_long:
          if bad_records is None:
            raise EvalError(f"{benchmark} {problem.id}: {too_long}")
          bad_records.append({"benchmark": benchmark, "question_id": problem.id, "reason": too_long})
          break  # the other mode has the same prompt
        budget, _ = search_runner.clamp_budget(len(tokens), config.max_new_tokens, limit)
        queue.put(GenerationRequest(
            prompt_tokens=tokens, max_new_tokens=budget, sampling=config.sampling(mode),
            seed=request_seed(config.seed, benchmark, problem.id), n=n, request_id=(problem.id, mode)))
        pending += missing
    wanted = {(p.id, mode) for p in problems for mode in config.modes}
    done = [r for r in read_samples(path) if (r["question_id"], r["mode"]) in wanted]
    progress = _Progress(benchmark, pending, done, config.progress)
    by_id = {p.id: p for p in problems}
    try:
      if pending:
        for result in generator.stream(queue):
          progress.update(writer.write(_grade_result(result, by_id, benchmark, grade_many, config.max_new_tokens)))
    finally:
      progress.close()
  # In problem order, whatever order units finished in, so a resumed run summarises exactly like a fresh one.
  position = {p.id: i for i, p in enumerate(problems)}
  rows = [r for r in read_samples(path) if (r["question_id"], r["mode"]) in wanted]
  return sorted(rows, key=lambda r: (position[r["question_id"]], MODES.index(r["mode"]), r["sample_index"]))


def _grade_result(result: GenerationResult, by_id: Mapping[str, benchmarks_lib.Problem], benchmark: str,
                  grade_many: GradeMany, max_new_tokens: int) -> list[dict]:
  question_id, mode = result.request.request_id
  problem = by_id[question_id]
  grades = grade_many([(problem.answer, sample.text) for sample in result.samples])
  clamped = result.request.max_new_tokens < max_new_tokens
  return [{
      "id": sample_id(question_id, mode, index),
      "benchmark": benchmark,
      "question_id": question_id,
      "mode": mode,
      "sample_index": index,
      "response": sample.text,
      "extracted_answer": grade.predicted,
      "gold": problem.answer,
      "correct": grade.correct,
      "grade_status": grade.status,
      "length": len(sample.tokens),
      "finish_reason": sample.finish_reason,
      "thought_switches": count_thought_switches(sample.text),
      "budget_clamped": clamped,
  } for index, (sample, grade) in enumerate(zip(result.samples, grades))]


def evaluate(generator: TextGenerator, tokenizer, benchmark_records: Mapping[str, Sequence[Any]],
             config: EvalConfig, *, grade_many: GradeMany | None = None,
             bad_records: Sequence[dict] = ()) -> dict[str, Any]:
  """Evaluates one model on several benchmarks and writes the whole report; returns the summary dict.

  Writes under `config.output_dir`: `samples/<benchmark>.jsonl` (one line per response), `run_config.json`,
  `summary.json`, `results.md` (also printed) and the plots `accuracy_vs_length.png`, `length_histogram.png`.
  Calling it again on the same directory resumes: finished samples are kept and only missing ones generated.
  `benchmark_records` maps a benchmark name to its problems (`Problem`s or `{id, question, answer}` dicts).
  `tokenizer` needs `render_prompt(question)` and `encode(text)` (a `retro_jax.tokenization.Tokenizer`).
  Without `grade_many`, answers are graded by a `retro_jax.grading.Grader` for the duration of the call.
  `bad_records` (records the loader left out) and the questions whose prompt does not fit are listed in the
  summary's `bad_records`; rows whose budget was cut to fit are counted in `budget_clamped`.
  """
  bad = list(bad_records)
  check_run_config(config)
  start = time.monotonic()
  rows: dict[str, list[dict]] = {}
  with contextlib.ExitStack() as stack:
    if grade_many is None:
      from retro_jax.grading import Grader  # pylint: disable=import-outside-toplevel
      grader = stack.enter_context(Grader(num_workers=config.grading_workers, timeout_s=config.grading_timeout_s))
      grade_many = grader.grade_many
    for name, problems in benchmark_records.items():
      rows[name] = run_benchmark(generator, tokenizer, name, problems, config, grade_many, bad)
  summary = report.build_summary(rows, name=config.name, config=dataclasses.asdict(config),
                                 wall_time_s=time.monotonic() - start)
  summary["bad_records"] = bad
  summary["budget_clamped"] = sum(bool(row.get("budget_clamped")) for group in rows.values() for row in group)
  report.write_report(summary, config.output_dir)
  return summary
