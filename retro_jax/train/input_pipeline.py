"""grain input pipeline: shuffled, repeated, per-process row batches whose iterator state is checkpointed.

Rows (packed SFT rows or DPO pairs, see data.py) are addressed by index, so the pipeline is a grain
`MapDataset` over row indices, shuffled with a per-epoch permutation (grain reshuffles on every pass of `repeat`)
and cut into global batches of indices; each process builds its slice of each batch (multi-host data
parallelism). The iterator's state is one integer, saved with the train state by orbax, so a
resumed run sees exactly the batches the uninterrupted run would have seen.

Batches come out as [grad_accum_steps, rows_per_micro_batch, ...]: the trainer scans over the leading axis
and the second one is the batch axis sharded over ("data", "fsdp").
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from retro_jax import sharding
from retro_jax.user_errors import UserError

Row = dict[str, np.ndarray]


def process_batch_size(global_batch: int, grad_accum_steps: int, mesh: Mesh) -> int:
  """Rows this process loads per optimizer step, after checking that the batch splits evenly."""
  if global_batch % grad_accum_steps:
    raise UserError(f"batch_size {global_batch} is not a multiple of grad_accum_steps {grad_accum_steps}")
  micro = global_batch // grad_accum_steps
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if micro % batch_shards:
    raise UserError(f"a micro-batch of {micro} rows (batch_size {global_batch} / grad_accum_steps "
                     f"{grad_accum_steps}) does not split over data x fsdp = {batch_shards} devices")
  if global_batch % jax.process_count():
    raise UserError(f"batch_size {global_batch} does not split over {jax.process_count()} processes")
  return global_batch // jax.process_count()


def train_dataset(num_rows: int, make_row: Callable[[int], Row], *, batch_per_process: int,
                  grad_accum_steps: int, seed: int, prefetch: int = 2) -> grain.IterDataset:
  """Endless shuffled batches of this process's rows; stop by step count, not by exhaustion.

  The shuffle and the batching happen on row indices, for the whole job: each global batch is the same
  whatever the number of processes, and process i builds rows [i * batch_per_process, (i + 1) *
  batch_per_process) of it. So a job on 2 hosts trains on exactly the batches of the same job on 1 host (which is
  what lets a multi-host run be checked against a single-host one), and only the rows a process feeds are built.
  """
  index, count = jax.process_index(), jax.process_count()
  global_batch = batch_per_process * count
  if num_rows < global_batch:
    raise UserError(f"{num_rows} training rows are fewer than one batch of {global_batch}",
                    "lower batch_size or add data")
  mine = slice(index * batch_per_process, (index + 1) * batch_per_process)
  ds = grain.MapDataset.range(num_rows).shuffle(seed=seed).repeat(None).batch(global_batch, drop_remainder=True)
  ds = ds.map(lambda indices: [make_row(int(i)) for i in indices[mine]]).map(
      lambda rows: {k: np.stack([r[k] for r in rows]).reshape(grad_accum_steps, -1, *rows[0][k].shape)
                    for k in rows[0]})
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))


def eval_batches(num_rows: int, make_row: Callable[[int], Row], batch_per_process: int) -> Iterator[Row]:
  """Every held-out row once, in order, as [batch_per_process, ...] batches.

  The last batch is filled with empty rows (all-zero: no segment, no loss), and every process yields the same
  number of batches, because each batch is one collective step.
  """
  index, count = jax.process_index(), jax.process_count()
  mine = list(range(index, num_rows, count))
  num_batches = math.ceil(math.ceil(num_rows / count) / batch_per_process)
  empty = {k: np.zeros_like(v) for k, v in make_row(0).items()}
  for b in range(num_batches):
    rows = [make_row(i) for i in mine[b * batch_per_process:(b + 1) * batch_per_process]]
    rows += [empty] * (batch_per_process - len(rows))
    yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def to_global(batch: Row, mesh: Mesh, batch_axis: int) -> dict[str, jax.Array]:
  """Process-local numpy batch -> global arrays with `batch_axis` sharded over ("data", "fsdp")."""
  out = {}
  for key, local in batch.items():
    axes = [None] * local.ndim
    axes[batch_axis] = "batch"
    target = NamedSharding(mesh, sharding.TRAIN_RULES.spec(axes))
    out[key] = jax.make_array_from_process_local_data(target, local)
  return out


def batch_shardings(example: Row, mesh: Mesh, batch_axis: int) -> dict[str, NamedSharding]:
  """The shardings `to_global` gives, for the jitted step's `in_shardings`."""
  return {k: NamedSharding(mesh, sharding.TRAIN_RULES.spec(
      [("batch" if i == batch_axis else None) for i in range(v.ndim)])) for k, v in example.items()}
