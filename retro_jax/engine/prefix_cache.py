"""Prompt KV kept on device for reuse, matched on the longest common token prefix.

Why longest-common-prefix and not exact keys: the KV of slot j depends only on tokens[0..j] (causal
attention, slot j = RoPE position j), so the cached KV of ANY earlier prompt serves every prefix it shares with
a new one. Retro-Search rolls out from nested prefixes of one trace (question + steps[:b] for growing b), so
each prompt shares all but its newest steps with the one before it, and a longer cached prompt serves every
shorter one.

What an entry holds: dense KV sliced to a power-of-two bucket of the prompt's length, or, with a paged pool,
the ids of the prompt's full pages (the driver retains them in the pool for the entry and `on_drop` releases
them; a slot reusing a cached prefix then shares those pages instead of holding a copy).

Policy:
- every prefilled prompt is stored;
- an entry whose tokens are a prefix of a new entry's is dropped (the new one serves everything it did), and
  a new prompt that is a prefix of an existing entry is not stored again;
- bounded in bytes; least-recently used entries are evicted first; an entry larger than the whole budget is
  not stored.

Reuse cannot change outputs beyond float rounding: reused slots hold exactly the keys/values a full prefill
would compute for those positions; only the order of floating-point sums over a chunk can differ.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import Any, Callable, Sequence

import jax
import numpy as np

from retro_jax.models.kv_cache import KVCache


def common_prefix_length(a: np.ndarray, b: np.ndarray) -> int:
  n = min(len(a), len(b))
  mismatch = np.flatnonzero(a[:n] != b[:n])
  return int(mismatch[0]) if mismatch.size else n


@dataclasses.dataclass
class _Entry:
  tokens: np.ndarray  # [length] int32
  cache: KVCache | Any  # [num_layers, 1, bucket >= length, kv_heads, head_dim], or a paged prompt's page ids
  nbytes: int


@dataclasses.dataclass
class PrefixCacheStats:
  lookups: int = 0
  hits: int = 0
  tokens_reused: int = 0
  evictions: int = 0


class PrefixCache:
  """LRU of prompt KV bounded in bytes (device memory), matched on the longest common token prefix."""

  def __init__(self, capacity_bytes: int, on_drop: Callable[[Any], None] | None = None):
    self.capacity_bytes = capacity_bytes
    self.on_drop = on_drop  # called with an entry's cache when it leaves (evicted, superseded, cleared)
    self._entries: collections.OrderedDict[int, _Entry] = collections.OrderedDict()
    self._ids = itertools.count()
    self.nbytes = 0
    self.stats = PrefixCacheStats()

  def __len__(self) -> int:
    return len(self._entries)

  def lookup(self, tokens: Sequence[int]) -> tuple[KVCache | Any | None, int]:
    """The entry sharing the longest token prefix with `tokens` and that length ((None, 0) when none)."""
    _, cache, length = self.lookup_entry(tokens)
    return cache, length

  def lookup_entry(self, tokens: Sequence[int]) -> tuple[int | None, KVCache | Any | None, int]:
    """`lookup` plus the entry's id (see `holds`)."""
    tokens = np.asarray(tokens, np.int32)
    self.stats.lookups += 1
    best_id, best_len = None, 0
    for entry_id, entry in self._entries.items():
      length = common_prefix_length(entry.tokens, tokens)
      if length > best_len:
        best_id, best_len = entry_id, length
    if best_id is None:
      return None, None, 0
    self._entries.move_to_end(best_id)
    self.stats.hits += 1
    return best_id, self._entries[best_id].cache, best_len

  def holds(self, entry_id: int | None) -> bool:
    """Whether the entry is still cached (a paged entry's pages stay valid exactly as long)."""
    return entry_id in self._entries

  def record_reuse(self, num_tokens: int) -> None:
    self.stats.tokens_reused += num_tokens

  def store(self, tokens: Sequence[int], cache: KVCache | Any, nbytes: int | None = None) -> bool:
    """Keeps `cache` (KV of `tokens` in slots [0, len(tokens))) unless a stored entry already covers it; True
    when it was kept. `nbytes` is the device memory it stands for (default: the dense cache's arrays)."""
    tokens = np.asarray(tokens, np.int32)
    if nbytes is None:
      nbytes = sum(x.nbytes for x in jax.tree.leaves((cache.keys, cache.values)))
    if nbytes > self.capacity_bytes or len(tokens) == 0:
      return False
    for entry_id, entry in list(self._entries.items()):
      shared = common_prefix_length(entry.tokens, tokens)
      if shared == len(tokens):  # the new prompt is a prefix of (or equal to) a stored one
        self._entries.move_to_end(entry_id)
        return False
      if shared == len(entry.tokens):  # a stored prompt is a prefix of the new one: superseded
        self._drop(entry_id)
    while self._entries and self.nbytes + nbytes > self.capacity_bytes:
      self._drop(next(iter(self._entries)))
      self.stats.evictions += 1
    self._entries[next(self._ids)] = _Entry(tokens=tokens, cache=cache, nbytes=nbytes)
    self.nbytes += nbytes
    return True

  def evict_lru(self) -> bool:
    """Drops the least recently used entry; False when there is none (the pool asks when it runs short)."""
    if not self._entries:
      return False
    self._drop(next(iter(self._entries)))
    self.stats.evictions += 1
    return True

  def _drop(self, entry_id: int) -> None:
    entry = self._entries.pop(entry_id)
    self.nbytes -= entry.nbytes
    if self.on_drop is not None:
      self.on_drop(entry.cache)

  def clear(self) -> None:
    for entry_id in list(self._entries):
      self._drop(entry_id)
