"""search/shards.py and distributed.plan in one process: shares, merge order, cut lines, locks, group settings."""
import collections
import hashlib
import json

import pytest

from retro_jax import distributed, jsonl
from retro_jax.search import shards


def test_shares_are_a_stable_hash_of_the_id():
  expected = int.from_bytes(hashlib.sha256(b'"r7"').digest()[:8], "big") % 4  # computed here independently
  assert shards.shard_of("r7", 4) == expected
  assert shards.shard_of(7, 4) == int.from_bytes(hashlib.sha256(b"7").digest()[:8], "big") % 4
  counts = collections.Counter(shards.shard_of(f"r{i}", 4) for i in range(4000))
  assert set(counts) == {0, 1, 2, 3} and min(counts.values()) > 900  # balanced within a few percent


def _write(path, records, cut=""):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in records) + cut)


def test_merge_writes_input_order_and_refuses_an_unfinished_record(tmp_path):
  output = str(tmp_path / "out.jsonl")
  ids = [f"p{i}" for i in range(10)]
  finished = lambda record_id, written: record_id in written
  parts = {0: [], 1: []}
  for record_id in reversed(ids):  # shards hold records in completion order, not input order
    parts[shards.shard_of(record_id, 2)].append({"id": record_id, "x": record_id.upper()})
  for index, records in parts.items():
    _write(tmp_path / f"out.jsonl.shards/part-0000{index}-of-00002.jsonl", records, cut='{"id": "p0", "x"')
  shard = shards.Shard(output, 0, 2)
  assert shards.written_ids(shard.sibling(1).path) == {r["id"] for r in parts[1]}  # a cut last line is no record
  assert shards.merge(shard, ids, finished, lambda r: r["id"]) == [len(parts[0]), len(parts[1])]
  assert [r["id"] for r in jsonl.read_jsonl(output)] == ids
  with pytest.raises(shards.IncompleteShards, match="1 input records are in no shard"):
    shards.merge(shard, [*ids, "p10"], finished, lambda r: r["id"])


def test_own_rows_take_the_job_limit_before_the_share(tmp_path):
  path = tmp_path / "in.jsonl"
  _write(path, [{"id": f"r{i}"} for i in range(20)])
  shard = shards.Shard(str(tmp_path / "out.jsonl"), 1, 3)
  rows = shards.own_rows(jsonl.read_lines(str(path)), shard, "id", limit=12)
  assert [r.data["id"] for r in rows] == [f"r{i}" for i in range(12) if shards.shard_of(f"r{i}", 3) == 1]


def test_one_writer_per_output(tmp_path):
  output = str(tmp_path / "out.jsonl")
  with shards.exclusive(output):
    with pytest.raises(shards.OutputBusy, match="being written by another job"):
      with shards.exclusive(output):
        pass
  with shards.exclusive(output):  # released on exit
    pass


@pytest.mark.parametrize("environ,message", [
    ({"RETRO_JAX_COORDINATOR_ADDRESS": "h:1"}, "missing"),
    ({"RETRO_JAX_COORDINATOR_ADDRESS": "nohost", "RETRO_JAX_NUM_PROCESSES": "2", "RETRO_JAX_PROCESS_ID": "0"},
     "not host:port"),
    ({"RETRO_JAX_COORDINATOR_ADDRESS": "h:1", "RETRO_JAX_NUM_PROCESSES": "2", "RETRO_JAX_PROCESS_ID": "2"},
     r"not in \[0, "),
    ({"RETRO_JAX_COORDINATOR_ADDRESS": "h:1", "RETRO_JAX_NUM_PROCESSES": "two", "RETRO_JAX_PROCESS_ID": "0"},
     "not an integer"),
    ({"RETRO_JAX_INIT_TIMEOUT_S": "0"}, "must be positive"),
])
def test_malformed_group_settings_are_named(environ, message):
  with pytest.raises(distributed.GroupError, match=message):
    distributed.plan(environ)


def test_group_plans():
  group = distributed.plan({"RETRO_JAX_COORDINATOR_ADDRESS": "10.0.0.2:8476", "RETRO_JAX_NUM_PROCESSES": "8",
                            "RETRO_JAX_PROCESS_ID": "7", "RETRO_JAX_INIT_TIMEOUT_S": "30"})
  assert (group.source, group.num_processes, group.process_id, group.timeout_s) == ("env", 8, 7, 30)
  if not distributed.on_cloud_tpu_vm():
    assert distributed.plan({}).source == "single" and distributed.initialize(distributed.plan({})).process_id == 0
