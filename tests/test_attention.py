"""Full-sequence attention paths against a float64 NumPy reference (values) and the dense path's autodiff
(gradients): packed segments, padding, GQA, lengths that are not a multiple of the block."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retro_jax import sharding
from retro_jax.models import attention as attention_lib


def _inputs(seed, b=2, t=45, n=4, k=2, h=8):
  rng = np.random.default_rng(seed)
  q, key, v = (rng.standard_normal((b, t, heads, h)).astype(np.float32) for heads in (n, k, k))
  segments = np.zeros((b, t), np.int32)
  segments[0, :17], segments[0, 17:40] = 1, 2  # two packed examples, then right padding
  segments[1, 3:] = 5  # left padding, then one example
  return q, key, v, segments


def _numpy_reference(q, k, v, segments):
  """float64 loops over rows and heads: softmax over visible keys, zero for a query that sees none."""
  b, t, n, h = q.shape
  group = n // k.shape[2]
  out = np.zeros(q.shape, np.float64)
  for row in range(b):
    for i in range(t):
      seen = [j for j in range(i + 1) if segments[row, j] == segments[row, i] != 0]
      for head in range(n):
        if not seen:
          continue
        scores = np.array([q[row, i, head].astype(np.float64) @ k[row, j, head // group] for j in seen]) / np.sqrt(h)
        p = np.exp(scores - scores.max())
        out[row, i, head] = (p / p.sum()) @ v[row, seen, head // group].astype(np.float64)
  return out


@pytest.mark.parametrize("block", [8, 16, 64])
def test_blockwise_matches_float64_reference(block):
  q, k, v, segments = _inputs(0)
  out = jax.jit(attention_lib.blockwise_attention, static_argnums=4)(q, k, v, segments, block)
  np.testing.assert_allclose(np.asarray(out), _numpy_reference(q, k, v, segments), atol=2e-6)


def test_dense_matches_float64_reference():
  q, k, v, segments = _inputs(1)
  out = attention_lib.attention(q, k, v, segments, implementation="xla")
  np.testing.assert_allclose(np.asarray(out), _numpy_reference(q, k, v, segments), atol=2e-6)


def test_blockwise_gradients_match_dense_autodiff():
  q, k, v, segments = _inputs(2)
  weights = np.random.default_rng(3).standard_normal(q.shape).astype(np.float32)  # a loss that mixes everything

  def loss(q, k, v, implementation):
    out = attention_lib.attention(q, k, v, segments, implementation=implementation, block=16)
    return jnp.sum(out * weights * (segments != 0)[..., None, None])

  grads = {impl: jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(q, k, v, impl)
           for impl in ("blockwise", "xla")}
  for ours, ref in zip(grads["blockwise"], grads["xla"]):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=2e-5)
  assert float(jnp.abs(grads["blockwise"][1]).max()) > 0.1  # the gradient is not trivially zero


def test_blockwise_backward_never_holds_square_scores():
  """At t = 4096 the [t, t] float32 scores of one head are 64 MiB; the blockwise grad's temp stays far below."""
  t, block = 4096, 256
  shape = jax.ShapeDtypeStruct((1, t, 2, 32), jnp.float32)
  segments = jax.ShapeDtypeStruct((1, t), jnp.int32)
  loss = lambda q, k, v, s, impl: jnp.sum(attention_lib.attention(q, k, v, s, implementation=impl, block=block))
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=4)
  temp = {impl: grad.lower(shape, shape, shape, segments, impl).compile().memory_analysis().temp_size_in_bytes
          for impl in ("blockwise", "xla")}
  assert temp["blockwise"] < 8 * 2**20 < 64 * 2**20 < temp["xla"], temp


def test_splash_kernel_matches_blockwise_in_interpret_mode():
  """JAX's TPU splash kernel, run by the Pallas interpreter on CPU, against the pure-JAX path (values, grads)."""
  q, k, v, segments = (x[:1] for x in _inputs(4, t=256, n=4, k=2, h=128))  # row 0: two segments, right padding
  weights = np.random.default_rng(5).standard_normal(q.shape).astype(np.float32)

  def loss(q, k, v, splash):
    out = (attention_lib.splash_attention(q, k, v, segments, block=128, interpret=True) if splash
           else attention_lib.blockwise_attention(q, k, v, segments, block=128))
    return jnp.sum(out * weights), out

  (_, ours), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, True)
  (_, ref), ref_grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, False)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=2e-5)
  for a, b in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-4)


def test_auto_follows_the_active_mesh_platform():
  assert attention_lib.platform() == jax.default_backend()
  with sharding.use_rules(sharding.make_mesh(data=2), sharding.TRAIN_RULES):
    assert attention_lib.platform() == "cpu"
  with pytest.raises(ValueError, match="attention implementation must be one of"):
    attention_lib.attention(*_inputs(0)[:4], implementation="flash")


def test_fresh_prefill_attends_blockwise_as_the_cache_path_does():
  """A prefill into an empty cache (the engine's common case) takes the blockwise path: same logits and KV as
  attending densely over the cache, padded rows included."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from retro_jax.models import KVCache, Qwen2Config, Qwen2ForCausalLM  # pylint: disable=import-outside-toplevel
  config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=8)
  model = Qwen2ForCausalLM(config, nnx.Rngs(0))
  tokens = np.random.default_rng(6).integers(0, 64, (2, 12))
  segment_ids = (np.arange(12)[None] < np.array([[12], [7]])).astype(np.int32)  # row 1 right-padded

  def prefill(empty):
    return model.hidden_states(jnp.asarray(tokens), jnp.arange(12)[None].repeat(2, 0), jnp.asarray(segment_ids),
                               KVCache.init(config, 2, 16), empty_cache=empty)

  (blockwise, cache_b), (dense, cache_d) = prefill(True), prefill(False)
  real = segment_ids[..., None] == 1
  np.testing.assert_allclose(np.where(real, blockwise, 0), np.where(real, dense, 0), atol=1e-5)
  written = np.pad(segment_ids, ((0, 0), (0, 4)))[None, :, :, None, None] == 1  # slots past a row's length are
  # overwritten by later tokens, so only the written ones must agree
  np.testing.assert_allclose(np.where(written, cache_b.keys, 0), np.where(written, cache_d.keys, 0), atol=1e-5)
  np.testing.assert_allclose(np.where(written, cache_b.values, 0), np.where(written, cache_d.values, 0), atol=1e-5)
  np.testing.assert_array_equal(cache_b.lengths, [12, 7])
