"""The decode KV cache as a memory budget: sized and checked at start-up, never discovered by an OOM.

Dense rows reserve `max_concurrent_decodes x max_seq_len` KV positions up front (one row per slot), and with
the search defaults (64 x 32,768) that is 51 GB for a 0.5B model in float32: a raw RESOURCE_EXHAUSTED half-way
through start-up is how a new user found out. So the engine first works out what it may use:

  budget = kv_memory_bytes                                             when given (> 0)
         = kv_memory_fraction x (device memory - this device's share of the weights)   otherwise

per device (slots are split over data x fsdp, KV heads over tensor). Device memory is the accelerator's
`bytes_limit`; a CPU device has none, so its share of the host memory available at start-up stands in (the
weights already sit in it, and the host is shared with whatever else runs there).
For dense rows (`kv_page_size` 0), `max_concurrent_decodes=0` ("auto") takes as many slots as the budget holds
(at most `MAX_AUTO_SLOTS`), and explicit slots that do not fit stop with one line that says what to lower.

With a paged pool (`kv_page_size` > 0, the default) the budget becomes pages, not rows: slots take pages as their
tokens arrive, so slots x max_seq_len may exceed the budget. What must fit is one sequence of max_seq_len per
shard (else a long request could never run); "auto" assumes a slot holds `PAGED_AUTO_FILL` of max_seq_len on
average (traces stop well short of their limit) and the driver makes requests wait, or preempts and later
recomputes one, when the pool runs out. The pool never takes more than dense rows would (`pool_pages`).
"""
from __future__ import annotations

import dataclasses
import math
import os

import jax
from flax import nnx

from retro_jax.models.config import Qwen2Config
from retro_jax.models.kv_cache import bytes_per_token
from retro_jax.user_errors import UserError

MAX_AUTO_SLOTS = 64  # the search's default concurrency; more rarely helps a single replica
PAGED_AUTO_FILL = 0.25  # auto slots of a paged pool: the pool's tokens / (this x max_seq_len)
DEFAULT_KV_MEMORY_FRACTION = 0.5  # of the memory left after the weights: prefill buffers, logits, the prefix
                                  # cache and XLA's temporaries live in the rest


class KVBudgetError(UserError):
  """The configured slots and lengths cannot fit the KV budget (a config error: one line, exit 2)."""


def _gb(n: float) -> str:
  for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
    if n >= size:
      return f"{n / size:,.1f} {unit}"
  return f"{int(n)} B"


def _host_available_bytes() -> int:
  """MemAvailable of /proc/meminfo (what the host can give without swapping), else its physical memory."""
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def free_device_memory(device, weight_bytes: int) -> tuple[int, str]:
  """(bytes the KV may come out of, how that was found) on one device: the accelerator's limit less the weights,
  or on a CPU its share of the host memory available now (the weights are already resident there)."""
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    limit = int(stats["bytes_limit"])
    return max(0, limit - weight_bytes), f"{_gb(limit)} of {device.platform} memory - {_gb(weight_bytes)} of weights"
  cpu_devices = sum(1 for d in jax.local_devices() if d.platform == device.platform) or 1
  available = _host_available_bytes() // cpu_devices
  return available, f"{_gb(available)} of host memory available per CPU device"


def per_device_weight_bytes(state, mesh, rules) -> int:
  """Bytes of the params in `state` that one device holds once they are placed on `mesh` under `rules`."""
  from retro_jax.sharding import state_shardings  # pylint: disable=import-outside-toplevel
  leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  shardings = jax.tree.leaves(state_shardings(state, mesh, rules))
  return sum(math.prod(s.shard_shape(v.shape)) * v.dtype.itemsize for v, s in zip(leaves, shardings))


