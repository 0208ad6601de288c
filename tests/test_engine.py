"""Engine correctness: parity with transformers' greedy generate (through `load_text_generator`, the CLIs'
entry point), prefill + decode == full forward, batched == one-by-one prefill, slot isolation, packed
ResultTokens, and sharded (4x2, 8x1 fake devices) == single device.

Tiny models keep every program small; max_seq_len 64 with small buckets keeps the number of compiles low.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from retro_jax import sharding
from retro_jax.engine import Driver, GenerationRequest, Qwen2Engine, ResultTokens, text_generator_from_model
from retro_jax.engine.qwen2_engine import bucket
from retro_jax.models.config import Qwen2Config
from retro_jax.models.kv_cache import write_rows
from retro_jax.models.qwen2 import Qwen2ForCausalLM, forward

# dense rows (kv_page_size=0) for the engine-level tests that index the cache by slot; paged pools are checked in
# test_prefill_then_decode_matches_full_forward, the sharded test and tests/test_engine_driver.py
ENGINE_KW = dict(max_seq_len=64, kv_page_size=0, decode_steps=4, min_prefill_bucket=8, min_attend_bucket=16,
                 max_prefill_batch=4)
CONFIG = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, rope_theta=10000.0)


class StubTokenizer:
  """Token id -> two letters, so stop strings can end inside a token."""

  def encode(self, text):
    raise NotImplementedError

  def decode(self, ids):
    return "".join(chr(97 + i % 26) + chr(97 + i // 26) for i in ids)


def sharp_model(config: Qwen2Config = CONFIG, seed: int = 0) -> Qwen2ForCausalLM:
  """Random weights scaled up so greedy choices have clear margins (no float-rounding ties); built in one jit."""
  def init():
    state = nnx.state(Qwen2ForCausalLM(config, nnx.Rngs(seed)))
    return jax.tree.map(lambda v: v if "norm" in v.get_metadata()["axes"] else v.replace(v.get_value() * 6), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))  # every weight but the norm scales

  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Qwen2ForCausalLM(config, nnx.Rngs(seed))))
  return nnx.merge(graphdef, jax.jit(init)())


def random_prompts(lengths, vocab, seed=0):
  rng = np.random.default_rng(seed)
  return [tuple(rng.integers(0, vocab, size=n).tolist()) for n in lengths]


def reference_greedy(model, prompt, num_tokens, width=32):
  """Greedy decoding by re-running the full forward (no cache) every step: tokens and their log-probs.

  The sequence is right-padded to `width` so one compiled forward serves every step (causal attention: the
  padding after a position cannot change its logits).
  """
  graphdef, state = nnx.split(model)
  full = jax.jit(lambda st, t: jax.nn.log_softmax(forward(graphdef, st, t, jnp.arange(width)[None])[0][0]))
  tokens, logprobs = list(prompt), []
  for _ in range(num_tokens):
    last = full(state, jnp.asarray([tokens + [0] * (width - len(tokens))]))[len(tokens) - 1]
    tokens.append(int(jnp.argmax(last)))
    logprobs.append(float(last[tokens[-1]]))
  return tokens[len(prompt):], logprobs


@pytest.fixture(scope="module")
def model():
  return sharp_model()


@pytest.fixture(scope="module")
def engine(model):
  """One single-device engine (and so one set of compiled programs) for the tests of this module."""
  return Qwen2Engine(model, max_concurrent_decodes=8, eos_token_ids=(), **ENGINE_KW)


def test_result_tokens_pack_round_trip():
  tokens = jnp.arange(6).reshape(2, 3)
  valid = jnp.array([[1, 1, 0], [0, 1, 1]])
  logprobs = -jnp.arange(6, dtype=jnp.float32).reshape(2, 3) / 7
  result = ResultTokens.pack(tokens, valid, jnp.array([4, 5]), logprobs).convert_to_numpy()
  assert isinstance(result.data, np.ndarray) and result.data.shape == (2, 10)
  slot = result.get_result_at_slot(1)
  np.testing.assert_array_equal(slot.tokens, [[3, 4, 5]])
  np.testing.assert_array_equal(slot.valid, [[0, 1, 1]])
  np.testing.assert_array_equal(slot.lengths, [5])
  np.testing.assert_array_equal(slot.logprobs, np.asarray(logprobs[1:]))


def test_write_rows_matches_numpy_and_drops_slots_past_the_end():
  rng = np.random.default_rng(0)
  buffer = rng.normal(size=(3, 2, 6, 1, 2)).astype(np.float32)  # [L, b, S, k, h]
  new = rng.normal(size=(2, 3, 1, 2)).astype(np.float32)  # [b, T, k, h]
  starts = np.array([1, 4], np.int32)  # row 1's third token would land at slot 6 of 6
  expected = buffer.copy()
  expected[2, 0, 1:4] = new[0]
  expected[2, 1, 4:6] = new[1, :2]  # dropped, not clamped back over slots 3..5
  got = write_rows(jnp.asarray(buffer), jnp.int32(2), jnp.asarray(new), jnp.asarray(starts))
  np.testing.assert_array_equal(np.asarray(got), expected)


def test_buckets_and_prefill_plan(engine):
  assert [bucket(n, 8, 64) for n in (1, 8, 9, 33, 64, 70)] == [8, 8, 16, 64, 64, 64]
  assert engine.prefill_buckets == [8, 16, 32, 64] and engine.attend_buckets == [16, 32, 64]
  assert engine.plan_prefill(20, 0) == (0, 32)
  assert engine.plan_prefill(20, 20) == (19, 8)  # the last token is always computed
  assert engine.plan_prefill(60, 40) == (32, 32)  # 40 + 32 > 64 would overflow: reuse fewer tokens


def _save_char_tokenizer(model_dir) -> None:
  """A 96-token tokenizer (id 0 = "</s>", then printable ASCII), saved as transformers saves one."""
  tokenizers = pytest.importorskip("tokenizers")
  transformers = pytest.importorskip("transformers")
  vocab = {"</s>": 0, **{chr(c): c - 31 for c in range(32, 127)}}
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="</s>"))
  tok.decoder = tokenizers.decoders.Fuse()
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>").save_pretrained(
      model_dir)


def test_greedy_matches_transformers_through_load_text_generator(tmp_path):
  """The CLI path (HF directory -> load_text_generator) against transformers' greedy generate."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from retro_jax.engine import load_text_generator  # pylint: disable=import-outside-toplevel
  hf_config = transformers.Qwen2Config(
      vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0, tie_word_embeddings=False)
  torch.manual_seed(0)
  hf = transformers.Qwen2ForCausalLM(hf_config).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():  # random biases and norms too, with clear greedy margins
      p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
  hf.save_pretrained(tmp_path)
  _save_char_tokenizer(tmp_path)
  generator = load_text_generator(str(tmp_path), max_concurrent_decodes=4, max_seq_len=64, decode_steps=4,
                                  progress=False)
  assert generator.engine.eos_token_ids == (0,)  # from the tokenizer
  prompts = random_prompts([3, 12, 7, 20, 1, 9, 5], 96)  # more prompts than slots: slots are refilled
  results = generator.generate([GenerationRequest(prompt_tokens=p, max_new_tokens=12) for p in prompts])
  for prompt, result in zip(prompts, results):
    with torch.no_grad():
      out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                        max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = out[0, len(prompt):].tolist()
    sample = result.samples[0]
    if sample.finish_reason == "eos":  # EOS is not returned; transformers (EOS off here) shows it
      assert expected[len(sample.tokens)] == 0 and 0 not in sample.tokens
      expected = expected[:len(sample.tokens)]
    else:
      assert sample.finish_reason == "length"
    assert list(sample.tokens) == expected
    assert sample.text == generator.tokenizer.decode(sample.tokens) == "".join(chr(t + 31) for t in expected)


