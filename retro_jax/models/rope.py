"""Rotary position embeddings as transformers' Qwen2 computes them (half-split `rotate_half` layout).

Frequencies are computed once per config in float32 NumPy (they are constants of the config); the cos/sin of
the actual positions are computed inside the forward, so any position layout (left padding, packing, decode
slots at different lengths) works without a precomputed table.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from retro_jax.models.config import Qwen2Config


def _yarn_inv_freq(config: Qwen2Config, base_inv_freq: np.ndarray) -> tuple[np.ndarray, float]:
  """YaRN: interpolate low frequencies, keep high ones, blend on a linear ramp (Peng et al., 2023)."""
  scaling = config.rope_scaling
  dim, base, factor = config.head_dim, config.rope_theta, scaling.factor
  original_max = scaling.original_max_position_embeddings or config.max_position_embeddings

  def mscale(scale: float, m: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  attention_factor = scaling.attention_factor
  if attention_factor is None:
    if scaling.mscale and scaling.mscale_all_dim:
      attention_factor = mscale(factor, scaling.mscale) / mscale(factor, scaling.mscale_all_dim)
    else:
      attention_factor = mscale(factor)

  def correction_dim(num_rotations: float) -> float:
    return dim * math.log(original_max / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

  low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
  if scaling.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  extrapolation_weight = 1.0 - ramp
  inv_freq = (base_inv_freq / factor) * (1 - extrapolation_weight) + base_inv_freq * extrapolation_weight
  return inv_freq.astype(np.float32), float(attention_factor)


@functools.lru_cache(maxsize=16)
def rope_frequencies(config: Qwen2Config) -> tuple[np.ndarray, float]:
  """Returns (inv_freq [head_dim // 2] float32, attention_factor applied to cos and sin); cached per config."""
  dim = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
  rope_type = config.rope_scaling.rope_type
  if rope_type == "default":
    return inv_freq.astype(np.float32), 1.0
  if rope_type == "linear":
    return (inv_freq / config.rope_scaling.factor).astype(np.float32), 1.0
  if rope_type == "yarn":
    return _yarn_inv_freq(config, inv_freq)
  raise ValueError(f"unsupported rope type {rope_type!r}")


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, attention_factor: float) -> jax.Array:
  """x: [batch, seq, heads, head_dim]; positions: [batch, seq] int. Rotation in float32, result in x.dtype."""
  angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [b, t, h/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [b, t, 1, h]
  cos, sin = jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor
  xf = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  return (xf * cos + rotated * sin).astype(x.dtype)
