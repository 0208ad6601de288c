"""The programs a command runs, lowered from abstract inputs by the project's own builders, then compiled for a
TPU topology and measured: per-device memory (XLA's buffer assignment) and FLOPs / bytes (XLA's cost model).

- sft / dpo: `trainer.make_train_step` (loss + grad over the micro-batches, the optimizer update included), one
  micro-batch's loss + grad alone (`optim.accumulate_gradients` on one micro-batch) and `trainer.make_eval_step`,
  with the Task of `sft.build_task` / `dpo.build_task` and the train state's shardings from
  `trainer.state_shardings`; no data is read and no weights exist.
- generate / search / eval: `Qwen2Engine.lowered_programs`, the programs `warmup` compiles, over abstract
  params with the serving shardings.

XLA's cost model counts a loop body once. The loops that carry most of a program's work have a trip count the
plan knows, so it scales them: the scanned layers (each program is compiled again, for cost only, on a 1-layer
and a 2-layer unrolled model: LayerCost), gradient accumulation (`flops = update + n x (step - update)`, the
update compiled alone to know its share) and the decode steps of `generate`. Loops it cannot attribute (the
loss's logits chunks, top-p bisection) are counted in `uncounted_loops`: the program's FLOPs are a lower bound
then. A Pallas kernel (splash attention on TPU) is counted by the cost estimate it declares.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
import optax
from flax import nnx

from retro_jax import sharding
from retro_jax.models.config import Qwen2Config
from retro_jax.models.qwen2 import Qwen2ForCausalLM


@dataclasses.dataclass
class ProgramPlan:
  """One compiled program, per device. total = arguments + outputs - donated (aliased) + temp + resident, where
  resident is what stays in memory from other programs while this one runs (the optimizer state during eval,
  the decode state during prefill)."""

  name: str
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  resident_bytes: int
  total_bytes: int
  hbm_bytes: float
  flops: float | None  # None where the compiler refused the program (over HBM)
  bytes_accessed: float | None
  roofline_s: float | None
  compile_s: float
  loop_scale: int = 1  # the trip count applied to XLA's cost (grad accumulation, decode steps)
  uncounted_loops: int = 0

  @property
  def fits(self) -> bool:
    return self.total_bytes <= self.hbm_bytes


@dataclasses.dataclass(frozen=True)
class Device:
  """What the roofline divides by, per device (a v4 AOT device is one of a chip's two TensorCores)."""

  hbm_bytes: float
  hbm_bytes_per_s: float
  peak_flops: float


def per_device_bytes(tree: Any) -> int:
  """Bytes one device holds of a pytree of sharded ShapeDtypeStructs (or arrays)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
    key = jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
    total += math.prod(shape) * (8 if key else np.dtype(leaf.dtype).itemsize)  # a threefry key is 2 x uint32
  return total


def _cost(compiled) -> tuple[float, float]:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def measure(name: str, lowered, device: Device, *, arguments: Any = (), resident_bytes: int = 0,
            loop_scale: int = 1, outside_loop: tuple[float, float] = (0.0, 0.0), scaled_loops: int = 0,
            cost: "LayerCost | None" = None) -> ProgramPlan:
  """Compiles `lowered` and reads its memory and cost. `cost` (the layers' loop counted, see LayerCost) replaces
  XLA's count of the scanned program. With `loop_scale` n > 1, the cost inside the one loop XLA counted once is
  multiplied: cost = outside + n x (xla - outside). `arguments` (the abstract inputs, with shardings) give the
  argument bytes when the compiler refuses a program that cannot fit."""
  start = time.perf_counter()
  compiled, over = _compile_unless_over_hbm(lowered)
  if compiled is None:
    return _refused(name, arguments, device, over, resident_bytes, time.perf_counter() - start)
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  flops, accessed = _cost(compiled) if cost is None else (cost.flops, cost.bytes_accessed)
  if loop_scale > 1:
    flops = outside_loop[0] + loop_scale * max(flops - outside_loop[0], 0.0)
    accessed = outside_loop[1] + loop_scale * max(accessed - outside_loop[1], 0.0)
  loops = _loops(compiled) if cost is None else cost.loops
  arg, out, alias = memory.argument_size_in_bytes, memory.output_size_in_bytes, memory.alias_size_in_bytes
  temp = memory.temp_size_in_bytes + memory.generated_code_size_in_bytes
  roofline = max(flops / device.peak_flops, accessed / device.hbm_bytes_per_s)
  return ProgramPlan(name=name, argument_bytes=arg, output_bytes=out, alias_bytes=alias, temp_bytes=temp,
                     resident_bytes=resident_bytes, total_bytes=arg + out - alias + temp + resident_bytes,
                     hbm_bytes=device.hbm_bytes, flops=flops, bytes_accessed=accessed, roofline_s=roofline,
                     compile_s=compile_s, loop_scale=loop_scale, uncounted_loops=max(loops - scaled_loops, 0))


def _loops(compiled) -> int:
  return compiled.as_text().count(" while(")


@dataclasses.dataclass(frozen=True)
class LayerCost:
  """A program's cost with its layers counted: XLA counts the scanned layers' loop body once, so the plan
  compiles the program again for a 1-layer model (cost a + b) and a 2-layer model with the scan unrolled
  (a + 2b); L layers cost a + L x b. `loops`: the while loops left in the unrolled program (what stays
  uncounted)."""

  flops: float
  bytes_accessed: float
  loops: int


def layer_costs(lowered_programs: Callable[[Qwen2Config], Iterator[tuple[str, Any]]], model_config: Qwen2Config
                ) -> dict[str, LayerCost]:
  """LayerCost per program name of `lowered_programs(model_config)` (which yields (name, lowered)), from the two
  shallow compiles; empty for a 1-layer model, where XLA's count is already complete."""
  layers = model_config.num_layers
  if layers == 1:
    return {}

  def costs(cfg: Qwen2Config) -> dict[str, tuple[float, float, int]]:
    """(flops, bytes accessed, while loops) per program that compiles (a shallow misfit has none)."""
    out = {}
    for name, lowered in lowered_programs(cfg):
      compiled, _ = _compile_unless_over_hbm(lowered)
      if compiled is not None:
        out[name] = (*_cost(compiled), _loops(compiled))
    return out

  one, two = costs(model_config.replace(num_layers=1)), costs(model_config.replace(num_layers=2, scan_unroll=2))
  return {name: LayerCost(flops=one[name][0] + (layers - 1) * (two[name][0] - one[name][0]),
                          bytes_accessed=one[name][1] + (layers - 1) * (two[name][1] - one[name][1]),
                          loops=two[name][2])
          for name in one.keys() & two.keys()}


def _compile_unless_over_hbm(lowered) -> tuple[Any, int | None]:
  """(the compiled program, None), or (None, its temp bytes) when the TPU compiler refuses it for HBM. Other
  compile errors are bugs and propagate."""
  try:
    return lowered.compile(), None
  except jax.errors.JaxRuntimeError as e:
    over = _over_hbm(str(e))
    if over is None:
      raise
    return None, over


def _over_hbm(message: str) -> int | None:
  """The temp bytes of XLA's "Ran out of memory on HBM" refusal (XLA prints binary units: G = GiB)."""
  match = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", message)
  return None if match is None else int(float(match.group(1)) * 1024 ** " KMGT".index(match.group(2)))


def _refused(name: str, arguments: Any, device: Device, temp: int, resident: int, compile_s: float) -> ProgramPlan:
  """A program the TPU compiler refused because its temporaries alone exceed HBM: no cost figures, the
  arguments counted from their shapes (outputs assumed donated in place)."""
  args = per_device_bytes(arguments)
  return ProgramPlan(name=name, argument_bytes=args, output_bytes=0, alias_bytes=0, temp_bytes=temp,
                     resident_bytes=resident, total_bytes=args + temp + resident, hbm_bytes=device.hbm_bytes,
                     flops=None, bytes_accessed=None, roofline_s=None, compile_s=compile_s)


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# ---- training -------------------------------------------------------------------------------------------------

def example_row(command: str, seq_len: int) -> dict[str, np.ndarray]:
  """One row as the trainer's data pipeline builds it (shapes and dtypes are all the plan needs)."""
  from retro_jax.train import data  # pylint: disable=import-outside-toplevel
  if command == "sft":
    return data.build_packed_row([], seq_len)
  one = np.ones(1, np.int32)
  row = data.build_pair_row(data.DPOExample(prompt=one, chosen=one, rejected=one), seq_len)
  row["reference_logps"] = np.zeros(2, np.float32)
  return row


def _training_lowered(command: str, config, model_config: Qwen2Config, mesh) -> dict[str, Any]:
  """The train and eval steps of `model_config` lowered over abstract inputs, with what measuring them needs."""
  from retro_jax.train import dpo, input_pipeline, optim, sft, trainer  # pylint: disable=import-outside-toplevel
  s = trainer.Setup(config=config, mesh=mesh, tokenizer=None, model_config=model_config, base_dir="")
  task = (sft if command == "sft" else dpo).build_task(s, [], [], {})
  graphdef, params, param_sh = trainer.init_params(s, abstract=True)
  schedule, tx = trainer.schedule_and_optimizer(config, max(config.num_train_steps, 1))  # steps: constants only
  state_sh = trainer.state_shardings(tx, params, param_sh, mesh)
  state = _abstract(jax.eval_shape(trainer.initial_state_fn(tx, config.seed), params), state_sh)

  accum = config.grad_accum_steps
  try:
    input_pipeline.process_batch_size(config.batch_size, accum, mesh)  # the run's own batch-split check
  except ValueError as e:
    raise sharding.ShardingError(str(e)) from e
  row = example_row(command, config.data.seq_len)
  micro = {k: v[None, None] for k, v in row.items()}
  batch_sh = input_pipeline.batch_shardings(micro, mesh, batch_axis=1)
  batch = {k: jax.ShapeDtypeStruct((accum, config.batch_size // accum) + v.shape, v.dtype, sharding=batch_sh[k])
           for k, v in row.items()}
  step = trainer.make_train_step(graphdef, task, tx, schedule, state_sh, batch_sh, mesh)

  def loss_and_grad(params, micro):  # one pass of the step's accumulation loop, as make_train_step traces it
    with sharding.use_rules(mesh, sharding.TRAIN_RULES):
      return optim.accumulate_gradients(
          lambda p, m: task.loss(nnx.merge(graphdef, p), m, task.totals(micro)), params, micro)
  micro_batch = {k: jax.ShapeDtypeStruct((1,) + v.shape[1:], v.dtype, sharding=batch_sh[k]) for k, v in batch.items()}
  micro_step = jax.jit(loss_and_grad, in_shardings=(param_sh, batch_sh), out_shardings=(param_sh, None))

  eval_rows = trainer.eval_batch_size(config)
  eval_row = {k: v[None] for k, v in row.items()}
  eval_sh = input_pipeline.batch_shardings(eval_row, mesh, batch_axis=0)
  eval_batch = {k: jax.ShapeDtypeStruct((eval_rows,) + v.shape, v.dtype, sharding=eval_sh[k]) for k, v in row.items()}
  eval_step = trainer.make_eval_step(graphdef, task, param_sh, eval_sh, mesh)
  return {"tx": tx, "state": state, "batch": batch, "eval_batch": eval_batch, "micro_batch": micro_batch,
          "loss_and_grad": micro_step.lower(state["params"], micro_batch),
          "train_step": step.lower(state, batch), "eval_step": eval_step.lower(state["params"], eval_batch)}


def training_programs(command: str, config, model_config: Qwen2Config, mesh, device: Device
                      ) -> Iterator[ProgramPlan]:
  """Plans of one micro-batch's loss + grad (what the step's accumulation loop runs; the Adam moments stay
  resident meanwhile), the optimizer update alone (with accumulation), the train step (accumulation and update)
  and the eval step of an SFT or DPO config."""
  built = _training_lowered(command, config, model_config, mesh)
  state, batch, accum = built["state"], built["batch"], config.grad_accum_steps
  costs = layer_costs(lambda cfg: ((name, _training_lowered(command, config, cfg, mesh)[name])
                                   for name in ("loss_and_grad", "train_step", "eval_step")), model_config)
  others = {k: v for k, v in state.items() if k != "params"}  # the optimizer state stays on device
  yield measure("loss_and_grad", built["loss_and_grad"], device, arguments=(state["params"], built["micro_batch"]),
                resident_bytes=per_device_bytes(others), cost=costs.get("loss_and_grad"))

  update_cost = (0.0, 0.0)
  if accum > 1:  # the update alone: the part of the step outside the accumulation loop
    tx = built["tx"]

    def update(grads, opt_state, p):
      updates, opt_state = tx.update(grads, opt_state, p)
      return optax.apply_updates(p, updates), opt_state
    update_plan = measure("optimizer_update", jax.jit(update, donate_argnums=(1, 2)).lower(
        state["params"], state["opt_state"], state["params"]), device,
        arguments=(state["params"], state["opt_state"], state["params"]))
    update_cost = (update_plan.flops or 0.0, update_plan.bytes_accessed or 0.0)
    yield update_plan
  yield measure("train_step", built["train_step"], device, arguments=(state, batch), loop_scale=accum,
                outside_loop=update_cost, scaled_loops=1 if accum > 1 else 0, cost=costs.get("train_step"))

  yield measure("eval_step", built["eval_step"], device, arguments=(state["params"], built["eval_batch"]),
                resident_bytes=per_device_bytes(others), cost=costs.get("eval_step"))


_NO_KV_LIMIT = 1 << 62

# ---- serving --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ServingShape:
  """The engine settings a serving plan compiles at."""

  max_concurrent_decodes: int
  max_seq_len: int
  decode_steps: int
  all_buckets: bool  # every prefill bucket, else the largest only
  prefix_cache_bytes: int


def _serving_lowered(model_config: Qwen2Config, mesh, shape: ServingShape):
  """(engine, abstract params, abstract decode state, [(name, lowered)]) of the programs a serving plan measures:
  per prefill bucket the batched prefill of the most prompts (the largest) and its insert, and the generate
  step at the longest attend bucket."""
  from retro_jax.engine.qwen2_engine import Qwen2Engine  # pylint: disable=import-outside-toplevel
  model = nnx.eval_shape(lambda: Qwen2ForCausalLM(model_config, nnx.Rngs(0)))
  # the plan measures what fits itself, so the engine is not asked to query the (absent) device's memory. It plans
  # dense rows (every slot at max_seq_len): the upper bound of a paged pool, which never holds more, and programs
  # XLA can cost (a Pallas kernel's bytes and FLOPs are not in its cost analysis)
  engine = Qwen2Engine(model, max_concurrent_decodes=shape.max_concurrent_decodes, max_seq_len=shape.max_seq_len,
                       decode_steps=shape.decode_steps, mesh=mesh, kv_memory_bytes=_NO_KV_LIMIT, kv_page_size=0)
  state = nnx.state(model)
  params = _abstract(nnx.to_pure_dict(state),
                     nnx.to_pure_dict(sharding.state_shardings(state, mesh, sharding.SERVE_RULES)))
  # the decode state as `warmup` sees it (shapes and shardings; the engine has no public accessor for them)
  decode_state = _abstract(jax.eval_shape(engine._init_state),  # pylint: disable=protected-access
                           engine._state_sharding)  # pylint: disable=protected-access
  prefill = engine.prefill_buckets if shape.all_buckets else engine.prefill_buckets[-1:]
  largest = {f"{kind}[{engine.prefill_batch_size(t)}x{t}]" for t in prefill for kind in ("prefill", "insert")}
  lowered = [(name, program) for name, program in engine.lowered_programs(
      params, prefill_lengths=prefill, attend_lengths=[engine.attend_buckets[-1]])
      # smaller prefills, and small programs (state init, sampling the first token, trims) are left out
      if name in largest or name.startswith("generate")]
  return engine, params, decode_state, lowered


def serving_programs(model_config: Qwen2Config, mesh, device: Device, shape: ServingShape
                     ) -> tuple[list[ProgramPlan], dict[str, Any]]:
  """Plans of the engine's prefill buckets, inserts and generate step at the configured slots and length, and
  the serving figures: weights and KV-cache bytes per device, KV bytes per token, decode tokens/s at the
  roofline."""
  _, params, decode_state, lowered = _serving_lowered(model_config, mesh, shape)
  costs = layer_costs(lambda cfg: iter(_serving_lowered(cfg, mesh, shape)[3]), model_config)
  weights = per_device_bytes(params)
  kv = per_device_bytes((decode_state.cache.keys, decode_state.cache.values))
  prefix_cache = shape.prefix_cache_bytes // mesh.shape["tensor"]  # its KV heads are split over tensor
  plans = []
  for name, program in lowered:
    if name.startswith("generate"):
      plans.append(measure(name, program, device, arguments=(params, decode_state), resident_bytes=prefix_cache,
                           loop_scale=shape.decode_steps, scaled_loops=1, cost=costs.get(name)))
    else:  # the decode state and the prefix cache stay in memory while a prompt is prefilled and inserted
      resident = (kv + prefix_cache) if name.startswith("prefill") else prefix_cache
      plans.append(measure(name, program, device, arguments=params, resident_bytes=resident, cost=costs.get(name)))
  generate = plans[-1]
  kv_per_token = kv / (shape.max_concurrent_decodes * shape.max_seq_len)
  summary = {
      "weights_bytes": weights, "kv_cache_bytes": kv, "kv_bytes_per_token": kv_per_token,
      "prefix_cache_bytes": prefix_cache, "max_concurrent_decodes": shape.max_concurrent_decodes,
      "max_seq_len": shape.max_seq_len, "decode_steps": shape.decode_steps,
      # every slot at full length: the slowest decode step of this engine
      "decode_step_roofline_s": generate.roofline_s and generate.roofline_s / shape.decode_steps,
      "decode_tokens_per_s_roofline": generate.roofline_s and (
          shape.max_concurrent_decodes * shape.decode_steps / generate.roofline_s),
      # the best a step can do: read the weights and every slot's full KV once (XLA's bytes count more: it also
      # charges the cache updates and copies of the compiled program)
      "decode_tokens_per_s_read_bound": shape.max_concurrent_decodes * device.hbm_bytes_per_s / (weights + kv),
      # KV tokens the memory left after weights, the largest program's temp and the prefix cache would hold
      "kv_tokens_that_fit": int(max(device.hbm_bytes - weights - max(p.temp_bytes for p in plans) - prefix_cache,
                                    0) // kv_per_token),
  }
  return plans, summary

