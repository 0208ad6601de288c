"""Driver behaviour: per-request seeds, prefix reuse, bans, stop strings, EOS, streaming, over-long requests,
and the sampling filters. One shared engine (one set of compiled programs) serves most tests."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retro_jax.engine import Driver, GenerationRequest, Qwen2Engine, RequestQueue, SamplingParams
from retro_jax.engine import sampling as sampling_lib
from retro_jax.models.config import Qwen2Config
from tests.test_engine import sharp_model

VOCAB = 96
ENGINE_KW = dict(max_seq_len=64, kv_page_size=8, decode_steps=4, min_prefill_bucket=8, min_attend_bucket=16, max_prefill_batch=4)
CONFIG = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, rope_theta=10000.0)
SAMPLED = SamplingParams(temperature=0.8, top_p=0.9, top_k=40)


class StubTokenizer:
  """Token id -> two letters, so stop strings can end inside a token."""

  def encode(self, text):
    raise NotImplementedError

  def decode(self, ids):
    return "".join(chr(97 + i % 26) + chr(97 + i // 26) for i in ids)


def prompts(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [tuple(rng.integers(0, VOCAB, size=n).tolist()) for n in lengths]


@pytest.fixture(scope="module")
def model():
  return sharp_model(CONFIG, seed=1)  # clear greedy margins


@pytest.fixture(scope="module")
def engine(model):
  return Qwen2Engine(model, max_concurrent_decodes=4, eos_token_ids=(), **ENGINE_KW)


def driver(engine, **kwargs):
  return Driver(engine, StubTokenizer(), progress=False, **kwargs)


def test_seed_determinism_independent_of_batch(engine):
  target = GenerationRequest(prompt_tokens=prompts([7])[0], max_new_tokens=10, sampling=SAMPLED, seed=11, n=3)
  others = [GenerationRequest(prompt_tokens=p, max_new_tokens=12, sampling=SAMPLED, seed=i)
            for i, p in enumerate(prompts([5, 12, 3, 9], seed=1))]
  others.append(GenerationRequest(prompt_tokens=prompts([6], seed=2)[0], max_new_tokens=6))  # a greedy neighbour
  gen = driver(engine)
  alone = gen.generate([target])[0]
  crowded = gen.generate(others[:3] + [target] + others[3:])[3]  # other slots, other neighbours
  assert [s.tokens for s in alone.samples] == [s.tokens for s in crowded.samples]
  assert len({s.tokens for s in alone.samples}) == 3  # sample i has its own key
  reseeded = gen.generate([dataclasses.replace(target, seed=12)])[0]
  assert [s.tokens for s in reseeded.samples] != [s.tokens for s in alone.samples]


def test_prefix_reuse_gives_identical_outputs_and_computes_less(engine):
  trace = prompts([44], seed=3)[0]
  cuts = [12, 20, 27, 35, 44, 30]  # nested prefixes of one trace, then one served by a longer cached prompt
  requests = [GenerationRequest(prompt_tokens=trace[:c], max_new_tokens=8, sampling=SAMPLED if i % 2 else
                                SamplingParams(), seed=i) for i, c in enumerate(cuts)]
  reused = driver(engine).generate(requests)
  fresh = driver(engine, prefix_cache_bytes=0).generate(requests)
  for a, b in zip(reused, fresh):
    assert a.samples[0].tokens == b.samples[0].tokens
    np.testing.assert_allclose(a.samples[0].logprobs, b.samples[0].logprobs, atol=1e-5)
  assert [r.prompt_tokens_computed for r in fresh] == cuts
  assert [r.prompt_tokens_computed for r in reused] == [12, 12, 11, 11, 12, 1]


def test_banned_tokens_are_never_emitted_where_banned(engine):
  prompt = prompts([9], seed=4)[0]
  gen = driver(engine)
  greedy = gen.generate([GenerationRequest(prompt_tokens=prompt, max_new_tokens=8)])[0].samples[0].tokens
  first_ban = gen.generate([GenerationRequest(prompt_tokens=prompt, max_new_tokens=8,
                                              banned_first_token_ids=(greedy[0],))])[0].samples[0].tokens
  assert first_ban[0] != greedy[0]  # the ban moved the argmax ...
  banned_first_three = tuple(sorted(set(greedy[:3]) | set(first_ban[:3])))
  ban_k = gen.generate([GenerationRequest(prompt_tokens=prompt, max_new_tokens=8, ban_first_k=3,
                                          banned_first_token_ids=banned_first_three)])[0].samples[0].tokens
  assert not set(ban_k[:3]) & set(banned_first_three)
  everywhere = tuple(sorted(set(greedy) | set(first_ban)))
  results = gen.generate([
      GenerationRequest(prompt_tokens=prompt, max_new_tokens=12, banned_token_ids=everywhere),
      GenerationRequest(prompt_tokens=prompt, max_new_tokens=12, banned_token_ids=everywhere,
                        sampling=SamplingParams(temperature=1.5), n=3)])
  for result in results:
    for sample in result.samples:
      assert not set(sample.tokens) & set(everywhere)


def test_stop_strings(engine):
  gen = driver(engine)
  prompt = prompts([10], seed=5)[0]
  tokens = gen.generate([GenerationRequest(prompt_tokens=prompt, max_new_tokens=12)])[0].samples[0].tokens
  text = gen.decode(tokens)
  stop = text[8:11]  # ends inside token 5 (two letters per token); may also occur earlier
  end = next(k for k in range(1, 13) if stop in gen.decode(tokens[:k]))
  result = gen.generate([GenerationRequest(prompt_tokens=prompt, max_new_tokens=12,
                                           stop_strings=("not-there", stop))])[0].samples[0]
  assert result.finish_reason == "stop"
  assert result.tokens == tokens[:end] and len(result.logprobs) == end
  assert result.text == gen.decode(tokens[:end]) and stop in result.text


def test_eos_ends_a_sample_and_is_not_returned(model, engine):
  prompt = prompts([8], seed=6)[0]
  greedy = driver(engine).generate([GenerationRequest(prompt_tokens=prompt, max_new_tokens=12)])[0].samples[0]
  k = next(i for i in range(1, 12) if greedy.tokens[i] not in greedy.tokens[:i])
  eos = greedy.tokens[k]
  gen = driver(Qwen2Engine(model, max_concurrent_decodes=4, eos_token_ids=(eos,), **ENGINE_KW))
  not_eos = tuple(t for t in range(VOCAB) if t != eos)
  at_once, stopped = gen.generate([
      GenerationRequest(prompt_tokens=prompt, max_new_tokens=12, banned_first_token_ids=not_eos),
      GenerationRequest(prompt_tokens=prompt, max_new_tokens=12)])
  assert (at_once.samples[0].tokens, at_once.samples[0].finish_reason) == ((), "eos")  # EOS at prefill
  assert stopped.samples[0].finish_reason == "eos"
  assert stopped.samples[0].tokens == greedy.tokens[:k]
  assert stopped.samples[0].logprobs == pytest.approx(greedy.logprobs[:k], abs=1e-5)


def test_stream_pulls_follow_ups_and_matches_generate(engine):
  seeds = iter(range(100))
  make = lambda p: GenerationRequest(prompt_tokens=p, max_new_tokens=5 + len(p) % 4, sampling=SAMPLED,
                                     seed=next(seeds), n=1 + len(p) % 2)
  queue = RequestQueue([make(p) for p in prompts([4, 9, 6], seed=7)])
  follow_ups = {p: make(p) for p in prompts([5, 11, 3, 8, 7], seed=8)}
  pending = list(follow_ups.values())
  streamed = []
  gen = driver(engine)
  for result in gen.stream(queue):
    streamed.append(result)
    if pending:  # like one search record asking for its next rollout
      queue.put(pending.pop(0))
  assert len(streamed) == 8 and not pending
  again = gen.generate([r.request for r in streamed])
  assert [r.request for r in again] == [r.request for r in streamed]
  assert [[s.tokens for s in r.samples] for r in again] == [[s.tokens for s in r.samples] for r in streamed]


def test_over_long_requests_are_refused_per_request(engine):
  gen = driver(engine)
  ok, too_long = prompts([10, 40], seed=9)
  requests = [GenerationRequest(prompt_tokens=too_long, max_new_tokens=30, n=2),
              GenerationRequest(prompt_tokens=ok, max_new_tokens=6)]
  assert not gen.fits(requests[0]) and gen.fits(requests[1])
  refused, served = gen.generate(requests)
  assert refused.prompt_tokens_computed == 0 and len(refused.samples) == 2
  assert all(s.tokens == () and s.text == "" and s.finish_reason == "length" for s in refused.samples)
  assert len(served.samples[0].tokens) == 6 and served.samples[0].finish_reason == "length"


def test_sampling_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4096))
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(4096))

  def draw(temperature, top_p, top_k, banned=()):
    rows = lambda x, dtype: jnp.full((4096,), x, dtype)
    mask = jnp.zeros((4096, 4), bool).at[:, list(banned)].set(True)
    config = sampling_lib.SamplingConfig(
        temperature=rows(temperature, jnp.float32), top_p=rows(top_p, jnp.float32), top_k=rows(top_k, jnp.int32),
        ban_first_k=rows(0, jnp.int32), banned_first=jnp.zeros_like(mask), banned=mask)
    tokens, logprobs = jax.jit(sampling_lib.sample)(logits, config, keys, jnp.zeros((4096,), jnp.int32))
    return np.bincount(np.asarray(tokens), minlength=4) / 4096, np.asarray(logprobs), np.asarray(tokens)

  freq, _, _ = draw(1.0, 1.0, 0)
  np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
  freq, _, _ = draw(1.0, 1.0, 2)
  np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.03)
  freq, _, _ = draw(1.0, 0.7, 0)  # nucleus {0, 1}: 0.5 < 0.7 <= 0.8
  np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.03)
  freq, logprobs, tokens = draw(0.0, 1.0, 0, banned=(0,))
  assert freq[1] == 1.0  # greedy with the argmax banned
  np.testing.assert_allclose(logprobs, np.log(0.3), rtol=1e-6)  # log-probs of the raw model distribution


def test_warmup_compiles_everything_a_run_without_reuse_needs(model, caplog):
  engine = Qwen2Engine(model, max_concurrent_decodes=2, eos_token_ids=(), max_seq_len=32, decode_steps=4,
                       min_prefill_bucket=16, min_attend_bucket=16)
  gen = driver(engine, prefix_cache_bytes=0)
  gen.warmup()  # abstract shapes only
  requests = [GenerationRequest(prompt_tokens=p, max_new_tokens=8, sampling=SAMPLED if len(p) % 2 else
                                SamplingParams()) for p in prompts([3, 9, 17, 20, 5], seed=10)]  # 2-row prefills
  with jax.log_compiles(True), caplog.at_level("WARNING"):
    gen.generate(requests)
  assert not [r.message for r in caplog.records if "Compiling" in r.message]


def test_top_k_top_p_cutoffs_match_a_sorted_reference():
  """The bisection cut-offs keep exactly the sorted definition's tokens (ties at the cut included)."""
  rng = np.random.default_rng(0)
  logits = np.round(rng.standard_normal((6, 500)) * 3, 1).astype(np.float32)  # rounding makes ties
  top_k = np.array([0, 5, 0, 40, 1, 500], np.int32)
  top_p = np.array([0.9, 1.0, 0.3, 0.8, 0.5, 0.999], np.float32)
  cut = jax.jit(sampling_lib._top_k_top_p)  # pylint: disable=protected-access
  kept = np.asarray(cut(logits, top_k, top_p)) > -1e29
  for row in range(6):
    order = np.sort(logits[row])[::-1]
    kth = order[min(top_k[row], 500) - 1] if top_k[row] else order[-1]
    allowed = logits[row] >= kth
    probs = np.exp(logits[row] - logits[row].max()) * allowed
    probs /= probs.sum()
    sorted_probs = np.sort(probs)[::-1]
    need = np.searchsorted(np.cumsum(sorted_probs), top_p[row] * (1 - 1e-6)) if top_p[row] < 1 else 499
    expected = allowed & (probs >= sorted_probs[min(need, 499)])
    np.testing.assert_array_equal(kept[row], expected, err_msg=f"row {row}")
