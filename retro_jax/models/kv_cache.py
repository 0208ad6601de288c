"""The KV cache: a plain pytree passed into and returned from the forward, never module state.

Keeping it outside the module is what lets the engine donate it through `jit`, insert a prefill's cache into
one decode slot, and slice a cached prefix out of it (JetStream's prefill / insert / generate split). Layers
are stacked on a leading axis, as the model's scanned layers read them: one array per keys / values, updated
in place inside the layer scan.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from retro_jax.models.config import Qwen2Config

# Logical axes of the stacked key or value buffer; sharding.py maps them to the mesh.
CACHE_AXES = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")


@struct.dataclass
class KVCache:
  """Key/value buffers of every layer and how many positions of each row are filled.

  Row b's tokens occupy slots [0, lengths[b]) and slot j holds position j: the engine right-aligns nothing,
  so a token's cache index is its RoPE position. Writing past `max_len` is the caller's bug (the engine checks).
  """

  keys: jax.Array  # [layers, batch, max_len, kv_heads, head_dim]
  values: jax.Array  # [layers, batch, max_len, kv_heads, head_dim]
  lengths: jax.Array  # [batch] int32

  @classmethod
  def init(cls, config: Qwen2Config, batch: int, max_len: int, dtype=None) -> KVCache:
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    dtype = dtype or config.jnp_dtype
    return cls(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype), lengths=jnp.zeros((batch,), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.keys.shape[2]

  @property
  def batch(self) -> int:
    return self.keys.shape[1]


def bytes_per_token(config: Qwen2Config, dtype=None) -> int:
  """KV bytes one cached position takes over all layers (keys and values; int8 adds a float32 scale per head)."""
  dtype = jnp.dtype(dtype or config.jnp_dtype)
  per_head = config.head_dim * dtype.itemsize + (4 if dtype == jnp.int8 else 0)
  return 2 * config.num_layers * config.num_kv_heads * per_head


def write_rows(buffer: jax.Array, layer: jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
  """buffer [L, b, S, k, h] with new [b, T, k, h] written into layer `layer` at per-row offsets starts [b].

  One scatter at explicit (layer, row, slot) indices, not a dynamic_update_slice vmapped over rows: the vmap
  moves the batch axis to the front, so XLA picks a batch-major layout for the cache inside the decode loops and
  copies the whole cache in and out of it. Compiled for v5p that was 2x the KV cache in temporaries per generate
  call (94.3 of 95 GB per chip for the 7B search plan at 64 slots x 32k; benchmarks/plan.py); the scatter
  updates the carried buffer in place. Slots past S are dropped, never clamped onto a row's last tokens.
  """
  rows = jnp.arange(new.shape[0])[:, None]
  slots = starts[:, None] + jnp.arange(new.shape[1])[None, :]
  return buffer.at[layer, rows, slots].set(new.astype(buffer.dtype), mode="drop")


# ---- paged ------------------------------------------------------------------------------------------------------

# Logical axes of a paged pool. Kv-heads-major, as JAX's Pallas paged-attention kernels (TPU and GPU) take pages:
# [kv_heads, pages, page_size, head_dim]. Layers sit next to pages, so the whole pool reshapes for free into
# [kv_heads, layers x pages, ...] and a layer's pages are ids offset by layer x pages: a kernel reads one layer
# without a copy of it (indexing pool[:, layer] would hand the kernel a copied slice every step).
PAGED_CACHE_AXES = ("kv_heads", "layers", "kv_pages", None, "head_dim")


@struct.dataclass
class PagedKVCache:
  """A pool of fixed-size KV pages shared by all decode slots, and each slot's table of the pages it reads.

  Slot b's position j lives at page `page_table[b, j // page_size]`, offset `j % page_size`. Pages are handed out
  by the host (engine/page_pool.py) as a slot grows, so memory follows the tokens that exist rather than
  slots x max_seq_len, and one page can sit in several tables (the n samples of a prompt, a cached prefix).
  Table entries are page indices local to the slot's shard of the pool (the pool's page axis is split like the
  slots); `num_pages` (one past the last local page) marks an entry with no page: writes there are dropped.
  """

  keys: jax.Array  # [kv_heads, layers, pages, page_size, head_dim]
  values: jax.Array  # [kv_heads, layers, pages, page_size, head_dim]
  lengths: jax.Array  # [batch] int32, positions filled
  page_table: jax.Array  # [batch, pages_per_slot] int32
  # int8 pools: float32 [kv_heads, layers, pages, page_size], one scale per position and KV head (key = int8 x scale)
  key_scales: jax.Array | None = None
  value_scales: jax.Array | None = None

  @classmethod
  def init(cls, config: Qwen2Config, batch: int, pages_per_slot: int, num_pages: int, page_size: int,
           dtype=None) -> PagedKVCache:
    shape = (config.num_kv_heads, config.num_layers, num_pages, page_size, config.head_dim)
    dtype = jnp.dtype(dtype or config.jnp_dtype)
    scales = (lambda: jnp.ones(shape[:-1], jnp.float32)) if dtype == jnp.int8 else (lambda: None)
    return cls(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype), lengths=jnp.zeros((batch,), jnp.int32),
               page_table=jnp.full((batch, pages_per_slot), num_pages, jnp.int32), key_scales=scales(),
               value_scales=scales())

  @property
  def page_size(self) -> int:
    return self.keys.shape[3]

  @property
  def num_pages(self) -> int:
    return self.keys.shape[2]  # per layer

  @property
  def max_len(self) -> int:
    return self.page_table.shape[1] * self.page_size

  @property
  def batch(self) -> int:
    return self.page_table.shape[0]


def write_pages(pool: jax.Array, layer: jax.Array, new: jax.Array, pages: jax.Array, offsets: jax.Array) -> jax.Array:
  """pool [k, L, P, page, (h)] with new [m, k, (h)] written into layer `layer` at (pages[i], offsets[i]) [m].

  One scatter; entries whose page is out of range (the table's "no page" marker) are dropped, which is how a free
  or finished slot's step writes nothing. Scales ([k, L, P, page], new [m, k]) go through here too.
  """
  return pool.at[:, layer, pages, offsets].set(jnp.moveaxis(new.astype(pool.dtype), 0, 1), mode="drop")


def quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x [..., h] -> (int8 [..., h], float32 scale [...]) with x ~= int8 x scale: symmetric, one scale per vector
  (per position and KV head, as jax-llm-examples quantizes its KV), so the error is at most scale / 2."""
  x = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x), axis=-1) / 127.0
  scale = jnp.where(scale > 0, scale, 1.0)
  return jnp.clip(jnp.rint(x / scale[..., None]), -127, 127).astype(jnp.int8), scale


def dequantize(x: jax.Array, scale: jax.Array | None, dtype) -> jax.Array:
  """int8 [..., h] x scale [...] -> dtype (a float pool passes through)."""
  if scale is None:
    return x.astype(dtype)
  return (x.astype(jnp.float32) * scale[..., None]).astype(dtype)


def layer_pages(pool: jax.Array, layer: jax.Array, page_table: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(pool as [k, L x P, page, h], page_table's ids of layer `layer` in it): a free reshape, no copy of a layer."""
  k, num_layers, num_pages = pool.shape[:3]
  return pool.reshape((k, num_layers * num_pages) + pool.shape[3:]), page_table + layer * num_pages
