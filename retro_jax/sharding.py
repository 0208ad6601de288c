"""The one place that names physical mesh axes.

Models annotate every parameter and activation with *logical* axis names ("batch", "embed", "heads", ...).
This module maps them onto a ("data", "fsdp", "tensor") mesh with one of two rule sets:

- TRAIN_RULES: FSDP (weights' embed dim over "fsdp") plus tensor parallelism (heads / mlp / vocab over
  "tensor"); the batch is split over data and fsdp.
- SERVE_RULES: weights and KV heads over "tensor" only (no per-step all-gathers of weights), decode slots over
  data and fsdp.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from retro_jax.user_errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
MeshAxes = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """Logical axis name -> mesh axis (or tuple of mesh axes, or None = replicated)."""

  name: str
  rules: Mapping[str, MeshAxes]

  def spec(self, logical_axes: Sequence[str | None]) -> PartitionSpec:
    return PartitionSpec(*(self.rules.get(a) if a else None for a in logical_axes))


# Activations get their own names ("act_*"): under FSDP a weight's embed dim is split over "fsdp" while an
# activation's embed dim must not be (its batch already is), the distinction MaxText draws the same way.
# "kv_pages": the page axis of a paged KV pool, split like the decode slots (each replica allocates its own pages).
_COMMON = {"batch": ("data", "fsdp"), "kv_pages": ("data", "fsdp"), "seq": None, "cache_seq": None, "head_dim": None,
           "norm": None, "act_embed": None, "act_mlp": "tensor", "act_vocab": "tensor"}
# "layer_seq": the sequence axis of the residual stream between scanned layers, which full remat keeps for every
# layer; training splits it over "tensor" (sequence parallelism at layer boundaries, Korthikanti et al. 2022), so
# those saved inputs take 1/tensor of the memory, and a layer gathers its input once.
TRAIN_RULES = ShardingRules("train", {
    **_COMMON, "layer_seq": "tensor", "embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor"})
SERVE_RULES = ShardingRules("serve", {
    **_COMMON, "embed": None, "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor"})


class ShardingError(UserError):
  """A mesh layout that cannot split the model evenly (named, instead of a cryptic XLA error): a config the user
  fixes, so the CLI prints it as one line (a UserError is a ValueError)."""


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh. Use -1 for at most one axis to take all remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ShardingError("at most one mesh axis may be -1")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if len(devices) % known:
      raise ShardingError(f"{len(devices)} devices do not divide by the fixed mesh axes {sizes}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) > len(devices):
    raise ShardingError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                        f"only {len(devices)} available")
  grid = np.asarray(devices[:math.prod(sizes)], dtype=object).reshape(sizes)
  return Mesh(grid, MESH_AXES)


def serving_mesh(tensor: int = 0, replicas: int = 0, devices: Sequence[Any] | None = None,
                 tensor_dims: Sequence[int] = (), slots: int = 0) -> Mesh:
  """The mesh one process serves on: its local chips as `replicas` x `tensor` ("data" x "tensor").

  Under SERVE_RULES each index of "data" is an engine replica: it holds the whole model, split over its `tensor`
  chips, and its own share of the decode slots, so replicas never all-gather weights. (They step together, which
  costs nothing here: every replica decodes the same number of tokens per step.) 0 means automatic: `tensor`
  becomes the largest count of the chips left per replica that divides every size in `tensor_dims` (the model
  dimensions SERVE_RULES splits over "tensor": heads, KV heads, MLP, vocab; the KV heads usually bound it), and
  `replicas` the chips left over, fewer where that count does not divide `slots` (the decode slots, split evenly
  over the replicas; 0: any count): 4 slots on 8 one-chip replicas serve on 4. Across hosts there is one such
  mesh per process.
  """
  devices = list(devices if devices is not None else jax.local_devices())
  if tensor < 0 or replicas < 0:
    raise ShardingError(f"engine.tensor ({tensor}) and engine.replicas_per_host ({replicas}) must be >= 0")
  if tensor == 0:
    per_replica = len(devices) // max(replicas, 1)
    tensor = max(t for t in range(1, per_replica + 1)
                 if per_replica % t == 0 and all(dim % t == 0 for dim in tensor_dims))
  if not replicas:
    replicas = max(r for r in range(1, len(devices) // tensor + 1) if not slots or slots % r == 0)
  if replicas * tensor > len(devices) or replicas * tensor == 0:
    raise ShardingError(f"{replicas} replicas x {tensor} chips need {replicas * tensor} local devices, "
                        f"this process has {len(devices)}")
  return make_mesh(replicas, 1, tensor, devices=devices)


def axis_size(mesh: Mesh, axes: MeshAxes) -> int:
  """Devices along `axes` (a mesh axis name, a tuple of them, or None = 1)."""
  if axes is None:
    return 1
  names = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[n] for n in names)


def check_divisible(name: str, shape: Sequence[int], logical_axes: Sequence[str | None], mesh: Mesh,
                    rules: ShardingRules) -> None:
  for dim, axis in zip(shape, logical_axes):
    parts = axis_size(mesh, rules.rules.get(axis) if axis else None)
    if dim % parts:
      raise ShardingError(
          f"{name}: dimension {axis!r} of size {dim} cannot be split {parts} ways over mesh axes "
          f"{rules.rules.get(axis)!r} (mesh {dict(mesh.shape)}, {rules.name} rules). "
          + ("Tensor parallelism is bounded by the number of KV heads." if axis == "kv_heads" else ""))


def state_shardings(state: nnx.State, mesh: Mesh, rules: ShardingRules) -> Any:
  """NamedSharding per variable of `state` (abstract or concrete), checking divisibility with clear errors."""
  def one(path, variable):
    axes = variable.get_metadata().get("axes") or (None,) * len(variable.shape)
    check_divisible(jax.tree_util.keystr(path), variable.shape, axes, mesh, rules)
    return NamedSharding(mesh, rules.spec(axes))

  return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def array_sharding(shape: Sequence[int], logical_axes: Sequence[str | None], mesh: Mesh, rules: ShardingRules,
                   name: str = "array") -> NamedSharding:
  check_divisible(name, shape, logical_axes, mesh, rules)
  return NamedSharding(mesh, rules.spec(logical_axes))


_log = logging.getLogger(__name__)
_DROPPED_CONSTRAINTS: set[tuple] = set()  # layouts already warned about (constrain)
_ACTIVE: contextvars.ContextVar[tuple[Mesh, ShardingRules] | None] = contextvars.ContextVar(
    "retro_jax_sharding", default=None)


def active() -> tuple[Mesh, ShardingRules] | None:
  """The (mesh, rules) of the enclosing `use_rules`, or None (kernels that must `shard_map` themselves ask)."""
  return _ACTIVE.get()


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: ShardingRules):
  """Activates activation-sharding constraints while tracing (the trainer and the engine wrap their jits)."""
  token = _ACTIVE.set((mesh, rules))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names; a no-op outside `use_rules` (single device, tests).

  A dimension that does not divide its mesh axes (a prefill of one prompt on a data axis of 4) cannot be
  constrained, so the whole constraint is left to XLA rather than failing. That is also how a real layout
  mistake would look (a vocab that does not split over "tensor"), so the first drop of each logical layout on
  each mesh is logged as a warning.
  """
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  spec = rules.spec(logical_axes)
  uneven = tuple((axis, dim, axes) for axis, dim, axes in zip(logical_axes, x.shape, spec)
                 if dim % axis_size(mesh, axes))
  if uneven:
    key = (tuple(logical_axes), tuple(axis for axis, _, _ in uneven), tuple(mesh.shape.items()), rules.name)
    if key not in _DROPPED_CONSTRAINTS:
      _DROPPED_CONSTRAINTS.add(key)
      what = ", ".join(f"{axis!r} of size {dim} over {axes!r} ({axis_size(mesh, axes)} ways)"
                       for axis, dim, axes in uneven)
      _log.warning("sharding constraint %s dropped (%s rules, mesh %s): %s does not divide; XLA chooses the "
                   "layout (logged once per layout)", tuple(logical_axes), rules.name, dict(mesh.shape), what)
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
