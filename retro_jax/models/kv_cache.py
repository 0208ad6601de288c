"""The KV cache: a plain pytree passed into and returned from the forward, never module state.

Keeping it outside the module is what lets the engine donate it through `jit`, insert a prefill's cache into
one decode slot, and slice a cached prefix out of it (JetStream's prefill / insert / generate split).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from retro_jax.models.config import Qwen2Config

# Logical axes of one layer's key or value buffer; sharding.py maps them to the mesh.
CACHE_AXES = ("batch", "cache_seq", "kv_heads", "head_dim")


@struct.dataclass
class KVCache:
  """Per-layer key/value buffers and how many positions of each row are filled.

  Row b's tokens occupy slots [0, lengths[b]) and slot j holds position j: the engine right-aligns nothing,
  so a token's cache index is its RoPE position. Writing past `max_len` is the caller's bug (the engine checks).
  """

  keys: tuple[jax.Array, ...]  # num_layers x [batch, max_len, kv_heads, head_dim]
  values: tuple[jax.Array, ...]  # num_layers x [batch, max_len, kv_heads, head_dim]
  lengths: jax.Array  # [batch] int32

  @classmethod
  def init(cls, config: Qwen2Config, batch: int, max_len: int, dtype=None) -> KVCache:
    shape = (batch, max_len, config.num_kv_heads, config.head_dim)
    dtype = dtype or config.jnp_dtype
    zeros = lambda: jnp.zeros(shape, dtype)
    return cls(
        keys=tuple(zeros() for _ in range(config.num_layers)),
        values=tuple(zeros() for _ in range(config.num_layers)),
        lengths=jnp.zeros((batch,), jnp.int32),
    )

  @property
  def max_len(self) -> int:
    return self.keys[0].shape[1]

  @property
  def batch(self) -> int:
    return self.keys[0].shape[0]


def write_rows(buffer: jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
  """buffer [b, S, k, h] with new [b, T, k, h] written at per-row offsets starts [b]."""
  def write_one(row, chunk, start):
    return jax.lax.dynamic_update_slice(row, chunk.astype(row.dtype), (start, 0, 0))

  return jax.vmap(write_one)(buffer, new, starts)
