"""R1-style reasoning traces for the arithmetic task, with over- and under-thinking at tunable rates.

A trace is the assistant text: `<think>\\n`, steps joined by `\\n\\n`, `\\n</think>\\n\\n`, then a one-line
solution with `\\boxed{answer}`. One step does one operation. Example (over-thinking, one re-verification):

    <think>
    Compute 3 + 4 = 7.

    Compute 7 * 5 = 35.

    Wait, let me double-check: 3 + 4 = 7.

    7 * 5 = 35.

    So the answer is 35.
    </think>

    The answer is \\boxed{35}.

The shapes are chosen so that Retro-Search has something real to find in a model that imitates them:

- **Over-thinking** starts right after the step that finishes the derivation, never after the concluding
  step. In traces without it, that same position is followed by `So the answer is X.`, so a model banned
  from opening a new thought there continues with the conclusion, `</think>` and the solution: a shorter
  trace with the same answer. Each re-verification recomputes the whole chain, which makes over-thinking a
  large share of the length (as in R1, where double-checks are long).
- **Under-thinking** abandons the main line (`Compute a op b = c.`), which was correct, after 1..n-1 steps
  for a different method (rewriting the whole expression one operation at a time) that starts over, so it
  is always longer than finishing the main line. The alternative line is the only place where arithmetic
  slips happen (`alt_wrong_rate`): a slip propagates, and because every operation is injective (`+`, `-`,
  `*` by at least 2) the final answer is then wrong. A model imitating this gets its errors from switching,
  so a model trained on revised traces, which switch less, should also be more accurate.
- Over-thinking only follows a correct derivation: by definition it re-checks an answer that is already
  right, and a recomputation of a wrong line would contradict it.

Every thought switch opens with a phrase that starts with a transition keyword of the spec's default list;
no other step starts with one, and no other step starts with the same first word (`Compute`, `That`, `So`
or a digit), so banning the keywords at a boundary leaves the ordinary continuations untouched.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import random
from typing import Sequence

from retro_jax import jsonl
from retro_jax.tasks import arithmetic

THINK_OPEN = "<think>\n"  # the R1 generation prompt ends with this; a completion is trace[len(THINK_OPEN):]
THINK_CLOSE = "\n</think>\n\n"
STEP_SEPARATOR = "\n\n"

# Re-verification openers (over-thinking). Each is followed by the first recomputed operation.
VERIFY_OPENERS = (
    "Wait, let me double-check:",
    "But wait, let me recompute:",
    "Let me verify:",
    "Let me double-check:",
    "Hold on, let me check again:",
)
# Alternative-method openers (under-thinking). Each is followed by the first rewritten expression.
ALTERNATIVE_OPENERS = (
    "Alternatively, let me simplify the whole expression:",
    "Hmm, let me simplify the whole expression instead:",
    "Another approach is to simplify the whole expression:",
    "On second thought, let me simplify the whole expression:",
    "Actually, let me simplify the whole expression:",
)
_SLIPS = (-2, -1, 1, 2)  # arithmetic slips in an alternative line: off by one or two, like a real miscount


@dataclasses.dataclass(frozen=True)
class TraceConfig:
  """Failure-mode rates. All probabilities are per trace.

  Attributes:
    overthink_rate: probability that a correct derivation is followed by re-verification.
    reverify_again_prob: after one re-verification, probability of another (geometric, capped).
    max_reverifications: cap on re-verifications per trace.
    underthink_rate: probability of abandoning the (correct) main line for the alternative method; needs a
      problem with at least 2 operations, since a switch can only follow a finished step and must come
      before the main line is done.
    alt_wrong_rate: probability that the alternative line contains a slip, making the final answer wrong.
  """

  overthink_rate: float = 0.6
  reverify_again_prob: float = 0.5
  max_reverifications: int = 2
  underthink_rate: float = 0.3
  alt_wrong_rate: float = 0.5

  def __post_init__(self):
    for name in ("overthink_rate", "reverify_again_prob", "underthink_rate", "alt_wrong_rate"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
    if self.max_reverifications < 1:
      raise ValueError(f"max_reverifications must be >= 1, got {self.max_reverifications}")


@dataclasses.dataclass(frozen=True)
class Trace:
  """A written trace and what went into it.

  Attributes:
    text: the assistant text, from `<think>\\n` to the end of the solution.
    final_answer: the boxed answer.
    is_correct: whether `final_answer` equals the gold answer.
    num_reverifications: re-verification thoughts (0 when there is no over-thinking).
    switch_after: main-line steps written before abandoning the main line (None without under-thinking).
    alt_wrong: whether the alternative line has a slip.
    num_steps: thinking steps (the `\\n\\n`-separated chunks between the think tags).
    num_switches: steps that open a thought with a transition keyword (= Retro-Search boundaries).
  """

  text: str
  final_answer: int
  is_correct: bool
  num_reverifications: int
  switch_after: int | None
  alt_wrong: bool
  num_steps: int
  num_switches: int

  @property
  def overthinking(self) -> bool:
    return self.num_reverifications > 0

  @property
  def underthinking(self) -> bool:
    return self.switch_after is not None

  def metadata(self) -> dict:
    """Everything but the text, for JSONL records."""
    fields = dataclasses.asdict(self)
    del fields["text"]
    return fields | {"overthinking": self.overthinking, "underthinking": self.underthinking}


def _main_line(start: int, ops: Sequence[arithmetic.Operation]) -> list[str]:
  """`Compute a op b = c.` steps, one per operation."""
  steps, value = [], start
  for op in ops:
    result = arithmetic.apply_op(value, op)
    steps.append(f"Compute {value} {op[0]} {op[1]} = {result}.")
    value = result
  return steps


def _alternative_line(problem: arithmetic.Problem, opener: str, slip_at: int | None,
                      rng: random.Random) -> tuple[list[str], int]:
  """Rewrites the whole expression one operation at a time, from the start; returns (steps, final value).

  With `slip_at`, the value of that operation is off by a small amount and the rest is computed correctly
  from the wrong value, so the line stays internally consistent but ends wrong.
  """
  steps, value = [], problem.start
  for i, op in enumerate(problem.ops):
    value = arithmetic.apply_op(value, op)
    if i == slip_at:
      value += rng.choice([d for d in _SLIPS if _stays_non_negative(value + d, problem.ops[i + 1:])])
    rest = arithmetic.render_expression(value, problem.ops[i + 1:])
    steps.append(f"{opener} {rest}." if i == 0 else f"That gives {rest}.")
  return steps, value


def _stays_non_negative(value: int, ops: Sequence[arithmetic.Operation]) -> bool:
  """Whether a (wrong) value and everything computed from it stay >= 0, as the task's numbers do."""
  return value >= 0 and all(v >= 0 for v in arithmetic.intermediate_values(value, ops))


