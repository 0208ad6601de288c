"""The paged KV pool: host page accounting (page_pool.py), and the driver over a paged engine (paging.py) giving
the same tokens and log-probs as dense rows, for n samples sharing a prompt's pages, prefix-cache hits that share
cached pages, and a pool too small for the work (requests wait, samples are preempted and recomputed); an int8 pool.

The reference is the dense engine (one max_seq_len row per slot) on the same model, itself checked against
transformers and a full forward in tests/test_engine.py.
"""
from __future__ import annotations

import numpy as np
import pytest

from retro_jax.engine import Driver, GenerationRequest, Qwen2Engine
from retro_jax.engine.requests import GREEDY
from retro_jax.engine.kv_budget import KVBudgetError
from retro_jax.engine.page_pool import PagePool
from retro_jax.models.kv_cache import bytes_per_token
from tests.test_engine_driver import CONFIG, ENGINE_KW, SAMPLED, StubTokenizer, prompts
from tests.test_engine import sharp_model

PAGE = 8


def test_page_pool_counts_holders_and_frees_at_zero():
  pool = PagePool(pages_per_shard=4, shards=2)
  a = pool.allocate(3, shard=0)
  assert a == [0, 1, 2] and pool.free(0) == 1 and pool.free(1) == 4
  assert pool.allocate(2, shard=0) is None and pool.free(0) == 1  # nothing taken when short
  b = pool.allocate(2, shard=1)
  assert b == [4, 5] and [pool.shard_of(p) for p in b] == [1, 1] and [pool.local(p) for p in b] == [0, 1]
  pool.retain(a[:2])  # a second holder (another sample, the prefix cache)
  pool.release(a)
  assert pool.free(0) == 2 and pool.used() == 4  # pages 0 and 1 are still held once
  pool.release(a[:2])
  assert pool.free(0) == 4 and pool.allocate(4, shard=0) is not None
  with pytest.raises(RuntimeError, match="release of free page"):
    pool.release([6])
  with pytest.raises(RuntimeError, match="retain of free pages"):
    pool.retain([7])


@pytest.fixture(scope="module")
def model():
  return sharp_model(CONFIG, seed=1)


@pytest.fixture(scope="module")
def dense(model):
  return Qwen2Engine(model, max_concurrent_decodes=4, eos_token_ids=(), **{**ENGINE_KW, "kv_page_size": 0})


def paged_engine(model, pages: int, kv_dtype: str = "") -> Qwen2Engine:
  """A paged engine whose budget holds exactly `pages` pages (max_seq_len 64 needs 8)."""
  return Qwen2Engine(model, max_concurrent_decodes=4, eos_token_ids=(), kv_dtype=kv_dtype,
                     kv_memory_bytes=pages * PAGE * bytes_per_token(CONFIG, kv_dtype or None),
                     **{**ENGINE_KW, "kv_page_size": PAGE})


def same_samples(got, expected):
  for a, b in zip(got, expected):
    assert [s.tokens for s in a.samples] == [s.tokens for s in b.samples]
    assert [s.finish_reason for s in a.samples] == [s.finish_reason for s in b.samples]
    for sa, sb in zip(a.samples, b.samples):
      np.testing.assert_allclose(sa.logprobs, sb.logprobs, atol=1e-5)


def no_pages_leak(driver: Driver):
  """Once the prefix cache lets go, every page is free again."""
  assert not any(driver.paging.slot_pages)
  driver.prefix_cache.clear()
  assert driver.paging.pool.used() == 0 and not driver.paging.pool.refcounts.any()


def test_n_samples_share_the_prompt_pages(model, dense):
  prompt = prompts([20], seed=5)[0]  # 2 full pages + 4 tokens on a third
  requests = [GenerationRequest(prompt_tokens=prompt, max_new_tokens=6, sampling=SAMPLED, seed=3, n=4)]
  expected = Driver(dense, StubTokenizer(), progress=False).generate(requests)
  driver = Driver(paged_engine(model, 32), StubTokenizer(), progress=False)
  same_samples(driver.generate(requests), expected)
  assert len({s.tokens for s in expected[0].samples}) > 1  # the samples really differ
  # each sample reaches 4 pages (20 + 6 - 1 positions, plus the steps of its last call): unshared that is 16
  # pages; shared, the 2 full prompt pages are held once and each sample adds its own copy of the third + one
  assert driver.stats.peak_kv_pages == 2 + 4 * 2
  assert driver.stats.preemptions == 0
  no_pages_leak(driver)


