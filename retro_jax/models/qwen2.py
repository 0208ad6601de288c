"""Qwen2-family causal LM in Flax NNX (Qwen2.5-*, DeepSeek-R1-Distill-Qwen-*), as transformers'
`Qwen2ForCausalLM` defines it: GQA with q/k/v bias and no o bias, RoPE, RMSNorm, SwiGLU, tied or untied head.

One forward serves both uses:
- training / scoring: `model(tokens, positions, segment_ids=...)` over full sequences. `segment_ids` 0 marks
  padding (left or right), and distinct ids keep packed sequences from attending to each other;
- decoding: `model(tokens, positions, kv_cache=cache)` appends the chunk to each row of an external KV cache at
  that row's length and returns the updated cache (see kv_cache.py for why it is not module state).

Layers are scanned, not unrolled: every layer parameter carries a leading [num_layers] axis (logical axis
"layers") and one `lax.scan` runs the decoder layer over it. XLA compiles one layer instead of 28 or 64 (the
7B train step compiled in 5.3 min unrolled on 2 cores), and rematerialisation is a policy applied to the scan
body (`Qwen2Config.remat`), which is how MaxText and tunix trade memory for compute on long sequences.
Full-sequence attention never builds [t, t] scores (attention.py); decoding attends densely over a cache of
dense rows, or over each row's own pages of a paged pool (paged_attention.py).

Dimension letters in einsums: b batch, t query positions, s key positions, d embed, k kv heads, g query heads
per kv head, n query heads (= k*g), h head dim, f mlp, v vocab.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from retro_jax import sharding
from retro_jax.models.attention import attention, dense_attention
from retro_jax.models.config import REMAT_POLICIES, Qwen2Config
from retro_jax.models.kv_cache import CACHE_AXES, KVCache, PagedKVCache, write_rows
from retro_jax.models.paged_attention import paged_update_and_attend
from retro_jax.models.rope import apply_rope, rope_frequencies


def _param(rngs: nnx.Rngs, shape, axes, dtype, init: str = "normal", layers: int | None = None) -> nnx.Param:
  """A parameter, stacked on a leading "layers" axis when `layers` is given (each layer drawn independently)."""
  if layers is not None:
    shape, axes = (layers,) + tuple(shape), ("layers",) + tuple(axes)
  if init == "normal":  # HF initializer_range 0.02
    value = 0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)
  elif init == "ones":
    value = jnp.ones(shape, jnp.float32)
  else:
    value = jnp.zeros(shape, jnp.float32)
  return nnx.Param(value.astype(dtype), axes=axes)


class RMSNorm(nnx.Module):
  """Normalises in float32 and scales after casting back, exactly as Qwen2RMSNorm does."""

  def __init__(self, config: Qwen2Config, rngs: nnx.Rngs, layers: int | None = None):
    self.eps = config.rms_norm_eps
    self.scale = _param(rngs, (config.hidden_size,), ("norm",), config.jnp_param_dtype, "ones", layers)

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * xf.astype(x.dtype)


@struct.dataclass
class LayerCache:
  """What one scanned layer needs of the decode cache: the stacked buffers (carried through the scan and
  updated in place), which layer this is, where each row's chunk starts and what each query may see.
  With a `page_table` the buffers are a paged pool (kv_cache.PagedKVCache) and the chunk is one decode step."""

  keys: jax.Array  # [L, b, S, k, h], or paged [L, k, P, page, h]
  values: jax.Array  # as keys
  layer: jax.Array  # [] int32
  starts: jax.Array  # [b] int32
  mask: jax.Array | None  # [b, t, attend] bool (dense rows only)
  # attention reads cache slots [0, attend) only (S: all of them); writes still go to the whole buffer
  attend: int = struct.field(pytree_node=False)
  # every row starts at 0 (a fresh prefill): the chunk attends to itself only, through the full-sequence path,
  # so a 32k-token prompt never builds [t, S] scores
  empty: bool = struct.field(pytree_node=False, default=False)
  page_table: jax.Array | None = None  # [b, attend // page] int32: the pages each row reads (paged pools only)
  key_scales: jax.Array | None = None  # int8 paged pools: [k, L, P, page] float32
  value_scales: jax.Array | None = None


class Attention(nnx.Module):

  def __init__(self, config: Qwen2Config, rngs: nnx.Rngs, layers: int | None = None):
    d, n, k, h, pd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim, config.jnp_param_dtype
    self.config = config
    self.q_kernel = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), pd, layers=layers)
    self.q_bias = _param(rngs, (n, h), ("heads", "head_dim"), pd, "zeros", layers)
    self.k_kernel = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), pd, layers=layers)
    self.k_bias = _param(rngs, (k, h), ("kv_heads", "head_dim"), pd, "zeros", layers)
    self.v_kernel = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), pd, layers=layers)
    self.v_bias = _param(rngs, (k, h), ("kv_heads", "head_dim"), pd, "zeros", layers)
    self.o_kernel = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), pd, layers=layers)

  def _project(self, x, kernel, bias):
    dt = self.config.jnp_dtype
    return jnp.einsum("btd,dnh->btnh", x, kernel[...].astype(dt)) + bias[...].astype(dt)

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, cache: LayerCache | None):
    """x [b, t, d]; positions, segment_ids [b, t] -> (out [b, t, d], cache with this chunk written, or None)."""
    cfg = self.config
    inv_freq, attention_factor = rope_frequencies(cfg)
    q = apply_rope(self._project(x, self.q_kernel, self.q_bias), positions, inv_freq, attention_factor)
    k = apply_rope(self._project(x, self.k_kernel, self.k_bias), positions, inv_freq, attention_factor)
    v = self._project(x, self.v_kernel, self.v_bias)
    if cache is None:
      out = attention(q, k, v, segment_ids, implementation=cfg.attention)
    elif cache.page_table is not None:
      out, keys, values, key_scales, value_scales = paged_update_and_attend(
          q[:, 0], k[:, 0], v[:, 0], cache.keys, cache.values, cache.layer, cache.page_table, cache.starts,
          segment_ids[:, 0] != 0, cfg.paged_attention, cache.key_scales, cache.value_scales)
      out = out[:, None]
      cache = cache.replace(keys=keys, values=values, key_scales=key_scales, value_scales=value_scales)
    else:
      keys = sharding.constrain(write_rows(cache.keys, cache.layer, k, cache.starts), CACHE_AXES)
      values = sharding.constrain(write_rows(cache.values, cache.layer, v, cache.starts), CACHE_AXES)
      cache = cache.replace(keys=keys, values=values)
      if cache.empty:  # pure JAX: the chunk's rows are replicated over the mesh, no kernel shard_map fits them
        out = attention(q, k, v, segment_ids, implementation="blockwise")
      else:
        out = dense_attention(q, keys[cache.layer, :, :cache.attend].astype(cfg.jnp_dtype),
                              values[cache.layer, :, :cache.attend].astype(cfg.jnp_dtype), cache.mask)
    out = jnp.einsum("btnh,nhd->btd", out, self.o_kernel[...].astype(cfg.jnp_dtype))
    return out, cache


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, config: Qwen2Config, rngs: nnx.Rngs, layers: int | None = None):
    d, f, pd = config.hidden_size, config.intermediate_size, config.jnp_param_dtype
    self.dtype = config.jnp_dtype
    self.gate_kernel = _param(rngs, (d, f), ("embed", "mlp"), pd, layers=layers)
    self.up_kernel = _param(rngs, (d, f), ("embed", "mlp"), pd, layers=layers)
    self.down_kernel = _param(rngs, (f, d), ("mlp", "embed"), pd, layers=layers)

  def __call__(self, x: jax.Array) -> jax.Array:
    gate = jnp.einsum("btd,df->btf", x, self.gate_kernel[...].astype(self.dtype))
    up = jnp.einsum("btd,df->btf", x, self.up_kernel[...].astype(self.dtype))
    hidden = sharding.constrain(jax.nn.silu(gate) * up, ("batch", "seq", "act_mlp"))
    return jnp.einsum("btf,fd->btd", hidden, self.down_kernel[...].astype(self.dtype))


class DecoderLayer(nnx.Module):
  """One decoder layer; built with `layers=L` it holds all L layers' params stacked (the scanned form)."""

  def __init__(self, config: Qwen2Config, rngs: nnx.Rngs, layers: int | None = None):
    self.input_norm = RMSNorm(config, rngs, layers)
    self.attention = Attention(config, rngs, layers)
    self.post_attention_norm = RMSNorm(config, rngs, layers)
    self.mlp = MLP(config, rngs, layers)

  def __call__(self, x, positions, segment_ids, cache: LayerCache | None):
    attn_out, cache = self.attention(self.input_norm(x), positions, segment_ids, cache)
    x = sharding.constrain(x + attn_out, ("batch", "seq", "act_embed"))
    x = sharding.constrain(x + self.mlp(self.post_attention_norm(x)), ("batch", "seq", "act_embed"))
    return x, cache


