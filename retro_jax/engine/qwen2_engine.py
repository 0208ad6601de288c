"""The Engine contract implemented for the Qwen2 model: prefill / insert / generate on a donated decode state.

Shapes and compiles (everything static is a power-of-two bucket, so a long run compiles a handful of programs):
- prefill: the new tokens are padded to a bucket T (min_prefill_bucket .. max_seq_len) and written into a
  working KV buffer of Lp = bucket(reused + T) slots, so prefill attention costs T x Lp, not T x max_seq_len.
  Prompts without reused KV can be prefilled together (`prefill_batch`, rows padded to a power of two up to
  `max_prefill_batch`): one pass over the weights instead of one per prompt, which is what time to first
  token needs when a whole batch of short prompts arrives. One program per (rows, T, Lp).
- insert: one program per (rows, Lp) (slot, sample and row indices are traced, not static).
- generate: `decode_steps` steps in one `lax.scan` per call (one dispatch, one host copy per `decode_steps`
  tokens). Attention reads only the first `attend_len` cache slots (a bucket >= the longest live slot), since
  decoding is bound by memory reads and the unread tail of a long cache is the largest avoidable read.
  One program per attend bucket.

The decode state (KV cache + per-slot sampling arrays) is donated to `insert` and `generate`, so XLA updates
it in place instead of copying batch x max_seq_len x layers of KV every call.

The KV cache is a paged pool by default (`kv_page_size`, models/kv_cache.PagedKVCache): the host hands pages to
slots (engine/paging.py) and sends every slot's page table with each `generate` call; `insert` writes a prompt's
KV into the slot's own pages only (its shared full pages are written once, by `write_pages`), and a cached prefix
comes back through `gather_pages`. `kv_page_size=0` keeps one dense max_seq_len row per slot.

Sharding (SERVE_RULES): decode slots over data (and fsdp), weights and KV heads over tensor. A prefix has few
rows, so its batch axis is replicated and only its KV heads are split.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from retro_jax import sharding as sharding_lib
from retro_jax.checkpoint.hf import load_pretrained, shard_model
from retro_jax.engine import kv_budget
from retro_jax.engine import sampling as sampling_lib
from retro_jax.engine.api import Engine, ResultTokens
from retro_jax.engine.requests import GenerationRequest
from retro_jax.models.kv_cache import CACHE_AXES, PAGED_CACHE_AXES, KVCache, PagedKVCache, dequantize, quantize
from retro_jax.models.qwen2 import Qwen2ForCausalLM

SamplingConfig = sampling_lib.SamplingConfig


@struct.dataclass
class DecodeState:
  """Everything the decode loop carries, one row per slot."""

  # dense rows: keys/values [num_layers, b, max_seq_len, kv_heads, head_dim]; or a paged pool
  # [kv_heads, num_layers, pages, page_size, head_dim] with page tables [b, pages_per_slot]; lengths [b] = filled
  cache: KVCache | PagedKVCache
  tokens: jax.Array  # [b] int32, the last generated token (input of the next step)
  generated: jax.Array  # [b] int32, tokens generated so far
  budget: jax.Array  # [b] int32, max new tokens
  active: jax.Array  # [b] bool, still decoding (False for free slots and after EOS / budget)
  keys: jax.Array  # [b, 2] uint32, per-sample PRNG keys
  sampling: SamplingConfig  # [b] rows


@struct.dataclass
class Prefix:
  """A prefilled prompt and its first generated token for each of its samples (padded to a power of two)."""

  cache: KVCache  # [num_layers, rows, Lp, kv_heads, head_dim]; lengths [rows] = prompt lengths
  row: jax.Array  # [] int32, this prompt's row of `cache` (a batched prefill's prompts share one cache)
  first_tokens: jax.Array  # [n_pad] int32
  first_logprobs: jax.Array  # [n_pad] float32
  keys: jax.Array  # [n_pad, 2] uint32
  sampling: SamplingConfig  # the request's row (no batch axis)
  budget: jax.Array  # [] int32


@dataclasses.dataclass(frozen=True)
class ExistingPrefix:
  """KV already computed for `common_prefix_tokens` (MaxText's name): slots [0, len) of `cache` are reused."""

  cache: KVCache  # [num_layers, 1, S >= len(common_prefix_tokens), kv_heads, head_dim]
  common_prefix_tokens: np.ndarray  # [m] int32


def bucket(n: int, minimum: int, maximum: int) -> int:
  """Smallest power of two >= max(n, minimum), capped at `maximum`."""
  return min(maximum, max(minimum, 1 << max(0, int(n) - 1).bit_length()))


def _pow2_buckets(minimum: int, maximum: int) -> list[int]:
  out, b = [], bucket(1, minimum, maximum)
  while True:
    out.append(b)
    if b >= maximum:
      return out
    b = bucket(b + 1, minimum, maximum)


class Qwen2Engine(Engine):
  """JetStream-style engine for `Qwen2ForCausalLM`.

  Args:
    model: the model (its params are moved onto `mesh` by `load_params`).
    max_concurrent_decodes: decode slots (must divide by the data x fsdp mesh size); 0 = as many as the KV
      budget holds at max_seq_len (at most kv_budget.MAX_AUTO_SLOTS).
    max_seq_len: KV positions per decode slot: prompt + generated tokens must fit.
    kv_page_size: positions per page of a paged KV pool (0: one dense max_seq_len row per slot). The pool is
      sized from the budget; the driver hands pages to slots as their tokens arrive (engine/page_pool.py). Only
      whole pages are shared between prompts, so small pages keep more of a cached prefix reusable.
    kv_dtype: "int8" stores the paged pool as int8 with a float32 scale per position and KV head (about half of
      bfloat16's bytes); "" keeps the model's compute dtype.
    kv_memory_fraction, kv_memory_bytes: the per-device KV budget (see kv_budget.py): a byte count when > 0,
      else the fraction of device memory left after the weights. Slots x max_seq_len are checked against it
      before anything is allocated (KVBudgetError).
    decode_steps: decode steps per `generate` call; more steps amortise dispatch and host work, fewer free a
      finished slot sooner.
    eos_token_ids: tokens that end a sample (default: the model config's).
    mesh: ("data", "fsdp", "tensor") mesh; one device when None.
    min_prefill_bucket, min_attend_bucket: smallest prefill / attention buckets.
    max_prefill_batch, max_prefill_tokens: most prompts (and padded tokens) one `prefill_batch` call takes.
  """

  def __init__(self, model: Qwen2ForCausalLM, *, max_concurrent_decodes: int = 8, max_seq_len: int = 2048,
               decode_steps: int = 16, eos_token_ids: tuple[int, ...] | None = None, mesh: Mesh | None = None,
               min_prefill_bucket: int = 16, min_attend_bucket: int = 128, max_prefill_batch: int = 8,
               max_prefill_tokens: int = 4096, kv_memory_fraction: float = kv_budget.DEFAULT_KV_MEMORY_FRACTION,
               kv_memory_bytes: int = 0, kv_page_size: int = 16, kv_dtype: str = ""):
    if kv_dtype not in ("", "int8") or (kv_dtype and not kv_page_size):
      raise kv_budget.KVBudgetError(f"engine.kv_dtype must be '' or 'int8' (int8 with a paged pool, "
                                    f"engine.kv_page_size > 0), got {kv_dtype!r} with kv_page_size {kv_page_size}")
    self.kv_dtype = jnp.dtype(kv_dtype) if kv_dtype else None
    self.config = model.config
    self._mesh = mesh if mesh is not None else sharding_lib.make_mesh(devices=jax.devices()[:1])
    self._rules = sharding_lib.SERVE_RULES
    self._model = model
    self._graphdef = nnx.graphdef(model)
    self._params = None
    self.kv_budget, self._batch = kv_budget.plan_slots(
        self.config, nnx.state(model), self._mesh, self._rules, max_concurrent_decodes=max_concurrent_decodes,
        max_seq_len=max_seq_len, kv_memory_fraction=kv_memory_fraction, kv_memory_bytes=kv_memory_bytes,
        page_size=kv_page_size, kv_dtype=self.kv_dtype)
    self._max_len = max_seq_len
    self.page_size = kv_page_size
    if kv_page_size:
      self.pages_per_slot = -(-max_seq_len // kv_page_size)
      self.pages_per_shard = self.kv_budget.pool_pages(self._batch, max_seq_len, kv_page_size)
      self.page_shards = self.kv_budget.slot_shards
    self.decode_steps = decode_steps
    self.eos_token_ids = tuple(self.config.eos_token_ids if eos_token_ids is None else eos_token_ids)
    self.prefill_buckets = _pow2_buckets(min_prefill_bucket, max_seq_len)
    self.attend_buckets = _pow2_buckets(min_attend_bucket, max_seq_len)
    self._max_prefill_batch, self._max_prefill_tokens = max_prefill_batch, max_prefill_tokens
    self._build_shardings()
    self._build_programs()

  # ---- sharding -------------------------------------------------------------------------------------------

  def _sharding(self, shape, axes, name) -> NamedSharding:
    return sharding_lib.array_sharding(shape, axes, self._mesh, self._rules, name)

  def _build_shardings(self):
    cfg, b, s = self.config, self._batch, self._max_len
    rows = self._sharding((b,), ("batch",), "decode slots")
    rows2 = self._sharding((b, cfg.vocab_size), ("batch", None), "decode slots")
    if self.page_size:
      pool_shape = (cfg.num_kv_heads, cfg.num_layers, self.pages_per_shard * self.page_shards, self.page_size,
                    cfg.head_dim)
      pool = self._sharding(pool_shape, PAGED_CACHE_AXES, "paged KV pool (pages x kv_heads)")
      self._table_sharding = self._sharding((b, self.pages_per_slot), ("batch", None), "decode slots")
      scales = None
      if self.kv_dtype is not None:
        scales = self._sharding(pool_shape[:4], PAGED_CACHE_AXES[:4], "paged KV pool scales")
      cache = PagedKVCache(keys=pool, values=pool, lengths=rows, page_table=self._table_sharding, key_scales=scales,
                           value_scales=scales)
    else:
      kv_shape = (cfg.num_layers, b, s, cfg.num_kv_heads, cfg.head_dim)
      kv = self._sharding(kv_shape, CACHE_AXES, "decode KV cache (max_concurrent_decodes x kv_heads)")
      cache = KVCache(keys=kv, values=kv, lengths=rows)
    self._state_sharding = DecodeState(
        cache=cache,
        tokens=rows, generated=rows, budget=rows, active=rows, keys=rows2,
        sampling=SamplingConfig(temperature=rows, top_p=rows, top_k=rows, ban_first_k=rows,
                                banned_first=rows2, banned=rows2))
    prefix_kv = NamedSharding(self._mesh, self._rules.spec(("layers", None) + CACHE_AXES[2:]))
    self._replicated = NamedSharding(self._mesh, PartitionSpec())
    self._prefix_cache_sharding = KVCache(keys=prefix_kv, values=prefix_kv, lengths=self._replicated)

  def get_prefix_destination_sharding(self) -> Prefix:
    rep = self._replicated
    return Prefix(cache=self._prefix_cache_sharding, row=rep, first_tokens=rep, first_logprobs=rep, keys=rep,
                  sampling=jax.tree.map(lambda _: rep, SamplingConfig.zeros(1, 1)), budget=rep)

  # ---- programs -------------------------------------------------------------------------------------------

  def _build_programs(self):
    cfg, graphdef, steps = self.config, self._graphdef, self.decode_steps
    eos = np.asarray(self.eos_token_ids, np.int32)
    is_eos = lambda t: jnp.isin(t, jnp.asarray(eos))
    prefix_sharding = self.get_prefix_destination_sharding()
    batch, max_len = self._batch, self._max_len

    def init_state() -> DecodeState:
      if self.page_size:
        cache = PagedKVCache.init(cfg, batch, self.pages_per_slot, self.pages_per_shard * self.page_shards,
                                  self.page_size, self.kv_dtype)
      else:
        cache = KVCache.init(cfg, batch, max_len)
      return DecodeState(cache=cache, tokens=jnp.zeros((batch,), jnp.int32),
                         generated=jnp.zeros((batch,), jnp.int32), budget=jnp.zeros((batch,), jnp.int32),
                         active=jnp.zeros((batch,), bool), keys=jnp.zeros((batch, 2), jnp.uint32),
                         sampling=SamplingConfig.zeros(batch, cfg.vocab_size))

    def empty_prefix_cache(rows: int, length: int) -> KVCache:
      return KVCache.init(cfg, rows, length)

    def expand(stored: KVCache, reused: jax.Array, length: int) -> KVCache:
      """Copies the reused slots of a stored prefix into a fresh [1, length] working buffer."""
      n = min(stored.max_len, length)
      grow = lambda x: jnp.zeros(x.shape[:2] + (length,) + x.shape[3:], x.dtype).at[:, :, :n].set(x[:, :, :n])
      return KVCache(keys=grow(stored.keys), values=grow(stored.values),
                     lengths=jnp.reshape(reused, (1,)).astype(jnp.int32))

    def prefill_kv(params, cache: KVCache, tokens: jax.Array, true_lengths: jax.Array, empty: bool):
      """tokens [r, T] (right-padded) written after cache.lengths; returns the cache and the logits [r, v] of
      each row's last real token (the head runs on those rows only). `empty`: no reused KV, so attention runs
      blockwise over the chunk (a long prompt never builds [T, Lp] scores)."""
      model = nnx.merge(graphdef, params)
      t = tokens.shape[1]
      segment_ids = (jnp.arange(t)[None, :] < true_lengths[:, None]).astype(jnp.int32)
      positions = cache.lengths[:, None] + jnp.arange(t)[None, :]
      hidden, cache = model.hidden_states(tokens, positions, segment_ids=segment_ids, kv_cache=cache,
                                          empty_cache=empty)
      last = jnp.take_along_axis(hidden, (true_lengths - 1)[:, None, None], axis=1)  # [r, 1, d]
      return cache, model.logits(last)[:, 0]

    def sample_first(all_logits: jax.Array, row: jax.Array, config: SamplingConfig, seed: jax.Array,
                     budget: jax.Array, num_samples: int):
      logits = all_logits[row]
      keys = sampling_lib.request_keys(seed, num_samples)
      rows = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_samples,) + x.shape), config)
      tokens, logprobs = sampling_lib.sample(jnp.broadcast_to(logits, (num_samples,) + logits.shape), rows, keys,
                                             jnp.zeros((num_samples,), jnp.int32))
      ones = jnp.ones((num_samples, 1), jnp.int32)
      result = ResultTokens.pack(tokens[:, None], ones, ones[:, 0], logprobs[:, None])
      return row, tokens, logprobs, keys, config, budget, result  # Prefix's field order

    def insert_slot(prefix: Prefix, state: DecodeState, cache, slot, sample, token, generated, budget):
      """The slot's sampling state from `prefix`; token / budget < 0 take the prefix's (a preempted sample
      resumes with its own last token, count and budget)."""
      token = jnp.where(token >= 0, token, prefix.first_tokens[sample])
      budget = jnp.where(budget >= 0, budget, prefix.budget)
      cache = cache.replace(lengths=cache.lengths.at[slot].set(prefix.cache.lengths[prefix.row]))
      return DecodeState(
          cache=cache, tokens=state.tokens.at[slot].set(token), generated=state.generated.at[slot].set(generated),
          budget=state.budget.at[slot].set(budget),
          active=state.active.at[slot].set(~is_eos(token) & (generated < budget)),
          keys=state.keys.at[slot].set(prefix.keys[sample]),
          sampling=jax.tree.map(lambda full, row: full.at[slot].set(row), state.sampling, prefix.sampling))

    def insert(prefix: Prefix, state: DecodeState, slot, sample, token, generated, budget) -> DecodeState:
      put_row = lambda full, rows: jax.lax.dynamic_update_slice(
          full, jax.lax.dynamic_slice_in_dim(rows, prefix.row, 1, axis=1), (0, slot) + (0,) * (full.ndim - 2))
      cache = state.cache.replace(keys=put_row(state.cache.keys, prefix.cache.keys),
                                  values=put_row(state.cache.values, prefix.cache.values))
      return insert_slot(prefix, state, cache, slot, sample, token, generated, budget)

    def write_pages(prefix: Prefix, state: DecodeState, pages: jax.Array) -> DecodeState:
      """Writes the prefix row's positions into `pages` [pages_per_slot] (global ids, in position order; out of
      range = shared or absent: not written)."""
      positions = jnp.arange(prefix.cache.max_len)
      page, offset = pages[positions // self.page_size], positions % self.page_size
      put = lambda pool, new: pool.at[:, :, page, offset].set(new.astype(pool.dtype), mode="drop")
      row = lambda rows: jax.lax.dynamic_index_in_dim(rows, prefix.row, axis=1, keepdims=False).transpose(2, 0, 1, 3)
      cache, keys, values = state.cache, row(prefix.cache.keys), row(prefix.cache.values)  # [k, L, Lp, h]
      if cache.key_scales is not None:  # int8 pool
        (keys, key_scales), (values, value_scales) = quantize(keys), quantize(values)
        cache = cache.replace(key_scales=put(cache.key_scales, key_scales),
                              value_scales=put(cache.value_scales, value_scales))
      return state.replace(cache=cache.replace(keys=put(cache.keys, keys), values=put(cache.values, values)))

    def insert_paged(prefix: Prefix, state: DecodeState, slot, sample, token, generated, budget, table_row,
                     pages) -> DecodeState:
      """`write_pages`, then the slot's table row `table_row` (local ids) and sampling state."""
      state = write_pages(prefix, state, pages)
      cache = state.cache.replace(page_table=state.cache.page_table.at[slot].set(table_row))
      return insert_slot(prefix, state, cache, slot, sample, token, generated, budget)

    def gather_pages(cache: PagedKVCache, pages: jax.Array, reused: jax.Array) -> KVCache:
      """A prefix's pages [n] (global ids) gathered into dense [L, 1, n x page_size] rows (a cached prefix
      reused by prefill)."""
      take = lambda pool, scales: dequantize(pool[:, :, pages], None if scales is None else scales[:, :, pages],
                                             cfg.jnp_dtype).reshape(pool.shape[:2] + (-1, pool.shape[-1])
                                                                    ).transpose(1, 2, 0, 3)
      return KVCache(keys=take(cache.keys, cache.key_scales)[:, None],
                     values=take(cache.values, cache.value_scales)[:, None],
                     lengths=jnp.reshape(reused, (1,)).astype(jnp.int32))

    def generate(params, state: DecodeState, page_table: jax.Array | None, attend_len: int):
      model = nnx.merge(graphdef, params)
      if page_table is not None:  # the host's tables: pages handed out for this call, freed slots emptied
        state = state.replace(cache=state.cache.replace(page_table=page_table))

      def step(carry, _):
        cache, tokens, generated, active = carry
        # Free and finished slots still run (fixed shapes) but write nothing that counts: segment id 0 keeps
        # their length, and their tokens come back marked invalid. Attention reads the first `attend_len` slots of
        # the cache in place (no copy of that prefix).
        logits, cache = model(tokens[:, None], cache.lengths[:, None], segment_ids=active[:, None].astype(jnp.int32),
                              kv_cache=cache, attend_len=attend_len)
        new, logprobs = sampling_lib.sample(logits[:, 0], state.sampling, state.keys, generated)
        valid = active
        generated = generated + active
        active = active & ~is_eos(new) & (generated < state.budget)
        return (cache, jnp.where(valid, new, tokens), generated, active), (new, valid, logprobs)

      carry = (state.cache, state.tokens, state.generated, state.active)
      (cache, tokens, generated, active), (new, valid, logprobs) = jax.lax.scan(step, carry, length=steps)
      result = ResultTokens.pack(new.T, valid.T, generated, logprobs.T)
      state = state.replace(cache=cache, tokens=tokens, generated=generated, active=active)
      return state, result

    def trim(cache: KVCache, row: jax.Array, length: int) -> KVCache:
      cut = lambda x: jax.lax.dynamic_slice_in_dim(x, row, 1, axis=1)[:, :, :length]
      return KVCache(keys=cut(cache.keys), values=cut(cache.values), lengths=cache.lengths[row][None])

    state_sh, rep = self._state_sharding, self._replicated
    self._trim = jax.jit(trim, static_argnums=2, out_shardings=self._prefix_cache_sharding)
    self._init_state = jax.jit(init_state, out_shardings=state_sh)
    self._empty_prefix_cache = jax.jit(empty_prefix_cache, static_argnums=(0, 1),
                                       out_shardings=self._prefix_cache_sharding)
    self._expand = jax.jit(expand, static_argnums=2, out_shardings=self._prefix_cache_sharding)
    self._prefill_kv = jax.jit(prefill_kv, donate_argnums=1, static_argnums=4,
                               out_shardings=(self._prefix_cache_sharding, rep))
    self._sample_first = jax.jit(sample_first, static_argnums=5, out_shardings=(
        rep, rep, rep, rep, prefix_sharding.sampling, rep, rep))
    self._insert = jax.jit(insert_paged if self.page_size else insert, donate_argnums=1, out_shardings=state_sh)
    self._generate = jax.jit(generate, donate_argnums=1, static_argnums=3, out_shardings=(state_sh, rep))
    self._gather_pages = jax.jit(gather_pages, out_shardings=self._prefix_cache_sharding)
    self._write_pages = jax.jit(write_pages, donate_argnums=1, out_shardings=state_sh)

  def _traced(self, fn, *args):
    with sharding_lib.use_rules(self._mesh, self._rules):
      return fn(*args)

  # ---- the contract ---------------------------------------------------------------------------------------

  @property
  def max_concurrent_decodes(self) -> int:
    return self._batch

  @property
  def samples_per_slot(self) -> int:
    return 1

  @property
  def max_prefill_length(self) -> int:
    return self._max_len

  @property
  def max_seq_len(self) -> int:
    return self._max_len

  @property
  def mesh(self) -> Mesh:
    return self._mesh

  def load_params(self) -> nnx.State:
    """The model's params placed on the mesh under SERVE_RULES (placed once, then cached)."""
    if self._params is None:
      self._params = nnx.state(shard_model(self._model, self._mesh, self._rules))
      self._model = None  # the engine holds the params from here on
    return self._params

  def init_decode_state(self) -> DecodeState:
    return self._traced(self._init_state)

  def plan_prefill(self, prompt_length: int, cached_length: int) -> tuple[int, int]:
    """(tokens to reuse, padded length of the rest) for a prompt sharing `cached_length` tokens with a cache.

    At least the last prompt token is always computed (its logits give the first generated token), and the
    reused part shrinks when reuse + bucket would overflow max_seq_len (a few cached tokens are recomputed).
    """
    reuse = min(cached_length, prompt_length - 1)
    padded = bucket(prompt_length - reuse, self.prefill_buckets[0], self._max_len)
    return min(reuse, self._max_len - padded), padded

  def prefill_batch_size(self, padded_length: int) -> int:
    """Most prompts of one padded length that one `prefill_batch` call takes (never more than the slots)."""
    return max(1, min(self._max_prefill_batch, self._max_prefill_tokens // padded_length, self._batch))

  def _check(self, padded_length: int, true_length: int, reused: int, request: GenerationRequest) -> None:
    if padded_length not in self.prefill_buckets or not 0 < true_length <= padded_length or (
        reused + padded_length > self._max_len):
      raise ValueError(f"prefill of {true_length} tokens padded to {padded_length} after {reused} reused tokens "
                       f"does not fit the buckets {self.prefill_buckets} / max_seq_len {self._max_len}")
    if reused + true_length + request.max_new_tokens > self._max_len:
      raise ValueError(f"prompt of {reused + true_length} tokens + max_new_tokens {request.max_new_tokens} "
                       f"exceeds max_seq_len {self._max_len}")

  def _first_tokens(self, cache: KVCache, logits: jax.Array, row: int,
                    request: GenerationRequest) -> tuple[Prefix, ResultTokens]:
    config = sampling_lib.request_config(request, self.config.vocab_size)
    seed = np.uint32(request.seed % 2**32)  # PRNGKey(seed) == PRNGKey(uint32(seed % 2**32))
    n_pad = bucket(request.n, 1, 1 << 30)  # powers of two: a new n rarely means a new program
    *fields, result = self._traced(
        self._sample_first, logits, np.int32(row), config, seed, np.int32(request.max_new_tokens), n_pad)
    return Prefix(cache, *fields), result

  def prefill(self, *, params, existing_prefix: ExistingPrefix | None = None, padded_tokens, true_length: int,
              request: GenerationRequest) -> tuple[Prefix, ResultTokens]:
    """Prefills `padded_tokens[:true_length]` after the reused prefix; samples the first token of each sample.

    Args:
      params: from `load_params`.
      existing_prefix: reused KV for the tokens before `padded_tokens` (see `plan_prefill`).
      padded_tokens: [T] int32, T a prefill bucket.
      true_length: real tokens in `padded_tokens`.
      request: sampling, seed, n, bans and max_new_tokens.

    Returns:
      the prefix to `insert` (once per sample) and the first tokens as ResultTokens ([n_pad] rows; rows >= n
      are padding).
    """
    padded_tokens = np.asarray(padded_tokens, np.int32)
    t = padded_tokens.shape[-1]
    reused = 0 if existing_prefix is None else len(existing_prefix.common_prefix_tokens)
    self._check(t, true_length, reused, request)
    length = bucket(reused + t, self.prefill_buckets[0], self._max_len)
    if existing_prefix is None:
      cache = self._traced(self._empty_prefix_cache, 1, length)
    else:
      cache = self._traced(self._expand, existing_prefix.cache, np.int32(reused), length)
    cache, logits = self._traced(self._prefill_kv, params, cache, padded_tokens[None],
                                 np.asarray([true_length], np.int32), existing_prefix is None)
    return self._first_tokens(cache, logits, 0, request)

  def prefill_batch(self, *, params, padded_tokens, true_lengths,
                    requests: list[GenerationRequest]) -> list[tuple[Prefix, ResultTokens]]:
    """`prefill` for several prompts without reused KV in one pass (their prefixes share one cache).

    Args:
      padded_tokens: [r, T] int32, r <= prefill_batch_size(T); rows are padded to a power of two here.
      true_lengths: [r] real tokens per row.
      requests: one per row.
    """
    padded_tokens = np.asarray(padded_tokens, np.int32)
    r, t = padded_tokens.shape
    if r > self.prefill_batch_size(t):
      raise ValueError(f"{r} prompts of padded length {t} exceed prefill_batch_size {self.prefill_batch_size(t)}")
    for true_length, request in zip(true_lengths, requests):
      self._check(t, int(true_length), 0, request)
    rows = bucket(r, 1, self.prefill_batch_size(t))
    tokens = np.zeros((rows, t), np.int32)
    tokens[:r] = padded_tokens
    lengths = np.ones((rows,), np.int32)
    lengths[:r] = true_lengths
    cache = self._traced(self._empty_prefix_cache, rows, t)
    cache, logits = self._traced(self._prefill_kv, params, cache, tokens, lengths, True)
    return [self._first_tokens(cache, logits, i, request) for i, request in enumerate(requests)]

  def prefix_kv(self, prefix: Prefix, length: int) -> KVCache:
    """This prompt's KV alone, cut to bucket(length) slots: what a prefix cache keeps (no padding, no rows of
    other prompts)."""
    keep = bucket(length, self.prefill_buckets[0], self._max_len)
    if prefix.cache.batch == 1 and prefix.cache.max_len <= keep:
      return prefix.cache
    return self._traced(self._trim, prefix.cache, prefix.row, keep)

  def insert(self, prefix: Prefix, decode_state: DecodeState, slot: int, *, sample: int = 0,
             pages: list[int] | None = None, shared_pages: int = 0,
             resume: tuple[int, int, int] | None = None) -> DecodeState:
    """Puts sample `sample` of `prefix` into `slot` (the prefix is not consumed: insert it once per sample).

    Paged pools: `pages` (global page ids, in position order) become the slot's table; the prefix's positions
    are written into them except into the first `shared_pages`, which other holders already filled with the same
    tokens' KV (n samples of one prompt, a cached prefix). `resume` = (last token, tokens generated, budget)
    restarts a preempted sample from a prefill of its prompt and all but its last token.
    """
    token, generated, budget = resume or (-1, 1, -1)
    args = (prefix, decode_state, np.int32(slot), np.int32(sample), np.int32(token), np.int32(generated),
            np.int32(budget))
    if not self.page_size:
      return self._traced(self._insert, *args)
    if pages is None or not 0 <= shared_pages <= len(pages) <= self.pages_per_slot:
      raise ValueError(f"a paged insert needs at most {self.pages_per_slot} pages and shared_pages <= len(pages)")
    return self._traced(self._insert, *args, self.table_row(slot, pages), self._write_row(pages, shared_pages))

  def _write_row(self, pages: list[int], shared_pages: int) -> np.ndarray:
    """[pages_per_slot] global ids to write, the "no page" marker for the shared ones and past the end."""
    row = np.full((self.pages_per_slot,), self.pages_per_shard * self.page_shards, np.int32)
    row[shared_pages:len(pages)] = pages[shared_pages:]
    return row

  def write_pages(self, prefix: Prefix, decode_state: DecodeState, pages: list[int], *,
                  shared_pages: int = 0) -> DecodeState:
    """Writes a prompt's KV from `prefix` into `pages` (global ids, in position order), skipping the first
    `shared_pages`, without giving it a slot: a prompt's full pages, written once for all its samples and the
    prefix cache."""
    return self._traced(self._write_pages, prefix, decode_state, self._write_row(pages, shared_pages))

  def slot_shard(self, slot: int) -> int:
    """The shard of the pool (and of the slots) a decode slot lives on: slots are split evenly, in order."""
    return slot // (self._batch // self.page_shards)

  def table_row(self, slot: int, pages: list[int]) -> np.ndarray:
    """A slot's device page-table row [pages_per_slot]: local ids of `pages` (global ids of the slot's shard),
    then the "no page" marker."""
    shard = self.slot_shard(slot)
    if any(p // self.pages_per_shard != shard for p in pages):
      raise ValueError(f"slot {slot} lives on shard {shard} of the pool; pages {list(pages)} are not all there")
    row = np.full((self.pages_per_slot,), self.pages_per_shard, np.int32)
    row[:len(pages)] = np.asarray(pages, np.int64) % self.pages_per_shard
    return row

  def gather_pages(self, decode_state: DecodeState, pages: list[int], reused: int) -> KVCache:
    """Dense [1, bucket(len(pages)) x page_size] rows of the KV in `pages` (a cached prefix to reuse)."""
    n = bucket(len(pages), 1, self.pages_per_slot)
    padded = np.zeros((n,), np.int32)
    padded[:len(pages)] = pages
    return self._traced(self._gather_pages, decode_state.cache, padded, np.int32(reused))

  def generate(self, params, decode_state: DecodeState, *, attend_len: int | None = None,
               page_table: np.ndarray | None = None) -> tuple[DecodeState, ResultTokens]:
    """Runs `decode_steps` steps for every slot.

    `attend_len` promises that no live slot holds more than `attend_len - decode_steps` tokens, so attention
    can stop at that bucket; a slot that breaks the promise only corrupts itself. None = the whole cache.
    `page_table` [slots, pages_per_slot] (paged pools: required): every slot's pages for this call, which must
    cover each live slot's positions up to its length + decode_steps.
    """
    attend = bucket(attend_len or self._max_len, self.attend_buckets[0], self._max_len)
    if self.page_size and page_table is None:
      raise ValueError("a paged engine's generate needs the page tables")
    if page_table is not None:
      page_table = jax.device_put(np.asarray(page_table, np.int32), self._table_sharding)
    return self._traced(self._generate, params, decode_state, page_table, attend)

  # ---- ahead-of-time compilation --------------------------------------------------------------------------

  def warmup(self, params, *, prefill_lengths: list[int] | None = None) -> None:
    """Compiles, from abstract shapes only, the programs a run without prefix reuse needs (see
    `lowered_programs`). Passing the buckets a workload will use keeps this short on big models. Prefix reuse
    adds (T, Lp) prefill programs on first use; they are small next to a decode program.
    """
    for _, lowered in self.lowered_programs(params, prefill_lengths=prefill_lengths):
      lowered.compile()

  def lowered_programs(self, params, *, prefill_lengths: list[int] | None = None,
                       attend_lengths: list[int] | None = None):
    """Yields (name, jax Lowered) for every program `warmup` compiles, from abstract shapes only: the state
    init; for each prefill bucket in `prefill_lengths` (default all), prefills of every power-of-two number of
    rows with their inserts, prefix-cache trims and (paged pools) the writes of a prompt's shared pages; then `generate` at each attend bucket in `attend_lengths`
    (default all). `params` may be arrays or ShapeDtypeStructs with shardings: `retro-jax plan` lowers these
    same programs for a TPU topology without weights.
    """
    abstract = lambda tree, shardings: jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
    params_abs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
    state_abs = abstract(jax.eval_shape(self._init_state), self._state_sharding)
    scalar, seed = jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.uint32)
    host_config = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                               jax.eval_shape(lambda: SamplingConfig.zeros(1, self.config.vocab_size)))
    lower = lambda jitted, *args: self._traced(jitted.lower, *args)
    yield "init_decode_state", lower(self._init_state)
    for length in prefill_lengths or self.prefill_buckets:
      for rows in _pow2_buckets(1, self.prefill_batch_size(length)):  # as prefill_batch pads them
        cache_abs = abstract(jax.eval_shape(self._empty_prefix_cache, rows, length), self._prefix_cache_sharding)
        yield f"empty_prefix_cache[{rows}x{length}]", lower(self._empty_prefix_cache, rows, length)
        tokens_abs = jax.ShapeDtypeStruct((rows, length), jnp.int32)
        lengths_abs = jax.ShapeDtypeStruct((rows,), jnp.int32)
        yield f"prefill[{rows}x{length}]", lower(self._prefill_kv, params_abs, cache_abs, tokens_abs, lengths_abs, True)
        logits_abs = jax.ShapeDtypeStruct((rows, self.config.vocab_size), jnp.float32, sharding=self._replicated)
        yield f"sample_first[{rows}]", lower(self._sample_first, logits_abs, scalar, host_config, seed, scalar, 1)
        sampled = jax.eval_shape(self._sample_first, logits_abs, scalar, host_config, seed, scalar, 1)
        prefix_abs = abstract(Prefix(cache_abs, *sampled[:6]), self.get_prefix_destination_sharding())
        insert_args = (prefix_abs, state_abs) + (scalar,) * 5
        if self.page_size:
          page_row = jax.ShapeDtypeStruct((self.pages_per_slot,), jnp.int32)
          insert_args += (page_row, page_row)
          yield f"write_pages[{rows}x{length}]", lower(self._write_pages, prefix_abs, state_abs, page_row)
        yield f"insert[{rows}x{length}]", lower(self._insert, *insert_args)
        if rows > 1:
          yield f"trim[{rows}x{length}]", lower(self._trim, cache_abs, prefix_abs.row, length)
    table_abs = None
    if self.page_size:
      table_abs = jax.ShapeDtypeStruct((self._batch, self.pages_per_slot), jnp.int32, sharding=self._table_sharding)
    for attend in attend_lengths or self.attend_buckets:
      yield f"generate[{attend}]", lower(self._generate, params_abs, state_abs, table_abs, attend)


def load_engine(model_dir: str, *, mesh: Mesh | None = None, dtype: str | None = None,
                **engine_kwargs) -> Qwen2Engine:
  """An engine over an HF checkpoint directory, loaded straight onto `mesh` (SERVE_RULES)."""
  mesh = mesh if mesh is not None else sharding_lib.make_mesh(devices=jax.devices()[:1])
  model = load_pretrained(model_dir, mesh=mesh, rules=sharding_lib.SERVE_RULES, param_dtype=dtype, dtype=dtype)
  return Qwen2Engine(model, mesh=mesh, **engine_kwargs)
