"""Scripted stand-ins for the engine and the grader, so the search's logic is checked by hand.

`ScriptedGenerator` is a TextGenerator with one token per character (token id = code point). Its rollouts are a
function of the prompt text (and sample index), never of batch order, like the real engine with per-request
seeds. Run as a script, it drives `run_search` for the kill-and-resume test.
"""
from __future__ import annotations

import collections
import hashlib
import re
import sys
import time
from typing import Callable, Mapping, Sequence

from retro_jax.engine.requests import Completion, GenerationRequest, GenerationResult, RequestQueue
from retro_jax.grading import GradeResult, extract_final_answer

Script = Mapping[str, Sequence[str]] | Callable[[str, int], str]


def render(question: str) -> str:
  """The prompt renderer of the tests: ends with the thinking opener, like the R1 template."""
  return f"Question: {question}\n<think>\n"


class ScriptedGenerator:
  """Rollout i of a prompt is `script[prompt][i % len]` (a mapping) or `script(prompt, i)` (a callable).

  `stream` serves up to `slots` requests at once and answers the most recent first, so results come back out of
  submission order. Every request served is kept in `requests`; `max_in_flight` is the most held at once.
  """

  def __init__(self, script: Script, slots: int = 4, delay_s: float = 0.0, max_seq_len: int | None = None):
    self.script = script
    self.slots = slots
    self.delay_s = delay_s
    self.max_seq_len = max_seq_len  # prompt + generated tokens, as the engine's; None: no limit
    self.requests: list[GenerationRequest] = []
    self.max_in_flight = 0

  def encode(self, text: str) -> list[int]:
    return [ord(char) for char in text]

  def decode(self, tokens: Sequence[int]) -> str:
    return "".join(chr(token) for token in tokens)

  def _rollout(self, prompt: str, index: int) -> str:
    if callable(self.script):
      return self.script(prompt, index)
    if prompt not in self.script:
      raise KeyError(f"no scripted rollout for prompt {prompt!r}")
    rollouts = self.script[prompt]
    return rollouts[index % len(rollouts)]

  def complete(self, request: GenerationRequest) -> GenerationResult:
    if self.max_seq_len is not None and len(request.prompt_tokens) + request.max_new_tokens > self.max_seq_len:
      raise AssertionError(f"a request of {len(request.prompt_tokens)} + {request.max_new_tokens} tokens reached "
                           f"a generator of {self.max_seq_len}: callers must fit requests first")
    prompt = self.decode(request.prompt_tokens)
    samples = []
    for index in range(request.n):
      text = self._rollout(prompt, index)
      if text and ord(text[0]) in request.banned_first_token_ids:
        raise AssertionError(f"scripted rollout {text!r} starts with a banned token")
      finish = "eos"
      if len(text) > request.max_new_tokens:
        text, finish = text[:request.max_new_tokens], "length"
      samples.append(Completion(tuple(self.encode(text)), text, finish))
    return GenerationResult(request, tuple(samples), len(request.prompt_tokens))

  def stream(self, queue: RequestQueue):
    in_flight: list[GenerationRequest] = []
    while True:
      while len(in_flight) < self.slots and (request := queue.get()) is not None:
        in_flight.append(request)
      if not in_flight:
        return
      self.max_in_flight = max(self.max_in_flight, len(in_flight))
      request = in_flight.pop()
      self.requests.append(request)
      if self.delay_s:
        time.sleep(self.delay_s)
      yield self.complete(request)

  def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
    return [self.complete(request) for request in requests]


class ExactGrader:
  """Correct when the extracted answer equals the gold string: the Grader's interface without processes."""

  def __init__(self):
    self.counts: collections.Counter[str] = collections.Counter()
    self.calls = 0

  def grade_many(self, pairs: Sequence[tuple[str, str]]) -> list[GradeResult]:
    self.calls += len(pairs)
    results = []
    for gold, response in pairs:
      predicted = extract_final_answer(response)
      if predicted is None:
        results.append(GradeResult(False, "no_answer", None))
      else:
        results.append(GradeResult(predicted == gold.strip(), "ok", predicted))
    self.counts.update(result.status for result in results)
    return results

  def grade(self, gold: str, response: str) -> GradeResult:
    return self.grade_many([(gold, response)])[0]


def _stable_fraction(*parts: object) -> float:
  digest = hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()
  return int.from_bytes(digest[:8], "little") / 2**64


def synthetic_rollout(prompt: str, index: int) -> str:
  """A rollout for `synthetic_records`: one to three steps, right (the answer is in the question) two times in
  three, sometimes with a thought switch of its own. Depends only on the prompt and the sample index."""
  answer = re.search(r"answer is (\d+)", prompt).group(1)
  draw = _stable_fraction(prompt, index)
  steps = ["So we continue."] + ["Hmm, check again."] * (draw < 0.3) + ["Then it holds."] * (draw > 0.7)
  final = answer if draw < 2 / 3 else str(int(answer) + 1)
  return "\n\n".join(steps) + f"\n</think>\n\nThe answer is \\boxed{{{final}}}."


def synthetic_records(count: int) -> list[dict]:
  """Correct-ish traces with several thought switches; every third one ends on a wrong answer."""
  records = []
  for i in range(count):
    answer = 10 + i
    body = [f"Step one of {i}.", "Wait, look again.", "Compute more.", "Alternatively, use symmetry.",
            "Hmm, fine.", "Keep going.", "Actually, recount."][:3 + i % 5]
    final = answer if i % 3 else answer + 100
    trace = "<think>\n" + "\n\n".join(body) + f"\n</think>\n\n\\boxed{{{final}}}"
    records.append({"id": f"r{i}", "question": f"q{i}: the answer is {answer}", "answer": str(answer),
                    "trace": trace})
  return records


def _main(argv: Sequence[str]) -> None:
  """`python fakes.py INPUT OUTPUT DELAY_S`: the search of synthetic records with the scripted engine."""
  from retro_jax.search import runner  # pylint: disable=import-outside-toplevel
  input_path, output_path, delay_s = argv[0], argv[1], float(argv[2])
  rows, total = runner.open_input(input_path)
  runner.run_search(rows, generator=ScriptedGenerator(synthetic_rollout, slots=3, delay_s=delay_s),
                    render_prompt=render, grader=ExactGrader(), output_path=output_path,
                    max_records_in_flight=4, total=total, progress=False)


if __name__ == "__main__":
  _main(sys.argv[1:])