@pytest.fixture(scope="module")
def paged_engine(model):
  return Qwen2Engine(model, max_concurrent_decodes=8, eos_token_ids=(), **{**ENGINE_KW, "kv_page_size": 8})


@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
def test_prefill_then_decode_matches_full_forward(model, engine, paged_engine, paged):
  engine = paged_engine if paged else engine
  params = engine.load_params()
  prompt = random_prompts([11], 96, seed=1)[0]
  padded = np.zeros(16, np.int32)
  padded[:11] = prompt
  request = GenerationRequest(prompt_tokens=prompt, max_new_tokens=13)
  prefix, first = engine.prefill(params=params, padded_tokens=padded, true_length=11, request=request)
  first = first.convert_to_numpy().get_result_at_slot(0)
  table = None
  if paged:  # pages out of order and scattered over the pool: positions 0-7 in page 9, 8-15 in page 2, ...
    pages = [9, 2, 30]
    state = engine.insert(prefix, engine.init_decode_state(), 2, pages=pages[:2])
    table = np.full((8, engine.pages_per_slot), engine.pages_per_shard, np.int32)
    table[2] = engine.table_row(2, pages)
  else:
    state = engine.insert(prefix, engine.init_decode_state(), 2)
  tokens, logprobs = [int(first.tokens[0, 0])], [float(first.logprobs[0, 0])]
  for _ in range(3):
    state, result = engine.generate(params, state, attend_len=32, page_table=table)
    slot = result.convert_to_numpy().get_result_at_slot(2)
    assert slot.valid.all()
    tokens += slot.tokens[0].tolist()
    logprobs += slot.logprobs[0].tolist()
  assert int(slot.lengths[0]) == 13
  expected_tokens, expected_logprobs = reference_greedy(model, prompt, 13)
  assert tokens == expected_tokens
  np.testing.assert_allclose(logprobs, expected_logprobs, atol=1e-4)
  _, result = engine.generate(params, state, page_table=table)  # the budget of 13 is spent: the slot stops
  assert not result.convert_to_numpy().get_result_at_slot(2).valid.any()