def test_prefix_cache_hits_share_cached_pages(model, dense):
  trace = prompts([44], seed=3)[0]
  cuts = [20, 35, 44, 30]  # nested prefixes of one trace, then one inside a longer cached prompt
  requests = [GenerationRequest(prompt_tokens=trace[:c], max_new_tokens=5, sampling=SAMPLED if i % 2 else
                                GREEDY, seed=i)
              for i, c in enumerate(cuts)]
  expected = Driver(dense, StubTokenizer(), progress=False, prefix_cache_bytes=0).generate(requests)
  driver = Driver(paged_engine(model, 32), StubTokenizer(), progress=False)
  first = driver.generate(requests)
  same_samples(first, expected)
  # whole pages are cached: 35 reuses 16 tokens of 20, 44 reuses 32 of 35, 30 reuses 29 of the 40 cached (its last
  # token is always computed); the second time round every prompt but 44 is cached whole
  assert [r.prompt_tokens_computed for r in first] == [20, 19, 12, 1]
  again = driver.generate(requests)
  same_samples(again, expected)
  assert [r.prompt_tokens_computed for r in again] == [1, 1, 4, 1]
  no_pages_leak(driver)


def test_an_exhausted_pool_makes_requests_wait_and_preempts_without_changing_outputs(model, dense):
  # 12 pages (96 positions) for 4 slots whose samples grow to 6-8 pages each: dense rows would reserve 32.
  lengths = [20, 13, 26, 9, 17]
  requests = [GenerationRequest(prompt_tokens=p, max_new_tokens=36, sampling=SAMPLED if i % 2 else
                                GREEDY, seed=i, n=1 + (i == 0))
              for i, p in enumerate(prompts(lengths, seed=7))]
  expected = Driver(dense, StubTokenizer(), progress=False).generate(requests)
  driver = Driver(paged_engine(model, 12), StubTokenizer(), progress=False)
  same_samples(driver.generate(requests), expected)
  assert driver.stats.preemptions > 0 and driver.stats.recomputed_tokens > 0
  assert driver.stats.peak_kv_pages <= 12
  assert all(len(s.tokens) == 36 for r in expected for s in r.samples)  # nobody stopped early: real pressure
  no_pages_leak(driver)


def test_a_pool_without_room_for_one_sequence_is_refused(model):
  with pytest.raises(KVBudgetError, match="one sequence of 64 tokens needs 16.4 KB of KV per device"):
    paged_engine(model, 7)


def test_int8_pages_keep_greedy_tokens_at_less_than_half_the_bytes(model, dense):
  """An int8 pool (a float32 scale per position and KV head) against float32 KV: 96 B per position instead of 256
  here (head_dim 8: 8 + 4 bytes per head and layer, vs 32), the same greedy tokens on this sharp-margin model,
  log-probs within the quantization's reach."""
  requests = [GenerationRequest(prompt_tokens=p, max_new_tokens=20, n=2 if i == 0 else 1)
              for i, p in enumerate(prompts([20, 13, 26], seed=7))]
  full = Driver(dense, StubTokenizer(), progress=False)
  int8 = Driver(paged_engine(model, 32, kv_dtype="int8"), StubTokenizer(), progress=False)
  assert int8.engine.kv_budget.bytes_per_position == 2 * 2 * 2 * (8 + 4) == 96
  assert full.engine.kv_budget.bytes_per_position == 256
  expected, got = full.generate(requests), int8.generate(requests)
  assert [[s.tokens for s in r.samples] for r in got] == [[s.tokens for s in r.samples] for r in expected]
  error = max(np.abs(np.subtract(a.logprobs, b.logprobs)).max()
              for r, e in zip(got, expected) for a, b in zip(r.samples, e.samples))
  assert 0 < error < 0.05
  with pytest.raises(KVBudgetError, match="kv_dtype must be '' or 'int8'"):
    Qwen2Engine(model, kv_dtype="int8", **{**ENGINE_KW, "kv_page_size": 0})
