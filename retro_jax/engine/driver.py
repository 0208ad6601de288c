"""Offline continuous-batching driver: the `TextGenerator` that search, generate and eval talk to.

The loop (JetStream's orchestrator, minus the threads):
  1. while a decode slot is free: insert a prefilled sample that waits for one (with a paged KV pool: once its
     pages are free, see paging.py), or pull requests from the
     queue (enough samples for the free slots) and prefill each prompt once: after its cached prefix KV when
     one is long enough, else batched with the other new prompts of its padded length; queue their n samples
     for insertion;
  2. hand finished requests to the consumer (who may `put` follow-ups, which step 1 then sees);
  3. (paged pool) give every live slot the pages its next decode steps write, preempting the newest sample
     when the pool runs short; run one `generate` call (several decode steps for all slots), copy its
     `ResultTokens` to the host once, and retire samples that hit EOS, a stop string or their token budget.
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

from retro_jax.engine.paging import Prefilled, SlotPages, pages_for
from retro_jax.engine.prefix_cache import PrefixCache, common_prefix_length
from retro_jax.engine.qwen2_engine import ExistingPrefix, Qwen2Engine, bucket
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
  preemptions: int = 0  # samples whose pages were taken back mid-run (paged pool), then recomputed
  recomputed_tokens: int = 0  # prompt + generated tokens prefilled again for them
  peak_kv_pages: int = 0  # most pages of the paged pool held at once
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
  inserted: int = 0  # when it last took a slot (preemption takes the newest)

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
    self.paging = SlotPages(engine, self.prefix_cache) if engine.page_size else None
    self._inserts = 0
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
    # samples without a slot, oldest first: prefilled, or preempted (None: to recompute first)
    waiting: list[tuple[_Sample, Prefilled | None]] = []
    ready: list[_Job] = []
    bar = tqdm.tqdm(total=total, unit="sample", disable=not self.progress, dynamic_ncols=True)
    started, generated_before = time.perf_counter(), self.stats.generated_tokens
    try:
      while True:
        while None in slots:
          if waiting:
            if not self._insert(params, slots, waiting):
              break  # the pool is short: wait for running samples to finish
          elif not self._admit(pull, slots.count(None), params, waiting, ready, bar, total is None):
            break
        if ready:
          while ready:
            yield ready.pop(0)
          continue  # the consumer may have queued follow-ups
        if all(s is None for s in slots):
          if waiting:
            raise RuntimeError("samples wait for KV pages while no slot runs (page accounting bug)")
          return
        self._decode(params, slots, waiting, ready, bar)
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
      reuse = self._plan(prompt)[2]
      if reuse < min_reuse and any(common_prefix_length(prompt, other) >= min_reuse
                                   for group in groups.values() for _, other in group):
        self._flush(groups, params, waiting, ready, bar)
        reuse = self._plan(prompt)[2]
      if reuse >= min_reuse:
        tic = time.perf_counter()
        prefilled, first, reuse = self._prefill_one(params, prompt, request)
        self._started(job, prompt, reuse, prefilled, first, waiting, ready, bar)  # copies the first tokens: waits
        self.stats.prefill_seconds += time.perf_counter() - tic
        continue
      length = bucket(len(prompt), min_reuse, self.engine.max_seq_len)
      groups.setdefault(length, []).append((job, prompt))
      if len(groups[length]) == self.engine.prefill_batch_size(length):
        self._flush({length: groups.pop(length)}, params, waiting, ready, bar)
    self._flush(groups, params, waiting, ready, bar)
    return pulled > 0

  def _plan(self, prompt: np.ndarray):
    """(prefix-cache entry id, its KV or pages, tokens to reuse, padded length of the rest)."""
    entry, cached, shared = self.prefix_cache.lookup_entry(prompt) if self.prefix_cache else (None, None, 0)
    reuse, padded = self.engine.plan_prefill(len(prompt), shared)
    return entry, cached, reuse, padded

  def _prefill_one(self, params, prompt: np.ndarray, request: GenerationRequest):
    """One prompt prefilled after the longest cached prefix it shares (or from scratch): (Prefilled, its first
    tokens, tokens reused)."""
    entry, cached, reuse, padded = self._plan(prompt)
    existing, hit_pages = None, []
    if reuse >= self.engine.prefill_buckets[0]:
      if self.paging is not None:  # the cached pages, gathered into the prefill's working rows
        hit_pages = cached[:reuse // self.paging.page_size]
        cached = self.engine.gather_pages(self._state, cached[:pages_for(reuse, self.paging.page_size)], reuse)
      existing = ExistingPrefix(cache=cached, common_prefix_tokens=prompt[:reuse])
    else:
      reuse = 0
    tokens = np.zeros((padded,), np.int32)
    tokens[:len(prompt) - reuse] = prompt[reuse:]
    prefix, first = self.engine.prefill(params=params, existing_prefix=existing, padded_tokens=tokens,
                                        true_length=len(prompt) - reuse, request=request)
    return Prefilled(prefix, prompt, hit_entry=entry, hit_pages=hit_pages), first, reuse

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
        self._started(job, prompt, 0, Prefilled(prefix, prompt), first, waiting, ready, bar)
    groups.clear()
    self.stats.prefill_seconds += time.perf_counter() - tic

  def _started(self, job: _Job, prompt: np.ndarray, reuse: int, prefilled: Prefilled, first, waiting, ready,
               bar) -> None:
    """Books a prefilled request, caches its KV (a paged pool: writes its full pages, paging.py), and queues
    the samples its first token did not finish."""
    job.computed = len(prompt) - reuse
    self.stats.prompt_tokens += len(prompt)
    self.stats.prompt_tokens_computed += job.computed
    if self.prefix_cache is not None:
      self.prefix_cache.record_reuse(reuse)
      if self.paging is None:
        self.prefix_cache.store(prompt, self.engine.prefix_kv(prefilled.prefix, len(prompt)))
    if self.paging is not None:  # its full pages now, so prompts prefilled next can reuse them
      prepared = self.paging.prompt_pages(self._state, prefilled)
      if prepared is not None:
        self._state = prepared[0]
    first = first.convert_to_numpy()
    for i in range(job.request.n):
      sample = _Sample(job=job, index=i)
      data = first.get_result_at_slot(i)
      reason = self._consume(sample, data.tokens[0], data.logprobs[0])
      if reason is None:
        waiting.append((sample, prefilled))
        prefilled.pending += 1
      else:
        self._finish(sample, reason, ready, bar)
    if self.paging is not None and not prefilled.pending:
      self.paging.drop_shared(prefilled)

  def _insert(self, params, slots, waiting) -> bool:
    """Puts the oldest waiting sample into a free slot; False when a paged pool cannot hold it yet."""
    sample, prefilled = waiting[0]
    resume = None
    if prefilled is None or len(sample.tokens) > 1:  # preempted: recompute its KV, then resume where it was
      if prefilled is None:
        prefilled = self._recompute(params, sample)
        waiting[0] = (sample, prefilled)
      resume = (sample.tokens[-1], len(sample.tokens), sample.job.request.max_new_tokens)
    slot = slots.index(None)
    if self.paging is None:
      self._state = self.engine.insert(prefilled.prefix, self._state, slot, sample=sample.index, resume=resume)
    else:
      running = any(s is not None for s in slots)
      headroom = pages_for(self.engine.decode_steps, self.paging.page_size) if running else 0
      state = self.paging.insert(self._state, prefilled, sample.index, slot, headroom=headroom, resume=resume)
      if state is None and not running:  # nothing runs to free pages: other prompts' shared pages go first
        for _, other in waiting[1:]:
          if other is not None and other is not prefilled:
            self.paging.drop_shared(other)
        state = self.paging.insert(self._state, prefilled, sample.index, slot, headroom=0, resume=resume)
        if state is None:
          raise RuntimeError(f"a sample of {len(prefilled.tokens)} tokens does not fit an empty KV pool (bug: the "
                             "engine checks that one max_seq_len sequence fits)")
      if state is None:
        return False
      self._state = state
      self.stats.peak_kv_pages = max(self.stats.peak_kv_pages, self.paging.peak_pages)
    waiting.pop(0)
    self._inserts += 1
    sample.inserted = self._inserts
    slots[slot] = sample
    return True

  def _recompute(self, params, sample: _Sample) -> Prefilled:
    """A preempted sample's prompt plus all but its last token, prefilled again (after the longest cached
    prefix, usually its own prompt)."""
    request = sample.job.request
    prompt = np.asarray(request.prompt_tokens + tuple(sample.tokens[:-1]), np.int32)
    resumed = dataclasses.replace(request, prompt_tokens=tuple(prompt.tolist()),
                                  max_new_tokens=request.max_new_tokens - len(sample.tokens) + 1)
    tic = time.perf_counter()
    prefilled, first, reuse = self._prefill_one(params, prompt, resumed)
    first.convert_to_numpy()  # waits for the prefill, so its time is counted here
    self.stats.prefill_seconds += time.perf_counter() - tic
    self.stats.recomputed_tokens += len(prompt) - reuse
    prefilled.pending = 1
    return prefilled

  def _preempt(self, slots, slot: int, waiting) -> None:
    """Takes a running sample's pages back; it waits at the front to be recomputed (see paging.py)."""
    sample = slots[slot]
    self.paging.release(slot)
    slots[slot] = None
    waiting.insert(0, (sample, None))
    self.stats.preemptions += 1

  def _decode(self, params, slots, waiting, ready, bar) -> None:
    steps = self.engine.decode_steps
    page_table = None
    if self.paging is not None:
      while True:
        live = sorted(((slot, s) for slot, s in enumerate(slots) if s is not None), key=lambda x: x[1].inserted)
        victim = self.paging.grow([(slot, s.kv_length) for slot, s in live], steps)
        if victim is None:
          break
        if len(live) == 1:
          raise RuntimeError("one sample cannot grow in an otherwise empty KV pool (page accounting bug)")
        self._preempt(slots, victim, waiting)
      page_table = self.paging.table
      self.stats.peak_kv_pages = max(self.stats.peak_kv_pages, self.paging.peak_pages)
    live = [(slot, s) for slot, s in enumerate(slots) if s is not None]
    attend = max(s.kv_length for _, s in live) + steps
    tic = time.perf_counter()
    self._state, result = self.engine.generate(params, self._state, attend_len=attend, page_table=page_table)
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
        if self.paging is not None:
          self.paging.release(slot)

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
