"""One rollout output written by many processes: deterministic shares, one resumable shard each, one merge.

In a multi-process job (a TPU pod, or a simulated one) every process serves its own engine replica and takes
the records whose id hashes to it: `shard_of(id) = sha256(id) mod processes`. The share depends on the id alone,
not on arrival order, on the other records or on how often the job restarted, so a restarted process finds its
own finished records in its own shard file (`<output>.shards/part-00001-of-00004.jsonl`, a
`ResumableJsonlWriter` file) and continues after them. Once every process has finished its share, they meet at
a barrier and process 0 merges the shards into `<output>` in input order and writes the run summary. A rerun
of a finished job loads no model: each process sees its share complete, and process 0 merges again.

A one-process job is the same code with one shard, which is the output itself (no merge).

Two jobs writing the same output would interleave or overwrite each other's records, so each process holds an
exclusive lock (`flock`) on its shard, and process 0 on the output, for the whole job. A killed process drops
its locks with its file descriptors, so a restart is never refused by a dead job's lock.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import itertools
import json
import os
import socket
from typing import Any, Callable, Container, Iterable, Iterator

from retro_jax import distributed, jsonl
from retro_jax.search import runner

# Processes that finished their share wait this long for the slowest one before giving up; a peer that died is
# reported sooner by the process group itself (missed heartbeats end every process).
WAIT_FOR_PEERS_S = 7 * 24 * 3600

# (record id, the ids already written) -> whether that input record needs no more work.
Finished = Callable[[runner.RecordId, Container[runner.RecordId]], bool]


class OutputBusy(RuntimeError):
  """Another job holds the output (or this shard of it)."""


class IncompleteShards(RuntimeError):
  """The merge found input records that no shard finished (a bug or a changed input: never merged silently)."""


def shard_of(record_id: runner.RecordId, num_shards: int) -> int:
  """The shard that owns `record_id`: a hash of its JSON form, so the integer 7 and the string "7" differ."""
  digest = hashlib.sha256(json.dumps(record_id).encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") % num_shards


@dataclasses.dataclass(frozen=True)
class Shard:
  """This process's part of the job writing `output`: shard `index` of `count`."""

  output: str
  index: int = 0
  count: int = 1
  summary_override: str = ""  # the merged summary's path; "": next to the output

  @classmethod
  def for_this_process(cls, output: str, summary_path: str = "") -> Shard:
    index, count = distributed.process_index_and_count()
    return cls(output, index, count, summary_path)

  @property
  def path(self) -> str:
    if self.count == 1:
      return self.output
    return os.path.join(f"{self.output}.shards", f"part-{self.index:05d}-of-{self.count:05d}.jsonl")

  def sibling(self, index: int) -> Shard:
    return dataclasses.replace(self, index=index)

  @property
  def summary_path(self) -> str:
    """Where this shard's own run writes its summary (the job's summary when there is one shard)."""
    if self.count == 1:
      return self.merged_summary_path
    return runner.default_summary_path(self.path)

  @property
  def merged_summary_path(self) -> str:
    return self.summary_override or runner.default_summary_path(self.output)


# ---- exclusive ownership ----


@contextlib.contextmanager
def exclusive(path: str) -> Iterator[None]:
  """Holds `<path>.lock` with flock for the duration; raises OutputBusy when another process holds it."""
  lock_path = f"{path}.lock"
  os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
  while True:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
      holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
      os.close(fd)
      if error.errno in (errno.EAGAIN, errno.EACCES):
        raise OutputBusy(f"{path} is being written by another job ({holder}); wait for it or choose another "
                         "output") from error
      raise
    if os.path.exists(lock_path) and os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
      break  # not a lock file that its previous holder unlinked while we opened it
    os.close(fd)
  os.ftruncate(fd, 0)
  os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
  try:
    yield
  finally:
    os.unlink(lock_path)
    os.close(fd)


# ---- shares ----


def unique_ids(rows: Iterable[runner.InputRow], id_field: str, limit: int = 0) -> list[runner.RecordId]:
  """The input's record ids in input order, each once (a repeated id is the same record), first `limit` rows."""
  rows = itertools.islice(rows, limit) if limit > 0 else rows
  return list(dict.fromkeys(runner.identify(row, id_field)[0] for row in rows))


def own_rows(rows: Iterable[runner.InputRow], shard: Shard, id_field: str, limit: int = 0
             ) -> Iterator[runner.InputRow]:
  """The rows of this shard's share, from the first `limit` rows of the input (the job's limit, not the shard's)."""
  rows = itertools.islice(rows, limit) if limit > 0 else rows
  return (row for row in rows if shard_of(runner.identify(row, id_field)[0], shard.count) == shard.index)


