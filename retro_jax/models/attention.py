"""Causal self-attention over full sequences (training, scoring, prefill without a cache) without [t, t] scores.

R1 traces run to 32k tokens; dense scores at that length are 32k x 32k x 4 B = 4 GiB per head, which is what
made one layer's attention most of a 7B training step's memory. Every path here keeps only [block, block]
tiles alive, forward and backward:

- "blockwise": pure JAX, runs everywhere, the reference the kernels are checked against. An online softmax
  over key blocks (Milakov & Gimelshein 2018; FlashAttention, Dao et al. 2022) with a hand-written backward
  that recomputes each tile from the saved log-sum-exp, so the gradient never holds [t, t] either. Blocks
  above the diagonal are skipped (a causal row of n blocks costs n(n+1)/2 tiles, not n^2).
- "splash": JAX's Pallas splash-attention kernel on TPU (block-sparse causal mask, segment ids in-kernel),
  run per device under `shard_map` over the active mesh (a Pallas call does not partition itself).
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` on GPU. Its public API knows padding but
  not packing, so a batch whose rows hold more than one segment falls back to "blockwise" at run time.
- "xla": the dense reference (materialises the scores; tiny models and tests).

`attention(..., implementation="auto")` picks by the platform of the active mesh (`sharding.use_rules`), not
the default backend, so an AOT compile for a TPU topology on a CPU host traces the TPU path.

Masking is the model's: query i sees key j when j <= i, both share a segment id and the id is not 0
(padding). A query that sees nothing (a padding position) gets a zero output and zero gradient.
Shapes: q [b, t, n, h], k and v [b, t, k, h] (n = k * g query heads), segment_ids [b, t] int.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from retro_jax import sharding
from retro_jax.models.config import ATTENTION_IMPLEMENTATIONS

DEFAULT_BLOCK = 512


def visible(q_segments: jax.Array, k_segments: jax.Array, q_index: jax.Array, k_index: jax.Array) -> jax.Array:
  """[b, tq], [b, tk] segment ids and [tq], [tk] positions in the row -> [b, tq, tk] bool (causal, same segment,
  no padding key)."""
  causal = k_index[None, None, :] <= q_index[None, :, None]
  same = q_segments[:, :, None] == k_segments[:, None, :]
  return causal & same & (k_segments[:, None, :] != 0)


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """The reference: q [b, t, n, h], k/v [b, s, k, h], mask [b, t, s] bool -> [b, t, n, h] in q.dtype.

  A fully masked query row averages nothing: its output is 0 (as in the blockwise path)."""
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  qg = q.reshape(b, t, kv_heads, n // kv_heads, h)
  scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * (h ** -0.5)
  seen = mask[:, None, None]
  # a finite fill keeps a fully masked row NaN-free; zeroing afterwards makes its output 0
  probs = jnp.where(seen, jax.nn.softmax(jnp.where(seen, scores, -1e30), axis=-1), 0.0)
  out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, n, h).astype(q.dtype)


# ---- blockwise (pure JAX) --------------------------------------------------------------------------------------

def _tile(q_blk, k_blk, q_seg, k_seg, i, j, block, scale):
  """Scores of query block i against key block j, masked: q_blk [b, B, k, g, h] -> s [b, k, g, B, B] f32, mask."""
  idx = jnp.arange(block)
  mask = visible(q_seg, k_seg, i * block + idx, j * block + idx)[:, None, None]
  s = jnp.einsum("bqkgh,bskh->bkgqs", q_blk, k_blk, preferred_element_type=jnp.float32) * scale
  return jnp.where(mask, s, -jnp.inf), mask


def _blocks(x, i, block):
  return jax.lax.dynamic_slice_in_dim(x, i * block, block, axis=1)


def _forward(q, k, v, seg, block):
  """q [b, T, k, g, h] (T a multiple of block) -> (out [b, T, k, g, h] q.dtype, lse [b, k, g, T] f32)."""
  b, t, kh, g, h = q.shape
  scale = h ** -0.5

  def query_block(i):
    q_blk, q_seg = _blocks(q, i, block), _blocks(seg, i, block)

    def key_block(j, carry):
      peak, denom, acc = carry
      s, _ = _tile(q_blk, _blocks(k, j, block), q_seg, _blocks(seg, j, block), i, j, block, scale)
      new_peak = jnp.maximum(peak, jnp.max(s, axis=-1))
      safe = jnp.where(jnp.isfinite(new_peak), new_peak, 0.0)
      p = jnp.exp(s - safe[..., None])
      correction = jnp.exp(peak - safe)
      pv = jnp.einsum("bkgqs,bskh->bkgqh", p.astype(v.dtype), _blocks(v, j, block),
                      preferred_element_type=jnp.float32)
      return new_peak, denom * correction + jnp.sum(p, axis=-1), acc * correction[..., None] + pv

    init = (jnp.full((b, kh, g, block), -jnp.inf), jnp.zeros((b, kh, g, block)), jnp.zeros((b, kh, g, block, h)))
    peak, denom, acc = jax.lax.fori_loop(0, i + 1, key_block, init)  # causal: key blocks 0..i only
    out = acc / jnp.where(denom > 0, denom, 1.0)[..., None]
    lse = jnp.where(denom > 0, peak + jnp.log(jnp.where(denom > 0, denom, 1.0)), 0.0)
    return out.transpose(0, 3, 1, 2, 4).astype(q.dtype), lse

  out, lse = jax.lax.map(query_block, jnp.arange(t // block))  # [nb, b, B, k, g, h], [nb, b, k, g, B]
  out = out.transpose(1, 0, 2, 3, 4, 5).reshape(b, t, kh, g, h)
  lse = lse.transpose(1, 2, 3, 0, 4).reshape(b, kh, g, t)
  return out, lse


def _backward(q, k, v, seg, out, lse, d_out, block):
  """FlashAttention-2's backward: for each key block, walk the query blocks at or below it, recomputing tiles."""
  b, t, kh, g, h = q.shape
  scale = h ** -0.5
  nb = t // block
  # delta_i = sum_h dO_i * O_i, the softmax-Jacobian term, once per query.
  delta = jnp.einsum("btkgh,btkgh->bkgt", d_out.astype(jnp.float32), out.astype(jnp.float32))

  def key_block(j, d_q):
    k_blk, v_blk, k_seg = _blocks(k, j, block), _blocks(v, j, block), _blocks(seg, j, block)

    def query_block(i, carry):
      d_q, d_k, d_v = carry
      q_blk, do_blk = _blocks(q, i, block), _blocks(d_out, i, block)
      s, mask = _tile(q_blk, k_blk, _blocks(seg, i, block), k_seg, i, j, block, scale)
      lse_blk = jax.lax.dynamic_slice_in_dim(lse, i * block, block, axis=3)
      p = jnp.where(mask, jnp.exp(s - lse_blk[..., None]), 0.0)  # [b, k, g, Bq, Bk]
      d_v = d_v + jnp.einsum("bkgqs,bqkgh->bskh", p.astype(do_blk.dtype), do_blk, preferred_element_type=jnp.float32)
      d_p = jnp.einsum("bqkgh,bskh->bkgqs", do_blk, v_blk, preferred_element_type=jnp.float32)
      delta_blk = jax.lax.dynamic_slice_in_dim(delta, i * block, block, axis=3)
      d_s = (p * (d_p - delta_blk[..., None]) * scale).astype(q.dtype)
      d_k = d_k + jnp.einsum("bkgqs,bqkgh->bskh", d_s, q_blk, preferred_element_type=jnp.float32)
      d_q_blk = _blocks(d_q, i, block) + jnp.einsum("bkgqs,bskh->bqkgh", d_s, k_blk,
                                                     preferred_element_type=jnp.float32)
      return jax.lax.dynamic_update_slice_in_dim(d_q, d_q_blk, i * block, axis=1), d_k, d_v

    zeros_kv = jnp.zeros((b, block, kh, h), jnp.float32)
    d_q, d_k, d_v = jax.lax.fori_loop(j, nb, query_block, (d_q, zeros_kv, zeros_kv))  # causal: i >= j only
    return d_q, (d_k, d_v)

  d_q, (d_k, d_v) = jax.lax.scan(lambda d_q, j: key_block(j, d_q), jnp.zeros(q.shape, jnp.float32),
                                 jnp.arange(nb))
  unblock = lambda x: x.transpose(1, 0, 2, 3, 4).reshape(b, t, kh, h)
  return d_q.astype(q.dtype), unblock(d_k).astype(k.dtype), unblock(d_v).astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blockwise(q, k, v, seg, block):
  return _forward(q, k, v, seg, block)[0]


