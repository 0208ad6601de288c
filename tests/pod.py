"""A simulated TPU pod for tests: N local processes x K fake CPU devices, joined by gloo collectives.

Each process runs `python -m retro_jax.cli ...` with the RETRO_JAX_* group variables, a coordinator on a port the
OS chose, and a persistent JAX compilation cache shared by every process of the session (the first process
compiles the tiny model's programs, the others load them: a pod test then costs process start-up, not compiles).
Processes are always killed on the way out, whatever happened.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from typing import Iterator, Sequence

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_REASONER = str(REPO_ROOT / "retro_jax" / "assets" / "tiny_reasoner")
FORM_TIMEOUT_S = 120  # generous: a loaded 2-core machine starts JAX slowly


def free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


def process_env(cache_dir: str, devices: int, group: tuple[str, int, int] | None = None) -> dict[str, str]:
  env = dict(os.environ)
  env.update(PYTHONPATH=str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             RETRO_JAX_INIT_TIMEOUT_S=str(FORM_TIMEOUT_S), TPU_SKIP_MDS_QUERY="1")
  for name in ("RETRO_JAX_COORDINATOR_ADDRESS", "RETRO_JAX_NUM_PROCESSES", "RETRO_JAX_PROCESS_ID"):
    env.pop(name, None)
  if group is not None:
    address, count, index = group
    env.update(RETRO_JAX_COORDINATOR_ADDRESS=address, RETRO_JAX_NUM_PROCESSES=str(count),
               RETRO_JAX_PROCESS_ID=str(index))
  return env


@dataclasses.dataclass
class Pod:
  """Running processes of one job; `logs[i]` is process i's combined stdout and stderr."""

  processes: list[subprocess.Popen]
  logs: list[pathlib.Path]

  def wait(self, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in self.processes]

  def log(self, index: int) -> str:
    return self.logs[index].read_text(errors="replace")

  def kill(self) -> None:
    for process in self.processes:
      if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    for process in self.processes:
      process.wait()


@contextlib.contextmanager
def launch(argv: Sequence[str], *, processes: int, devices: int, cache_dir: str, log_dir: pathlib.Path,
           module: str = "retro_jax.cli") -> Iterator[Pod]:
  """Starts `python -m module argv` as a group of `processes` (one plain process when 1); kills what is left."""
  address = f"127.0.0.1:{free_port()}"
  log_dir.mkdir(parents=True, exist_ok=True)
  pod = Pod([], [])
  try:
    for index in range(processes):
      group = (address, processes, index) if processes > 1 else None
      log = log_dir / f"process-{index}.log"
      with open(log, "wb") as out:
        pod.processes.append(subprocess.Popen([sys.executable, "-m", module, *argv], stdout=out,
                                              stderr=subprocess.STDOUT, env=process_env(cache_dir, devices, group),
                                              cwd=str(REPO_ROOT)))
      pod.logs.append(log)
    yield pod
  finally:
    pod.kill()


def run(argv: Sequence[str], *, processes: int, devices: int, cache_dir: str, log_dir: pathlib.Path,
        timeout_s: float = 600) -> Pod:
  """Runs a job to the end; raises with every process's log tail when one fails."""
  with launch(argv, processes=processes, devices=devices, cache_dir=cache_dir, log_dir=log_dir) as pod:
    codes = pod.wait(timeout_s)
    if any(codes):
      tails = "\n".join(f"--- process {i} (exit {c}):\n{pod.log(i)[-3000:]}" for i, c in enumerate(codes))
      raise AssertionError(f"job {list(argv)} failed:\n{tails}")
    return pod


def wait_for_lines(path: pathlib.Path, count: int, timeout_s: float, pod: Pod) -> None:
  """Blocks until the JSONL file at `path` holds `count` complete lines (a job mid-run), or fails."""
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if path.exists() and path.read_bytes().count(b"\n") >= count:
      return
    if all(p.poll() is not None for p in pod.processes):
      raise AssertionError(f"the job ended before {path} had {count} lines:\n{pod.log(0)[-2000:]}")
    time.sleep(0.2)
  raise AssertionError(f"{path} did not reach {count} lines in {timeout_s} s")
