"""Final-answer extraction and math equivalence (the reward R of retro_jax/search/README.md, section 2).

Equivalence goes through Math-Verify (`parse` then `verify`, gold first, prediction second). Sympy can hang on
model output (`9^{9^{9^{9}}}` never finishes), and Math-Verify's own timeout is a SIGALRM that only works in a
main thread and answers False silently. So checks run in a small pool of worker processes with a per-call
deadline: a worker past its deadline is killed and replaced, and the answer counts as incorrect with status
"timeout". Model output is only ever parsed, never evaluated as Python.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
import select
import subprocess
import sys
import time
from typing import Literal, Sequence

GradeStatus = Literal["ok", "no_answer", "parse_error", "timeout"]

THINKING_END_MARKERS = ("</think>", "<|end_of_thought|>")
_BOX_COMMANDS = ("\\boxed", "\\fbox")
_READY = "ready"


@dataclasses.dataclass(frozen=True)
class GradeResult:
  """`status` is "ok" whenever the check ran, whatever its verdict; every other status means incorrect."""

  correct: bool
  status: GradeStatus
  predicted: str | None


def boxed_contents(text: str) -> list[str]:
  r"""Contents of the top-level `\boxed{...}` / `\fbox{...}` in `text`, in order.

  Braces nest; `\{` and `\}` are literal braces and do not count. A box whose braces never close (a truncated
  response) is skipped. A box inside another box is part of the outer content, not a separate answer.
  """
  contents = []
  position = 0
  while True:
    start = _next_box_start(text, position)
    if start < 0:
      return contents
    end = _matching_brace(text, start)
    if end < 0:
      position = start
      continue
    contents.append(text[start + 1:end])
    position = end + 1


def _next_box_start(text: str, position: int) -> int:
  """Index of the "{" that opens the next box at or after `position`, or -1."""
  while True:
    hits = [(text.find(command, position), command) for command in _BOX_COMMANDS]
    hits = [(at, command) for at, command in hits if at >= 0]
    if not hits:
      return -1
    at, command = min(hits)
    brace = at + len(command)
    while brace < len(text) and text[brace] == " ":
      brace += 1
    if brace < len(text) and text[brace] == "{":
      return brace
    position = at + len(command)  # `\boxed 5` or `\boxedfoo`: not a braced box


def _matching_brace(text: str, open_at: int) -> int:
  depth = 0
  index = open_at
  while index < len(text):
    char = text[index]
    if char == "\\":
      index += 2
      continue
    if char == "{":
      depth += 1
    elif char == "}":
      depth -= 1
      if depth == 0:
        return index
    index += 1
  return -1


def extract_final_answer(text: str) -> str | None:
  r"""The last box after the thinking, falling back to the last box anywhere in the text.

  The thinking ends at the first `</think>` or `<|end_of_thought|>`. The fallback covers responses that never
  close their thinking (truncated, or a model that skips the marker) but still box an answer inside it.
  """
  for marker in THINKING_END_MARKERS:
    at = text.find(marker)
    if at >= 0:
      after = boxed_contents(text[at + len(marker):])
      if after:
        return after[-1].strip()
      break
  everywhere = boxed_contents(text)
  return everywhere[-1].strip() if everywhere else None


def _gold_answer(gold: str) -> str:
  """Gold answers are sometimes whole solutions with a box (MATH's `solution` field); take the box then."""
  return extract_final_answer(gold) or gold.strip()


def _check(parse, verify, gold: str, predicted: str) -> str:
  """Verdict "correct" | "wrong" | "parse_error". Math-Verify's own timeouts are off: the pool enforces one."""
  try:
    gold_parsed = parse("\\boxed{" + gold + "}", parsing_timeout=None)
    predicted_parsed = parse("\\boxed{" + predicted + "}", parsing_timeout=None)
    if not gold_parsed or not predicted_parsed:
      return "parse_error"
    return "correct" if verify(gold_parsed, predicted_parsed, timeout_seconds=None) else "wrong"
  except Exception:  # pylint: disable=broad-except  # sympy raises anything on odd input; it is a parse failure
    return "parse_error"


def _worker_main() -> None:
  """`python -m retro_jax.grading`: one JSON [gold, predicted] per stdin line -> one JSON verdict per line.

  Stdin closing (the parent exited or was killed) ends the worker.
  """
  import logging  # pylint: disable=import-outside-toplevel
  from math_verify import parse, verify  # pylint: disable=import-outside-toplevel
  logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns that its timeout is off; we know
  protocol, sys.stdout = sys.stdout, sys.stderr  # a library print must not corrupt the protocol stream
  _check(parse, verify, "1", "1")  # warm the LaTeX grammar so that no real call is charged for it
  print(json.dumps(_READY), file=protocol, flush=True)
  for line in sys.stdin:
    gold, predicted = json.loads(line)
    print(json.dumps(_check(parse, verify, gold, predicted)), file=protocol, flush=True)


class _Worker:
  """One grading process, started with `python -m` rather than multiprocessing so that it never re-imports
  the caller's `__main__` (scripts without an `if __name__ == "__main__"` guard, notebooks, absl apps).

  `task` is the index being checked; `deadline` is when the worker is killed (its start, or the task).
  """

  def __init__(self, deadline: float):
    package_root = str(pathlib.Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    self.process = subprocess.Popen([sys.executable, "-m", "retro_jax.grading"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, bufsize=0, env=env)
    self.ready = False
    self.task: int | None = None
    self.deadline = deadline
    self._buffer = b""

  def fileno(self) -> int:
    return self.process.stdout.fileno()

  def send(self, gold: str, predicted: str) -> None:
    self.process.stdin.write((json.dumps([gold, predicted]) + "\n").encode())

  def read_messages(self) -> list[str]:
    """Complete messages that arrived; raises EOFError when the process has died."""
    chunk = os.read(self.fileno(), 65536)
    if not chunk:
      raise EOFError
    self._buffer += chunk
    *lines, self._buffer = self._buffer.split(b"\n")
    return [json.loads(line) for line in lines]

  def stop(self) -> None:
    self.process.kill()
    self.process.wait()
    self.process.stdin.close()
    self.process.stdout.close()


class Grader:
  """Grades (gold, response) pairs; use as a context manager so the worker processes are shut down.

  Workers start lazily (the first pair with an answer to check). `counts` tallies every status this grader
  returned, so runs can report how many answers timed out or failed to parse.
  """

  def __init__(self, num_workers: int = 2, timeout_s: float = 5.0, start_timeout_s: float = 120.0):
    if num_workers < 1:
      raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    self.timeout_s = timeout_s
    self.start_timeout_s = start_timeout_s
    self.counts: collections.Counter[str] = collections.Counter()
    self._num_workers = num_workers
    self._workers: list[_Worker] = []

  def __enter__(self) -> Grader:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def close(self) -> None:
    for worker in self._workers:
      worker.stop()
    self._workers = []

  def grade(self, gold: str, response: str) -> GradeResult:
    return self.grade_many([(gold, response)])[0]

  def grade_many(self, pairs: Sequence[tuple[str, str]]) -> list[GradeResult]:
    """Grades all pairs, checking up to `num_workers` at once; results are in input order."""
    predictions = [extract_final_answer(response) for _, response in pairs]
    tasks = {i: (_gold_answer(gold), predicted)
             for i, ((gold, _), predicted) in enumerate(zip(pairs, predictions)) if predicted is not None}
    verdicts = self._check_all(tasks) if tasks else {}
    results = [_result(verdicts.get(i), predicted) for i, predicted in enumerate(predictions)]
    self.counts.update(result.status for result in results)
    return results

  def _check_all(self, tasks: dict[int, tuple[str, str]]) -> dict[int, str]:
    """Runs every check; a verdict is "correct" | "wrong" | "parse_error" | "timeout"."""
    self._start_missing_workers()
    waiting = collections.deque(tasks)
    verdicts: dict[int, str] = {}
    while len(verdicts) < len(tasks):
      self._dispatch(waiting, tasks)
      self._collect(verdicts)
      self._replace_late_workers(verdicts)
    return verdicts

  def _start_missing_workers(self) -> None:
    while len(self._workers) < self._num_workers:
      self._workers.append(_Worker(deadline=time.monotonic() + self.start_timeout_s))

  def _dispatch(self, waiting: collections.deque[int], tasks: dict[int, tuple[str, str]]) -> None:
    for worker in list(self._workers):
      if waiting and worker.ready and worker.task is None:
        task = waiting.popleft()
        try:
          worker.send(*tasks[task])
        except OSError:  # it died while idle: retry the task on a fresh worker
          waiting.appendleft(task)
          self._replace(worker, {}, "parse_error")
          continue
        worker.task = task
        worker.deadline = time.monotonic() + self.timeout_s

  def _collect(self, verdicts: dict[int, str]) -> None:
    """Waits until a worker answers or the nearest deadline passes, and records what arrived."""
    active = [w for w in self._workers if w.task is not None or not w.ready]
    wait_s = max(0.0, min(w.deadline for w in active) - time.monotonic())
    readable, _, _ = select.select(active, [], [], wait_s)
    for worker in readable:
      try:
        messages = worker.read_messages()
      except EOFError:  # the process died (out of memory, a crash in native code)
        self._replace(worker, verdicts, "parse_error")
        continue
      for message in messages:
        if message == _READY:
          worker.ready = True
        else:
          verdicts[worker.task] = message
          worker.task = None

  def _replace_late_workers(self, verdicts: dict[int, str]) -> None:
    now = time.monotonic()
    for worker in list(self._workers):
      if worker.deadline <= now and worker.task is not None:
        self._replace(worker, verdicts, "timeout")
      elif worker.deadline <= now and not worker.ready:
        raise RuntimeError(f"a grading worker did not start within {self.start_timeout_s} s")

  def _replace(self, worker: _Worker, verdicts: dict[int, str], verdict: str) -> None:
    if worker.task is not None:
      verdicts[worker.task] = verdict
    elif not worker.ready:
      raise RuntimeError("a grading worker died while starting (is math-verify installed?)")
    worker.stop()
    self._workers.remove(worker)
    self._start_missing_workers()


def _result(verdict: str | None, predicted: str | None) -> GradeResult:
  if predicted is None:
    return GradeResult(False, "no_answer", None)
  if verdict in ("correct", "wrong"):
    return GradeResult(verdict == "correct", "ok", predicted)
  return GradeResult(False, verdict, predicted)


if __name__ == "__main__":
  _worker_main()