@dataclasses.dataclass(frozen=True)
class KVBudget:
  """Per-device KV bytes the engine may reserve, and what one cached position costs per device."""

  budget_bytes: int
  bytes_per_position: int  # per device: this device's share of the KV heads, all layers, keys and values
  slot_shards: int  # devices the decode slots are split over (data x fsdp)
  source: str  # how the budget was set, for the message

  def slots_that_fit(self, max_seq_len: int) -> int:
    """Most slots (a multiple of slot_shards) whose max_seq_len positions fit, capped at MAX_AUTO_SLOTS."""
    per_shard = self.budget_bytes // (max_seq_len * self.bytes_per_position)
    return min(MAX_AUTO_SLOTS, per_shard * self.slot_shards) // self.slot_shards * self.slot_shards

  def pages_that_fit(self, page_size: int) -> int:
    """Pages of `page_size` positions the budget holds per shard of the slots."""
    return self.budget_bytes // (page_size * self.bytes_per_position)

  def paged_slots_that_fit(self, max_seq_len: int, page_size: int) -> int:
    """Auto slots of a paged pool (see the module docstring), a multiple of slot_shards, at least one per shard."""
    tokens = self.pages_that_fit(page_size) * page_size
    per_shard = max(1, int(tokens // (PAGED_AUTO_FILL * max_seq_len)))
    return max(1, min(MAX_AUTO_SLOTS, per_shard * self.slot_shards) // self.slot_shards) * self.slot_shards

  def pool_pages(self, slots: int, max_seq_len: int, page_size: int) -> int:
    """Pages per shard of a paged pool: what the budget holds, but never more than dense rows would reserve."""
    per_slot = -(-max_seq_len // page_size)
    return min(self.pages_that_fit(page_size), -(-slots // self.slot_shards) * per_slot)

  def describe(self, slots: int, max_seq_len: int, page_size: int = 0) -> str:
    """One line for the start-up log: what the KV takes of the budget."""
    need = -(-slots // self.slot_shards) * max_seq_len * self.bytes_per_position
    if page_size:
      pages = self.pool_pages(slots, max_seq_len, page_size)
      return (f"KV cache: a pool of {pages:,} pages x {page_size} tokens = "
              f"{_gb(pages * page_size * self.bytes_per_position)} per device of a {_gb(self.budget_bytes)} budget "
              f"({self.source}), shared by {slots} slots of up to {max_seq_len:,} tokens (dense rows: {_gb(need)})")
    return (f"KV cache: {slots} slots x {max_seq_len:,} tokens = {_gb(need)} per device of a {_gb(self.budget_bytes)} "
            f"budget ({self.source})")

  def check_pool(self, max_seq_len: int, page_size: int) -> None:
    """A paged pool must hold one max_seq_len sequence per shard, or a long request could never run."""
    need = -(-max_seq_len // page_size) * page_size * self.bytes_per_position
    if need > self.budget_bytes:
      raise KVBudgetError(
          f"one sequence of {max_seq_len:,} tokens needs {_gb(need)} of KV per device; the budget is "
          f"{_gb(self.budget_bytes)} ({self.source}): lower engine.max_seq_len, or raise the budget "
          f"(engine.kv_memory_fraction or engine.kv_memory_bytes)")

  def check(self, slots: int, max_seq_len: int) -> None:
    need = -(-slots // self.slot_shards) * max_seq_len * self.bytes_per_position
    if need > self.budget_bytes:
      fit = self.slots_that_fit(max_seq_len)
      hint = f"; {fit} slots fit at this length" if fit else ""
      raise KVBudgetError(
          f"{slots} slots x {max_seq_len:,} tokens need {_gb(need)} of KV per device; the budget is "
          f"{_gb(self.budget_bytes)} ({self.source}){hint}: lower engine.max_concurrent_decodes or "
          f"engine.max_seq_len, or raise the budget (engine.kv_memory_fraction or engine.kv_memory_bytes)")


def kv_budget(config: Qwen2Config, weight_bytes: int, mesh, rules, *,
              kv_memory_fraction: float = DEFAULT_KV_MEMORY_FRACTION, kv_memory_bytes: int = 0,
              kv_dtype=None) -> KVBudget:
  """The per-device KV budget of an engine on `mesh` whose weights take `weight_bytes` per device (KV stored in
  `kv_dtype`, default the model's compute dtype)."""
  from retro_jax.sharding import axis_size  # pylint: disable=import-outside-toplevel
  if kv_memory_bytes < 0 or not 0 < kv_memory_fraction <= 1:
    raise KVBudgetError(f"engine.kv_memory_fraction must be in (0, 1] and engine.kv_memory_bytes >= 0, got "
                        f"{kv_memory_fraction} and {kv_memory_bytes}")
  slot_shards = axis_size(mesh, rules.rules.get("batch"))
  position = bytes_per_token(config, kv_dtype) // axis_size(mesh, rules.rules.get("kv_heads"))
  if kv_memory_bytes:
    return KVBudget(kv_memory_bytes, position, slot_shards, "engine.kv_memory_bytes")
  free, how = free_device_memory(mesh.devices.flat[0], weight_bytes)
  return KVBudget(int(kv_memory_fraction * free), position, slot_shards, f"{kv_memory_fraction:g} x ({how})")


def plan_slots(config: Qwen2Config, state, mesh, rules, *, max_concurrent_decodes: int, max_seq_len: int,
               kv_memory_fraction: float = DEFAULT_KV_MEMORY_FRACTION, kv_memory_bytes: int = 0,
               page_size: int = 0, kv_dtype=None) -> tuple[KVBudget, int]:
  """(budget, slots) for an engine with params `state` (concrete or abstract) on `mesh`: `max_concurrent_decodes`
  0 becomes the slots that fit; raises KVBudgetError when the slots x max_seq_len do not fit (dense rows), or
  when one max_seq_len sequence does not fit the pool (`page_size` > 0)."""
  budget = kv_budget(config, per_device_weight_bytes(state, mesh, rules), mesh, rules,
                     kv_memory_fraction=kv_memory_fraction, kv_memory_bytes=kv_memory_bytes, kv_dtype=kv_dtype)
  if page_size:
    budget.check_pool(max_seq_len, page_size)
    return budget, max_concurrent_decodes or budget.paged_slots_that_fit(max_seq_len, page_size)
  slots = max_concurrent_decodes or budget.slots_that_fit(max_seq_len)
  budget.check(max(1, slots), max_seq_len)
  return budget, slots
