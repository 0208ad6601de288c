"""Synthetic multi-step arithmetic: the task behind the bundled tiny reasoner.

A problem is a left-to-right chain of operations on small non-negative integers, written as one expression
with the parentheses that standard precedence needs, e.g. `What is (3 + 4) * 5 - 6?`. Its difficulty level is
the number of operations. The task is shaped for a few-million-parameter model:

- every intermediate value stays in [0, MAX_VALUE] (two digits), `+`/`-` operands are at most 20 and `*`
  operands are single digits, so the arithmetic facts a step needs form a small table the model can learn;
- evaluation is strictly left to right, so one explicit step per operation (see `trace_writer`) solves it and
  the step order is unambiguous, which makes "the derivation is finished" a learnable event;
- gold answers are exact Python ints.

Splits are deterministic in the seed, and the held-out questions never occur in the training split.
"""
from __future__ import annotations

import dataclasses
import os
import random
from typing import Iterable, Sequence

from retro_jax import jsonl

MAX_VALUE = 99
MAX_ADD_OPERAND = 20
MUL_OPERANDS = (2, 9)  # inclusive range of `*` operands
START_RANGE = (2, 30)  # inclusive range of the first number
DEFAULT_LEVELS = (2, 3, 4)

Operation = tuple[str, int]  # (operator in "+-*", operand)


@dataclasses.dataclass(frozen=True)
class Problem:
  """One arithmetic problem.

  `start` and `ops` are the structure the trace writer derives its steps from; records on disk keep only
  `id`, `question` and `answer` (the spec's record fields).
  """

  id: str
  question: str
  answer: int
  start: int
  ops: tuple[Operation, ...]

  @property
  def level(self) -> int:
    """Difficulty: the number of operations."""
    return len(self.ops)

  def to_record(self) -> dict:
    """The JSONL record: gold answer as a string, the way answers are graded (Math-Verify)."""
    return {"id": self.id, "question": self.question, "answer": str(self.answer)}


def apply_op(value: int, op: Operation) -> int:
  """The value after one operation."""
  operator, operand = op
  if operator == "+":
    return value + operand
  if operator == "-":
    return value - operand
  if operator == "*":
    return value * operand
  raise ValueError(f"unknown operator {operator!r}")


def intermediate_values(start: int, ops: Sequence[Operation]) -> list[int]:
  """Values after each operation, in order (the last one is the answer)."""
  values, value = [], start
  for op in ops:
    value = apply_op(value, op)
    values.append(value)
  return values


def render_expression(start: int, ops: Sequence[Operation]) -> str:
  """The chain as an infix expression that evaluates left to right under standard precedence.

  Only `*` after a `+`/`-` needs parentheses: `((3 + 4) * 5 - 6) * 2`. Keeping parentheses minimal keeps
  questions short in tokens.
  """
  expression, has_additive = str(start), False
  for operator, operand in ops:
    if operator == "*":
      if has_additive:
        expression = f"({expression})"
      has_additive = False
    else:
      has_additive = True
    expression = f"{expression} {operator} {operand}"
  return expression


def _allowed_ops(value: int, rng: random.Random) -> list[Operation]:
  """One candidate operation per operator that keeps the value in [0, MAX_VALUE]."""
  candidates = []
  if value + 1 <= MAX_VALUE:
    candidates.append(("+", rng.randint(1, min(MAX_ADD_OPERAND, MAX_VALUE - value))))
  if value >= 1:
    candidates.append(("-", rng.randint(1, min(MAX_ADD_OPERAND, value))))
  if 1 <= value and value * MUL_OPERANDS[0] <= MAX_VALUE:
    candidates.append(("*", rng.randint(MUL_OPERANDS[0], min(MUL_OPERANDS[1], MAX_VALUE // value))))
  return candidates


def sample_problem(rng: random.Random, level: int, problem_id: str) -> Problem:
  """Draws a problem with `level` operations; operators are uniform among those that stay in range."""
  if level < 1:
    raise ValueError(f"level must be >= 1, got {level}")
  start = rng.randint(*START_RANGE)
  value, ops = start, []
  for _ in range(level):
    op = rng.choice(_allowed_ops(value, rng))
    ops.append(op)
    value = apply_op(value, op)
  question = f"What is {render_expression(start, ops)}?"
  return Problem(id=problem_id, question=question, answer=value, start=start, ops=tuple(ops))


def _sample_unique(rng: random.Random, n: int, levels: Sequence[int], prefix: str,
                   exclude: frozenset[str]) -> list[Problem]:
  """`n` problems with distinct questions, none in `exclude`; levels cycle so each is equally common."""
  problems, seen = [], set(exclude)
  attempts = 0
  while len(problems) < n:
    attempts += 1
    if attempts > 100 * n + 1000:
      raise ValueError(f"cannot draw {n} distinct problems at levels {tuple(levels)}")
    level = levels[len(problems) % len(levels)]
    problem = sample_problem(rng, level, f"{prefix}-{len(problems):06d}")
    if problem.question not in seen:
      seen.add(problem.question)
      problems.append(problem)
  return problems


def make_splits(seed: int, n_train: int, n_eval: int,
                levels: Sequence[int] = DEFAULT_LEVELS) -> tuple[list[Problem], list[Problem]]:
  """Train and held-out problems, deterministic in `seed`, with disjoint questions.

  The held-out split is drawn first from its own stream, so it does not change when `n_train` changes: every
  model is evaluated on the same questions whatever amount of training data it saw.
  """
  eval_problems = _sample_unique(random.Random(f"arith-eval-{seed}"), n_eval, levels, "eval", frozenset())
  held_out = frozenset(p.question for p in eval_problems)
  train_problems = _sample_unique(random.Random(f"arith-train-{seed}"), n_train, levels, "train", held_out)
  return train_problems, eval_problems


def write_problems(path: str | os.PathLike, problems: Iterable[Problem]) -> int:
  """Writes `{"id", "question", "answer"}` records; returns the number written."""
  return jsonl.write_jsonl(path, (p.to_record() for p in problems))
