"""The process group: the one place that starts `jax.distributed`, called first by every `retro-jax` command.

Where the group comes from, first match wins:
- `RETRO_JAX_COORDINATOR_ADDRESS` (host:port of process 0), `RETRO_JAX_NUM_PROCESSES` and `RETRO_JAX_PROCESS_ID`:
  an explicit group (any cluster, or N local CPU processes simulating a pod);
- a Cloud TPU VM (TPU chips on this host): `jax.distributed.initialize()` with no arguments, which reads the
  slice's hosts from the TPU metadata;
- otherwise one process, as on a laptop or a single accelerator.

On CPU, cross-process collectives need gloo (`jax_cpu_collectives_implementation`), so a multi-process group
switches it on: N processes started with `XLA_FLAGS=--xla_force_host_platform_device_count=K` then form one pod
of N x K devices. That is how the tests prove multi-host code on one machine.

A group that cannot form (a wrong address, a peer that never starts) would make JAX wait and then abort the
process from C++ with a stack trace. A watchdog thread gives up first, after `RETRO_JAX_INIT_TIMEOUT_S`
(default 300 s), with one line on stderr and exit status 2.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import sys
import threading

ENV_ADDRESS = "RETRO_JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "RETRO_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "RETRO_JAX_PROCESS_ID"
ENV_TIMEOUT = "RETRO_JAX_INIT_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 300
EXIT_NO_GROUP = 2


class GroupError(ValueError):
  """Settings that cannot describe a process group (a malformed variable, an id out of range)."""


@dataclasses.dataclass(frozen=True)
class GroupPlan:
  """The group this process will join. `source`: "env" (the RETRO_JAX_* variables), "tpu" (Cloud TPU VM, sizes
  known only once formed) or "single"."""

  source: str
  num_processes: int | None = None
  process_id: int | None = None
  coordinator_address: str | None = None
  timeout_s: int = DEFAULT_TIMEOUT_S

  def describe(self) -> str:
    if self.source == "single":
      return "single process"
    if self.source == "tpu":
      return f"Cloud TPU VM slice (jax.distributed.initialize(), timeout {self.timeout_s} s)"
    return (f"process {self.process_id} of {self.num_processes}, coordinator {self.coordinator_address} "
            f"(timeout {self.timeout_s} s)")


def on_cloud_tpu_vm() -> bool:
  """TPU chips attached to this host (v4: /dev/accel*, v5e/v5p/v6e: /dev/vfio/<n>); no network query."""
  return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def _int_variable(name: str, value: str) -> int:
  try:
    return int(value)
  except ValueError as error:
    raise GroupError(f"{name}={value!r} is not an integer") from error


def plan(environ: dict[str, str] | None = None) -> GroupPlan:
  """The group the environment asks for, without starting anything (what `--dry-run` prints)."""
  environ = os.environ if environ is None else environ
  timeout = _int_variable(ENV_TIMEOUT, environ.get(ENV_TIMEOUT, str(DEFAULT_TIMEOUT_S)))
  if timeout <= 0:
    raise GroupError(f"{ENV_TIMEOUT} must be positive, got {timeout}")
  names = (ENV_ADDRESS, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
  given = [name for name in names if environ.get(name)]
  if given:
    missing = [name for name in names if name not in given]
    if missing:
      raise GroupError(f"{', '.join(given)} set but {', '.join(missing)} missing: set all three or none")
    address = environ[ENV_ADDRESS]
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
      raise GroupError(f"{ENV_ADDRESS}={address!r} is not host:port")
    count = _int_variable(ENV_NUM_PROCESSES, environ[ENV_NUM_PROCESSES])
    index = _int_variable(ENV_PROCESS_ID, environ[ENV_PROCESS_ID])
    if count < 1 or not 0 <= index < count:
      raise GroupError(f"{ENV_PROCESS_ID}={index} is not in [0, {ENV_NUM_PROCESSES}={count})")
    return GroupPlan("env", count, index, address, timeout)
  if on_cloud_tpu_vm():
    return GroupPlan("tpu", timeout_s=timeout)
  return GroupPlan("single", 1, 0, None, timeout)


def _give_up_after(seconds: int, what: str) -> threading.Event:
  """Exits the process with one line unless the returned event is set within `seconds`."""
  formed = threading.Event()

  def watch() -> None:
    if not formed.wait(seconds):
      print(f"retro-jax: the process group did not form within {seconds} s ({what}); check the coordinator "
            f"address and that every process was started (or raise {ENV_TIMEOUT})", file=sys.stderr, flush=True)
      os._exit(EXIT_NO_GROUP)  # pylint: disable=protected-access  # JAX's C++ wait cannot be interrupted

  threading.Thread(target=watch, name="process-group-watchdog", daemon=True).start()
  return formed


def _already_formed() -> bool:
  from jax._src import distributed as jax_distributed  # pylint: disable=import-outside-toplevel

  return jax_distributed.global_state.client is not None


def initialize(group: GroupPlan | None = None) -> GroupPlan:
  """Joins the process group (a no-op for one process, or when this process already joined); returns it.

  Must run before anything touches a JAX device: JAX fixes the device list at its first use.
  """
  group = plan() if group is None else group
  if group.source == "single":
    return group
  import jax  # pylint: disable=import-outside-toplevel

  if _already_formed():
    return GroupPlan(group.source, jax.process_count(), jax.process_index(), group.coordinator_address,
                     group.timeout_s)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only the CPU backend reads it
  formed = _give_up_after(group.timeout_s, group.describe())
  # JAX's own deadline comes later than the watchdog's, so the watchdog's clear line is what a user sees.
  slack = group.timeout_s + 60
  if group.source == "tpu":
    jax.distributed.initialize(initialization_timeout=slack)
  else:
    jax.distributed.initialize(coordinator_address=group.coordinator_address, num_processes=group.num_processes,
                               process_id=group.process_id, initialization_timeout=slack)
  formed.set()
  return GroupPlan(group.source, jax.process_count(), jax.process_index(), group.coordinator_address,
                   group.timeout_s)


def initialize_or_exit(prog: str = "retro-jax") -> GroupPlan:
  """`initialize()` for the CLIs: malformed settings are one line on stderr and exit status 2."""
  try:
    return initialize()
  except GroupError as error:
    print(f"{prog}: {error}", file=sys.stderr)
    raise SystemExit(EXIT_NO_GROUP) from error


def process_index_and_count() -> tuple[int, int]:
  """(this process's index, the number of processes) of the group `initialize` joined; (0, 1) for one process."""
  import jax  # pylint: disable=import-outside-toplevel

  return jax.process_index(), jax.process_count()


def barrier(name: str, timeout_s: float) -> None:
  """Waits until every process of the group reaches `name` (a no-op for one process).

  A key-value barrier of the coordination service rather than a device collective: processes that finish their
  share of the records at different times wait here without holding a collective open, and a peer that never
  comes is an error after `timeout_s` instead of a hang.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from jax._src import distributed as jax_distributed  # pylint: disable=import-outside-toplevel

  if jax.process_count() == 1:
    return
  jax_distributed.global_state.client.wait_at_barrier(name, int(timeout_s * 1000))
