"""A train step sharded over 8 fake CPU devices matches the same step on one device.

Tolerance: float32 compute at "highest" matmul precision; sharding only reorders the sums of matmuls and
reductions, so loss and gradient norm agree to rtol 1e-5 and parameters after two AdamW steps to atol 1e-6.
AdamW's eps is 1e-3 here: with the usual 1e-8 the first update is lr * g / |g| and a gradient that is
rounding noise (|g| ~ 1e-9) moves its weight by ±lr either way; a large eps keeps the update linear in small
gradients, so the comparison tests the sharded arithmetic rather than the sign of noise.
"""
import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from retro_jax import sharding
from retro_jax.models.qwen2 import Qwen2ForCausalLM
from retro_jax.train import config as config_lib
from retro_jax.train import data, dpo, input_pipeline, sft, trainer
from tests.train_helpers import VOCAB_SIZE, tiny_config

SEQ_LEN, ROWS = 24, 8


def _examples(n: int, seed: int) -> list[data.SFTExample]:
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    prompt = rng.integers(3, VOCAB_SIZE, rng.integers(3, 7))
    completion = rng.integers(3, VOCAB_SIZE, rng.integers(3, 9))
    out.append(data.SFTExample(tokens=np.concatenate([prompt, completion]).astype(np.int32),
                               loss_mask=np.r_[np.zeros(len(prompt)), np.ones(len(completion))].astype(np.int32)))
  return out


def _setup(config: ml_collections.ConfigDict, mesh_shape) -> trainer.Setup:
  config.data.seq_len, config.batch_size, config.compute_dtype = SEQ_LEN, ROWS, "float32"
  config.optim.learning_rate, config.optim.warmup_steps, config.optim.weight_decay = 1e-3, 1, 0.1
  config.optim.eps = 1e-3
  return trainer.Setup(config=config, mesh=sharding.make_mesh(*mesh_shape), tokenizer=None,
                       model_config=tiny_config(VOCAB_SIZE, dtype="float32"), base_dir="")


def _two_steps(s: trainer.Setup, task: trainer.Task, host_params: dict):
  """Two optimizer steps from `host_params` on the mesh of `s`; returns (params, [sums of each step])."""
  graphdef, _, param_sh = trainer.init_params(s, abstract=True)
  params = jax.device_put(host_params, param_sh)
  schedule, tx = trainer.schedule_and_optimizer(s.config, total_steps=10)
  state_sh = trainer.state_shardings(tx, params, param_sh, s.mesh)
  state = jax.jit(trainer.initial_state_fn(tx, 0), out_shardings=state_sh)(params)
  accum = s.config.grad_accum_steps
  rows = [task.make_row(i) for i in range(ROWS)]
  batch = {k: np.stack([r[k] for r in rows]).reshape(accum, ROWS // accum, *rows[0][k].shape) for k in rows[0]}
  step = trainer.make_train_step(graphdef, task, tx, schedule, state_sh,
                                 input_pipeline.batch_shardings(batch, s.mesh, batch_axis=1), s.mesh)
  history = []
  for _ in range(2):
    state, sums = step(state, input_pipeline.to_global(batch, s.mesh, batch_axis=1))
    history.append(jax.device_get(sums))
  return jax.device_get(state["params"]), history


@pytest.fixture(scope="module")
def host_params():
  model = Qwen2ForCausalLM(tiny_config(VOCAB_SIZE, dtype="float32"), nnx.Rngs(3))
  return jax.device_get(nnx.to_pure_dict(nnx.state(model)))


def _sft_task(s):
  examples = _examples(3 * ROWS, seed=1)
  return sft.build_task(s, examples, [], stats={})


def _compare(reference, candidate):
  (ref_params, ref_hist), (params, hist) = reference, candidate
  for ref_sums, sums in zip(ref_hist, hist):
    for key in ("nll", "grad_norm", "loss_tokens"):
      np.testing.assert_allclose(sums[key], ref_sums[key], rtol=1e-5, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), params, ref_params)


@pytest.fixture(scope="module")
def sft_single_device(host_params):
  s = _setup(config_lib.sft_config(), (1, 1, 1))
  return _two_steps(s, _sft_task(s), host_params)


@pytest.mark.parametrize("mesh_shape,accum", [((1, 4, 2), 1), ((2, 2, 2), 2), ((1, 8, 1), 1)])
def test_sharded_sft_step_matches_single_device(mesh_shape, accum, host_params, sft_single_device):
  config = config_lib.sft_config()
  config.grad_accum_steps = accum  # accumulation over 2 micro-batches must equal one big batch, too
  s = _setup(config, mesh_shape)
  _compare(sft_single_device, _two_steps(s, _sft_task(s), host_params))


def test_sharded_dpo_step_matches_single_device(host_params):
  """The DPO step folds pairs [b, 2, t] into [2b, t] rows; that reshape must not care about the layout."""
  rng = np.random.default_rng(2)
  pairs = [data.DPOExample(prompt=rng.integers(3, VOCAB_SIZE, 5).astype(np.int32),
                           chosen=rng.integers(3, VOCAB_SIZE, 6).astype(np.int32),
                           rejected=rng.integers(3, VOCAB_SIZE, 8).astype(np.int32)) for _ in range(ROWS)]
  reference_logps = rng.normal(-30, 1, (ROWS, 2)).astype(np.float32)
  results = []
  for mesh_shape in ((1, 1, 1), (1, 4, 2)):
    config = config_lib.dpo_config()
    config.dpo.sft_weight, config.dpo.mask_shared_prefix, config.dpo.label_smoothing = 0.5, True, 0.1
    s = _setup(config, mesh_shape)
    task = dpo.build_task(s, pairs, [], stats={})
    task.set_extras({"train": reference_logps})
    results.append(_two_steps(s, task, host_params))
  (ref_params, ref_hist), (params, hist) = results
  for ref_sums, sums in zip(ref_hist, hist):
    for key in ("dpo", "sft_nll", "margin", "grad_norm"):
      np.testing.assert_allclose(sums[key], ref_sums[key], rtol=1e-5, atol=1e-6, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), params, ref_params)
