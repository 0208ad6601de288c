"""TPU chip generations and topologies: what a plan compiles for and the figures its roofline divides by.

Figures are per chip, from Google's public Cloud TPU pages (named in `source`). HBM is taken in decimal GB as
those pages print it ("95 GB"): a fit checked against it errs on the safe side if the device reports GiB.
A topology's devices come from libtpu (`jax.experimental.topologies`), which needs no TPU: it is installed by
`pip install 'retro_jax[tpu]'` (jax[tpu]).
"""
from __future__ import annotations

import dataclasses
import os
import re


class TopologyError(ValueError):
  """A topology name this module cannot turn into TPU devices (said in one line, with what would work)."""


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str  # topology prefix libtpu takes, e.g. "v5p"
  hbm_bytes: float  # per chip
  hbm_bytes_per_s: float  # per chip
  peak_bf16_flops: float  # dense, per chip
  cores_in_type_name: bool  # True when the accelerator type counts TensorCores (v4-32 = 16 chips)
  dims: int  # 3 for a 3D torus (v4, v5p), 2 for v5e / v6e
  source: str


CHIPS = {
    "v4": Chip("v4", 32e9, 1200e9, 275e12, True, 3, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("v5e", 16e9, 819e9, 197e12, False, 2, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", 95e9, 2765e9, 459e12, True, 3, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", 32e9, 1640e9, 918e12, False, 2, "https://cloud.google.com/tpu/docs/v6e"),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}


def _grid(chips: int, dims: int) -> str:
  """The usual slice shape of `chips` chips, as Google's topology tables list them: axes doubled in turn, the
  last one first after the first round (v5p: 4 -> 2x2x1, 16 -> 2x2x4, 32 -> 2x4x4; v5e: 8 -> 2x4, 16 -> 4x4)."""
  if chips < 1 or chips & (chips - 1):
    raise TopologyError(f"{chips} chips is not a power of two: give the shape instead (e.g. v5p:2x2x4)")
  order = list(range(dims)) + list(reversed(range(dims))) * 8
  shape = [1] * dims
  for axis in order[:chips.bit_length() - 1]:
    shape[axis] *= 2
  return "x".join(map(str, shape))


def resolve(topology: str) -> tuple[Chip, str]:
  """(chip, libtpu topology name) from "v5p:2x2x4" or an accelerator type ("v5p-32", "v5litepod-16")."""
  text = topology.strip().lower()
  match = re.fullmatch(r"([a-z0-9]+)[:=_]([0-9x]+)", text)
  if match:
    gen = _ALIASES.get(match.group(1), match.group(1))
    if gen not in CHIPS:
      raise TopologyError(f"unknown TPU generation {match.group(1)!r} in {topology!r}; known: {', '.join(CHIPS)}")
    return CHIPS[gen], f"{gen}:{match.group(2)}"
  match = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
  if not match:
    raise TopologyError(f"topology {topology!r}: expected an accelerator type (v5p-32, v5litepod-16) or a shape "
                        f"(v5p:2x2x4, v5e:2x2)")
  gen = _ALIASES.get(match.group(1), match.group(1))
  if gen not in CHIPS:
    raise TopologyError(f"unknown TPU generation {match.group(1)!r} in {topology!r}; known: {', '.join(CHIPS)}")
  chip, count = CHIPS[gen], int(match.group(2))
  chips = count // 2 if chip.cores_in_type_name else count
  return chip, f"{gen}:{_grid(chips, chip.dims)}"


def devices(topology_name: str, num_slices: int = 1) -> list:
  """The TPU devices of `num_slices` slices of a topology, from libtpu, on any machine.

  TPU_SKIP_MDS_QUERY keeps libtpu from waiting minutes on cloud metadata a CPU machine cannot reach (and
  TPU_WORKER_HOSTNAMES from logging an error about it), and ALLOW_MULTIPLE_LIBTPU_LOAD lets it start while
  another process on the machine holds libtpu's lock file.
  """
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology_name, **kwargs).devices)
  except Exception as e:  # libtpu missing or the name rejected: both are the user's to fix
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "tpu" in message.lower() and ("plugin" in message.lower() or "not found" in message.lower()):
      message += " (install libtpu: pip install 'retro_jax[tpu]')"
    raise TopologyError(f"cannot build TPU topology {topology_name!r}: {message}") from e


def devices_per_chip(devs: list) -> int:
  """Devices libtpu exposes per chip (2 on v4 AOT topologies, one per TensorCore; else 1)."""
  chips = {(getattr(d, "slice_index", 0), tuple(d.coords)) for d in devs}
  return max(1, len(devs) // len(chips))
