"""Losses: chunked log-probs, the masking golden test (assistant tokens only, no attention across packed
segments), remat, and DPO against hand-computed float64 values.

Tolerances: float32 model at "highest" matmul precision against float64 references built from the model's
plain logits; 1e-5 relative covers float32 rounding of a log-softmax over 96 classes and sums of ~10 terms.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from retro_jax.models.qwen2 import Qwen2ForCausalLM, positions_from_segment_ids
from retro_jax.train import config as config_lib
from retro_jax.train import data, dpo, losses, sft, trainer
from tests.train_helpers import VOCAB_SIZE, tiny_config

SEQ_LEN = 16


@pytest.fixture(scope="module")
def model():
  return Qwen2ForCausalLM(tiny_config(VOCAB_SIZE, dtype="float32"), nnx.Rngs(7))


@nnx.jit
def _logits(model, tokens):
  return model(tokens, jnp.arange(tokens.shape[1])[None])[0]


def _reference_logprobs(model, tokens: np.ndarray) -> np.ndarray:
  """float64 log p(tokens[1:]) of one unpacked sequence, from the model's full logits.

  The sequence is padded at the end to a fixed 32 tokens (one compile); causal attention keeps the padding
  from touching the logits of the real tokens.
  """
  padded = np.zeros((1, 32), np.int32)
  padded[0, :len(tokens)] = tokens
  logits = np.asarray(_logits(model, jnp.asarray(padded))[0, :len(tokens)], np.float64)
  logits -= logits.max(-1, keepdims=True)
  log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return log_softmax[np.arange(len(tokens) - 1), tokens[1:]]


def _example(rng, n_prompt: int, n_completion: int) -> data.SFTExample:
  tokens = rng.integers(3, VOCAB_SIZE, n_prompt + n_completion).astype(np.int32)
  return data.SFTExample(tokens=tokens, loss_mask=np.r_[np.zeros(n_prompt), np.ones(n_completion)].astype(np.int32))


def _rows(row: dict) -> dict:
  return {k: jnp.asarray(v)[None] for k, v in row.items()}


def test_chunked_token_logprobs_equal_the_full_log_softmax(model):
  tokens = np.random.default_rng(0).integers(3, VOCAB_SIZE, 11).astype(np.int32)
  inputs, targets = jnp.asarray(tokens[:-1])[None], jnp.asarray(tokens[1:])[None]
  hidden = nnx.jit(lambda m, x: m.hidden_states(x, jnp.arange(10)[None])[0])(model, inputs)
  expected = _reference_logprobs(model, tokens)
  results = []
  for chunk in (4, 64):  # 10 positions in chunks of 4 (a padded, rematerialised scan) and in one chunk
    value_and_grad = jax.value_and_grad(lambda h, c=chunk: jnp.sum(losses.token_logprobs(model, h, targets, c)))
    results.append(jax.jit(value_and_grad)(hidden))
    logp = jax.jit(lambda h, c=chunk: losses.token_logprobs(model, h, targets, c))(hidden)
    np.testing.assert_allclose(logp[0], expected, rtol=1e-5)
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
  np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5, atol=1e-7)


def test_masking_golden_only_assistant_tokens_count_and_segments_do_not_attend(model):
  rng = np.random.default_rng(1)
  first, second = _example(rng, 3, 4), _example(rng, 2, 5)
  config = config_lib.sft_config()
  packed = data.build_packed_row([first, second], SEQ_LEN)
  logp = np.asarray(sft.sft_logprobs(model, _rows(packed), config)[0])
  # Each segment's log-probs equal those of the example run alone: nothing leaks across the boundary.
  np.testing.assert_allclose(logp[:6], _reference_logprobs(model, first.tokens), rtol=1e-5)
  np.testing.assert_allclose(logp[6:12], _reference_logprobs(model, second.tokens), rtol=1e-5)
  # Perturbing the other segment leaves the first one's log-probs unchanged.
  other = data.SFTExample(tokens=rng.integers(3, VOCAB_SIZE, 7).astype(np.int32), loss_mask=second.loss_mask)
  perturbed = np.asarray(sft.sft_logprobs(model, _rows(data.build_packed_row([first, other], SEQ_LEN)), config)[0])
  np.testing.assert_array_equal(perturbed[:6], logp[:6])
  # The loss is the mean NLL of the completion tokens only (hand-computed in float64).
  nll, count = losses.masked_nll_sum(jnp.asarray(logp)[None], jnp.asarray(packed["loss_mask"])[None])
  expected = -np.concatenate([_reference_logprobs(model, e.tokens)[e.loss_mask[1:] == 1] for e in (first, second)])
  assert count == 9
  np.testing.assert_allclose(float(nll) / float(count), expected.mean(), rtol=1e-5)
  # Targets outside the mask (prompt, padding) do not enter the loss.
  scrambled = dict(packed, targets=np.where(packed["loss_mask"] == 1, packed["targets"], 3))
  nll_scrambled, _ = losses.masked_nll_sum(sft.sft_logprobs(model, _rows(scrambled), config),
                                           jnp.asarray(scrambled["loss_mask"])[None])
  np.testing.assert_allclose(float(nll_scrambled), float(nll), rtol=1e-6)


def test_remat_gives_the_same_loss_and_gradients(model):
  rng = np.random.default_rng(2)
  rows = _rows(data.build_packed_row([_example(rng, 3, 5), _example(rng, 2, 4)], SEQ_LEN))
  graphdef, params = nnx.split(model)

  def loss(p, remat):
    h = losses.hidden_states(nnx.merge(graphdef, p), rows["inputs"], rows["positions"], rows["segment_ids"], remat)
    return jnp.sum(losses.token_logprobs(nnx.merge(graphdef, p), h, rows["targets"]) * rows["loss_mask"])

  (plain, g_plain), (full, g_full) = [jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, r)
                                      for r in ("none", "full")]
  np.testing.assert_allclose(full, plain, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g_full, g_plain)
  np.testing.assert_array_equal(positions_from_segment_ids(rows["segment_ids"]), rows["positions"])


def _log_sigmoid(x: float) -> float:
  return -np.logaddexp(0.0, -x)


@pytest.mark.parametrize("label_smoothing,mask_prefix,sft_weight",
                         [(0.0, False, 0.0), (0.1, False, 0.0), (0.0, True, 0.0), (0.2, True, 0.5)])
def test_dpo_loss_matches_hand_computed_float64(model, label_smoothing, mask_prefix, sft_weight):
  beta, shared = 0.5, 3  # the two responses of each pair share their first 3 tokens
  rng = np.random.default_rng(3)
  pairs = []
  for _ in range(2):
    prefix = rng.integers(3, VOCAB_SIZE, shared)
    pairs.append(data.DPOExample(prompt=rng.integers(3, VOCAB_SIZE, 4).astype(np.int32),
                                 chosen=np.r_[prefix, rng.integers(3, VOCAB_SIZE, 3)].astype(np.int32),
                                 rejected=np.r_[prefix, rng.integers(3, VOCAB_SIZE, 5)].astype(np.int32)))
  reference = np.array([[-20.0, -25.0], [-31.5, -28.0]], np.float32)
  config = config_lib.dpo_config()
  config.data.seq_len = SEQ_LEN
  config.dpo.beta, config.dpo.label_smoothing = beta, label_smoothing
  config.dpo.mask_shared_prefix, config.dpo.sft_weight = mask_prefix, sft_weight
  s = trainer.Setup(config=config, mesh=None, tokenizer=None, model_config=model.config, base_dir="")
  task = dpo.build_task(s, pairs, [], stats={})
  task.set_extras({"train": reference})
  batch = {k: jnp.asarray(np.stack([task.make_row(i)[k] for i in range(2)])) for k in task.make_row(0)}
  loss, _ = task.loss(model, batch, task.totals(batch))

  expected_dpo, chosen_nll, chosen_tokens = [], [], 0
  for pair, (ref_chosen, ref_rejected) in zip(pairs, reference.astype(np.float64)):
    skip = shared if mask_prefix else 0  # response tokens dropped from the DPO sums
    chosen = _reference_logprobs(model, np.r_[pair.prompt, pair.chosen])[len(pair.prompt) - 1:]
    rejected = _reference_logprobs(model, np.r_[pair.prompt, pair.rejected])[len(pair.prompt) - 1:]
    z = beta * ((chosen[skip:].sum() - ref_chosen) - (rejected[skip:].sum() - ref_rejected))
    expected_dpo.append(-(1 - label_smoothing) * _log_sigmoid(z) - label_smoothing * _log_sigmoid(-z))
    chosen_nll.append(-chosen.sum())
    chosen_tokens += len(chosen)
  expected = np.mean(expected_dpo) + sft_weight * np.sum(chosen_nll) / chosen_tokens
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
