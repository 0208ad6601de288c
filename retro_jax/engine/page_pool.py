"""Host-side bookkeeping of the paged KV pool: which pages are free, and how many holders each page has.

The device pool (models/kv_cache.PagedKVCache) is one array; this class decides which of its pages a slot may
write. A page is held by every slot whose table lists it and by the prefix cache when it caches it: the n
samples of one prompt hold the prompt's full pages together, and a cached prompt keeps its pages after its
samples finish. A page returns to the free list when its last holder releases it.

The pool's page axis is split like the decode slots (each data-parallel replica owns `pages_per_shard`
consecutive pages), so pages are allocated per shard: a slot only ever holds pages of its own shard. Page ids
here are global (shard * pages_per_shard + local index); `local` converts for a slot's device table.
"""
from __future__ import annotations

import numpy as np


class PagePool:
  """Free lists and reference counts of `shards` x `pages_per_shard` pages."""

  def __init__(self, pages_per_shard: int, shards: int = 1):
    self.pages_per_shard = pages_per_shard
    self.shards = shards
    self.refcounts = np.zeros((shards * pages_per_shard,), np.int32)
    # lowest ids first: a fresh pool hands out pages in order, which keeps tests and traces readable
    self._free = [list(range((s + 1) * pages_per_shard - 1, s * pages_per_shard - 1, -1)) for s in range(shards)]

  @property
  def num_pages(self) -> int:
    return self.shards * self.pages_per_shard

  def free(self, shard: int = 0) -> int:
    return len(self._free[shard])

  def used(self) -> int:
    return self.num_pages - sum(len(f) for f in self._free)

  def allocate(self, count: int, shard: int = 0) -> list[int] | None:
    """`count` fresh pages of `shard`, each held once, or None (nothing taken) when fewer are free."""
    if count > len(self._free[shard]):
      return None
    pages = [self._free[shard].pop() for _ in range(count)]
    self.refcounts[pages] = 1
    return pages

  def retain(self, pages) -> None:
    """One more holder for each page (they must be held already)."""
    pages = np.asarray(pages, np.int64)
    if pages.size and (self.refcounts[pages] <= 0).any():
      raise RuntimeError(f"retain of free pages {pages[self.refcounts[pages] <= 0].tolist()}")
    np.add.at(self.refcounts, pages, 1)

  def release(self, pages) -> None:
    """One holder fewer for each page; pages nobody holds go back to their shard's free list."""
    for page in pages:
      if self.refcounts[page] <= 0:
        raise RuntimeError(f"release of free page {page}")
      self.refcounts[page] -= 1
      if self.refcounts[page] == 0:
        self._free[page // self.pages_per_shard].append(page)

  def shard_of(self, page: int) -> int:
    return page // self.pages_per_shard

  def local(self, page: int) -> int:
    return page % self.pages_per_shard
