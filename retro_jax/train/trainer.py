"""The training loop SFT and DPO share: mesh, float32 master weights, jitted donated step, eval, metrics,
checkpoints with exact resume and preemption saves, and the final HF export.

What differs between the two objectives is a `Task` (rows, loss, metrics); everything else lives here.

Train state, a plain pytree so orbax and jit see arrays only: {"step", "params" (nnx pure dict, float32),
"opt_state" (optax), "rng"}. The model graph is rebuilt inside the step with `nnx.merge(graphdef, params)`;
its layers cast the float32 master weights to the compute dtype (bfloat16) at each use, so gradients and the
AdamW update stay in float32. The state is donated to the step: params and optimizer state are updated in
place, which is what lets a model use (almost) all of device memory.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from retro_jax import sharding, user_errors
from retro_jax.checkpoint import hf
from retro_jax.checkpoint.train_state import TrainCheckpointer
from retro_jax.models.config import Qwen2Config
from retro_jax.models.qwen2 import Qwen2ForCausalLM
from retro_jax.tokenization import Tokenizer, load_tokenizer_for
from retro_jax.train import input_pipeline, metrics as metrics_lib, optim

log = logging.getLogger(__name__)
Row = dict[str, np.ndarray]
Sums = dict[str, jax.Array]
# Files an exported model directory needs besides weights and config.json, copied from the base model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


@dataclasses.dataclass
class Task:
  """What one objective supplies to the shared loop.

  Batches are dicts of [grad_accum_steps, rows, ...] arrays (eval batches: [rows, ...]). `loss` sees one
  micro-batch and the `totals` of the whole step batch, and returns (normalised loss, metric sums); sums from
  micro-batches and eval batches are added, and `summarize` turns them into the logged means.
  """

  name: str
  num_rows: int
  make_row: Callable[[int], Row]
  num_eval_rows: int
  make_eval_row: Callable[[int], Row]
  totals: Callable[[dict], Sums]
  loss: Callable[[Qwen2ForCausalLM, dict, Sums], tuple[jax.Array, Sums]]
  eval_sums: Callable[[Qwen2ForCausalLM, dict], Sums]
  summarize: Callable[[dict[str, float]], dict[str, float]]
  data_stats: dict[str, int]
  # DPO: per-row arrays derived once from the initial params (reference log-probs), saved with every
  # checkpoint and taken from there on resume. `extras_template` gives their shapes, for the restore.
  prepare: Callable[["Setup", Any, dict], dict[str, np.ndarray]] | None = None
  set_extras: Callable[[dict[str, np.ndarray]], None] | None = None
  extras_template: dict[str, np.ndarray] | None = None


@dataclasses.dataclass
class Setup:
  config: ml_collections.ConfigDict
  mesh: Mesh
  tokenizer: Tokenizer | None  # None where rows are built without text (tests, benchmarks)
  model_config: Qwen2Config
  base_dir: str  # where tokenizer / generation config files come from


def setup(config: ml_collections.ConfigDict) -> Setup:
  """Mesh, tokenizer and model config (with master/compute dtypes), before any weights are touched."""
  if not config.workdir:
    raise user_errors.UserError("config.workdir is not set",
                                "pass --config.workdir=DIR (checkpoints, TensorBoard events and the export go there)")
  user_errors.check_input_file(config.data.train_path, "--config.data.train_path")
  if config.data.eval_path:
    user_errors.check_input_file(config.data.eval_path, "--config.data.eval_path")
  user_errors.check_choice("--config.init", config.init, ("pretrained", "scratch"))
  user_errors.check_choice("--config.remat", config.remat, ("none", "dots", "full"))
  user_errors.check_choice("--config.optim.decay", config.optim.decay, ("cosine", "linear", "constant"))
  if config.init == "pretrained":
    user_errors.check_model_dir(config.model_dir, "--config.model_dir")
  base_dir = config.tokenizer_dir or config.model_dir
  if not base_dir:
    raise user_errors.UserError("no tokenizer: config.model_dir and config.tokenizer_dir are both empty",
                                "pass --config.tokenizer_dir=DIR (init='scratch') or --config.model_dir=DIR")
  tokenizer = load_tokenizer_for(base_dir, config)
  if config.init == "pretrained":
    model_config = Qwen2Config.from_pretrained(config.model_dir, param_dtype=config.param_dtype,
                                               dtype=config.compute_dtype)
  else:
    arch = config.model.to_dict()
    arch["vocab_size"] = arch["vocab_size"] or tokenizer.vocab_size
    model_config = Qwen2Config(**arch, bos_token_id=tokenizer.hf.bos_token_id,
                               eos_token_ids=tokenizer.eos_token_ids, param_dtype=config.param_dtype,
                               dtype=config.compute_dtype)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  return Setup(config=config, mesh=mesh, tokenizer=tokenizer, model_config=model_config, base_dir=base_dir)


def init_params(s: Setup, abstract: bool) -> tuple[nnx.GraphDef, dict, dict]:
  """(graphdef, params pure dict, param shardings). Abstract when a checkpoint will provide the values."""
  cfg = s.model_config
  abstract_model = nnx.eval_shape(lambda: Qwen2ForCausalLM(cfg, nnx.Rngs(s.config.seed)))
  graphdef, abstract_state = nnx.split(abstract_model)
  shardings = nnx.to_pure_dict(sharding.state_shardings(abstract_state, s.mesh, sharding.TRAIN_RULES))
  if abstract:
    params = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                          nnx.to_pure_dict(abstract_state), shardings)
  elif s.config.init == "pretrained":
    model = hf.load_pretrained(s.config.model_dir, mesh=s.mesh, rules=sharding.TRAIN_RULES,
                               param_dtype=s.config.param_dtype, dtype=s.config.compute_dtype)
    params = nnx.to_pure_dict(nnx.state(model))
  else:
    init = jax.jit(lambda: nnx.to_pure_dict(nnx.state(Qwen2ForCausalLM(cfg, nnx.Rngs(s.config.seed)))),
                   out_shardings=shardings)
    params = init()
  return graphdef, params, shardings


def schedule_and_optimizer(config: ml_collections.ConfigDict, total_steps: int):
  o = config.optim
  warmup = o.warmup_steps if o.warmup_steps > 0 else int(round(o.warmup_ratio * total_steps))
  schedule = optim.make_schedule(o.learning_rate, total_steps, warmup_steps=warmup, decay=o.decay,
                                 min_lr_ratio=o.min_lr_ratio)
  tx = optim.make_optimizer(schedule, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps,
                            max_grad_norm=o.max_grad_norm)
  return schedule, tx


def state_shardings(tx, params, param_shardings, mesh: Mesh) -> dict:
  """Shardings of the train state: optimizer moments follow their params, scalars are replicated."""
  replicated = NamedSharding(mesh, PartitionSpec())
  opt = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, params), param_shardings,
                              transform_non_params=lambda _: replicated)
  return {"step": replicated, "params": param_shardings, "opt_state": opt, "rng": replicated}


def initial_state_fn(tx: optax.GradientTransformation, seed: int) -> Callable[[dict], dict]:
  """params -> the step-0 train state (jit it with the state shardings as out_shardings)."""
  def init(params):
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "rng": jax.random.key(seed)}
  return init


def make_train_step(graphdef, task: Task, tx, schedule, state_sh, batch_sh, mesh: Mesh):
  """jit(state, batch) -> (state, metric sums), the state donated, traced under the training rules."""
  def step_fn(state, batch):
    with sharding.use_rules(mesh, sharding.TRAIN_RULES):
      totals = task.totals(batch)
      grads, sums = optim.accumulate_gradients(
          lambda params, micro: task.loss(nnx.merge(graphdef, params), micro, totals), state["params"], batch)
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      params = optax.apply_updates(state["params"], updates)
    sums = dict(sums, grad_norm=optax.tree.norm(grads), learning_rate=schedule(state["step"]))
    # The rng is advanced every step and checkpointed, so a stochastic term added to a loss resumes exactly.
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
                 "rng": jax.random.split(state["rng"])[0]}
    return new_state, sums

  return jax.jit(step_fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=(0,))


def make_eval_step(graphdef, task: Task, param_shardings, batch_shardings, mesh: Mesh):
  def eval_fn(params, batch):
    with sharding.use_rules(mesh, sharding.TRAIN_RULES):
      return task.eval_sums(nnx.merge(graphdef, params), batch)

  return jax.jit(eval_fn, in_shardings=(param_shardings, batch_shardings))


def eval_batch_size(config) -> int:
  return config.eval_batch_size or config.batch_size // config.grad_accum_steps


def evaluate(eval_step, params, task: Task, s: Setup) -> dict[str, float] | None:
  """Summarised metrics over every held-out row (None when there is no held-out split)."""
  if not task.num_eval_rows:
    return None
  per_process = input_pipeline.process_batch_size(eval_batch_size(s.config), 1, s.mesh)
  total: dict[str, float] = {}
  for batch in input_pipeline.eval_batches(task.num_eval_rows, task.make_eval_row, per_process):
    sums = jax.device_get(eval_step(params, input_pipeline.to_global(batch, s.mesh, batch_axis=0)))
    for k, v in sums.items():
      total[k] = total.get(k, 0.0) + float(v)
  return task.summarize(total)


class _PreemptionFlag:
  """SIGTERM (TPU maintenance / preemption) -> save at the end of the current step, then stop.

  Single-process only: a multi-host job relies on JAX's preemption service instead (which owns SIGTERM there)
  through `TrainCheckpointer.reached_preemption`, so all hosts stop at the same step.
  """

  def __init__(self):
    self.requested = False
    self.previous = None
    if jax.process_count() == 1:
      self.previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    log.warning("SIGTERM: saving a checkpoint after this step, then stopping")
    self.requested = True

  def restore(self) -> None:
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)


def total_steps(config, num_rows: int) -> int:
  if config.num_train_steps > 0:
    return config.num_train_steps
  return max(1, int(config.num_epochs * num_rows // config.batch_size))


def fit(s: Setup, task: Task, on_step: Callable[[int, dict | None], None] | None = None) -> dict[str, Any]:
  """Trains `task` to the configured number of steps (resuming from <workdir>/checkpoints if it holds one).

  `on_step(step, logged)` is called after every step; `logged` is the metrics dict on logging steps, else None.
  Returns the run summary: final and initial eval metrics, the last logged train metrics, throughput, MFU,
  the export directory, data statistics, the metric history, the checkpoint step it resumed from (None for a
  fresh run), and `preempted` when SIGTERM stopped the run.
  """
  config = s.config
  steps = total_steps(config, task.num_rows)
  schedule, tx = schedule_and_optimizer(config, steps)
  ckpt = TrainCheckpointer(os.path.join(config.workdir, "checkpoints"), save_every_steps=config.checkpoint_every_steps,
                           max_to_keep=config.keep_checkpoints, async_save=config.async_checkpointing)
  meta = {"task": task.name, "num_rows": task.num_rows, "batch_size": config.batch_size,
          "grad_accum_steps": config.grad_accum_steps, "seed": config.seed, "seq_len": config.data.seq_len,
          "processes": jax.process_count()}
  flag = _PreemptionFlag()
  writer = metrics_lib.MetricsWriter(os.path.join(config.workdir, "tensorboard") if config.tensorboard else None,
                                     task.name)
  try:
    return _train(s, task, ckpt, meta, schedule, tx, steps, flag, writer, on_step)
  finally:
    flag.restore()
    ckpt.close()
    writer.close()


def _start(s: Setup, task: Task, ckpt: TrainCheckpointer, meta: dict, tx, resume_step: int | None):
  """(graphdef, state, state shardings, param shardings, data iterator, extras), fresh or from a checkpoint."""
  config = s.config
  graphdef, params, param_shardings = init_params(s, abstract=resume_step is not None)
  state_sh = state_shardings(tx, params, param_shardings, s.mesh)
  init_state = initial_state_fn(tx, config.seed)
  # Per-row extras first: the data iterator may start building rows (in its prefetch thread) once it exists.
  if resume_step is None:
    extras = task.prepare(s, graphdef, params) if task.prepare else None
  else:
    extras = ckpt.restore_extras(resume_step, task.extras_template) if task.extras_template else None
  if task.set_extras and extras:
    task.set_extras(extras)
  batch_per_process = input_pipeline.process_batch_size(config.batch_size, config.grad_accum_steps, s.mesh)
  train_iter = iter(input_pipeline.train_dataset(task.num_rows, task.make_row, batch_per_process=batch_per_process,
                                                 grad_accum_steps=config.grad_accum_steps, seed=config.seed))
  if resume_step is None:
    state = jax.jit(init_state, out_shardings=state_sh, donate_argnums=(0,))(params)
  else:
    abstract_state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                  jax.eval_shape(init_state, params), state_sh)
    state = ckpt.restore(resume_step, abstract_state, train_iter, meta)
    print(f"[{task.name}] resumed from step {resume_step}", flush=True)
  return graphdef, state, state_sh, param_shardings, train_iter, extras


def _train(s: Setup, task: Task, ckpt: TrainCheckpointer, meta: dict, schedule, tx, steps: int,
           flag: _PreemptionFlag, writer: metrics_lib.MetricsWriter, on_step) -> dict[str, Any]:
  config = s.config
  resume_step = ckpt.latest_step()
  graphdef, state, state_sh, param_sh, train_iter, extras = _start(s, task, ckpt, meta, tx, resume_step)
  micro_batch = {k: v[None, None] for k, v in task.make_row(0).items()}  # [accum, rows, ...]
  train_step = make_train_step(graphdef, task, tx, schedule, state_sh,
                               input_pipeline.batch_shardings(micro_batch, s.mesh, batch_axis=1), s.mesh)
  row_batch = {k: v[None] for k, v in task.make_row(0).items()}  # [rows, ...]
  eval_step = make_eval_step(graphdef, task, param_sh,
                             input_pipeline.batch_shardings(row_batch, s.mesh, batch_axis=0), s.mesh)
  flops_per_token = metrics_lib.training_flops_per_token(s.model_config, config.data.seq_len)
  peak = config.peak_flops_per_device or metrics_lib.peak_flops_per_device()
  summary: dict[str, Any] = {"data": task.data_stats, "total_steps": steps, "history": [], "preempted": False,
                             "resumed_from": resume_step}
  start = int(jax.device_get(state["step"]))
  if config.eval_at_start and resume_step is None:
    summary["initial_eval"] = evaluate(eval_step, state["params"], task, s)
    if summary["initial_eval"]:
      writer.write(start, summary["initial_eval"], split="eval")

  # Throughput: from the end of this run's first step (which compiles), over the steps after it, minus the time
  # spent in evals and checkpoint saves.
  pending, timer, paused, timed_tokens, timed_steps, first_pending = [], None, 0.0, 0.0, 0, True
  for step in range(start, steps):
    batch = input_pipeline.to_global(next(train_iter), s.mesh, batch_axis=1)
    state, sums = train_step(state, batch)
    pending.append(sums)
    done = step + 1
    if timer is None:
      jax.block_until_ready(state["step"])
      timer = time.perf_counter()
    logged = None
    if (config.log_every_steps > 0 and done % config.log_every_steps == 0) or done == steps:
      logged, tokens = _log_interval(pending, task)
      tokens, first_pending, pending = (tokens[1:] if first_pending else tokens), False, []
      timed_tokens, timed_steps = timed_tokens + sum(tokens), timed_steps + len(tokens)
      elapsed = time.perf_counter() - timer - paused
      logged["tokens_per_second"] = timed_tokens / elapsed if timed_steps else None
      logged["step_seconds"] = elapsed / timed_steps if timed_steps else None
      logged["mfu"] = logged["tokens_per_second"] and metrics_lib.mfu(
          logged["tokens_per_second"], flops_per_token, s.mesh.devices.size, peak)
      writer.write(done, logged)
      summary["history"].append(dict(logged, step=done))
      summary["train"] = logged
    if on_step:
      on_step(done, logged)
    preempted = flag.requested or ckpt.reached_preemption(done)
    eval_due = config.eval_every_steps and done % config.eval_every_steps == 0 and done < steps
    # The final step is always saved: the export may still fail, and a rerun must not retrain the tail.
    save_due = ckpt.due(done) or preempted or done == steps
    if eval_due or save_due:
      jax.block_until_ready(state["step"])  # the step's own time stays on the training clock
      pause_start = time.perf_counter()
      if eval_due and (result := evaluate(eval_step, state["params"], task, s)):
        writer.write(done, result, split="eval")
        summary["history"].append(dict(result, step=done, split="eval"))
      if save_due:
        ckpt.save(done, state, train_iter, meta, extras, wait=preempted)
      paused += time.perf_counter() - pause_start
    if preempted:
      print(f"[{task.name}] stopped at step {done} on preemption; checkpoint saved", flush=True)
      return dict(summary, preempted=True, step=done)
  summary["step"] = steps
  summary["eval"] = evaluate(eval_step, state["params"], task, s)
  if summary["eval"]:
    writer.write(steps, summary["eval"], split="eval")
  if config.export:
    summary["export_dir"] = export(s, nnx.merge(graphdef, state["params"]))
  return summary


def _log_interval(pending: list[Sums], task: Task) -> tuple[dict[str, float], list[float]]:
  """Means over the steps since the last log; returns (metrics, trained tokens of each step)."""
  fetched = jax.device_get(pending)
  totals: dict[str, float] = {}
  for sums in fetched:
    for k, v in sums.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  logged = task.summarize(totals)
  logged["grad_norm"] = totals["grad_norm"] / len(fetched)
  logged["learning_rate"] = float(fetched[-1]["learning_rate"])
  return logged, [float(f["tokens"]) for f in fetched]


def export(s: Setup, model: Qwen2ForCausalLM) -> str:
  """HF directory of the trained model (+ tokenizer files and generation_config.json of the base model).

  In a multi-host job every process calls it and process 0 writes the directory (it must be on storage that
  process reads, and it is written by one host only)."""
  config = s.config
  out = config.export_dir or os.path.join(config.workdir, "export")
  dtype = config.export_dtype or _base_dtype(config)
  hf.save_pretrained(model, out, dtype=dtype)  # every process takes part in its gathers; process 0 writes
  if jax.process_index() != 0:
    return out
  for name in TOKENIZER_FILES:
    sources = [os.path.join(d, name) for d in (s.base_dir, config.model_dir) if d]
    found = [p for p in sources if os.path.exists(p)]
    if found:
      shutil.copyfile(found[0], os.path.join(out, name))
  if not os.path.exists(os.path.join(out, "generation_config.json")):
    tok = s.tokenizer
    ids = list(tok.eos_token_ids)
    with open(os.path.join(out, "generation_config.json"), "w", encoding="utf-8") as f:
      json.dump({"bos_token_id": tok.hf.bos_token_id, "eos_token_id": ids[0] if len(ids) == 1 else ids,
                 "pad_token_id": tok.pad_token_id}, f, indent=2)
  print(f"[export] wrote {out} ({dtype})", flush=True)
  return out


def _base_dtype(config) -> str:
  if config.init == "scratch":
    return "float32"
  with open(os.path.join(config.model_dir, "config.json"), encoding="utf-8") as f:
    raw = json.load(f)
  dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
  return dtype if dtype in ("float32", "bfloat16", "float16") else "float32"

