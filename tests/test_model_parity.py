"""Logits parity with transformers' PyTorch Qwen2ForCausalLM on tiny random configs.

Tolerances: float32 agrees to 1e-5 relative to the logits' scale (max |ref|); bfloat16 compute to 3e-2 of that
scale (bf16 has an 8-bit mantissa, and both sides round at different points).
"""
import jax.numpy as jnp
import numpy as np
import pytest

from retro_jax.checkpoint import load_pretrained
from retro_jax.models import KVCache, positions_from_segment_ids
from tests.hf_fixtures import save_tiny_qwen2, torch_logits

F32_RTOL = 1e-5
BF16_RTOL = 3e-2


def _relative_error(ours, ref) -> float:
  return float(np.max(np.abs(np.asarray(ours, np.float32) - ref)) / np.max(np.abs(ref)))


def _tokens(batch, length, vocab, seed=0):
  return np.random.RandomState(seed).randint(2, vocab, (batch, length)).astype(np.int32)


@pytest.mark.parametrize("tie,kv_heads,heads,theta", [
    (True, 1, 4, 1e4),
    (False, 2, 8, 1e6),
    (True, 4, 8, 1e6),
    (False, 4, 4, 1e4),
])
def test_float32_parity(tmp_path, tie, kv_heads, heads, theta):
  ref_model = save_tiny_qwen2(str(tmp_path), tie_word_embeddings=tie, num_kv_heads=kv_heads, num_heads=heads,
                              rope_theta=theta, hidden_size=8 * heads)
  model = load_pretrained(str(tmp_path))
  assert model.config.tie_word_embeddings == tie and model.config.rope_theta == theta
  tokens = _tokens(2, 17, 96)
  ours, _ = model(jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(17), (2, 17)))
  assert _relative_error(ours, torch_logits(ref_model, tokens)) < F32_RTOL


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_parity(tmp_path, side):
  ref_model = save_tiny_qwen2(str(tmp_path))
  model = load_pretrained(str(tmp_path))
  tokens = _tokens(3, 12, 96, seed=1)
  mask = np.ones_like(tokens)
  for row, pad in enumerate((0, 3, 7)):
    if pad:
      if side == "left":
        mask[row, :pad] = 0
      else:
        mask[row, -pad:] = 0
  ref = torch_logits(ref_model, tokens, mask)
  segment_ids = jnp.asarray(mask)
  ours, _ = model(jnp.asarray(tokens), positions_from_segment_ids(segment_ids), segment_ids=segment_ids)
  real = mask.astype(bool)
  assert _relative_error(np.asarray(ours)[real], ref[real]) < F32_RTOL


def test_bfloat16_parity(tmp_path):
  import torch

  ref_model = save_tiny_qwen2(str(tmp_path), dtype="bfloat16")
  model = load_pretrained(str(tmp_path))
  assert model.config.dtype == "bfloat16" and model.embedding[...].dtype == jnp.bfloat16
  tokens = _tokens(2, 16, 96, seed=2)
  ours, _ = model(jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(16), (2, 16)))
  ref = torch_logits(ref_model.to(torch.float32), tokens)  # the same bf16 weights, computed exactly
  assert _relative_error(ours, ref) < BF16_RTOL


@pytest.mark.parametrize("rope_scaling", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
])
def test_rope_scaling_parity(tmp_path, rope_scaling):
  ref_model = save_tiny_qwen2(str(tmp_path), rope_scaling=rope_scaling)
  model = load_pretrained(str(tmp_path))
  assert model.config.rope_scaling.rope_type == rope_scaling["rope_type"]
  tokens = _tokens(1, 40, 96, seed=3)
  positions = jnp.arange(100, 140)[None]  # beyond the original window, where the scaling matters
  ours, _ = model(jnp.asarray(tokens), positions)
  import torch
  with torch.no_grad():
    ref = ref_model(torch.tensor(tokens), position_ids=torch.tensor(np.asarray(positions))).logits.numpy()
  assert _relative_error(ours, ref) < F32_RTOL


def test_cached_decode_equals_full_forward(tmp_path):
  """Prefill a prefix into the external KV cache, then feed the rest one token at a time."""
  ref_model = save_tiny_qwen2(str(tmp_path))
  model = load_pretrained(str(tmp_path))
  tokens = _tokens(2, 10, 96, seed=4)
  ref = torch_logits(ref_model, tokens)
  cache = KVCache.init(model.config, batch=2, max_len=16)
  logits, cache = model(jnp.asarray(tokens[:, :6]), jnp.broadcast_to(jnp.arange(6), (2, 6)), kv_cache=cache)
  steps = [logits]
  for t in range(6, 10):
    logits, cache = model(jnp.asarray(tokens[:, t:t + 1]), jnp.full((2, 1), t), kv_cache=cache)
    steps.append(logits)
  assert np.asarray(cache.lengths).tolist() == [10, 10]
  assert _relative_error(jnp.concatenate(steps, axis=1), ref) < F32_RTOL
