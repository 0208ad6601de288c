"""`retro-jax sft` on a simulated pod (2 processes x 4 CPU devices) against the same job on 1 process x 8 devices.

Both runs see the same global batches (the input pipeline cuts batches for the job, not per process), on an
("fsdp": 8) mesh of the same shape, so they run the same SPMD program; only the all-reduces differ (gloo between
processes instead of in-process), which may reorder float32 sums. The pod job is stopped by SIGTERM on both
processes after its first checkpoint (JAX's preemption sync: both stop at the same step, save and exit 3), then
rerun to the end: it must resume from that checkpoint and checkpoint its final step.

Tolerance: float32 compute; 16 AdamW steps amplify a last-bit difference in a gradient by at most lr/eps per
step, so eps is 1e-3 here (as in test_train_sharded.py) and parameters must agree to atol 1e-6 (measured:
at most 2.4e-7 apart).
"""
import json
import pathlib
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from retro_jax.checkpoint import load_pretrained
from retro_jax.checkpoint.safetensors_io import SafetensorsDir
from retro_jax.tasks.trace_writer import write_task_files
from tests import pod
from tests.hf_fixtures import torch_logits

STEPS, CHECKPOINT_EVERY = 16, 4


def _argv(data: pathlib.Path, workdir: pathlib.Path) -> list[str]:
  return ["sft", "--config", str(pod.REPO_ROOT / "configs" / "tiny_reasoner_sft.py"),
          f"--config.data.train_path={data}", f"--config.workdir={workdir}", "--config.data.trace_field=trace",
          "--config.data.seq_len=128", "--config.data.eval_fraction=0.0", "--config.batch_size=8",
          f"--config.num_train_steps={STEPS}", f"--config.checkpoint_every_steps={CHECKPOINT_EVERY}",
          "--config.log_every_steps=4", "--config.eval_at_start=False", "--config.tensorboard=False",
          "--config.optim.eps=1e-3", "--config.optim.learning_rate=1e-3", "--config.export_dtype=float32"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("pod_train")
  data = write_task_files(root / "task", seed=5, n_train=200, n_eval=0)["train_traces"]
  cache = str(root / "jax_cache")
  pod.run(_argv(data, root / "one"), processes=1, devices=8, cache_dir=cache, log_dir=root / "logs" / "one")

  argv = _argv(data, root / "pod")
  with pod.launch(argv, processes=2, devices=4, cache_dir=cache, log_dir=root / "logs" / "pod-stopped") as job:
    first = root / "pod" / "checkpoints" / str(CHECKPOINT_EVERY)
    deadline = time.monotonic() + 600
    while not first.exists() and time.monotonic() < deadline and all(p.poll() is None for p in job.processes):
      time.sleep(0.05)  # signal soon after the first checkpoint, long before the last step
    assert first.exists(), job.log(0)[-3000:]
    for process in job.processes:
      process.send_signal(signal.SIGTERM)
    codes = job.wait(300)
  stopped = json.loads((root / "pod" / "summary.json").read_text())
  rerun = pod.run(argv, processes=2, devices=4, cache_dir=cache, log_dir=root / "logs" / "pod-rerun")
  return root, codes, stopped, rerun


def test_sigterm_stops_both_processes_at_a_checkpoint_and_the_rerun_resumes(runs):
  root, codes, stopped, rerun = runs
  assert codes == [3, 3]  # preempted, checkpoint saved
  assert stopped["preempted"] and CHECKPOINT_EVERY <= stopped["step"] < STEPS
  summary = json.loads((root / "pod" / "summary.json").read_text())
  assert summary["resumed_from"] == stopped["step"] and summary["step"] == STEPS and not summary["preempted"]
  assert f"resumed from step {stopped['step']}" in rerun.log(0)
  assert STEPS in ocp.utils.checkpoint_steps(str(root / "pod" / "checkpoints"))  # the final step is saved


def test_pod_params_equal_one_process_and_the_export_loads_in_transformers(runs):
  root = runs[0]
  one, two = SafetensorsDir(str(root / "one" / "export")), SafetensorsDir(str(root / "pod" / "export"))
  assert one.keys() == two.keys()
  moved = 0.0
  base = SafetensorsDir(pod.TINY_REASONER)
  for key in sorted(one.keys()):
    np.testing.assert_allclose(two.get(key), one.get(key), rtol=0, atol=1e-6, err_msg=key)
    moved = max(moved, float(np.max(np.abs(one.get(key) - base.get(key)))))
  assert moved > 1e-3  # the comparison is between trained weights, not two copies of the start

  # The export is the trained model: its logits in transformers equal our model's on the final checkpoint.
  import transformers  # pylint: disable=import-outside-toplevel

  model = load_pretrained(str(root / "pod" / "export"))
  path = root / "pod" / "checkpoints" / str(STEPS) / "state"
  checkpointer = ocp.StandardCheckpointer()
  saved = checkpointer.metadata(path)
  on_one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # saved over 2 processes, read here by one
  restored = checkpointer.restore(path, jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=on_one_device),
      getattr(saved, "item_metadata", saved).tree))
  graphdef, state = nnx.split(model)
  nnx.replace_by_pure_dict(state, jax.tree.map(np.asarray, restored["params"]))
  tokens = np.random.RandomState(0).randint(2, 400, (2, 24)).astype(np.int32)
  ours = np.asarray(nnx.merge(graphdef, state)(jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(24), (2, 24)))[0])
  theirs = torch_logits(transformers.Qwen2ForCausalLM.from_pretrained(str(root / "pod" / "export")), tokens)
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


def test_checkpoint_paths_keep_cloud_urls_and_make_local_paths_absolute(monkeypatch, tmp_path):
  from retro_jax.checkpoint.train_state import checkpoint_path  # pylint: disable=import-outside-toplevel

  assert str(checkpoint_path("gs://bucket/runs/r1/checkpoints")) == "gs://bucket/runs/r1/checkpoints"
  monkeypatch.chdir(tmp_path)
  assert str(checkpoint_path("runs/checkpoints")) == str(tmp_path / "runs" / "checkpoints")