def written_ids(path: str) -> set[runner.RecordId]:
  """Ids in a shard file; a last line cut by a kill is not a record (the writer drops it on open)."""
  if not os.path.exists(path):
    return set()
  ids = set()
  with open(path, encoding="utf-8") as file:
    for line in file:
      if line.endswith("\n") and line.strip():
        record = json.loads(line)
        if not record.get("retry_on_resume"):  # the writer drops these on open, so a rerun runs them again
          ids.add(record["id"])
  return ids


# ---- the job ----


def run_job(shard: Shard, ids: list[runner.RecordId], finished: Finished, run_share: Callable[[Shard], Any],
            merge_key: Callable[[dict], runner.RecordId], summarize: Callable[[str, list[dict]], dict]) -> dict | None:
  """Runs this process's share of a job over the input records `ids` (unique, in input order), then merges.

  `run_share(shard)` does the work (loads the model, writes `shard.path` and `shard.summary_path`); it is skipped
  when the share is already finished. `merge_key(record)` is the input id an output record belongs to.
  `summarize(merged_path, shard_summaries)` makes the job's summary. Returns the job's summary on the process
  that wrote it (process 0, or the only one), else None.
  """
  with contextlib.ExitStack() as locks:
    if shard.index == 0 and shard.count > 1:
      locks.enter_context(exclusive(shard.output))
    locks.enter_context(exclusive(shard.path))
    done = written_ids(shard.path)
    mine = [i for i in ids if shard_of(i, shard.count) == shard.index]
    todo = sum(not finished(i, done) for i in mine)
    summary = None
    if todo:
      print(f"[shard {shard.index}/{shard.count}] {todo} of {len(mine)} records to do", flush=True)
      summary = run_share(shard)
    else:
      print(f"[shard {shard.index}/{shard.count}] share finished ({len(mine)} records)", flush=True)
    if shard.count == 1:
      return summary if summary is not None else _summary_of_finished(shard, summarize)
    distributed.barrier(f"retro_jax.shards:{os.path.abspath(shard.output)}", WAIT_FOR_PEERS_S)
    if shard.index != 0:
      return None
    merged = merge(shard, ids, finished, merge_key)
    shard_summaries = [_read_json(shard.sibling(i).summary_path) for i in range(shard.count)]
    summary = summarize(shard.output, [s for s in shard_summaries if s is not None])
    summary.update(processes=shard.count, records_per_process=merged)
    jsonl.write_json(shard.merged_summary_path, summary)
    print(runner.format_table(f"merged {shard.count} shards", summary), flush=True)
    return summary


def _summary_of_finished(shard: Shard, summarize: Callable[[str, list[dict]], dict]) -> dict:
  summary = summarize(shard.output, [])
  jsonl.write_json(shard.merged_summary_path, summary)
  return summary


def _read_json(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as file:
    return json.load(file)


def merge(shard: Shard, ids: list[runner.RecordId], finished: Finished,
          merge_key: Callable[[dict], runner.RecordId]) -> list[int]:
  """Writes every shard's records into `shard.output` in input order (atomically); returns records per shard.

  Reads each shard twice, holding only (key -> byte ranges) in memory, so a merge of long traces needs memory
  for the index, not for the records. Raises IncompleteShards when an input record is unfinished in every shard.
  """
  where: dict[runner.RecordId, list[tuple[int, int, int]]] = collections.defaultdict(list)
  written: set[runner.RecordId] = set()
  counts = []
  for index in range(shard.count):
    path = shard.sibling(index).path
    count = 0
    if os.path.exists(path):
      with open(path, "rb") as file:
        offset = 0
        for line in file:
          if line.endswith(b"\n") and line.strip():
            record = json.loads(line)
            where[merge_key(record)].append((index, offset, len(line)))
            written.add(record["id"])
            count += 1
          offset += len(line)
    counts.append(count)
  unfinished = [i for i in ids if not finished(i, written)]
  if unfinished:
    raise IncompleteShards(f"{len(unfinished)} input records are in no shard of {shard.output} "
                           f"(first: {unfinished[:3]}); rerun the job to finish them")
  extra = [key for key in where if key not in set(ids)]
  if extra:
    print(f"[merge] {len(extra)} shard records belong to no input record (first {extra[:3]}); kept at the end",
          flush=True)
  temporary = f"{shard.output}.merging"
  files = [open(shard.sibling(i).path, "rb") if counts[i] else None  # pylint: disable=consider-using-with
           for i in range(shard.count)]
  try:
    with open(temporary, "wb") as out:
      for key in itertools.chain(ids, extra):
        for index, offset, length in where.get(key, ()):
          files[index].seek(offset)
          out.write(files[index].read(length))
      out.flush()
      os.fsync(out.fileno())
  finally:
    for file in files:
      if file is not None:
        file.close()
  os.replace(temporary, shard.output)
  return counts

