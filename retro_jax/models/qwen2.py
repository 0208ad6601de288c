"""Qwen2-family causal LM in Flax NNX (Qwen2.5-*, DeepSeek-R1-Distill-Qwen-*), as transformers'
`Qwen2ForCausalLM` defines it: GQA with q/k/v bias and no o bias, RoPE, RMSNorm, SwiGLU, tied or untied head.

One forward serves both uses:
- training / scoring: `model(tokens, positions, segment_ids=...)` over full sequences. `segment_ids` 0 marks
  padding (left or right), and distinct ids keep packed sequences from attending to each other;
- decoding: `model(tokens, positions, kv_cache=cache)` appends the chunk to each row of an external KV cache at
  that row's length and returns the updated cache (see kv_cache.py for why it is not module state).

Dimension letters in einsums: b batch, t query positions, s key positions, d embed, k kv heads, g query heads
per kv head, n query heads (= k*g), h head dim, f mlp, v vocab.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from retro_jax import sharding
from retro_jax.models.config import Qwen2Config
from retro_jax.models.kv_cache import CACHE_AXES, KVCache, write_rows
from retro_jax.models.rope import apply_rope, rope_frequencies

_MASKED = -1e30  # finite, so a row with nothing to attend to (a padding query) gives no NaN


def _param(rngs: nnx.Rngs, shape, axes, dtype, init: str = "normal") -> nnx.Param:
  if init == "normal":  # HF initializer_range 0.02
    value = 0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)
  elif init == "ones":
    value = jnp.ones(shape, jnp.float32)
  else:
    value = jnp.zeros(shape, jnp.float32)
  return nnx.Param(value.astype(dtype), axes=axes)


class RMSNorm(nnx.Module):
  """Normalises in float32 and scales after casting back, exactly as Qwen2RMSNorm does."""

  def __init__(self, config: Qwen2Config, rngs: nnx.Rngs):
    self.eps = config.rms_norm_eps
    self.scale = _param(rngs, (config.hidden_size,), ("norm",), config.jnp_param_dtype, "ones")

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * xf.astype(x.dtype)


class Attention(nnx.Module):

  def __init__(self, config: Qwen2Config, rngs: nnx.Rngs):
    d, n, k, h, pd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim, config.jnp_param_dtype
    self.config = config
    self.q_kernel = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), pd)
    self.q_bias = _param(rngs, (n, h), ("heads", "head_dim"), pd, "zeros")
    self.k_kernel = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), pd)
    self.k_bias = _param(rngs, (k, h), ("kv_heads", "head_dim"), pd, "zeros")
    self.v_kernel = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), pd)
    self.v_bias = _param(rngs, (k, h), ("kv_heads", "head_dim"), pd, "zeros")
    self.o_kernel = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), pd)

  def _project(self, x, kernel, bias):
    dt = self.config.jnp_dtype
    return jnp.einsum("btd,dnh->btnh", x, kernel[...].astype(dt)) + bias[...].astype(dt)

  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array,
               cache: tuple[jax.Array, jax.Array, jax.Array] | None):
    """x [b, t, d]; positions [b, t]; mask [b, t, s] bool; cache = (keys, values, write_starts) or None."""
    cfg = self.config
    inv_freq, attention_factor = rope_frequencies(cfg)
    q = apply_rope(self._project(x, self.q_kernel, self.q_bias), positions, inv_freq, attention_factor)
    k = apply_rope(self._project(x, self.k_kernel, self.k_bias), positions, inv_freq, attention_factor)
    v = self._project(x, self.v_kernel, self.v_bias)
    new_cache = None
    if cache is not None:
      cached_k, cached_v, starts = cache
      cached_k = sharding.constrain(write_rows(cached_k, k, starts), CACHE_AXES)
      cached_v = sharding.constrain(write_rows(cached_v, v, starts), CACHE_AXES)
      new_cache = (cached_k, cached_v)
      k, v = cached_k.astype(cfg.jnp_dtype), cached_v.astype(cfg.jnp_dtype)
    b, t = x.shape[:2]
    groups = cfg.num_heads // cfg.num_kv_heads
    q = q.reshape(b, t, cfg.num_kv_heads, groups, cfg.head_dim)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (cfg.head_dim ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(cfg.jnp_dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, cfg.num_heads, cfg.head_dim)
    out = jnp.einsum("btnh,nhd->btd", out, self.o_kernel[...].astype(cfg.jnp_dtype))
    return out, new_cache


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, config: Qwen2Config, rngs: nnx.Rngs):
    d, f, pd = config.hidden_size, config.intermediate_size, config.jnp_param_dtype
    self.dtype = config.jnp_dtype
    self.gate_kernel = _param(rngs, (d, f), ("embed", "mlp"), pd)
    self.up_kernel = _param(rngs, (d, f), ("embed", "mlp"), pd)
    self.down_kernel = _param(rngs, (f, d), ("mlp", "embed"), pd)

  def __call__(self, x: jax.Array) -> jax.Array:
    gate = jnp.einsum("btd,df->btf", x, self.gate_kernel[...].astype(self.dtype))
    up = jnp.einsum("btd,df->btf", x, self.up_kernel[...].astype(self.dtype))
    hidden = sharding.constrain(jax.nn.silu(gate) * up, ("batch", "seq", "act_mlp"))
    return jnp.einsum("btf,fd->btd", hidden, self.down_kernel[...].astype(self.dtype))


class DecoderLayer(nnx.Module):

  def __init__(self, config: Qwen2Config, rngs: nnx.Rngs):
    self.input_norm = RMSNorm(config, rngs)
    self.attention = Attention(config, rngs)
    self.post_attention_norm = RMSNorm(config, rngs)
    self.mlp = MLP(config, rngs)

  def __call__(self, x, positions, mask, cache):
    attn_out, new_cache = self.attention(self.input_norm(x), positions, mask, cache)
    x = sharding.constrain(x + attn_out, ("batch", "seq", "act_embed"))
    x = sharding.constrain(x + self.mlp(self.post_attention_norm(x)), ("batch", "seq", "act_embed"))
    return x, new_cache


def causal_segment_mask(segment_ids: jax.Array) -> jax.Array:
  """[b, t] segment ids (0 = padding) -> [b, t, t] bool: causal, same segment, no padding keys."""
  t = segment_ids.shape[1]
  causal = jnp.tril(jnp.ones((t, t), bool))
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return causal[None] & same & (segment_ids[:, None, :] != 0)


def cache_mask(starts: jax.Array, chunk_len: int, max_len: int) -> jax.Array:
  """Query t of row b (at cache slot starts[b] + t) sees cache slots <= its own: [b, t, max_len] bool."""
  query_slot = starts[:, None] + jnp.arange(chunk_len)[None, :]  # [b, t]
  return jnp.arange(max_len)[None, None, :] <= query_slot[:, :, None]


class Qwen2ForCausalLM(nnx.Module):

  def __init__(self, config: Qwen2Config, rngs: nnx.Rngs):
    self.config = config
    pd = config.jnp_param_dtype
    self.embedding = _param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), pd)
    self.layers = nnx.List([DecoderLayer(config, rngs) for _ in range(config.num_layers)])
    self.final_norm = RMSNorm(config, rngs)
    if not config.tie_word_embeddings:
      self.lm_head = _param(rngs, (config.hidden_size, config.vocab_size), ("embed", "vocab"), pd)

  def hidden_states(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None,
                    kv_cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    """Final-norm hidden states [b, t, d] (the trainer computes the loss from these in vocab chunks)."""
    b, t = tokens.shape
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    x = jnp.take(self.embedding[...], tokens, axis=0).astype(self.config.jnp_dtype)
    x = sharding.constrain(x, ("batch", "seq", "act_embed"))
    if kv_cache is None:
      mask, starts = causal_segment_mask(segment_ids), None
    else:
      starts = kv_cache.lengths
      mask = cache_mask(starts, t, kv_cache.max_len)
    new_keys, new_values = [], []
    for i, layer in enumerate(self.layers):
      cache = None if kv_cache is None else (kv_cache.keys[i], kv_cache.values[i], starts)
      x, updated = layer(x, positions, mask, cache)
      if updated is not None:
        new_keys.append(updated[0])
        new_values.append(updated[1])
    x = self.final_norm(x)
    if kv_cache is None:
      return x, None
    # A right-padded chunk advances each row by its real tokens only; slots past that are overwritten later.
    lengths = kv_cache.lengths + jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32)
    return x, KVCache(keys=tuple(new_keys), values=tuple(new_values), lengths=lengths)

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
               kv_cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    """tokens, positions [b, t] int32 -> (logits [b, t, v] float32, updated cache or None)."""
    hidden, kv_cache = self.hidden_states(tokens, positions, segment_ids, kv_cache)
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