def test_batched_prefill_equals_one_by_one(engine):
  """Rows of a batched prefill (shared weights pass, padded rows) give each prompt's own KV and first token."""
  params = engine.load_params()
  prompts = random_prompts([5, 16, 11], 96, seed=4)
  requests = [GenerationRequest(prompt_tokens=p, max_new_tokens=4) for p in prompts]
  padded = np.zeros((3, 16), np.int32)
  for row, prompt in enumerate(prompts):
    padded[row, :len(prompt)] = prompt
  batched = engine.prefill_batch(params=params, padded_tokens=padded, true_lengths=[5, 16, 11], requests=requests)
  for row, (request, (prefix, first)) in enumerate(zip(requests, batched)):
    alone, alone_first = engine.prefill(params=params, padded_tokens=padded[row], true_length=len(prompts[row]),
                                        request=request)
    kv, kv_alone = engine.prefix_kv(prefix, len(prompts[row])), engine.prefix_kv(alone, len(prompts[row]))
    real = slice(0, len(prompts[row]))
    np.testing.assert_allclose(kv.keys[1][:, real], kv_alone.keys[1][:, real], atol=1e-5)  # layer 1
    np.testing.assert_allclose(kv.values[0][:, real], kv_alone.values[0][:, real], atol=1e-5)  # layer 0
    first, alone_first = first.convert_to_numpy(), alone_first.convert_to_numpy()
    np.testing.assert_array_equal(first.get_result_at_slot(0).tokens, alone_first.get_result_at_slot(0).tokens)
    np.testing.assert_allclose(first.get_result_at_slot(0).logprobs, alone_first.get_result_at_slot(0).logprobs,
                               atol=1e-5)


def _slot_rows(state, rows):
  """State rows `rows`: axis 0 of every field but the stacked KV, whose slots are axis 1."""
  cache = state.cache
  slots_first = state.replace(cache=cache.replace(keys=jnp.swapaxes(cache.keys, 0, 1),
                                                  values=jnp.swapaxes(cache.values, 0, 1)))
  return jax.tree.map(lambda x: np.asarray(x)[rows], slots_first)


def test_slot_isolation(engine):
  """Inserting into one slot leaves the others bit-identical, and their later tokens unchanged."""
  params = engine.load_params()
  prompts = random_prompts([5, 9, 14], 96, seed=2)

  def prefix_of(prompt):
    padded = np.zeros(bucket(len(prompt), 8, 64), np.int32)
    padded[:len(prompt)] = prompt
    request = GenerationRequest(prompt_tokens=prompt, max_new_tokens=20)
    return engine.prefill(params=params, padded_tokens=padded, true_length=len(prompt), request=request)[0]

  def run(insert_third: bool):
    state = engine.insert(prefix_of(prompts[0]), engine.init_decode_state(), 0)
    state = engine.insert(prefix_of(prompts[1]), state, 1)
    state, first = engine.generate(params, state, attend_len=32)
    before = _slot_rows(state, slice(0, 3))
    if insert_third:
      state = engine.insert(prefix_of(prompts[2]), state, 3)
      jax.tree.map(np.testing.assert_array_equal, _slot_rows(state, slice(0, 3)), before)
    state, second = engine.generate(params, state, attend_len=32)
    data = second.convert_to_numpy()
    return [data.get_result_at_slot(s).tokens.tolist() for s in (0, 1)], data.get_result_at_slot(3).valid

  tokens_with, valid_third = run(True)
  tokens_without, valid_free = run(False)
  assert tokens_with == tokens_without
  assert valid_third.all() and not valid_free.any()


@pytest.mark.parametrize("data,tensor,page", [(4, 2, 0), (8, 1, 0), (4, 2, 8)])
def test_sharded_greedy_equals_single_device(model, engine, data, tensor, page):
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 (fake) devices")
  prompts = random_prompts([4, 15, 9, 2, 13, 6, 11, 3, 8, 16], 96, seed=3)  # more prompts than slots
  requests = [GenerationRequest(prompt_tokens=p, max_new_tokens=9) for p in prompts]
  tokens = lambda generator: [r.samples[0].tokens for r in generator.generate(requests)]
  sharded = text_generator_from_model(model, StubTokenizer(), max_concurrent_decodes=8, progress=False,
                                      mesh=sharding.make_mesh(data=data, tensor=tensor), eos_token_ids=(),
                                      **{**ENGINE_KW, "kv_page_size": page})
  assert tokens(sharded) == tokens(Driver(engine, StubTokenizer(), progress=False))
  keys = sharded.engine.init_decode_state().cache.keys
  if page:  # [kv heads, layers, pages, page, head dim]: pages split like the slots, KV heads over tensor
    assert keys.sharding.shard_shape(keys.shape) == (2 // tensor, 2, keys.shape[2] // data, 8, 16)
  else:  # [layers, slots, ...]: slots over data, KV heads over tensor
    assert keys.sharding.shard_shape(keys.shape)[1:] == (8 // data, 64, 2 // tensor, 16)
