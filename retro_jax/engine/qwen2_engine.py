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
from retro_jax.models.kv_cache import CACHE_AXES, KVCache
from retro_jax.models.qwen2 import Qwen2ForCausalLM

SamplingConfig = sampling_lib.SamplingConfig


@struct.dataclass
class DecodeState:
  """Everything the decode loop carries, one row per slot."""

  cache: KVCache  # keys/values: [num_layers, b, max_seq_len, kv_heads, head_dim]; lengths [b] = slots filled
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
    max_seq_len: KV slots per decode slot: prompt + generated tokens must fit.
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
               kv_memory_bytes: int = 0):
    self.config = model.config
    self._mesh = mesh if mesh is not None else sharding_lib.make_mesh(devices=jax.devices()[:1])
    self._rules = sharding_lib.SERVE_RULES
    self._model = model
    self._graphdef = nnx.graphdef(model)
    self._params = None
    self.kv_budget, self._batch = kv_budget.plan_slots(
        self.config, nnx.state(model), self._mesh, self._rules, max_concurrent_decodes=max_concurrent_decodes,
        max_seq_len=max_seq_len, kv_memory_fraction=kv_memory_fraction, kv_memory_bytes=kv_memory_bytes)
    self._max_len = max_seq_len
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
    kv_shape = (cfg.num_layers, b, s, cfg.num_kv_heads, cfg.head_dim)
    kv = self._sharding(kv_shape, CACHE_AXES, "decode KV cache (max_concurrent_decodes x kv_heads)")
    rows = self._sharding((b,), ("batch",), "decode slots")
    rows2 = self._sharding((b, cfg.vocab_size), ("batch", None), "decode slots")
    self._state_sharding = DecodeState(
        cache=KVCache(keys=kv, values=kv, lengths=rows),
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
      return DecodeState(cache=KVCache.init(cfg, batch, max_len), tokens=jnp.zeros((batch,), jnp.int32),
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

    def insert(prefix: Prefix, state: DecodeState, slot: jax.Array, sample: jax.Array) -> DecodeState:
      put_row = lambda full, rows: jax.lax.dynamic_update_slice(
          full, jax.lax.dynamic_slice_in_dim(rows, prefix.row, 1, axis=1), (0, slot) + (0,) * (full.ndim - 2))
      token = prefix.first_tokens[sample]
      cache = KVCache(keys=put_row(state.cache.keys, prefix.cache.keys),
                      values=put_row(state.cache.values, prefix.cache.values),
                      lengths=state.cache.lengths.at[slot].set(prefix.cache.lengths[prefix.row]))
      return DecodeState(
          cache=cache, tokens=state.tokens.at[slot].set(token), generated=state.generated.at[slot].set(1),
          budget=state.budget.at[slot].set(prefix.budget),
          active=state.active.at[slot].set(~is_eos(token) & (prefix.budget > 1)),
          keys=state.keys.at[slot].set(prefix.keys[sample]),
          sampling=jax.tree.map(lambda full, row: full.at[slot].set(row), state.sampling, prefix.sampling))

    def generate(params, state: DecodeState, attend_len: int):
      model = nnx.merge(graphdef, params)

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
    self._insert = jax.jit(insert, donate_argnums=1, out_shardings=state_sh)
    self._generate = jax.jit(generate, donate_argnums=1, static_argnums=2, out_shardings=(state_sh, rep))

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

  def insert(self, prefix: Prefix, decode_state: DecodeState, slot: int, *, sample: int = 0) -> DecodeState:
    """Puts sample `sample` of `prefix` into `slot` (the prefix is not consumed: insert it once per sample)."""
    return self._traced(self._insert, prefix, decode_state, np.int32(slot), np.int32(sample))

  def generate(self, params, decode_state: DecodeState, *,
               attend_len: int | None = None) -> tuple[DecodeState, ResultTokens]:
    """Runs `decode_steps` steps for every slot.

    `attend_len` promises that no live slot holds more than `attend_len - decode_steps` tokens, so attention
    can stop at that bucket; a slot that breaks the promise only corrupts itself. None = the whole cache.
    """
    attend = bucket(attend_len or self._max_len, self.attend_buckets[0], self._max_len)
    return self._traced(self._generate, params, decode_state, attend)

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
    rows with their inserts and prefix-cache trims; then `generate` at each attend bucket in `attend_lengths`
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
        yield f"insert[{rows}x{length}]", lower(self._insert, prefix_abs, state_abs, scalar, scalar)
        if rows > 1:
          yield f"trim[{rows}x{length}]", lower(self._trim, cache_abs, prefix_abs.row, length)
    for attend in attend_lengths or self.attend_buckets:
      yield f"generate[{attend}]", lower(self._generate, params_abs, state_abs, attend)


def load_engine(model_dir: str, *, mesh: Mesh | None = None, dtype: str | None = None,
                **engine_kwargs) -> Qwen2Engine:
  """An engine over an HF checkpoint directory, loaded straight onto `mesh` (SERVE_RULES)."""
  mesh = mesh if mesh is not None else sharding_lib.make_mesh(devices=jax.devices()[:1])
  model = load_pretrained(model_dir, mesh=mesh, rules=sharding_lib.SERVE_RULES, param_dtype=dtype, dtype=dtype)
  return Qwen2Engine(model, mesh=mesh, **engine_kwargs)
