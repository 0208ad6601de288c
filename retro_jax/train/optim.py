"""AdamW with warmup and cosine / linear decay, global-norm clipping, and exact gradient accumulation."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

DECAYS = ("cosine", "linear", "constant")


def make_schedule(learning_rate: float, total_steps: int, *, warmup_steps: int = 0, decay: str = "cosine",
                  min_lr_ratio: float = 0.0) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then decay to `min_lr_ratio * learning_rate` at `total_steps`.

  Warmup starts at lr / warmup_steps rather than 0 so that no step is wasted at zero learning rate.
  """
  if decay not in DECAYS:
    raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")
  floor = learning_rate * min_lr_ratio
  decay_steps = max(total_steps - warmup_steps, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = learning_rate * jnp.minimum(1.0, (step + 1.0) / max(warmup_steps, 1))
    frac = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
    if decay == "cosine":
      decayed = floor + (learning_rate - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    elif decay == "linear":
      decayed = learning_rate - (learning_rate - floor) * frac
    else:
      decayed = jnp.asarray(learning_rate, jnp.float32)
    return jnp.where(step < warmup_steps, warm, decayed)

  return schedule


def decay_mask(params: Any) -> Any:
  """True for matrices (kernels, embeddings); False for biases and norm scales, which weight decay would only
  pull towards zero (a norm scale's neutral value is one)."""
  def decays(path, _) -> bool:
    name = str(getattr(path[-1], "key", path[-1]))
    return not (name.endswith("bias") or name == "scale")

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(schedule: optax.Schedule, *, weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.95,
                   eps: float = 1e-8, max_grad_norm: float = 1.0) -> optax.GradientTransformation:
  """Clip the full-batch gradient by global norm (0 = off), then AdamW on the float32 master weights."""
  adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
  return optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw) if max_grad_norm > 0 else adamw


def accumulate_gradients(loss_fn: Callable[[Any, Any], tuple[jax.Array, dict]], params: Any,
                         micro_batches: Any) -> tuple[Any, dict]:
  """Sums gradients and metric sums of `loss_fn(params, micro_batch)` over the leading axis of `micro_batches`.

  `loss_fn` must already be normalised by totals over the whole batch (losses.py returns sums for that), so the
  summed gradient equals the gradient of the un-accumulated batch, not a mean of per-micro-batch means. One
  micro-batch skips the scan (no loop for XLA to see through).
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  num_micro = jax.tree.leaves(micro_batches)[0].shape[0]
  if num_micro == 1:
    (_, metrics), grads = grad_fn(params, jax.tree.map(lambda x: x[0], micro_batches))
    return grads, metrics

  def body(carry, micro):
    (_, metrics), grads = grad_fn(params, micro)
    return jax.tree.map(jnp.add, carry, (grads, metrics)), None

  _, metric_shapes = jax.eval_shape(loss_fn, params, jax.tree.map(lambda x: x[0], micro_batches))
  init = (jax.tree.map(jnp.zeros_like, params), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes))
  (grads, metrics), _ = jax.lax.scan(body, init, micro_batches)
  return grads, metrics
