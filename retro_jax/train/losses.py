"""Losses: the model's per-token log-probs computed in sequence chunks, masked NLL, and sigmoid DPO.

Long reasoning traces make the [b, t, v] float32 logits the largest activation of a step (8k tokens x 152k
vocab x 4 bytes = 5 GB per row), so `token_logprobs` never materialises them: it projects the final hidden
states chunk by chunk under `jax.checkpoint`, keeping [b, chunk, v] alive at a time, forward and backward.

Reductions over tokens here are *sums* (never means), so that gradient accumulation and data parallelism
normalise once, by totals over the whole optimizer-step batch (see `optim.accumulate_gradients`): a token in a
short micro-batch weighs exactly what it weighs in a long one.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from retro_jax import sharding
from retro_jax.models.qwen2 import Qwen2ForCausalLM


def hidden_states(model: Qwen2ForCausalLM, inputs: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                  remat: str = "none") -> jax.Array:
  """Final-norm hidden states [b, t, d] of the model's forward with the remat policy `remat` applied to each of
  its scanned layers ("full" keeps only each layer's input for the backward pass, "dots" also its matmul
  outputs): the memory/compute trade every long-sequence 7B+ run needs."""
  return model.hidden_states(inputs, positions, segment_ids, remat=remat)[0]


def token_logprobs(model: Qwen2ForCausalLM, hidden: jax.Array, targets: jax.Array,
                   chunk_size: int = 1024) -> jax.Array:
  """log p(targets[b, t] | prefix) as [b, t] float32, from hidden [b, t, d] in chunks of `chunk_size` positions.

  The logits are computed exactly as `model.logits` does (compute-dtype matmul, float32 accumulation). The
  target's logit is picked with a one-hot product rather than a gather so that a vocab axis sharded over
  "tensor" reduces with one small all-reduce instead of an all-gather of the logits.
  """
  kernel = model.head_kernel().astype(model.config.jnp_dtype)  # [d, v]
  vocab = kernel.shape[1]

  def chunk_logprobs(h, y):  # h [b, c, d], y [b, c] -> [b, c]
    logits = jnp.einsum("bcd,dv->bcv", h, kernel, preferred_element_type=jnp.float32)
    logits = sharding.constrain(logits, ("batch", "seq", "act_vocab"))
    target_logit = jnp.sum(logits * jax.nn.one_hot(y, vocab, dtype=logits.dtype), axis=-1)
    return target_logit - jax.nn.logsumexp(logits, axis=-1)

  b, t, d = hidden.shape
  if t <= chunk_size:
    return chunk_logprobs(hidden, targets)
  pad = -t % chunk_size
  hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
  targets = jnp.pad(targets, ((0, 0), (0, pad)))
  n = (t + pad) // chunk_size
  h_chunks = hidden.reshape(b, n, chunk_size, d).swapaxes(0, 1)  # [n, b, c, d]
  y_chunks = targets.reshape(b, n, chunk_size).swapaxes(0, 1)  # [n, b, c]
  out = jax.lax.map(lambda args: jax.checkpoint(chunk_logprobs)(*args), (h_chunks, y_chunks))
  return out.swapaxes(0, 1).reshape(b, n * chunk_size)[:, :t]


def masked_nll_sum(logprobs: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of -log p over masked tokens, number of masked tokens) for logprobs, loss_mask [..., t]."""
  mask = loss_mask.astype(jnp.float32)
  return -jnp.sum(logprobs * mask), jnp.sum(mask)


def sequence_logprobs(logprobs: jax.Array, mask: jax.Array) -> jax.Array:
  """Sum of the masked token log-probs of each sequence: [..., t] -> [...]."""
  return jnp.sum(logprobs * mask.astype(jnp.float32), axis=-1)


def shared_prefix_mask(chosen_targets: jax.Array, rejected_targets: jax.Array, chosen_mask: jax.Array,
                       rejected_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Drops from both masks the response tokens that chosen and rejected share as a prefix ([..., t] each).

  Pairs cut from one reasoning tree (the CoT-aware DPO of "Widening the Distillation Bottleneck") share long
  stretches of thought before they branch. Those tokens get equal and opposite pushes from the two terms, so
  they carry no preference signal but do add variance; only tokens from the first difference on count. Rows
  are aligned (same prompt, same positions), so the first difference is the first column where the targets or
  the masks disagree.
  """
  differs = (chosen_targets != rejected_targets) | (chosen_mask != rejected_mask)
  after_branch = (jnp.cumsum(differs.astype(jnp.int32), axis=-1) > 0).astype(chosen_mask.dtype)
  return chosen_mask * after_branch, rejected_mask * after_branch


def dpo_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, reference_chosen: jax.Array,
             reference_rejected: jax.Array, *, beta: float,
             label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Sigmoid DPO per pair (Rafailov et al.), conservative with label smoothing ε (cDPO, Mitchell 2023).

  All inputs are sequence log-probs [b]. With z = β[(π_c - ref_c) - (π_r - ref_r)]:
    loss = -(1 - ε) log σ(z) - ε log σ(-z),
  i.e. the preference label is trusted with probability 1 - ε, which bounds how far a noisy pair can push
  the margin. Returns (losses [b], chosen rewards [b], rejected rewards [b]), rewards being β(π - ref).
  """
  chosen_rewards = beta * (policy_chosen - reference_chosen)
  rejected_rewards = beta * (policy_rejected - reference_rejected)
  z = chosen_rewards - rejected_rewards
  losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)
  return losses, chosen_rewards, rejected_rewards