def _blockwise_fwd(q, k, v, seg, block):
  out, lse = _forward(q, k, v, seg, block)
  return out, (q, k, v, seg, out, lse)


def _blockwise_bwd(block, residuals, d_out):
  q, k, v, seg, out, lse = residuals
  d_q, d_k, d_v = _backward(q, k, v, seg, out, lse, d_out, block)
  return d_q, d_k, d_v, np.zeros(seg.shape, jax.dtypes.float0)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                        block: int = DEFAULT_BLOCK) -> jax.Array:
  """Causal attention in [block, block] tiles, forward and backward (see the module docstring)."""
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  block = min(block, 1 << max(0, t - 1).bit_length())  # short rows: one block of the next power of two
  pad = -t % block
  if pad:  # padded positions get segment id 0: they see nothing and nobody sees them
    q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)))
  qg = q.reshape(b, t + pad, kv_heads, n // kv_heads, h)
  out = _blockwise(qg, k, v, segment_ids.astype(jnp.int32), block)
  return out.reshape(b, t + pad, n, h)[:, :t]


# ---- kernels ---------------------------------------------------------------------------------------------------

def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                     block: int = DEFAULT_BLOCK, interpret: bool = False) -> jax.Array:
  """JAX's TPU splash-attention kernel, per device under `shard_map` (batch and heads split as the mesh
  splits them). `interpret=True` runs the kernel's Pallas interpreter on CPU (tests)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # pylint: disable=import-outside-toplevel
  active = sharding.active()
  b, t, n, h = q.shape
  head_parts = 1 if active is None else sharding.axis_size(active[0], active[1].rules.get("heads"))
  block = min(block, t)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                            block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)

  def per_device(q, k, v, segment_ids):  # local shapes; q [b', t, n', h] -> kernel layout [n', t, h]
    local_heads = q.shape[2]
    mask = splash.MultiHeadMask([splash.CausalMask((t, t))] * local_heads)
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    one_row = lambda q, k, v, s: kernel(q.transpose(1, 0, 2) * (h ** -0.5), k.transpose(1, 0, 2),
                                        v.transpose(1, 0, 2), segment_ids=splash.SegmentIds(q=s, kv=s))
    out = jax.vmap(one_row)(q, k, v, segment_ids)  # [b', n', t, h]
    # the kernel lets a padding query attend to padding keys; the model's rule is that it sees nothing
    return jnp.where((segment_ids != 0)[:, None, :, None], out, 0).transpose(0, 2, 1, 3).astype(q.dtype)

  if active is None or head_parts * sharding.axis_size(active[0], active[1].rules.get("batch")) == 1:
    return per_device(q, k, v, segment_ids)
  mesh, rules = active
  qkv_spec = rules.spec(("batch", None, "heads", None))
  kv_spec = rules.spec(("batch", None, "kv_heads", None))
  seg_spec = rules.spec(("batch", None))
  return jax.shard_map(per_device, mesh=mesh, in_specs=(qkv_spec, kv_spec, kv_spec, seg_spec),
                       out_specs=qkv_spec, check_vma=False)(q, k, v, segment_ids)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                    block: int = DEFAULT_BLOCK) -> jax.Array:
  """cuDNN's fused attention for rows holding one right-padded segment; packed rows take the blockwise path."""
  lengths = jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32)
  first_segment = jnp.where(segment_ids != 0, segment_ids, segment_ids[:, :1])
  one_segment = jnp.all(first_segment == segment_ids[:, :1]) & jnp.all(
      (segment_ids != 0) == (jnp.arange(segment_ids.shape[1])[None] < lengths[:, None]))

  def fused(q, k, v, segment_ids):
    del segment_ids
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=lengths,
                                       key_value_seq_lengths=lengths, implementation="cudnn")
    return jnp.where((jnp.arange(q.shape[1])[None] < lengths[:, None])[..., None, None], out, 0).astype(q.dtype)

  return jax.lax.cond(one_segment, fused, functools.partial(blockwise_attention, block=block), q, k, v, segment_ids)


def platform() -> str:
  """The platform attention runs on: the active mesh's devices (AOT compiles for TPU on a CPU host), else the
  default backend."""
  active = sharding.active()
  return active[0].devices.flat[0].platform if active is not None else jax.default_backend()


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
              implementation: str = "auto", block: int = DEFAULT_BLOCK) -> jax.Array:
  """Causal self-attention with segment ids: q [b, t, n, h], k/v [b, t, k, h] -> [b, t, n, h]."""
  if implementation == "auto":
    implementation = {"tpu": "splash", "gpu": "cudnn"}.get(platform(), "blockwise")
  if implementation == "blockwise":
    return blockwise_attention(q, k, v, segment_ids, block)
  if implementation == "splash":
    return splash_attention(q, k, v, segment_ids, block)
  if implementation == "cudnn":
    return cudnn_attention(q, k, v, segment_ids, block)
  if implementation == "xla":
    t = q.shape[1]
    return dense_attention(q, k, v, visible(segment_ids, segment_ids, jnp.arange(t), jnp.arange(t)))
  raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {implementation!r}")
