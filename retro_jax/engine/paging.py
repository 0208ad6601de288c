"""The driver's side of a paged KV pool: which pages each decode slot holds, sharing, growth and preemption.

- A prefilled prompt's full pages are written once and then shared: by the other samples of the same prompt
  (n > 1), and through the prefix cache by later prompts that start with it. A prompt's last, partial page is
  never shared: every sample gets its own copy, because its first decode step writes into it (copy-on-write,
  done when the sample is inserted, which is when the write would come anyway).
- A slot holds pages for its prompt when inserted; before every decode call it gets the pages its next
  `decode_steps` positions need. When the pool runs short the prefix cache gives up entries first (least
  recently used); then the newest running sample is preempted: its pages are freed and it waits to be
  recomputed (a prefill of its prompt plus what it generated, usually reusing the cached prompt), then resumes
  with the same token count and keys, so its tokens are the ones it would have produced anyway.
- Admission waits: a sample is inserted only when its pages and one decode call of growth are free.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from retro_jax.engine.page_pool import PagePool
from retro_jax.engine.prefix_cache import PrefixCache
from retro_jax.engine.qwen2_engine import Prefix, Qwen2Engine


@dataclasses.dataclass
class Prefilled:
  """A prefilled prompt waiting for its samples to be inserted."""

  prefix: Prefix
  tokens: np.ndarray  # the positions the prefix holds KV for
  pending: int = 0  # samples still to insert
  hit_entry: int | None = None  # prefix-cache entry whose pages the prefill reused ...
  hit_pages: list[int] = dataclasses.field(default_factory=list)  # ... the whole ones among them
  shared: dict[int, list[int]] = dataclasses.field(default_factory=dict)  # shard -> written full pages (held)


def pages_for(positions: int, page_size: int) -> int:
  return -(-positions // page_size)


class SlotPages:
  """Page tables of every decode slot over one `PagePool`, kept on the host and sent with each decode call."""

  def __init__(self, engine: Qwen2Engine, prefix_cache: PrefixCache | None):
    self.engine = engine
    self.page_size = engine.page_size
    self.pool = PagePool(engine.pages_per_shard, engine.page_shards)
    self.prefix_cache = prefix_cache
    self.slot_pages: list[list[int]] = [[] for _ in range(engine.max_concurrent_decodes)]
    self.table = np.full((engine.max_concurrent_decodes, engine.pages_per_slot), engine.pages_per_shard, np.int32)
    self.page_bytes = self.page_size * engine.kv_budget.bytes_per_position
    self.peak_pages = 0
    if prefix_cache is not None:
      prefix_cache.on_drop = self.pool.release

  # ---- allocation -----------------------------------------------------------------------------------------

  def _allocate(self, count: int, shard: int, headroom: int = 0) -> list[int] | None:
    """`count` fresh pages of `shard` (evicting cached prefixes if needed) when `count + headroom` are free."""
    while self.pool.free(shard) < count + headroom and self.prefix_cache is not None and self.prefix_cache.evict_lru():
      pass
    if self.pool.free(shard) < count + headroom:
      return None
    pages = self.pool.allocate(count, shard)
    self.peak_pages = max(self.peak_pages, self.pool.used())
    return pages

  def _set(self, slot: int, pages: list[int]) -> None:
    self.slot_pages[slot] = pages
    self.table[slot] = self.engine.table_row(slot, pages) if pages else self.engine.pages_per_shard

  # ---- the slot life cycle --------------------------------------------------------------------------------

  def prompt_pages(self, state, prefilled: Prefilled, shard: int | None = None, headroom: int = 0):
    """(state, pages) with the prompt's full pages on `shard` (default: the one with the most free pages): the
    reused pages of a cached prefix where still cached, the rest written from the prefill. The record holds them
    for its samples and the prefix cache for later prompts. None (nothing changed) when the pool is short."""
    if shard is None:
      shard = max(range(self.pool.shards), key=self.pool.free)
    if shard in prefilled.shared:
      return state, prefilled.shared[shard]
    full = len(prefilled.tokens) // self.page_size
    hit = []
    if self.prefix_cache is not None and self.prefix_cache.holds(prefilled.hit_entry) and all(
        self.pool.shard_of(p) == shard for p in prefilled.hit_pages):
      hit = prefilled.hit_pages[:full]
    self.pool.retain(hit)  # before allocating: the eviction it may do must not free (and hand out) these pages
    own = self._allocate(full - len(hit), shard, headroom)
    if own is None:
      self.pool.release(hit)
      return None
    pages = hit + own
    if own:
      state = self.engine.write_pages(prefilled.prefix, state, pages, shared_pages=len(hit))
    prefilled.shared[shard] = pages
    if pages and self.prefix_cache is not None and self.prefix_cache.store(
        prefilled.tokens[:full * self.page_size], pages, nbytes=full * self.page_bytes):
      self.pool.retain(pages)
    return state, pages

  def insert(self, state, prefilled: Prefilled, sample: int, slot: int, *, headroom: int,
             resume: tuple[int, int, int] | None = None):
    """Inserts sample `sample` of `prefilled` into `slot`: the prompt's full pages shared, its partial last page
    copied. None (nothing changed) when the pool is short."""
    shard = self.engine.slot_shard(slot)
    partial = pages_for(len(prefilled.tokens), self.page_size) - len(prefilled.tokens) // self.page_size
    prepared = self.prompt_pages(state, prefilled, shard, headroom + partial)
    if prepared is None:
      return None
    state, shared = prepared
    # prompt_pages left `partial + headroom` free when it wrote pages, so this fails only when it wrote nothing
    own = self._allocate(partial, shard, headroom)
    if own is None:
      return None
    self.pool.retain(shared)
    pages = shared + own
    state = self.engine.insert(prefilled.prefix, state, slot, sample=sample, pages=pages, shared_pages=len(shared),
                               resume=resume)
    self._set(slot, pages)
    prefilled.pending -= 1
    if not prefilled.pending:
      self.drop_shared(prefilled)
    return state

  def drop_shared(self, prefilled: Prefilled) -> None:
    """Lets go of a prompt's shared pages (its later samples then write their own copy from the prefix)."""
    for pages in prefilled.shared.values():
      self.pool.release(pages)
    prefilled.shared.clear()

  def grow(self, live: list[tuple[int, int]], steps: int) -> int | None:
    """Pages for the next `steps` positions of every live (slot, kv length), oldest first. None when all got
    them, else the slot to preempt so the others can: the newest (the last of `live`)."""
    for slot, kv_length in live:
      need = min(self.engine.pages_per_slot, pages_for(kv_length + steps, self.page_size))
      missing = need - len(self.slot_pages[slot])
      if missing <= 0:
        continue
      got = self._allocate(missing, self.engine.slot_shard(slot))
      if got is None:
        return live[-1][0]
      self._set(slot, self.slot_pages[slot] + got)
    return None

  def release(self, slot: int) -> None:
    """A slot finished or was preempted: its pages go back (shared ones stay with their other holders)."""
    self.pool.release(self.slot_pages[slot])
    self._set(slot, [])
