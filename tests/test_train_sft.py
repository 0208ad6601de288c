"""SFT end to end on a tiny model: the loss falls on an overfit set, metrics and TensorBoard events are written,
the export reloads in transformers with the same logits, and a SIGTERM-stopped run resumes exactly."""
import glob
import os
import signal

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from retro_jax.checkpoint import load_pretrained
from retro_jax.checkpoint.train_state import ResumeError
from retro_jax.tokenization import load_tokenizer
from retro_jax.train import run_sft, sft_config
from tests.train_helpers import arithmetic_records, shared_base_model_dir, write_jsonl


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  root = tmp_path_factory.mktemp("sft")
  base = shared_base_model_dir()
  train = write_jsonl(str(root / "train.jsonl"), arithmetic_records(16), extra_lines=("not json",))
  return root, base, train


def _config(workspace, name: str, **changes):
  root, base, train = workspace
  c = sft_config()
  c.model_dir, c.workdir, c.data.train_path = base, str(root / name), train
  c.compute_dtype = "float32"
  c.data.seq_len, c.batch_size = 64, 4
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 2, 2
  c.optim.learning_rate, c.optim.warmup_steps = 1e-2, 2
  c.log_every_steps = 5
  c.eval_at_start, c.export, c.tensorboard = False, False, False
  for key, value in changes.items():
    target = c
    *path, leaf = key.split(".")
    for part in path:
      target = target[part]
    target[leaf] = value
  return c


def test_sft_overfits_logs_metrics_and_exports_a_transformers_model(workspace):
  config = _config(workspace, "overfit", num_train_steps=30, eval_at_start=True, export=True, tensorboard=True,
                   peak_flops_per_device=1e11, **{"data.eval_path": workspace[2]})  # eval on the train set
  summary = run_sft(config)
  assert summary["data"]["bad_lines"] == 1 and summary["data"]["train_examples"] == 16
  assert summary["eval"]["loss"] < 0.3 * summary["initial_eval"]["loss"]
  for key in ("loss", "grad_norm", "learning_rate", "tokens_per_second", "mfu", "step_seconds"):
    assert summary["train"][key] > 0, key
  assert glob.glob(os.path.join(config.workdir, "tensorboard", "events.out.tfevents.*"))

  export = summary["export_dir"]
  for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "generation_config.json"):
    assert os.path.exists(os.path.join(export, name)), name
  load_tokenizer(export)
  import torch
  import transformers

  tokens = np.random.default_rng(0).integers(3, 90, (2, 12))
  reference = transformers.Qwen2ForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = reference(torch.tensor(tokens)).logits.numpy()
  ours = load_pretrained(export)(jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(12), (2, 12)))[0]
  np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-4, atol=1e-4)


def test_sigterm_stop_and_resume_reproduces_the_uninterrupted_run(workspace):
  steps = dict(num_train_steps=6, checkpoint_every_steps=2, export=True, log_every_steps=1)
  uninterrupted = run_sft(_config(workspace, "straight", **steps))

  def preempt_at_step_3(step, logged):
    del logged
    if step == 3:
      signal.raise_signal(signal.SIGTERM)

  config = _config(workspace, "interrupted", **steps)
  stopped = run_sft(config, on_step=preempt_at_step_3)
  assert stopped["preempted"] and stopped["step"] == 3
  assert sorted(os.listdir(os.path.join(config.workdir, "checkpoints"))) == ["2", "3"]
  resumed = run_sft(config)
  assert not resumed["preempted"] and resumed["step"] == 6
  assert resumed["resumed_from"] == 3 and uninterrupted["resumed_from"] is None
  assert resumed["train"]["loss"] == uninterrupted["train"]["loss"]
  ours, theirs = (load_file(os.path.join(s["export_dir"], "model.safetensors")) for s in (resumed, uninterrupted))
  assert ours.keys() == theirs.keys()
  for key in ours:
    np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)  # exact: same programs, same data

  with pytest.raises(ResumeError, match="batch_size"):
    run_sft(_config(workspace, "interrupted", **dict(steps, batch_size=8, num_train_steps=8)))
