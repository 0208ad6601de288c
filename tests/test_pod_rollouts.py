"""`retro-jax generate` and `retro-jax search` on a simulated pod: 2 processes x 4 CPU devices, gloo collectives.

The reference is the same command as one process (on 4 devices too, so both compile the same programs once into
the shared cache). Each pod job is SIGKILLed in one process mid-run, then restarted with both processes; the merged
output must equal the reference record for record (these records carry no timing fields), with each record
written once, by the process its id hashes to.
"""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from retro_jax.search import shards
from retro_jax.tasks.arithmetic import make_splits, write_problems
from tests import pod

NUM_PROBLEMS, PROCESSES, DEVICES = 200, 2, 4
ENGINE = ["--config.engine.max_seq_len=512", "--config.engine.max_concurrent_decodes=16",
          "--config.grading.num_workers=1", "--config.progress=False", "--model", pod.TINY_REASONER]
GENERATE = ["generate", "--config.generate.num_samples=1", "--config.generate.max_new_tokens=320", *ENGINE]
SEARCH = ["search", "--config.search.max_rollout_tokens=320", *ENGINE]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
  root = tmp_path_factory.mktemp("pod_rollouts")
  train, _ = make_splits(seed=11, n_train=NUM_PROBLEMS, n_eval=0)
  write_problems(root / "problems.jsonl", train)
  return root


def _run(work, argv, name, processes):
  return pod.run(argv, processes=processes, devices=DEVICES, cache_dir=str(work / "jax_cache"),
                 log_dir=work / "logs" / name)


def _records(path):
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]


def _kill_one_then_restart(work, argv, output: pathlib.Path, name: str):
  """Starts the pod job, SIGKILLs process 1 once its shard holds some records, kills the rest, runs it again."""
  shard1 = pathlib.Path(shards.Shard(str(output), 1, PROCESSES).path)
  with pod.launch(argv, processes=PROCESSES, devices=DEVICES, cache_dir=str(work / "jax_cache"),
                  log_dir=work / "logs" / f"{name}-killed") as job:
    pod.wait_for_lines(shard1, 10, timeout_s=300, pod=job)
    job.processes[1].send_signal(signal.SIGKILL)
    job.kill()  # the survivor would be ended by the group's heartbeat anyway; don't wait for it
  cut_at = len(_records(shard1))
  assert not output.exists()  # nothing was merged from the killed job
  _run(work, argv, f"{name}-restarted", PROCESSES)
  return cut_at


def _check_pod_output(output: pathlib.Path, reference: list[dict], input_ids: list, key: str):
  merged = _records(output)
  assert merged == sorted(reference, key=lambda r: input_ids.index(r[key]))  # equal, and in input order
  seen = []
  for index in range(PROCESSES):
    part = _records(shards.Shard(str(output), index, PROCESSES).path)
    assert part and all(shards.shard_of(r[key], PROCESSES) == index for r in part)
    seen += [r["id"] for r in part]
  assert sorted(seen) == sorted(r["id"] for r in reference)  # disjoint shares: 0 lost, 0 duplicated
  summary = json.loads(pathlib.Path(str(output).removesuffix(".jsonl") + ".summary.json").read_text())
  assert summary["processes"] == PROCESSES and sum(summary["records_per_process"]) == len(reference)
  return summary


@pytest.fixture(scope="module")
def generated(work):
  """The single-process reference traces: the pod's generate reference and the search input."""
  _run(work, [*GENERATE, "--input", str(work / "problems.jsonl"), "--output", str(work / "traces.jsonl")],
       "generate-reference", 1)
  return work / "traces.jsonl"


def test_pod_generate_equals_one_process_after_a_kill(work, generated):
  reference = _records(generated)
  assert len(reference) == NUM_PROBLEMS
  output = work / "pod_traces.jsonl"
  argv = [*GENERATE, "--input", str(work / "problems.jsonl"), "--output", str(output)]
  cut_at = _kill_one_then_restart(work, argv, output, "generate-pod")
  assert 10 <= cut_at < len(_records(shards.Shard(str(output), 1, PROCESSES).path))  # killed mid-share
  problem_ids = [json.loads(line)["id"] for line in (work / "problems.jsonl").read_text().splitlines()]
  summary = _check_pod_output(output, reference, problem_ids, key="problem_id")
  assert summary["samples"] == NUM_PROBLEMS