def _reverification(problem: arithmetic.Problem, opener: str) -> list[str]:
  """Recomputes the whole chain: `<opener> a op b = c.` then `c op d = e.` ..."""
  steps = [s.removeprefix("Compute ") for s in _main_line(problem.start, problem.ops)]
  steps[0] = f"{opener} {steps[0]}"
  return steps


def write_trace(problem: arithmetic.Problem, config: TraceConfig, rng: random.Random) -> Trace:
  """Writes one trace for `problem`, drawing the failure modes from `config` with `rng`."""
  main = _main_line(problem.start, problem.ops)
  switch_after, alt_wrong = None, False
  if problem.level >= 2 and rng.random() < config.underthink_rate:
    switch_after = rng.randint(1, problem.level - 1)
    alt_wrong = rng.random() < config.alt_wrong_rate
    slip_at = rng.randrange(problem.level) if alt_wrong else None
    alternative, final = _alternative_line(problem, rng.choice(ALTERNATIVE_OPENERS), slip_at, rng)
    steps = main[:switch_after] + alternative
  else:
    steps, final = list(main), problem.answer
  is_correct = final == problem.answer

  num_reverifications = 0
  if is_correct and rng.random() < config.overthink_rate:
    num_reverifications = 1
    while num_reverifications < config.max_reverifications and rng.random() < config.reverify_again_prob:
      num_reverifications += 1
    for _ in range(num_reverifications):
      steps += _reverification(problem, rng.choice(VERIFY_OPENERS))

  steps.append(f"So the answer is {final}.")
  text = THINK_OPEN + STEP_SEPARATOR.join(steps) + THINK_CLOSE + f"The answer is \\boxed{{{final}}}."
  return Trace(text=text, final_answer=final, is_correct=is_correct, num_reverifications=num_reverifications,
               switch_after=switch_after, alt_wrong=alt_wrong, num_steps=len(steps),
               num_switches=num_reverifications + (switch_after is not None))


def write_traces(problems: Sequence[arithmetic.Problem], config: TraceConfig, seed: int) -> list[Trace]:
  """One trace per problem; each draws from its own stream keyed by (seed, id), so a trace does not depend
  on which other problems are in the list."""
  return [write_trace(p, config, random.Random(f"trace-{seed}-{p.id}")) for p in problems]


def write_task_files(out_dir: str | os.PathLike, seed: int, n_train: int, n_eval: int,
                     levels: Sequence[int] = arithmetic.DEFAULT_LEVELS,
                     trace_config: TraceConfig | None = TraceConfig()) -> dict[str, pathlib.Path]:
  """Writes the task's files for the demo and for training the tiny reasoner.

  - `train.jsonl`, `eval.jsonl`: `{"id", "question", "answer"}` problems (held-out questions disjoint);
  - `train_traces.jsonl` (unless `trace_config` is None): the training problems with a written `trace` and
    its `meta` (failure modes, correctness), the spec's record format for SFT of the base reasoner.

  Returns the paths by name (`train`, `eval`, `train_traces`).
  """
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  train, held_out = arithmetic.make_splits(seed, n_train, n_eval, levels)
  paths = {"train": out / "train.jsonl", "eval": out / "eval.jsonl"}
  arithmetic.write_problems(paths["train"], train)
  arithmetic.write_problems(paths["eval"], held_out)
  if trace_config is not None:
    paths["train_traces"] = out / "train_traces.jsonl"
    traces = write_traces(train, trace_config, seed)
    jsonl.write_jsonl(paths["train_traces"], (
        p.to_record() | {"trace": t.text, "meta": t.metadata()} for p, t in zip(train, traces)))
  return paths
