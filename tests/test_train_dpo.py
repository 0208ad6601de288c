"""DPO end to end on a tiny model: reference precompute, rewards that learn the preference, exact resume
(the reference log-probs come back from the checkpoint). Train-set metrics only, to keep compiles few."""
import os
import signal

import numpy as np
import pytest
from safetensors.numpy import load_file

from retro_jax.train import dpo_config, run_dpo
from tests.train_helpers import arithmetic_records, shared_base_model_dir, write_jsonl


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  root = tmp_path_factory.mktemp("dpo")
  base = shared_base_model_dir()
  pairs = []
  for record in arithmetic_records(16, seed=1):  # Retro-Search-like pairs: the re-verification is the waste
    step = record["trace"].split("\n")[1]
    pairs.append({"id": record["id"], "question": record["question"], "chosen": record["trace"],
                  "rejected": record["trace"].replace(step, f"{step}\n\nWait, {step}")})
  train = write_jsonl(str(root / "pairs.jsonl"), pairs, extra_lines=('{"question": "1+1?", "chosen": "x"}',))
  return root, base, train


def _config(workspace, name: str, steps: int):
  root, base, train = workspace
  c = dpo_config()
  c.model_dir, c.workdir, c.data.train_path = base, str(root / name), train
  c.compute_dtype, c.data.seq_len, c.batch_size, c.num_train_steps = "float32", 40, 4, steps
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 2, 1
  c.optim.learning_rate, c.optim.warmup_steps = 1e-2, 1
  c.dpo.beta, c.dpo.label_smoothing, c.dpo.mask_shared_prefix, c.dpo.sft_weight = 0.5, 0.05, True, 0.2
  c.checkpoint_every_steps, c.log_every_steps, c.tensorboard = 4, 1, False
  return c


def test_dpo_learns_the_preference_and_resumes_exactly(workspace):
  straight = run_dpo(_config(workspace, "straight", steps=8))
  assert straight["data"]["bad_lines"] == 1 and straight["data"]["train_rows"] == 16
  # Step 1's metrics come from the initial policy, which *is* the reference: zero margin, loss log 2 (up to the
  # float32 rounding of two differently compiled programs, the scored forward and the one under grad).
  first, last = straight["history"][0], straight["history"][-1]
  assert abs(first["reward_margin"]) < 1e-5 and first["dpo_loss"] == pytest.approx(np.log(2), rel=1e-6)
  assert last["reward_accuracy"] == 1.0 and last["reward_margin"] > 0.5 and last["dpo_loss"] < 0.5
  assert last["sft_loss"] < first["sft_loss"]

  config = _config(workspace, "interrupted", steps=8)
  stopped = run_dpo(config, on_step=lambda step, _: step == 5 and signal.raise_signal(signal.SIGTERM))
  assert stopped["preempted"] and stopped["step"] == 5
  resumed = run_dpo(config)  # takes the reference log-probs from the checkpoint, not from a new pass
  assert resumed["train"]["loss"] == straight["train"]["loss"]
  ours, theirs = (load_file(os.path.join(s["export_dir"], "model.safetensors")) for s in (resumed, straight))
  for key in ours:
    np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