@pytest.fixture(scope="module")
def searched(work, generated):
  """The single-process reference search of the reference traces."""
  _run(work, [*SEARCH, "--input", str(generated), "--output", str(work / "revised.jsonl")], "search-reference", 1)
  return work / "revised.jsonl"


def test_pod_search_equals_one_process_after_a_kill_and_a_rerun_only_merges(work, generated, searched):
  reference = _records(searched)
  assert len(reference) == NUM_PROBLEMS and {r["status"] for r in reference} >= {"revised", "unchanged"}
  output = work / "pod_revised.jsonl"
  argv = [*SEARCH, "--input", str(generated), "--output", str(output)]
  _kill_one_then_restart(work, argv, output, "search-pod")
  trace_ids = [r["id"] for r in _records(generated)]
  _check_pod_output(output, reference, trace_ids, key="id")

  output.unlink()  # a rerun of the finished job loads no model and merges the shards again
  job = _run(work, argv, "search-rerun", PROCESSES)
  assert all("share finished" in job.log(i) for i in range(PROCESSES))
  assert _records(output) == sorted(reference, key=lambda r: trace_ids.index(r["id"]))


def test_a_process_with_an_empty_share_finishes_cleanly(work, generated, searched):
  """One input record: one process has nothing to do. Its owner finished it in an earlier run (its revised record
  is already in the owner's shard), so neither process loads a model: the empty one waits, process 0 merges."""
  first = _records(generated)[0]
  (work / "one.jsonl").write_text(json.dumps(first) + "\n")
  output = work / "one_revised.jsonl"
  owner = shards.shard_of(first["id"], PROCESSES)
  revised = next(r for r in _records(searched) if r["id"] == first["id"])
  owner_shard = pathlib.Path(shards.Shard(str(output), owner, PROCESSES).path)
  owner_shard.parent.mkdir(parents=True)
  owner_shard.write_text(json.dumps(revised) + "\n")
  job = _run(work, [*SEARCH, "--input", str(work / "one.jsonl"), "--output", str(output)], "search-one", PROCESSES)
  assert "share finished (0 records)" in job.log(1 - owner)
  assert _records(output) == [revised]


def test_a_second_job_on_the_same_output_is_refused(work, tmp_path):
  output = tmp_path / "busy.jsonl"
  with shards.exclusive(str(output)):  # the first job
    result = subprocess.run([sys.executable, "-m", "retro_jax.cli", *SEARCH, "--input", str(work / "problems.jsonl"),
                             "--output", str(output)], capture_output=True, text=True, timeout=300,
                            env=pod.process_env(str(work / "jax_cache"), DEVICES), cwd=str(pod.REPO_ROOT))
  assert result.returncode == 2
  assert [line for line in result.stderr.splitlines() if line.startswith("retro-jax")] == [
      f"retro-jax search: {output} is being written by another job (pid {os.getpid()} on {socket.gethostname()}); "
      "wait for it or choose another output"]


@pytest.mark.parametrize("missing", ["peer", "coordinator"])
def test_a_group_that_cannot_form_exits_2_with_one_line(tmp_path, missing):
  """Process 0 alone waits for a peer that never comes; process 1 alone for a coordinator that is not there."""
  env = pod.process_env(str(tmp_path), 1, (f"127.0.0.1:{pod.free_port()}", 2, 0 if missing == "peer" else 1))
  env["RETRO_JAX_INIT_TIMEOUT_S"] = "5"
  started = time.monotonic()
  result = subprocess.run([sys.executable, "-m", "retro_jax.cli", *SEARCH, "--input=x", "--output=y"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=str(pod.REPO_ROOT))
  assert result.returncode == 2
  assert time.monotonic() - started < 60
  lines = [line for line in result.stderr.splitlines() if line.startswith("retro-jax")]
  assert len(lines) == 1 and "did not form within 5 s" in lines[0]
  assert "Traceback" not in result.stderr