def cache_mask(starts: jax.Array, chunk_len: int, max_len: int) -> jax.Array:
  """Query t of row b (at cache slot starts[b] + t) sees cache slots <= its own: [b, t, max_len] bool."""
  query_slot = starts[:, None] + jnp.arange(chunk_len)[None, :]  # [b, t]
  return jnp.arange(max_len)[None, None, :] <= query_slot[:, :, None]


class Qwen2ForCausalLM(nnx.Module):

  def __init__(self, config: Qwen2Config, rngs: nnx.Rngs):
    self.config = config
    pd = config.jnp_param_dtype
    self.embedding = _param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), pd)
    self.layers = DecoderLayer(config, rngs, layers=config.num_layers)  # params [num_layers, ...]
    self.final_norm = RMSNorm(config, rngs)
    if not config.tie_word_embeddings:
      self.lm_head = _param(rngs, (config.hidden_size, config.vocab_size), ("embed", "vocab"), pd)

  def hidden_states(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None,
                    kv_cache: KVCache | PagedKVCache | None = None, remat: str | None = None,
                    empty_cache: bool = False, attend_len: int = 0) -> tuple[jax.Array, KVCache | None]:
    """Final-norm hidden states [b, t, d] (the trainer computes the loss from these in vocab chunks).

    `empty_cache` promises that every row of `kv_cache` is empty (lengths 0): the chunk then attends to itself
    blockwise (attention.py) instead of densely over the cache. `attend_len` (> 0) promises that no row that
    counts reaches past cache slot `attend_len`: attention then reads and scores only those slots (the decode
    loop's attend bucket), with no second buffer of that length.
    A `PagedKVCache` takes one token per row (decode): each row writes into and reads its own pages, the first
    attend_len // page_size entries of its page table.

    `remat` (default: the config's) names the policy applied to each layer of the scan: "full" keeps only each
    layer's input for the backward pass, "dots" also its matmul outputs.
    """
    b, t = tokens.shape
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    remat = self.config.remat if remat is None else remat
    if remat not in REMAT_POLICIES:
      raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}")
    x = jnp.take(self.embedding[...], tokens, axis=0).astype(self.config.jnp_dtype)
    graphdef, stacked = nnx.split(self.layers)

    between_layers = ("batch", "layer_seq", "act_embed")  # what remat saves per layer (see sharding.TRAIN_RULES)

    def layer_step(carry, layer_params):
      x, cache = carry
      x, cache = nnx.merge(graphdef, layer_params)(x, positions, segment_ids, cache)
      x = sharding.constrain(x, between_layers)
      return (x, None if cache is None else cache.replace(layer=cache.layer + 1)), None

    if remat != "none":
      layer_step = jax.checkpoint(layer_step, policy=REMAT_POLICIES[remat], prevent_cse=False)
    cache = None
    if isinstance(kv_cache, PagedKVCache):
      if t != 1:
        raise ValueError(f"a paged KV cache takes one token per row (decode), got {t}")
      pages = -(-min(attend_len or kv_cache.max_len, kv_cache.max_len) // kv_cache.page_size)
      cache = LayerCache(keys=kv_cache.keys, values=kv_cache.values, layer=jnp.int32(0), starts=kv_cache.lengths,
                         mask=None, attend=pages * kv_cache.page_size, page_table=kv_cache.page_table[:, :pages],
                         key_scales=kv_cache.key_scales, value_scales=kv_cache.value_scales)
    elif kv_cache is not None:
      seen = min(attend_len, kv_cache.max_len) if attend_len > 0 else kv_cache.max_len
      cache = LayerCache(keys=kv_cache.keys, values=kv_cache.values, layer=jnp.int32(0), starts=kv_cache.lengths,
                         mask=cache_mask(kv_cache.lengths, t, seen), attend=seen, empty=empty_cache)
    (x, cache), _ = jax.lax.scan(layer_step, (sharding.constrain(x, between_layers), cache), stacked,
                                 unroll=self.config.scan_unroll)
    x = self.final_norm(x)
    if kv_cache is None:
      return x, None
    # A right-padded chunk advances each row by its real tokens only; slots past that are overwritten later.
    lengths = kv_cache.lengths + jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32)
    if isinstance(kv_cache, PagedKVCache):
      kv_cache = kv_cache.replace(key_scales=cache.key_scales, value_scales=cache.value_scales)
    return x, kv_cache.replace(keys=cache.keys, values=cache.values, lengths=lengths)

  def head_kernel(self) -> jax.Array:
    """[d, v] output projection (the transposed embedding when tied)."""
    if self.config.tie_word_embeddings:
      return self.embedding[...].T
    return self.lm_head[...]

  def logits(self, hidden: jax.Array) -> jax.Array:
    """[b, t, d] -> [b, t, v] float32."""
    kernel = self.head_kernel().astype(self.config.jnp_dtype)
    logits = jnp.einsum("btd,dv->btv", hidden, kernel, preferred_element_type=jnp.float32)
    return sharding.constrain(logits, ("batch", "seq", "act_vocab"))

  def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None,
               kv_cache: KVCache | PagedKVCache | None = None,
               attend_len: int = 0) -> tuple[jax.Array, KVCache | PagedKVCache | None]:
    """tokens, positions [b, t] int32 -> (logits [b, t, v] float32, updated cache or None)."""
    hidden, kv_cache = self.hidden_states(tokens, positions, segment_ids, kv_cache, attend_len=attend_len)
    return self.logits(hidden), kv_cache


def forward(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, positions: jax.Array,
            segment_ids: jax.Array | None = None, kv_cache: KVCache | None = None):
  """The pure forward `(params, tokens, positions, kv_cache, ...) -> (logits, kv_cache)` for jit/donation."""
  model = nnx.merge(graphdef, state)
  return model(tokens, positions, segment_ids=segment_ids, kv_cache=kv_cache)


def positions_from_segment_ids(segment_ids: jax.Array) -> jax.Array:
  """Positions that restart at 0 in each segment and skip padding (left padding, packing)."""
  is_real = (segment_ids != 0).astype(jnp.int32)
  starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  idx = jnp.arange(segment_ids.shape[1])[None, :]
  segment_start = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  return jnp.where(is_real == 1, idx - segment_start, 0).astype(jnp.int32)
