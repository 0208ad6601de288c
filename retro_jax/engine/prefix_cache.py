"""Prompt KV kept on device for reuse, matched on the longest common token prefix.

Why longest-common-prefix and not exact keys: the KV of slot j depends only on tokens[0..j] (causal
attention, slot j = RoPE position j), so the cached KV of ANY earlier prompt serves every prefix it shares with
a new one. Retro-Search rolls out from nested prefixes of one trace (question + steps[:b] for growing b), so
each prompt shares all but its newest steps with the one before it, and a longer cached prompt serves every
shorter one.

Policy:
- every prefilled prompt is stored (its KV sliced to a power-of-two bucket of its length);
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
from typing import Sequence

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
  cache: KVCache  # [num_layers, 1, bucket >= length, kv_heads, head_dim]
  nbytes: int


@dataclasses.dataclass
class PrefixCacheStats:
  lookups: int = 0
  hits: int = 0
  tokens_reused: int = 0
  evictions: int = 0


class PrefixCache:
  """LRU of prompt KV bounded in bytes (device memory), matched on the longest common token prefix."""

  def __init__(self, capacity_bytes: int):
    self.capacity_bytes = capacity_bytes
    self._entries: collections.OrderedDict[int, _Entry] = collections.OrderedDict()
    self._ids = itertools.count()
    self.nbytes = 0
    self.stats = PrefixCacheStats()

  def __len__(self) -> int:
    return len(self._entries)

  def lookup(self, tokens: Sequence[int]) -> tuple[KVCache | None, int]:
    """The entry sharing the longest token prefix with `tokens` and that length ((None, 0) when none)."""
    tokens = np.asarray(tokens, np.int32)
    self.stats.lookups += 1
    best_id, best_len = None, 0
    for entry_id, entry in self._entries.items():
      length = common_prefix_length(entry.tokens, tokens)
      if length > best_len:
        best_id, best_len = entry_id, length
    if best_id is None:
      return None, 0
    self._entries.move_to_end(best_id)
    self.stats.hits += 1
    return self._entries[best_id].cache, best_len

  def record_reuse(self, num_tokens: int) -> None:
    self.stats.tokens_reused += num_tokens

  def store(self, tokens: Sequence[int], cache: KVCache) -> None:
    """Keeps `cache` (KV of `tokens` in slots [0, len(tokens))) unless a stored entry already covers it."""
    tokens = np.asarray(tokens, np.int32)
    nbytes = sum(x.nbytes for x in jax.tree.leaves((cache.keys, cache.values)))
    if nbytes > self.capacity_bytes:
      return
    for entry_id, entry in list(self._entries.items()):
      shared = common_prefix_length(entry.tokens, tokens)
      if shared == len(tokens):  # the new prompt is a prefix of (or equal to) a stored one
        self._entries.move_to_end(entry_id)
        return
      if shared == len(entry.tokens):  # a stored prompt is a prefix of the new one: superseded
        self._drop(entry_id)
    while self._entries and self.nbytes + nbytes > self.capacity_bytes:
      self._drop(next(iter(self._entries)))
      self.stats.evictions += 1
    self._entries[next(self._ids)] = _Entry(tokens=tokens, cache=cache, nbytes=nbytes)
    self.nbytes += nbytes

  def _drop(self, entry_id: int) -> None:
    self.nbytes -= self._entries.pop(entry_id).nbytes

  def clear(self) -> None:
    self._entries.clear()
    self.nbytes = 0
