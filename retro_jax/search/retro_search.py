"""Retro-Search of one record, as a small state machine (search/README.md, sections 3 and 4).

`RecordSearch` never calls the model: it hands out one `GenerationRequest` at a time (all rollouts of one
boundary, as `n` samples) and takes the result back, so a driver can multiplex thousands of records over one
engine and keep its decode slots full (runner.py).

Resolved details the spec leaves open:
- Value. Only the order of V = gamma^N * R matters, and gamma^N underflows to 0 for long traces in tokens, so
  values are compared as log V = N * log(gamma) (-inf when R = 0). With R in {0, 1} and gamma < 1 this is
  "correct and shorter"; gamma = 1 makes every correct trajectory tie, and ties keep the current one.
- A rollout that stops on the length limit, or never closes its thinking, has R = 0: it is not a complete
  trace, and an accepted suffix must leave a trace that can be parsed again.
- Only rollouts that could beat the current trajectory (by their length alone) are graded; the rest cannot
  change the outcome, and grading is the expensive part of a result.
- Prompt tokens are `encode(rendered prompt + kept thinking text)`, not the concatenation of separately
  encoded chunks: the model must see the canonical tokenization, the one it was trained on and the one a
  later SFT run renders. Nested prefixes of one trace still share their token prefix wherever the tokenizer
  does not merge across the "\\n\\n" before a step (Qwen2's pre-tokenizer splits newline runs from words), and
  where it does, the engine's prefix cache simply reuses a little less; outputs do not change.
- Keyword ban. At the first generated position every token that starts the tokenization of a keyword, with
  and without a leading space, is banned. This over-bans: "Let me check" bans the token "Let", so no rollout
  starts with "Let me compute" either; "But wait" bans every "But". The spec accepts this.
- Length bound (on by default, only while the current trajectory is correct, since any correct rollout beats
  an incorrect one): max_new_tokens = tokens(current suffix) + solution_allowance_tokens. In `tokens` units a
  rollout still thinking at that point has at least as many thinking tokens as the current suffix and cannot
  win, so the winner is unchanged as long as a winner's solution fits in the current solution plus the
  allowance (which also absorbs re-tokenization drift at the boundary). In `steps` units a rollout with fewer
  but longer steps may be cut: a documented approximation, switched off with `length_bounded_rollouts=False`.
- Sequence limit: a boundary's budget is cut to what fits the engine's max_seq_len after its prompt (counted in
  `budgets_clamped`; a cut rollout may end on "length", R = 0); a boundary whose prompt leaves no room ends the
  search with a `reason`, since later boundaries have longer prompts still.
- Seeds: a boundary's request is seeded from (run seed, record id, boundary), and the engine draws sample i
  from fold_in(seed, i), so no result depends on which other records share the batch.
- Partial mode draws its boundaries once from the original trace; after an accepted rollout the boundaries
  still to try are drawn again, with the same per-record generator, from the boundaries of the new suffix.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from typing import Callable, Sequence

from retro_jax.engine.requests import Completion, GenerationRequest, GenerationResult, SamplingParams
from retro_jax.grading import GradeResult
from retro_jax.search import traces

GradeMany = Callable[[Sequence[tuple[str, str]]], list[GradeResult]]
Encode = Callable[[str], list[int]]


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """Every option of the spec with its default; `max_prompt_tokens=0` means no limit. Prefix reuse [ext] is
  not here: it is the engine's prefix cache, and it must not change outputs."""

  mode: str = "full"  # "full": every boundary; "partial": num_partial_boundaries drawn at random
  num_partial_boundaries: int = 1
  rollouts_per_boundary: int = 1
  value_unit: str = "steps"  # "steps" | "tokens": the N of V = gamma^N * R, counted over the thinking
  gamma: float = 0.99
  revise_incorrect: bool = False  # [ext] also search traces whose answer is wrong
  length_bounded_rollouts: bool = True  # [ext]
  solution_allowance_tokens: int = 256
  max_rollout_tokens: int = 16384
  temperature: float = 0.6  # R1-distill's recommended sampling
  top_p: float = 0.95
  top_k: int = 0
  keywords: tuple[str, ...] = traces.DEFAULT_KEYWORDS
  max_prompt_tokens: int = 0
  keep_rollouts: bool = False  # write every rollout (text, tokens, grade) into the record's "rollouts"
  seed: int = 0

  def __post_init__(self):
    object.__setattr__(self, "keywords", tuple(self.keywords))
    if self.mode not in ("full", "partial"):
      raise ValueError(f"mode must be 'full' or 'partial', got {self.mode!r}")
    if self.value_unit not in ("steps", "tokens"):
      raise ValueError(f"value_unit must be 'steps' or 'tokens', got {self.value_unit!r}")
    if not 0.0 < self.gamma <= 1.0:
      raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
    for name in ("num_partial_boundaries", "rollouts_per_boundary", "max_rollout_tokens"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    for name in ("solution_allowance_tokens", "max_prompt_tokens"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

  @property
  def sampling(self) -> SamplingParams:
    return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)


@dataclasses.dataclass(frozen=True)
class SearchContext:
  """What every record of a run shares: the config, the reviser's tokenizer and the grader, and the engine's
  sequence limit (prompt + generated tokens; None: unlimited)."""

  config: SearchConfig
  encode: Encode
  grade_many: GradeMany
  banned_first_token_ids: tuple[int, ...]
  max_seq_len: int | None = None

  @classmethod
  def create(cls, config: SearchConfig, encode: Encode, grade_many: GradeMany,
             max_seq_len: int | None = None) -> SearchContext:
    return cls(config, encode, grade_many, keyword_first_token_ids(config.keywords, encode), max_seq_len)


@dataclasses.dataclass(frozen=True)
class SearchRecord:
  id: str | int
  question: str
  answer: str
  trace: traces.ParsedTrace
  prompt_text: str  # the rendered question, ending where the thinking starts ("...<think>\n")


def keyword_first_token_ids(keywords: Sequence[str], encode: Encode) -> tuple[int, ...]:
  """First token of each keyword's tokenization, with and without a leading space (over-bans; see above)."""
  ids = {tokens[0] for keyword in keywords for tokens in (encode(keyword), encode(" " + keyword)) if tokens}
  return tuple(sorted(ids))


def derive_seed(seed: int, record_id: str | int, salt: str | int) -> int:
  """A 31-bit seed from the run seed, the record and what it is for: results never depend on batch order."""
  digest = hashlib.sha256(f"{seed}\x00{record_id!r}\x00{salt}".encode()).digest()
  return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def log_value(correct: bool, length: int, gamma: float) -> float:
  return length * math.log(gamma) if correct else -math.inf


@dataclasses.dataclass(frozen=True)
class _Trajectory:
  trace: traces.ParsedTrace
  correct: bool
  length: int  # N, in the config's value unit


class RecordSearch:
  """The search of one record: call `next_request()`, then `on_result()` with its result, until the former
  returns None; then `outputs()` holds the output record."""

  def __init__(self, context: SearchContext, record: SearchRecord, original_grade: GradeResult):
    self._context = context
    self._config = context.config
    self._record = record
    self._original = self._trajectory(record.trace, original_grade.correct)
    self._original_grade = original_grade
    self._current = self._original
    self._rng = random.Random(derive_seed(self._config.seed, record.id, "partial"))
    self._plan: list[int] = []
    self._boundary: int | None = None
    self._request: GenerationRequest | None = None
    self._accepted: list[int] = []
    self._boundaries_tried = 0
    self._rollouts = 0
    self._rollout_log: list[dict] = []  # with keep_rollouts
    self._budgets_clamped = 0
    self._tokens_generated = 0
    self._reason: str | None = None
    if original_grade.correct or self._config.revise_incorrect:
      self._boundary = self._first_boundary()

  # ---- driving ----

  def next_request(self) -> GenerationRequest | None:
    """The rollouts for the current boundary, or None once the search is over."""
    if self._boundary is None or self._request is not None:
      return self._request
    prompt_tokens = tuple(self._context.encode(self._prompt_text(self._boundary)))
    if 0 < self._config.max_prompt_tokens < len(prompt_tokens):
      self._reason = (f"stopped at boundary {self._boundary}: prompt of {len(prompt_tokens)} tokens is over "
                      f"max_prompt_tokens={self._config.max_prompt_tokens}")
      self._boundary = None  # later boundaries have longer prompts still
      return None
    room = None if self._context.max_seq_len is None else self._context.max_seq_len - len(prompt_tokens)
    if room is not None and room < 1:
      self._reason = (f"stopped at boundary {self._boundary}: prompt of {len(prompt_tokens)} tokens leaves no room "
                      f"under engine.max_seq_len={self._context.max_seq_len}")
      self._boundary = None
      return None
    max_new_tokens = self._max_new_tokens(self._boundary)
    if room is not None and max_new_tokens > room:  # ends on "length" at the sequence limit (R = 0)
      max_new_tokens = room
      self._budgets_clamped += 1
    self._request = GenerationRequest(
        prompt_tokens=prompt_tokens,
        max_new_tokens=max_new_tokens,
        sampling=self._config.sampling,
        seed=derive_seed(self._config.seed, self._record.id, self._boundary),
        n=self._config.rollouts_per_boundary,
        banned_first_token_ids=self._context.banned_first_token_ids,
    )
    return self._request

  def on_result(self, result: GenerationResult) -> None:
    boundary = self._boundary
    if boundary is None or self._request is None:
      raise RuntimeError(f"record {self._record.id!r}: a result arrived with no request out")
    self._request = None
    self._boundaries_tried += 1
    self._rollouts += len(result.samples)
    self._tokens_generated += sum(len(sample.tokens) for sample in result.samples)
    winner = self._winning_candidate(boundary, result.samples)
    if winner is not None:
      self._current = winner
      self._accepted.append(boundary)
    self._boundary = self._next_boundary(boundary, accepted=winner is not None)

  @property
  def done(self) -> bool:
    return self._boundary is None

  def outputs(self) -> list[dict]:
    if not self.done:
      raise RuntimeError(f"record {self._record.id!r} is still being searched")
    return [self._output()]

  # ---- boundaries ----

  def _boundaries_after(self, boundary: int) -> list[int]:
    return [b for b in traces.boundaries(self._current.trace, self._config.keywords) if b > boundary]

  def _first_boundary(self) -> int | None:
    if self._config.mode == "partial":
      self._draw_plan(after=0, count=self._config.num_partial_boundaries)
      return self._plan.pop(0) if self._plan else None
    return next(iter(self._boundaries_after(0)), None)

  def _next_boundary(self, boundary: int, accepted: bool) -> int | None:
    if self._config.mode == "full":
      return next(iter(self._boundaries_after(boundary)), None)
    if accepted:  # the planned boundaries index steps of the replaced suffix: draw again from the new one
      self._draw_plan(after=boundary, count=self._config.num_partial_boundaries - self._boundaries_tried)
    return self._plan.pop(0) if self._plan else None

  def _draw_plan(self, after: int, count: int) -> None:
    pool = self._boundaries_after(after)
    self._plan = sorted(self._rng.sample(pool, min(count, len(pool))))

  # ---- rollouts and values ----

  def _prompt_text(self, boundary: int) -> str:
    return self._record.prompt_text + self._current.trace.thinking_prefix(boundary)

  def _max_new_tokens(self, boundary: int) -> int:
    if not (self._config.length_bounded_rollouts and self._current.correct):
      return self._config.max_rollout_tokens
    suffix_tokens = len(self._context.encode(self._current.trace.suffix(boundary)))
    return min(self._config.max_rollout_tokens, suffix_tokens + self._config.solution_allowance_tokens)

  def _trajectory(self, trace: traces.ParsedTrace, correct: bool) -> _Trajectory:
    if self._config.value_unit == "steps":
      return _Trajectory(trace, correct, len(trace.steps))
    return _Trajectory(trace, correct, len(self._context.encode(trace.thinking)))

  def _value(self, trajectory: _Trajectory) -> float:
    return log_value(trajectory.correct, trajectory.length, self._config.gamma)

  def _winning_candidate(self, boundary: int, samples: Sequence[Completion]) -> _Trajectory | None:
    """The correct rollout of highest value (ties: fewest generated tokens, then the first), if its value is
    strictly higher than the current trajectory's (a tie keeps the current one); else None."""
    kept_text = self._current.trace.head + self._current.trace.thinking_prefix(boundary)
    contenders = []
    for index, sample in enumerate(samples):
      trace = _complete_trace(kept_text + sample.text, sample)
      if trace is None:
        continue
      candidate = self._trajectory(trace, correct=True)  # valued as if correct: grade only possible winners
      if self._value(candidate) > self._value(self._current):
        contenders.append((candidate, len(sample.tokens), index))
    grades = (self._context.grade_many([(self._record.answer, c.trace.text) for c, _, _ in contenders])
              if contenders else [])
    winners = [item for item, grade in zip(contenders, grades) if grade.correct]
    best = min(winners, key=lambda item: (-self._value(item[0]), item[1], item[2])) if winners else None
    if self._config.keep_rollouts:
      graded = {index: grade for (_, _, index), grade in zip(contenders, grades)}
      self._log_rollouts(boundary, kept_text, samples, graded, None if best is None else best[2])
    return None if best is None else best[0]

  def _log_rollouts(self, boundary: int, kept_text: str, samples: Sequence[Completion],
                    grades: dict[int, GradeResult], accepted: int | None) -> None:
    """With keep_rollouts: each rollout's text, length and grade. Rollouts that could not win by their length
    (or were incomplete) were not graded for the search; they are graded here, so the user sees every grade."""
    ungraded = [index for index in range(len(samples)) if index not in grades]
    if ungraded:
      late = self._context.grade_many([(self._record.answer, kept_text + samples[i].text) for i in ungraded])
      grades.update(zip(ungraded, late))
    for index, sample in enumerate(samples):
      self._rollout_log.append({
          "boundary": boundary, "text": sample.text, "tokens": len(sample.tokens),
          "finish_reason": sample.finish_reason, "correct": grades[index].correct,
          "could_win": index not in ungraded, "accepted": index == accepted})

  # ---- output ----

  def _status(self) -> str:
    if not self._original.correct:
      if not self._config.revise_incorrect:
        return "skipped_incorrect"
      return "recovered" if self._current.correct else "unchanged"
    return "revised" if self._accepted else "unchanged"

  def _output(self) -> dict:
    before, after = self._original.trace, self._current.trace
    keywords = self._config.keywords
    return {
        "id": self._record.id,
        "question": self._record.question,
        "answer": self._record.answer,
        "trace": before.text,
        "revised_trace": after.text,
        "status": self._status(),
        "reason": self._reason,
        "correct_before": self._original.correct,
        "correct_after": self._current.correct,
        "grade_status_before": self._original_grade.status,
        "tokens_before": len(self._context.encode(before.text)),
        "tokens_after": len(self._context.encode(after.text)),
        "steps_before": len(before.steps),
        "steps_after": len(after.steps),
        "thoughts_before": traces.count_thoughts(before, keywords),
        "thoughts_after": traces.count_thoughts(after, keywords),
        "boundaries_tried": self._boundaries_tried,
        "accepted_boundaries": list(self._accepted),
        "num_rollouts": self._rollouts,
        "budgets_clamped": self._budgets_clamped,
        "tokens_generated": self._tokens_generated,
        **({"rollouts": self._rollout_log} if self._config.keep_rollouts else {}),
    }


def _complete_trace(text: str, sample: Completion) -> traces.ParsedTrace | None:
  """The candidate trace, or None when the rollout is incomplete (R = 0): cut by the length limit, or its
  thinking never closed."""
  if sample.finish_reason == "length":
    return None
  try:
    return traces.parse_trace(text)
  except traces.TraceFormatError:
    return None
