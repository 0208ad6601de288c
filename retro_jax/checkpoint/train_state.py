"""orbax train-state checkpoints: params, optimizer state, step and rng, the data iterator, and run metadata.

One orbax step directory holds every piece needed to continue a run exactly:
- `state`: the sharded pytree {step, params, opt_state, rng}, restored straight onto its target shardings;
- `data`: the grain iterator's state (per process), so the resumed run reads the next batch, not the first;
- `extras`: arrays a trainer derives once and must not recompute differently (DPO's reference log-probs);
- `meta`: a JSON fingerprint of what the run was trained on (rows, batch, seed). Resuming against a different
  dataset or batch layout would silently read different batches, so it is an error instead.

Saves are asynchronous (training continues while the previous step is written) except the one at a
preemption, which waits, because the process is about to be killed.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import grain
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)


class ResumeError(ValueError):
  """A checkpoint that does not belong to this run's data or batch layout."""


def checkpoint_path(directory: str) -> epath.Path:
  """`directory` as a path orbax can use on every host: a cloud URL (gs://bucket/run) stays a URL (epath talks to
  the object store), a local or mounted path becomes absolute."""
  if "://" in directory:
    return epath.Path(directory)
  return epath.Path(os.path.abspath(directory))


class TrainCheckpointer:
  """CheckpointManager for one training run under `directory` (every `save_every_steps`, `max_to_keep` kept)."""

  def __init__(self, directory: str, *, save_every_steps: int, max_to_keep: int = 2, async_save: bool = True):
    self.save_every_steps = save_every_steps
    self.manager = ocp.CheckpointManager(
        checkpoint_path(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=async_save),
        item_names=("state", "data", "extras", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def due(self, step: int) -> bool:
    return self.save_every_steps > 0 and step % self.save_every_steps == 0

  def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator, meta: dict,
           extras: dict[str, Any] | None = None, *, wait: bool = False) -> None:
    """Saves everything for `step` (async unless `wait`: a preempted process must finish writing)."""
    args = {"state": ocp.args.StandardSave(state), "data": grain.checkpoint.CheckpointSave(data_iterator),
            "meta": ocp.args.JsonSave(meta)}
    if extras:
      args["extras"] = ocp.args.StandardSave(extras)
    self.manager.save(step, args=ocp.args.Composite(**args), force=True)
    if wait:
      self.manager.wait_until_finished()

  def restore(self, step: int, abstract_state: Any, data_iterator: grain.DatasetIterator, meta: dict) -> Any:
    """Restores the state onto the shardings of `abstract_state`, and the iterator in place.

    Raises ResumeError when the saved fingerprint differs from `meta` (other data, batch or seed).
    """
    saved_meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    changed = {k: (saved_meta.get(k), v) for k, v in meta.items() if saved_meta.get(k) != v}
    if changed:
      raise ResumeError(f"checkpoint step {step} in {self.manager.directory} was written for a different run "
                        f"(saved vs now: {changed}); use a fresh workdir or the original settings")
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iterator)))
    log.info("restored step %d from %s", step, self.manager.directory)
    return restored["state"]

  def restore_extras(self, step: int, template: dict[str, Any]) -> dict[str, Any]:
    """The `extras` saved at `step`, as host arrays shaped like `template`."""
    return self.manager.restore(step, args=ocp.args.Composite(extras=ocp.args.StandardRestore(template)))["extras"]

  def reached_preemption(self, step: int) -> bool:
    """True at the sync point after a multi-host preemption notice (JAX's preemption service)."""
    return self.manager.reached_preemption(step)

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

