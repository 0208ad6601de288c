"""The JetStream Engine contract, kept in our own code with JetStream's names and meanings.

JetStream (google/JetStream, archived) splits serving into three jitted calls so an orchestrator can keep the
accelerator busy: `prefill` turns a prompt into a KV prefix and its first token, `insert` copies a prefix into
one decode slot, and `generate` advances every slot of the decode state together. We keep that split (and the
names) but not the package: it is archived, its PyPI release pulls in TensorFlow (through seqio), and its
orchestrator calls `jax.tree_map`, which JAX has removed.

Two extensions, both additive:
- `generate` runs several decode steps per call, so `ResultTokens` holds `steps` tokens per slot;
- `ResultTokens` also packs the log-probs of the sampled tokens (float32 bit-cast to int32), so tokens, valid
  flags, lengths and log-probs still come back in ONE device-to-host copy.
"""
from __future__ import annotations

import abc
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh

Params = Any
Prefix = Any
DecodeState = Any


@struct.dataclass
class SlotData:
  """What one slot produced in one call: rows are the slot's samples, columns the decode steps."""

  tokens: jax.Array | np.ndarray  # [samples_per_slot, steps] int32
  valid: jax.Array | np.ndarray  # [samples_per_slot, steps] int32, 1 where the token is real
  lengths: jax.Array | np.ndarray  # [samples_per_slot] int32, tokens generated so far (this call included)
  logprobs: jax.Array | np.ndarray  # [samples_per_slot, steps] float32


@struct.dataclass
class ResultTokens:
  """Tokens, validity, lengths and log-probs of every slot, packed column-wise into one int32 array.

  JetStream's meanings: `valid` is 1 where the slot was decoding when the token was produced (0 for free or
  finished slots, whose tokens are junk); `lengths` is the number of tokens generated so far for the slot.
  """

  data: jax.Array | np.ndarray  # [batch * samples_per_slot, 3 * steps + 1] int32
  tokens_idx: tuple[int, int] = struct.field(pytree_node=False)
  valid_idx: tuple[int, int] = struct.field(pytree_node=False)
  length_idx: tuple[int, int] = struct.field(pytree_node=False)
  logprob_idx: tuple[int, int] = struct.field(pytree_node=False)
  samples_per_slot: int = struct.field(pytree_node=False, default=1)

  @classmethod
  def pack(cls, tokens: jax.Array, valid: jax.Array, lengths: jax.Array, logprobs: jax.Array) -> ResultTokens:
    """tokens, valid, logprobs [b, steps]; lengths [b] -> one packed array (traceable inside jit)."""
    steps = tokens.shape[1]
    data = jnp.concatenate([
        tokens.astype(jnp.int32),
        valid.astype(jnp.int32),
        lengths.astype(jnp.int32)[:, None],
        jax.lax.bitcast_convert_type(logprobs.astype(jnp.float32), jnp.int32),
    ], axis=1)
    return cls(data=data, tokens_idx=(0, steps), valid_idx=(steps, 2 * steps),
               length_idx=(2 * steps, 2 * steps + 1), logprob_idx=(2 * steps + 1, 3 * steps + 1))

  def convert_to_numpy(self) -> ResultTokens:
    return self.replace(data=np.asarray(self.data))

  def _columns(self, rows: slice, idx: tuple[int, int]):
    return self.data[rows, idx[0]:idx[1]]

  def get_result_at_slot(self, slot: int) -> SlotData:
    rows = slice(slot * self.samples_per_slot, (slot + 1) * self.samples_per_slot)
    logprob_bits = self._columns(rows, self.logprob_idx)
    if isinstance(logprob_bits, np.ndarray):
      logprobs = logprob_bits.view(np.float32)
    else:
      logprobs = jax.lax.bitcast_convert_type(logprob_bits, jnp.float32)
    return SlotData(tokens=self._columns(rows, self.tokens_idx), valid=self._columns(rows, self.valid_idx),
                    lengths=self._columns(rows, self.length_idx)[:, 0], logprobs=logprobs)


class Engine(abc.ABC):
  """JetStream's Engine interface (prefill / insert / generate over a donated decode state)."""

  @abc.abstractmethod
  def prefill(self, *, params: Params, existing_prefix: Any | None = None, padded_tokens: jax.Array,
              true_length: int, **kwargs) -> tuple[Prefix, ResultTokens]:
    """Computes the KV of `padded_tokens[:true_length]` (after `existing_prefix`, whose KV is reused) and
    samples the first generated token(s)."""

  @abc.abstractmethod
  def insert(self, prefix: Prefix, decode_state: DecodeState, slot: int, **kwargs) -> DecodeState:
    """Copies `prefix` into decode slot `slot`; the decode state is donated (updated in place)."""

  @abc.abstractmethod
  def generate(self, params: Params, decode_state: DecodeState, **kwargs) -> tuple[DecodeState, ResultTokens]:
    """Advances every decode slot by the engine's steps per call; the decode state is donated."""

  @abc.abstractmethod
  def load_params(self, *args, **kwargs) -> Params:
    """The parameters, placed on `mesh`."""

  @abc.abstractmethod
  def get_prefix_destination_sharding(self) -> Any:
    """Sharding of a prefix (what `prefill` returns and `insert` reads)."""

  @abc.abstractmethod
  def init_decode_state(self, *args, **kwargs) -> DecodeState:
    """An empty decode state (every slot free), placed on `mesh`."""

  @property
  @abc.abstractmethod
  def max_concurrent_decodes(self) -> int:
    """Number of decode slots."""

  @property
  @abc.abstractmethod
  def samples_per_slot(self) -> int:
    """Samples a slot decodes (1 here: n samples of one prompt take n slots)."""

  @property
  @abc.abstractmethod
  def max_prefill_length(self) -> int:
    """Longest token sequence one prefill call accepts."""

  @property
  @abc.abstractmethod
  def mesh(self) -> Mesh:
    """The device mesh the engine runs on."""
