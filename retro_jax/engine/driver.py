"""Offline continuous-batching driver: the `TextGenerator` that search, generate and eval talk to.

The loop (JetStream's orchestrator, minus the threads):
  1. while a decode slot is free: insert a prefilled sample that waits for one, or pull requests from the
     queue (enough samples for the free slots) and prefill each prompt once: after its cached prefix KV when
     one is long enough, else batched with the other new prompts of its padded length; queue their n samples
     for insertion;
  2. hand finished requests to the consumer (who may `put` follow-ups, which step 1 then sees);
  3. run one `generate` call (several decode steps for all slots), copy its `ResultTokens` to the host once,
     and retire samples that hit EOS, a stop string or their token budget.
A finished slot is refilled before the next decode call, so slots stay busy while work remains.

Per-request policies (documented here once):
- Over-long requests (prompt + max_new_tokens > max_seq_len) are not run: each of their samples is
  `Completion(tokens=(), text="", finish_reason="length")` and `prompt_tokens_computed` is 0. Zero tokens is
  never a normal outcome (max_new_tokens >= 1), so callers can tell; `fits(request)` checks up front. They
  never take a slot, so one bad record cannot stall or crash a stream.
- EOS: the EOS token ends the sample and is not part of `tokens`, `text` or `logprobs`.
- Stop strings are matched on the decoded generated text (not the prompt). The sample ends at the first token
  whose text completes a stop string; that token is kept, so `text == decode(tokens)` contains the stop string
  and, when the token runs past it, the few characters after it.
- `prompt_tokens_computed` counts real prompt tokens prefilled (bucket padding excluded).
Runs are not thread-safe: one `stream` / `generate` at a time per driver.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
import tqdm

from retro_jax.engine.prefix_cache import PrefixCache, common_prefix_length
from retro_jax.engine.qwen2_engine import ExistingPrefix, Prefix, Qwen2Engine, bucket
from retro_jax.engine.requests import Completion, FinishReason, GenerationRequest, GenerationResult, RequestQueue


class Tokenizer(Protocol):
  def encode(self, text: str) -> list[int]:
    ...

  def decode(self, tokens: Sequence[int]) -> str:
    ...


@dataclasses.dataclass
class DriverStats:
  """Totals since the driver was built (benchmarks read these)."""

  requests: int = 0
  samples: int = 0
  prompt_tokens: int = 0
  prompt_tokens_computed: int = 0
  generated_tokens: int = 0
  decode_calls: int = 0
  prefill_seconds: float = 0.0
  decode_seconds: float = 0.0


@dataclasses.dataclass
class _Job:
  seq: int
  request: GenerationRequest
  samples: list[Completion | None]
  unfinished: int
  computed: int = 0

  def result(self) -> GenerationResult:
    return GenerationResult(request=self.request, samples=tuple(self.samples), prompt_tokens_computed=self.computed)


@dataclasses.dataclass
class _Sample:
  job: _Job
  index: int
  tokens: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[float] = dataclasses.field(default_factory=list)

  @property
  def kv_length(self) -> int:
    """KV slots the device holds for this sample (the newest token is not fed yet)."""
    return len(self.job.request.prompt_tokens) + len(self.tokens) - 1


class Driver:
  """Continuous-batching `TextGenerator` over a `Qwen2Engine`.

  Args:
    engine: the engine (its params are loaded on first use).
    tokenizer: anything with `encode(text) -> list[int]` and `decode(ids) -> str`.
    prefix_cache_bytes: device memory for reusable prompt KV; 0 turns prefix reuse off.
    progress: show a tqdm bar (samples finished, generated tokens per second).
  """

  def __init__(self, engine: Qwen2Engine, tokenizer: Tokenizer, *, prefix_cache_bytes: int = 1 << 30,
               progress: bool = True):
    self.engine = engine
    self.tokenizer = tokenizer
    self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
    self.progress = progress
    self.stats = DriverStats()
    self._eos = frozenset(engine.eos_token_ids)
    self._params = None
    self._state = None

  # ---- TextGenerator --------------------------------------------------------------------------------------

  def encode(self, text: str) -> list[int]:
    return list(self.tokenizer.encode(text))

  def decode(self, tokens: Sequence[int]) -> str:
    return self.tokenizer.decode(list(tokens))

  @property
  def max_seq_len(self) -> int:
    return self.engine.max_seq_len

  def fits(self, request: GenerationRequest) -> bool:
    """Whether the request's prompt plus max_new_tokens fit the KV cache (see the over-long policy)."""
    return len(request.prompt_tokens) + request.max_new_tokens <= self.engine.max_seq_len

  def stream(self, queue: RequestQueue) -> Iterator[GenerationResult]:
    """Yields results as requests finish; pulls from `queue` whenever a slot frees, until it is drained."""
    seqs = iter(range(1 << 62))

    def pull():
      request = queue.get()
      return None if request is None else (next(seqs), request)

    for job in self._run(pull, total=None):
      yield job.result()

  def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
    """Offline batch: results in request order."""
    items = iter(enumerate(requests))
    results: list[GenerationResult | None] = [None] * len(requests)
    for job in self._run(lambda: next(items, None), total=sum(r.n for r in requests)):
      results[job.seq] = job.result()
    return results

  def warmup(self, prefill_lengths: list[int] | None = None) -> None:
    """Compiles the engine's programs ahead of the first request (see `Qwen2Engine.warmup`)."""
    self.engine.warmup(self._load(), prefill_lengths=prefill_lengths)

  # ---- the loop -------------------------------------------------------------------------------------------

  def _load(self):
    if self._params is None:
      self._params = self.engine.load_params()
    return self._params

  def _run(self, pull: Callable[[], tuple[int, GenerationRequest] | None], total: int | None) -> Iterator[_Job]:
    params = self._load()
    if self._state is None:
      self._state = self.engine.init_decode_state()
    slots: list[_Sample | None] = [None] * self.engine.max_concurrent_decodes
    waiting: list[tuple[_Sample, Prefix]] = []  # prefilled samples without a slot, oldest first
    ready: list[_Job] = []
    bar = tqdm.tqdm(total=total, unit="sample", disable=not self.progress, dynamic_ncols=True)
    started, generated_before = time.perf_counter(), self.stats.generated_tokens
    try:
      while True:
        while None in slots:
          if waiting:
            sample, prefix = waiting.pop(0)
            slot = slots.index(None)
            self._state = self.engine.insert(prefix, self._state, slot, sample=sample.index)
            slots[slot] = sample
          elif not self._admit(pull, slots.count(None), params, waiting, ready, bar, total is None):
            break
        if ready:
          while ready:
            yield ready.pop(0)
          continue  # the consumer may have queued follow-ups
        live = [(slot, s) for slot, s in enumerate(slots) if s is not None]
        if not live:
          return
        self._decode(params, slots, live, ready, bar)
        rate = (self.stats.generated_tokens - generated_before) / max(time.perf_counter() - started, 1e-9)
        bar.set_postfix(tok_s=f"{rate:.0f}", refresh=False)
    finally:
      bar.close()

  def _admit(self, pull, free: int, params, waiting, ready, bar, grow_total: bool) -> bool:
    """Pulls requests for `free` slots and prefills them; False when the queue had nothing.

    A prompt sharing at least one prefill bucket of tokens with cached KV is prefilled alone after that
    prefix; the others are prefilled together, grouped by padded length. A prompt that shares such a prefix
    with a prompt still waiting for its group flushes the groups first, so nested prefixes arriving together
    (Retro-Search) still reuse each other.
    """
    min_reuse = self.engine.prefill_buckets[0]
    groups: dict[int, list[tuple[_Job, np.ndarray]]] = {}  # padded length -> prompts waiting for prefill
    pulled = 0
    while pulled < free:
      item = pull()
      if item is None:
        break
      seq, request = item
      pulled += request.n
      if grow_total:
        bar.total = (bar.total or 0) + request.n
      job = _Job(seq=seq, request=request, samples=[None] * request.n, unfinished=request.n)
      self.stats.requests += 1
      self.stats.samples += request.n
      if not self.fits(request):
        job.samples = [Completion(tokens=(), text="", finish_reason="length")] * request.n
        job.unfinished = 0
        bar.update(request.n)
        ready.append(job)
        continue
      prompt = np.asarray(request.prompt_tokens, np.int32)
      cached, reuse, padded = self._plan(prompt)
      if reuse < min_reuse and any(common_prefix_length(prompt, other) >= min_reuse
                                   for group in groups.values() for _, other in group):
        self._flush(groups, params, waiting, ready, bar)
        cached, reuse, padded = self._plan(prompt)
      if reuse >= min_reuse:
        tic = time.perf_counter()
        existing = ExistingPrefix(cache=cached, common_prefix_tokens=prompt[:reuse])
        tokens = np.zeros((padded,), np.int32)
        tokens[:len(prompt) - reuse] = prompt[reuse:]
        prefix, first = self.engine.prefill(params=params, existing_prefix=existing, padded_tokens=tokens,
                                            true_length=len(prompt) - reuse, request=request)
        self._started(job, prompt, reuse, prefix, first, waiting, ready, bar)
        self.stats.prefill_seconds += time.perf_counter() - tic
        continue
      length = bucket(len(prompt), min_reuse, self.engine.max_seq_len)
      groups.setdefault(length, []).append((job, prompt))
      if len(groups[length]) == self.engine.prefill_batch_size(length):
        self._flush({length: groups.pop(length)}, params, waiting, ready, bar)
    self._flush(groups, params, waiting, ready, bar)
    return pulled > 0

  def _plan(self, prompt: np.ndarray):
    """(cached KV or None, tokens to reuse, padded length of the rest)."""
    cached, shared = self.prefix_cache.lookup(prompt) if self.prefix_cache else (None, 0)
    reuse, padded = self.engine.plan_prefill(len(prompt), shared)
    return cached, reuse, padded

  def _flush(self, groups: dict[int, list[tuple[_Job, np.ndarray]]], params, waiting, ready, bar) -> None:
    """One batched prefill per padded length (a group's dispatches all go out before its first host copy)."""
    tic = time.perf_counter()
    for length, group in groups.items():
      tokens = np.zeros((len(group), length), np.int32)
      for row, (_, prompt) in enumerate(group):
        tokens[row, :len(prompt)] = prompt
      outputs = self.engine.prefill_batch(params=params, padded_tokens=tokens,
                                          true_lengths=[len(p) for _, p in group],
                                          requests=[job.request for job, _ in group])
      for (job, prompt), (prefix, first) in zip(group, outputs):
        self._started(job, prompt, 0, prefix, first, waiting, ready, bar)
    groups.clear()
    self.stats.prefill_seconds += time.perf_counter() - tic

  def _started(self, job: _Job, prompt: np.ndarray, reuse: int, prefix: Prefix, first, waiting, ready,
               bar) -> None:
    """Books a prefilled request, caches its KV, and queues the samples its first token did not finish."""
    job.computed = len(prompt) - reuse
    self.stats.prompt_tokens += len(prompt)
    self.stats.prompt_tokens_computed += job.computed
    if self.prefix_cache is not None:
      self.prefix_cache.record_reuse(reuse)
      self.prefix_cache.store(prompt, self.engine.prefix_kv(prefix, len(prompt)))
    first = first.convert_to_numpy()
    for i in range(job.request.n):
      sample = _Sample(job=job, index=i)
      data = first.get_result_at_slot(i)
      reason = self._consume(sample, data.tokens[0], data.logprobs[0])
      if reason is None:
        waiting.append((sample, prefix))
      else:
        self._finish(sample, reason, ready, bar)

  def _decode(self, params, slots, live, ready, bar) -> None:
    steps = self.engine.decode_steps
    attend = max(s.kv_length for _, s in live) + steps
    tic = time.perf_counter()
    self._state, result = self.engine.generate(params, self._state, attend_len=attend)
    result = result.convert_to_numpy()  # the one host copy per call
    self.stats.decode_seconds += time.perf_counter() - tic
    self.stats.decode_calls += 1
    for slot, sample in live:
      data = result.get_result_at_slot(slot)
      valid = data.valid[0].astype(bool)
      if not valid.any():
        raise RuntimeError(f"slot {slot} is live on the host but finished on the device (driver/engine disagree)")
      reason = self._consume(sample, data.tokens[0][valid], data.logprobs[0][valid])
      if reason is not None:
        self._finish(sample, reason, ready, bar)
        slots[slot] = None

  def _consume(self, sample: _Sample, tokens: np.ndarray, logprobs: np.ndarray) -> FinishReason | None:
    """Appends new tokens; returns why the sample finished, if it did."""
    request, start = sample.job.request, len(sample.tokens)
    reason = None
    for token, logprob in zip(tokens.tolist(), logprobs.tolist()):
      if token in self._eos:
        reason = "eos"
        break
      sample.tokens.append(token)
      sample.logprobs.append(logprob)
      if len(sample.tokens) >= request.max_new_tokens:
        reason = "length"
        break
    self.stats.generated_tokens += len(sample.tokens) - start + (reason == "eos")
    if request.stop_strings:
      cut = self._stop_cut(sample.tokens, start, request.stop_strings)
      if cut is not None:
        del sample.tokens[cut:], sample.logprobs[cut:]
        reason = "stop"
    return reason

  def _stop_cut(self, tokens: list[int], start: int, stop_strings: tuple[str, ...]) -> int | None:
    """Number of tokens to keep when tokens[start:] complete a stop string, else None.

    Decodes one window per call (the new tokens plus enough earlier ones to hold any stop string, at up to 4
    byte-level tokens per character) rather than the whole text, and scans token by token only on a hit.
    """
    if len(tokens) == start:
      return None
    lo = max(0, start - 4 * max(map(len, stop_strings)) - 4)
    if not any(s in self.decode(tokens[lo:]) for s in stop_strings):
      return None
    for end in range(start + 1, len(tokens) + 1):
      if any(s in self.decode(tokens[lo:end]) for s in stop_strings):
        return end
    return None

  def _finish(self, sample: _Sample, reason: FinishReason, ready: list[_Job], bar) -> None:
    job = sample.job
    job.samples[sample.index] = Completion(tokens=tuple(sample.tokens), text=self.decode(sample.tokens),
                                           finish_reason=reason, logprobs=tuple(sample.logprobs))
    job.unfinished -= 1
    bar.update(1)
    if job.unfinished == 0:
      ready.append(job)
