"""Decode attention over a paged KV pool: one new token per slot, reading only that slot's own pages.

One function, `paged_decode_attention`, with three implementations picked by platform (`implementation="auto"`):
- "gather": pure JAX, runs everywhere and is the reference: gather the slot's pages in table order into
  [b, pages x page_size] keys and values, mask positions >= the slot's length, softmax in float32.
- "pallas_tpu": `jax.experimental.pallas.ops.tpu.paged_attention` (JetStream's kernel, now inside JAX): it DMAs a
  slot's pages straight from HBM and stops at the slot's length, so a short slot next to a 32k one reads little.
- "pallas_gpu": `jax.experimental.pallas.ops.gpu.paged_attention` (Triton through Pallas; k-splits over pages).
Both kernels take q unscaled and apply no 1/sqrt(head_dim), so q is scaled here first; both read a layer's pool
as [kv_heads, pages, page_size, head_dim], which is why the pool is laid out kv-heads-major (kv_cache.py).

`paged_update_and_attend` writes the step's key/value into the pool and attends, per device under `shard_map`
when the mesh splits slots or KV heads: page indices in the tables are local to a device's shard of the pool,
so neither the write nor the read ever touches another device's pages.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from retro_jax import sharding
from retro_jax.models.attention import platform
from retro_jax.models.config import PAGED_ATTENTION_IMPLEMENTATIONS
from retro_jax.models.kv_cache import PAGED_CACHE_AXES, dequantize, layer_pages, quantize, write_pages


GATHER_BLOCK = 512  # positions the pure-JAX path gathers per step of its loop over a slot's pages


def gather_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
                     lengths: jax.Array, block: int = GATHER_BLOCK, k_scales: jax.Array | None = None,
                     v_scales: jax.Array | None = None) -> jax.Array:
  """q [b, n, h]; k/v_pages [k, P, page, h]; page_table [b, p] (in range); lengths [b] -> [b, n, h] in q.dtype.

  A loop over the table `block` positions at a time with an online softmax (as the kernels and the blockwise
  training path do): each step gathers [b, block] keys and values, so no [b, p x page] copy of every slot's pages
  is written and read back (on CPU that copy made decode at 32k contexts 0.59x the dense rows' speed; see
  benchmarks/results/decode_paged_cpu.json). A slot of length 0 averages nothing and gets 0. int8 pages come with
  k/v_scales [k, P, page] and are dequantized block by block."""
  q, k_pages, v_pages, page_table, lengths = map(jnp.asarray, (q, k_pages, v_pages, page_table, lengths))
  b, n, h = q.shape
  kv_heads, _, page_size, _ = k_pages.shape
  per_block = max(1, min(page_table.shape[1], block // page_size))
  table = jnp.pad(page_table, ((0, 0), (0, -page_table.shape[1] % per_block)))  # padding: page 0, past every length
  qg = q.reshape(b, kv_heads, n // kv_heads, h)

  def step(i, carry):
    peak, denom, acc = carry
    ids = jax.lax.dynamic_slice_in_dim(table, i * per_block, per_block, axis=1)
    seen = lambda pages, scales: dequantize(pages[:, ids], None if scales is None else scales[:, ids], q.dtype
                                            ).reshape(kv_heads, b, per_block * page_size, h)  # [k, b, block, h]
    keys, values = seen(k_pages, k_scales), seen(v_pages, v_scales)
    scores = jnp.einsum("bkgh,kbsh->bkgs", qg, keys, preferred_element_type=jnp.float32) * (h ** -0.5)
    position = i * per_block * page_size + jnp.arange(per_block * page_size)
    scores = jnp.where((position[None, :] < lengths[:, None])[:, None, None, :], scores, -jnp.inf)
    new_peak = jnp.maximum(peak, jnp.max(scores, axis=-1))
    safe = jnp.where(jnp.isfinite(new_peak), new_peak, 0.0)
    p = jnp.exp(scores - safe[..., None])
    correction = jnp.exp(peak - safe)
    pv = jnp.einsum("bkgs,kbsh->bkgh", p.astype(values.dtype), values, preferred_element_type=jnp.float32)
    return new_peak, denom * correction + jnp.sum(p, axis=-1), acc * correction[..., None] + pv

  shape = qg.shape[:3]
  init = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros(qg.shape, jnp.float32))
  _, denom, acc = jax.lax.fori_loop(0, table.shape[1] // per_block, step, init)
  out = acc / jnp.where(denom > 0, denom, 1.0)[..., None]
  return out.reshape(b, n, h).astype(q.dtype)


def _largest_divisor_up_to(n: int, cap: int) -> int:
  return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def tpu_kernel_attention(q, k_pages, v_pages, page_table, lengths, pages_per_compute_block: int = 8,
                         k_scales=None, v_scales=None):
  """The TPU kernel. Mosaic needs head_dim a multiple of 128 ("auto" falls back to "gather" otherwise) and does not
  lower under jax_default_matmul_precision="highest" (an f32 x bf16 dot). No int8 pools: the kernel's wrapper
  broadcasts per-position scales to [k, P, page, head_dim] float32, 4x the int8 pool it saves ("auto" gathers)."""
  from jax.experimental.pallas.ops.tpu import paged_attention as tpu  # pylint: disable=import-outside-toplevel
  if k_scales is not None or v_scales is not None:
    raise ValueError("the Pallas TPU paged-attention kernel takes no int8 pool here (see its docstring)")
  block = _largest_divisor_up_to(page_table.shape[1], pages_per_compute_block)
  out = tpu.paged_attention(q * (q.shape[-1] ** -0.5), k_pages, v_pages, jnp.maximum(lengths, 1), page_table,
                            pages_per_compute_block=block)
  return jnp.where((lengths > 0)[:, None, None], out, 0).astype(q.dtype)


def gpu_kernel_attention(q, k_pages, v_pages, page_table, lengths, pages_per_compute_block: int = 8,
                         interpret: bool = False, k_scales=None, v_scales=None):
  """The GPU kernel; `interpret=True` runs it through Pallas's interpreter on CPU (how tests check it). int8 pages
  take their scales [k, P, page] as the kernel does (key = int8 x scale)."""
  from jax.experimental.pallas.ops.gpu import paged_attention as gpu  # pylint: disable=import-outside-toplevel
  pages = page_table.shape[1]
  block = _largest_divisor_up_to(pages, pages_per_compute_block)
  out = gpu.paged_attention(q * (q.shape[-1] ** -0.5), k_pages, v_pages, page_table, jnp.maximum(lengths, 1),
                            k_scales, v_scales, pages_per_compute_block=block, k_splits=max(1, pages // block),
                            interpret=interpret)
  return jnp.where((lengths > 0)[:, None, None], out, 0).astype(q.dtype)


def paged_decode_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
                           lengths: jax.Array, implementation: str = "auto", k_scales: jax.Array | None = None,
                           v_scales: jax.Array | None = None) -> jax.Array:
  """Attention of one query per slot over its first `lengths[b]` positions (see the module docstring).

  q [b, n, h]; k/v_pages [k, P, page, h]; page_table [b, p] int32 with entries in [0, P); lengths [b] int32;
  int8 pages with k/v_scales [k, P, page].
  """
  implementation = _resolve(implementation, q.shape[-1], k_scales is not None)
  fn = {"gather": gather_attention, "pallas_tpu": tpu_kernel_attention, "pallas_gpu": gpu_kernel_attention}.get(
      implementation)
  if fn is None:
    raise ValueError(f"paged attention implementation must be one of {PAGED_ATTENTION_IMPLEMENTATIONS}, "
                     f"got {implementation!r}")
  return fn(q, k_pages, v_pages, page_table, lengths, k_scales=k_scales, v_scales=v_scales)


def _resolve(implementation: str, head_dim: int, quantized: bool) -> str:
  if implementation != "auto":
    return implementation
  kernel = {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}.get(platform(), "gather")
  return "gather" if kernel == "pallas_tpu" and (head_dim % 128 or quantized) else kernel


def _update_and_attend(q, k, v, pool_k, pool_v, k_scales, v_scales, layer, page_table, starts, active,
                       implementation):
  """Per device: write k/v [b, k, h] at each active slot's position `starts`, then attend over [0, starts]."""
  num_pages, page_size = pool_k.shape[2], pool_k.shape[3]
  page = jnp.take_along_axis(page_table, (starts // page_size)[:, None], axis=1, mode="fill",
                             fill_value=num_pages)[:, 0]  # a position past the table is dropped, not clamped
  page = jnp.where(active, page, num_pages)  # inactive slots write nothing
  offset = starts % page_size
  if k_scales is not None:  # int8 pool
    (k, k_scale), (v, v_scale) = quantize(k), quantize(v)
    k_scales = write_pages(k_scales, layer, k_scale, page, offset)
    v_scales = write_pages(v_scales, layer, v_scale, page, offset)
  pool_k = write_pages(pool_k, layer, k, page, offset)
  pool_v = write_pages(pool_v, layer, v, page, offset)
  readable = jnp.minimum(page_table, num_pages - 1)  # "no page" entries lie past the length: any page will do
  lengths = jnp.where(active, starts + 1, 0)
  k_pages, table = layer_pages(pool_k, layer, readable)
  v_pages, _ = layer_pages(pool_v, layer, readable)
  scales = [None if x is None else layer_pages(x, layer, readable)[0] for x in (k_scales, v_scales)]
  out = paged_decode_attention(q, k_pages, v_pages, table, lengths, implementation, *scales)
  return out, pool_k, pool_v, k_scales, v_scales


def paged_update_and_attend(q: jax.Array, k: jax.Array, v: jax.Array, pool_k: jax.Array, pool_v: jax.Array,
                            layer: jax.Array, page_table: jax.Array, starts: jax.Array, active: jax.Array,
                            implementation: str = "auto", k_scales: jax.Array | None = None,
                            v_scales: jax.Array | None = None):
  """One decode step of one layer: q [b, n, h], k/v [b, k, h] at positions starts [b] (written where active [b]);
  pools [k, L, P, page, h] (int8 pools: with scales [k, L, P, page]) -> (out [b, n, h], pool_k, pool_v, k_scales,
  v_scales)."""
  implementation = _resolve(implementation, q.shape[-1], k_scales is not None)
  body = functools.partial(_update_and_attend, implementation=implementation)
  args = (q, k, v, pool_k, pool_v, k_scales, v_scales, layer, page_table, starts, active)
  active_mesh = sharding.active()
  if active_mesh is None or active_mesh[0].size == 1:
    return body(*args)
  mesh, rules = active_mesh
  heads, kv_heads = rules.spec(("batch", "heads", None)), rules.spec(("batch", "kv_heads", None))
  pool, rows = rules.spec(PAGED_CACHE_AXES), rules.spec(("batch",))
  scales = None if k_scales is None else rules.spec(PAGED_CACHE_AXES[:4])
  return jax.shard_map(body, mesh=mesh, in_specs=(heads, kv_heads, kv_heads, pool, pool, scales, scales,
                                                  rules.spec(()), rules.spec(("batch", None)), rows, rows),
                       out_specs=(heads, pool, pool, scales, scales), check_vma=False)(*args)
