"""Optimizer pieces: warmup + decay schedules, the weight-decay mask, exact gradient accumulation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retro_jax.train import optim


def test_schedules_warm_up_then_decay_to_the_floor():
  cosine = optim.make_schedule(1.0, total_steps=12, warmup_steps=2, decay="cosine", min_lr_ratio=0.1)
  np.testing.assert_allclose([cosine(0), cosine(1), cosine(2), cosine(7), cosine(12), cosine(50)],
                             [0.5, 1.0, 1.0, 0.55, 0.1, 0.1], rtol=1e-6)
  linear = optim.make_schedule(2.0, total_steps=10, decay="linear")
  np.testing.assert_allclose([linear(0), linear(5), linear(10)], [2.0, 1.0, 0.0], atol=1e-6)
  constant = optim.make_schedule(3.0, total_steps=10, warmup_steps=3, decay="constant")
  np.testing.assert_allclose([constant(0), constant(2), constant(9)], [1.0, 3.0, 3.0], rtol=1e-6)
  with pytest.raises(ValueError, match="decay"):
    optim.make_schedule(1.0, 10, decay="step")


def test_weight_decay_spares_biases_and_norm_scales():
  params = {"layers": {0: {"attention": {"q_kernel": jnp.ones((2, 2, 2)), "q_bias": jnp.ones((2, 2))},
                           "input_norm": {"scale": jnp.ones(2)}}}, "embedding": jnp.ones((4, 2))}
  mask = optim.decay_mask(params)
  assert mask["embedding"] and mask["layers"][0]["attention"]["q_kernel"]
  assert not mask["layers"][0]["attention"]["q_bias"] and not mask["layers"][0]["input_norm"]["scale"]
  tx = optim.make_optimizer(optim.make_schedule(0.1, 10, decay="constant"), weight_decay=0.5, max_grad_norm=0)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  assert float(updates["embedding"][0, 0]) == pytest.approx(-0.05)  # -lr * wd * w
  assert float(updates["layers"][0]["input_norm"]["scale"][0]) == 0.0


def test_gradient_accumulation_equals_the_full_batch_gradient():
  """Micro-batches of unequal token counts: normalising by the step's total, the sum of micro-batch gradients
  is the full-batch gradient (a mean of per-micro-batch means would not be)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4, 3, 5)), jnp.float32)  # [micro, rows, features]
  mask = jnp.asarray([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 1]], jnp.float32)
  params = {"w": jnp.asarray(rng.normal(size=5), jnp.float32)}
  total = jnp.sum(mask)

  def loss_fn(p, micro):
    per_row = jnp.tanh(micro["x"] @ p["w"]) * micro["mask"]
    return jnp.sum(per_row) / total, {"tokens": jnp.sum(micro["mask"])}

  grads, sums = optim.accumulate_gradients(loss_fn, params, {"x": x, "mask": mask})
  full = {"x": x.reshape(1, 12, 5), "mask": mask.reshape(1, 12)}
  expected, full_sums = optim.accumulate_gradients(loss_fn, params, full)
  np.testing.assert_allclose(grads["w"], expected["w"], rtol=1e-6)
  assert float(sums["tokens"]) == float(full_sums["tokens"]) == 7.0
