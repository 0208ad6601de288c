"""The narrow request/result interface between the engine and its users (search, generate, eval).

Search and evaluation only ever see these dataclasses and a `TextGenerator`, never engine internals, so tests
can drive them with a scripted fake (see architecture.md, "Boundaries").
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Hashable, Iterator, Literal, Protocol, Sequence

FinishReason = Literal["eos", "stop", "length"]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """Per-request sampling. temperature == 0 means greedy; top_p == 1 and top_k == 0 switch those filters off.

  These are per-slot arrays inside the decode state, so changing them never recompiles.
  """

  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")


GREEDY = SamplingParams()
R1_SAMPLING = SamplingParams(temperature=0.6, top_p=0.95)  # DeepSeek-R1-distill's recommended setting


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
  """One prompt to complete.

  `banned_first_token_ids` are forbidden at the first `ban_first_k` generated positions (Retro-Search bans the
  transition keywords at the first position of a continuation); `banned_token_ids` are forbidden throughout.
  `n` samples are drawn; sample i uses the key fold_in(PRNGKey(seed), i), so a request's tokens do not depend
  on what else is in the batch.
  """

  prompt_tokens: tuple[int, ...]
  max_new_tokens: int
  sampling: SamplingParams = GREEDY
  seed: int = 0
  n: int = 1
  banned_first_token_ids: tuple[int, ...] = ()
  ban_first_k: int = 1
  banned_token_ids: tuple[int, ...] = ()
  stop_strings: tuple[str, ...] = ()
  request_id: Hashable = None

  def __post_init__(self):
    if len(self.prompt_tokens) == 0:
      raise ValueError("prompt_tokens is empty")
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.n < 1:
      raise ValueError(f"n must be >= 1, got {self.n}")


@dataclasses.dataclass(frozen=True)
class Completion:
  """One sampled continuation. `text` is the decoded `tokens` (stop string included when finish_reason=='stop')."""

  tokens: tuple[int, ...]
  text: str
  finish_reason: FinishReason
  logprobs: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class GenerationResult:
  request: GenerationRequest
  samples: tuple[Completion, ...]  # len == request.n
  prompt_tokens_computed: int = 0  # prefill work actually done (less than the prompt when a cached prefix was reused)


class RequestQueue:
  """FIFO the consumer fills while it iterates over `TextGenerator.stream`.

  The stream pulls from the queue whenever a decode slot frees, so a consumer that puts follow-up requests
  after each result keeps the slots full with work from many records at once (continuous batching).
  """

  def __init__(self, requests: Sequence[GenerationRequest] = ()):
    self._items: collections.deque[GenerationRequest] = collections.deque(requests)

  def put(self, request: GenerationRequest) -> None:
    self._items.append(request)

  def get(self) -> GenerationRequest | None:
    return self._items.popleft() if self._items else None

  def __len__(self) -> int:
    return len(self._items)


class TextGenerator(Protocol):
  """What search / generate / eval need from a model server."""

  def encode(self, text: str) -> list[int]:
    """Tokens of `text`, without special tokens added."""

  def decode(self, tokens: Sequence[int]) -> str:
    ...

  def stream(self, queue: RequestQueue) -> Iterator[GenerationResult]:
    """Yields results as they finish, until the queue is empty and nothing is in flight."""

  def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
    """Offline batch: results in request order."""
