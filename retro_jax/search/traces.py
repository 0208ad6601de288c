"""Reasoning traces as Retro-Search sees them: steps, thoughts and the boundaries between thoughts.

Section 2 of search/README.md. A trace is `head + thinking + solution`:
- `head`: the opening marker (`<think>` or `<|begin_of_thought|>`) and the white space after it, or "" when the
  marker lives in the rendered prompt instead (R1-style chat templates end the prompt with "<think>\n");
- `thinking`: split on "\n\n" into steps. The split is lossless: `separators[i]` sits between `steps[i]` and
  `steps[i + 1]`, and joining them back gives the thinking byte for byte;
- `solution`: from the closing marker (`</think>` or `<|end_of_thought|>`, included) to the end.

A step opens a new thought when, after leading white space, it starts with a transition keyword as a whole
word (case-sensitive). A keyword in the middle of a step opens nothing.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Sequence

STEP_SEPARATOR = "\n\n"

DEFAULT_KEYWORDS: tuple[str, ...] = (
    "Wait", "But wait", "Alternatively", "Hmm", "Hold on", "However", "Actually", "Let me check",
    "Let me verify", "Let me double-check", "Another approach", "On second thought",
)


@dataclasses.dataclass(frozen=True)
class TraceStyle:
  name: str
  open_marker: str
  close_marker: str


THINK_STYLE = TraceStyle("think", "<think>", "</think>")  # DeepSeek-R1 and its distills
THOUGHT_STYLE = TraceStyle("thought", "<|begin_of_thought|>", "<|end_of_thought|>")  # OpenThoughts / Sky-T1
STYLES = (THINK_STYLE, THOUGHT_STYLE)


class TraceFormatError(ValueError):
  """The text is not a trace Retro-Search can revise (no closing marker after the thinking)."""


@dataclasses.dataclass(frozen=True)
class ParsedTrace:
  """A trace cut into head, thinking steps and solution; `text` re-joins it byte for byte.

  `style` is the style of the closing marker that ends the thinking. A revised trace may open in one style and
  close in another (an R1 reviser continuing an OpenThoughts trace writes `</think>`); the closing marker is what
  separates thinking from solution, so it is what counts.
  """

  head: str
  steps: tuple[str, ...]
  separators: tuple[str, ...]
  solution: str
  style: TraceStyle

  @property
  def thinking(self) -> str:
    return _join(self.steps, self.separators)

  @property
  def text(self) -> str:
    return self.head + self.thinking + self.solution

  def thinking_prefix(self, boundary: int) -> str:
    """Steps [0, boundary) and the separator that preceded step `boundary`: what a rollout continues from."""
    if not 1 <= boundary < len(self.steps):
      raise ValueError(f"boundary {boundary} outside [1, {len(self.steps)})")
    return _join(self.steps[:boundary], self.separators[:boundary])

  def suffix(self, boundary: int) -> str:
    """Everything after `head + thinking_prefix(boundary)`: the part a rollout at `boundary` would replace."""
    return _join(self.steps[boundary:], self.separators[boundary:]) + self.solution


def _join(steps: Sequence[str], separators: Sequence[str]) -> str:
  """Interleaves steps and separators; a trailing separator (len(separators) == len(steps)) is kept."""
  parts = []
  for index, step in enumerate(steps):
    parts.append(step)
    if index < len(separators):
      parts.append(separators[index])
  return "".join(parts)


_HEAD_RE = re.compile(r"\s*(?:" + "|".join(re.escape(s.open_marker) for s in STYLES) + r")\s*")


def split_steps(thinking: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """Splits on every "\\n\\n" (left to right, no overlap), keeping the separators so the split is lossless."""
  steps = tuple(thinking.split(STEP_SEPARATOR))
  return steps, (STEP_SEPARATOR,) * (len(steps) - 1)


def parse_trace(text: str, require_close: bool = True) -> ParsedTrace:
  """Cuts `text` into head, steps and solution.

  The thinking ends at the first closing marker of either style. Without one, a TraceFormatError is raised,
  unless `require_close=False` (thought counting on truncated responses), where the whole text is thinking.
  """
  head_match = _HEAD_RE.match(text)
  head = head_match.group(0) if head_match else ""
  close_at, style = _first_close_marker(text, len(head))
  if close_at < 0:
    if require_close:
      raise TraceFormatError("no </think> or <|end_of_thought|> closes the thinking")
    close_at, style = len(text), _open_style(head)
  steps, separators = split_steps(text[len(head):close_at])
  return ParsedTrace(head, steps, separators, text[close_at:], style)


def _first_close_marker(text: str, start: int) -> tuple[int, TraceStyle]:
  found = [(text.find(s.close_marker, start), s) for s in STYLES]
  found = [(at, s) for at, s in found if at >= 0]
  return min(found, key=lambda item: item[0]) if found else (-1, THINK_STYLE)


def _open_style(head: str) -> TraceStyle:
  return next((s for s in STYLES if s.open_marker in head), THINK_STYLE)


@functools.lru_cache(maxsize=32)
def _keyword_re(keywords: tuple[str, ...]) -> re.Pattern[str]:
  """`^\\s*(kw1|kw2|...)(?!\\w)`: at the start after white space, case-sensitive, whole word."""
  if not keywords:
    return re.compile(r"(?!)")  # matches nothing: no keyword, no thought switch
  alternatives = "|".join(re.escape(k) for k in sorted(keywords, key=len, reverse=True))
  return re.compile(r"\s*(?:" + alternatives + r")(?!\w)")


def starts_thought(step: str, keywords: Sequence[str] = DEFAULT_KEYWORDS) -> bool:
  return _keyword_re(tuple(keywords)).match(step) is not None


def boundaries(trace: ParsedTrace, keywords: Sequence[str] = DEFAULT_KEYWORDS) -> tuple[int, ...]:
  """Indices of the steps that start a thought, other than the first step."""
  pattern = _keyword_re(tuple(keywords))
  return tuple(i for i in range(1, len(trace.steps)) if pattern.match(trace.steps[i]))


def count_thoughts(trace: ParsedTrace, keywords: Sequence[str] = DEFAULT_KEYWORDS) -> int:
  return 1 + len(boundaries(trace, keywords))


def count_thought_switches(text: str, keywords: Sequence[str] = DEFAULT_KEYWORDS) -> int:
  """Number of thought switches (boundaries) in a model response; a response cut before its closing marker
  counts over all of its text, so truncated responses (the ones that switch most) are not dropped."""
  return len(boundaries(parse_trace(text, require_close=False), keywords))
