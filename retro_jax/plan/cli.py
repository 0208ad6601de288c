"""`retro-jax plan`: compile every program a config runs for its TPU topology, on any machine, before renting it.

    retro-jax plan --config configs/r1_distill_7b_self_improve.py                  # v5p, chips from the mesh
    retro-jax plan --config configs/r1_distill_7b_self_improve.py --topology v5p-32 --output plan.json
    retro-jax plan --command search --model qwen2.5-7b --topology v5p:2x2x1 --config.engine.dtype=bfloat16

The config's command (sft, dpo, generate, search, eval) is read from its keys, or given by `--command` (then its
default config is planned). The model's shape comes from `<model dir>/config.json` when that exists here, else
from a published shape (`--shape`, or guessed from the directory's name, e.g. "...-7B" -> qwen2.5-7b); no weights
are read. `--num_layers` overrides the depth (a quick, smaller plan). Prints a table, writes JSON
(`--output`), and exits 1 when a program does not fit in HBM (naming it, by how much, and what shrinks it),
2 on bad input.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import re
import sys
from typing import Sequence

from absl import flags

from retro_jax import config_cli
from retro_jax.jsonl import write_json

PROG = "retro-jax plan"
EXIT_MISFIT = 1
COMMANDS = ("sft", "dpo", "generate", "search", "eval")
TRAINING_MFU = 0.4  # the utilisation a well-tuned long-sequence run reaches on TPU: the planning figure


class PlanError(ValueError):
  """Bad input to the plan, said in one line."""


def _define(values: flags.FlagValues) -> None:
  flags.DEFINE_string("topology", None, "v5p-32 | v5p:2x2x4 | v5e:2x2 ... (default: v5p, chips from the mesh)",
                      flag_values=values)
  flags.DEFINE_integer("num_slices", 1, "slices joined over DCN; training's data axis spans them", flag_values=values)
  flags.DEFINE_enum("command", None, COMMANDS, "plan this command's default config (no --config)",
                    flag_values=values)
  flags.DEFINE_string("shape", None, "published model shape when the model dir is not here (qwen2.5-7b, ...)",
                      flag_values=values)
  flags.DEFINE_string("model", None, "serving: model dir or published shape (sets --config.model)", flag_values=values)
  flags.DEFINE_integer("num_layers", None, "override the model's depth", flag_values=values)
  flags.DEFINE_integer("tensor", None, "serving: chips per engine replica (default engine.tensor, else all)",
                       flag_values=values)
  flags.DEFINE_boolean("all_buckets", False, "serving: plan every prefill bucket, not only the largest",
                       flag_values=values)
  flags.DEFINE_string("output", None, "write the plan as JSON here", flag_values=values)


def _default_config(command: str):
  if command in ("sft", "dpo"):
    from retro_jax.train import config as train_config  # pylint: disable=import-outside-toplevel
    return train_config.sft_config() if command == "sft" else train_config.dpo_config()
  if command == "eval":
    from retro_jax.eval.cli import default_eval_config  # pylint: disable=import-outside-toplevel
    return default_eval_config()
  from retro_jax.search import cli as search_cli  # pylint: disable=import-outside-toplevel
  return search_cli.default_search_config() if command == "search" else search_cli.default_generate_config()


def command_of(config) -> str:
  for key, command in (("dpo", "dpo"), ("optim", "sft"), ("search", "search"), ("generate", "generate"),
                       ("eval", "eval")):
    if key in config:
      return command
  raise PlanError("cannot tell which command this config is for (no dpo / optim / search / generate / eval key)")


def parse(argv: Sequence[str]):
  """The config, the flag values and the command to plan (also what `--dry-run` parses)."""
  command = next((a.split("=", 1)[1] for a in argv if a.startswith("--command=")), None)
  if command is None and "--command" in argv and argv.index("--command") + 1 < len(argv):
    command = argv[argv.index("--command") + 1]
  has_file = config_cli.config_file_arg(argv) is not None
  if not has_file and command not in COMMANDS:
    raise PlanError(f"--config FILE or --command {{{','.join(COMMANDS)}}} is required")
  default = None if has_file else _default_config(command)
  config, values = config_cli.parse_config(argv, prog=PROG, default=default, define_extra=_define)
  return config, values, values.command or command_of(config)


def model_config(source: str, shape: str | None, num_layers: int | None, **dtypes):
  """(Qwen2Config, where it came from): the dir's config.json, a named shape, or one guessed from the name."""
  from retro_jax.models import config as model_lib  # pylint: disable=import-outside-toplevel
  if shape is None and source and os.path.exists(os.path.join(source, "config.json")):
    cfg, origin = model_lib.Qwen2Config.from_pretrained(source, **dtypes), f"{source}/config.json"
  else:
    if shape is None:
      if source in model_lib.SHAPES:
        shape = source
      else:
        size = re.search(r"(\d+(?:\.\d+)?)b\b", os.path.basename(source.rstrip("/")).lower())
        named = [n for n in model_lib.SHAPES if size and n.endswith(f"-{size.group(1)}b")]
        if not named:
          raise PlanError(f"model {source!r} is not a directory with a config.json here and names no published "
                          f"shape: pass --shape ({', '.join(model_lib.SHAPES)})")
        shape = named[0]
      origin = f"published shape {shape} ({source!r} has no config.json here)" if source != shape else \
          f"published shape {shape}"
    else:
      origin = f"published shape {shape} (--shape)"
    cfg = model_lib.shape_config(shape, **{k: v for k, v in dtypes.items() if v})
  if num_layers:
    cfg, origin = cfg.replace(num_layers=num_layers), f"{origin}, num_layers overridden to {num_layers}"
  return cfg, origin


def _training_model(config, shape, num_layers):
  dtypes = dict(param_dtype=config.param_dtype, dtype=config.compute_dtype)
  if config.init == "scratch":
    from retro_jax.models.config import Qwen2Config  # pylint: disable=import-outside-toplevel
    arch = config.model.to_dict()
    if not arch["vocab_size"]:
      from retro_jax.tokenization import load_tokenizer  # pylint: disable=import-outside-toplevel
      arch["vocab_size"] = load_tokenizer(config.tokenizer_dir or config.model_dir).vocab_size
    cfg = Qwen2Config(**arch, **dtypes)
    return (cfg.replace(num_layers=num_layers) if num_layers else cfg), "config.model (init=scratch)"
  return model_config(config.model_dir, shape, num_layers, **dtypes)


def _versions() -> dict[str, str]:
  out = {}
  for name in ("jax", "jaxlib", "libtpu", "flax", "optax"):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = "not installed"
  return out


def _gb(n: float) -> str:
  return f"{n / 1e9:.2f}"


def print_table(plans) -> None:
  print(f"{'program':<24} {'args GB':>8} {'out GB':>7} {'temp GB':>8} {'resident':>9} {'total GB':>9} "
        f"{'HBM GB':>7} {'TFLOP':>9} {'GB moved':>9} {'roofline s':>11} {'compile s':>10}")
  for p in plans:
    mark = "" if p.fits else "  <- does not fit"
    if p.flops is None:
      cost = f"{'-':>9} {'-':>9} {'-':>11}"
    else:
      cost = f"{p.flops / 1e12:>9.2f} {p.bytes_accessed / 1e9:>9.1f} {p.roofline_s:>11.4g}"
    print(f"{p.name:<24} {_gb(p.argument_bytes):>8} {_gb(p.output_bytes):>7} {_gb(p.temp_bytes):>8} "
          f"{_gb(p.resident_bytes):>9} {_gb(p.total_bytes):>9} {_gb(p.hbm_bytes):>7} {cost} {p.compile_s:>10.1f}{mark}")
  if any(p.uncounted_loops for p in plans):
    print("(XLA counts a loop body once: programs with uncounted loops report FLOPs and bytes as lower bounds)")


def shrink_advice(command: str, config, plan, mesh, max_seq_len: int = 0) -> list[str]:
  """Settings that lower the offending program's memory, most effective first."""
  if command in ("sft", "dpo"):
    from retro_jax.train import trainer  # pylint: disable=import-outside-toplevel
    advice = []
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = config.batch_size // config.grad_accum_steps
    if plan.name in ("train_step", "loss_and_grad") and micro > shards:
      advice.append(f"--config.grad_accum_steps={config.batch_size // shards} (one row per data x fsdp shard "
                    f"per micro-batch; now {micro // shards})")
    if plan.name == "eval_step" and trainer.eval_batch_size(config) > shards:
      advice.append(f"--config.eval_batch_size={shards}")
    if config.remat != "full":
      advice.append("--config.remat=full (recompute each layer in the backward pass)")
    if config.loss_chunk_size > 512:
      advice.append(f"--config.loss_chunk_size={config.loss_chunk_size // 2} (smaller logits chunks)")
    advice.append(f"--config.data.seq_len={config.data.seq_len // 2} (shorter rows), or more chips on the fsdp "
                  "axis (a larger --topology with --config.mesh.fsdp)")
    return advice
  engine = config.engine
  return [f"--config.engine.max_concurrent_decodes={max(engine.max_concurrent_decodes // 2, 1)} or "
          f"--config.engine.max_seq_len={max(max_seq_len // 2, 1)} (the KV cache is slots x length)",
          "--config.engine.dtype=bfloat16 (halves weights and KV)" if engine.dtype == "float32" else
          "more chips per replica (--tensor, up to the KV heads)"]


def _input_errors() -> tuple[type[Exception], ...]:
  """Errors that mean the config or the topology is wrong, not the code (bugs keep their traceback)."""
  from retro_jax.models.config import ConfigError  # pylint: disable=import-outside-toplevel
  from retro_jax.plan.chips import TopologyError  # pylint: disable=import-outside-toplevel
  from retro_jax.sharding import ShardingError  # pylint: disable=import-outside-toplevel
  return ConfigError, TopologyError, ShardingError


def plan_main(argv: Sequence[str] | None = None) -> int:
  # The plan compiles for the topology's TPU devices and runs nothing on them: what runs here (shape tracing)
  # stays on the CPU, so libtpu is not claimed as this machine's backend (set before jax picks one).
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  argv = list(sys.argv[1:] if argv is None else argv)
  if any(a in ("-h", "--help") for a in argv):
    print(__doc__)
    return 0
  try:
    return _run(argv)
  except (PlanError, flags.Error, AttributeError, KeyError, FileNotFoundError, *_input_errors()) as e:
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"{PROG}: {message}", file=sys.stderr)
    return 2


def _run(argv: Sequence[str]) -> int:
  config, values, command = parse(argv)
  from retro_jax import sharding  # pylint: disable=import-outside-toplevel
  from retro_jax.plan import chips, programs  # pylint: disable=import-outside-toplevel
  training = command in ("sft", "dpo")
  if values.model and not training:
    config.model = values.model
  if training:
    cfg, origin = _training_model(config, values.shape, values.num_layers)
    sizes = [config.mesh.data, config.mesh.fsdp, config.mesh.tensor]
    if values.topology is None and -1 in sizes:
      raise PlanError("the config's mesh has a -1 axis: pass --topology to say how many chips")
    default_topology = f"v5p-{2 * max(1, _prod(sizes) // values.num_slices)}"
  else:
    cfg, origin = model_config(config.model, values.shape, values.num_layers, param_dtype=config.engine.dtype,
                               dtype=config.engine.dtype)
    default_topology = "v5p:2x2x1"  # one host: rollouts run as per-host engine replicas
  chip, topology = chips.resolve(values.topology or default_topology)
  devs = chips.devices(topology, values.num_slices)
  per_chip = chips.devices_per_chip(devs)
  device = programs.Device(chip.hbm_bytes / per_chip, chip.hbm_bytes_per_s / per_chip, chip.peak_bf16_flops / per_chip)
  print(f"[plan] {command}: {topology} x {values.num_slices} slice(s), {len(devs)} devices; model: {origin}",
        flush=True)

  report = {"command": command, "config": config_cli.config_file_arg(argv) or f"default {command} config",
            "topology": {"name": topology, "num_slices": values.num_slices, "devices": len(devs),
                         "devices_per_chip": per_chip, "chip": dataclasses.asdict(chip)},
            "model": {"source": origin, "num_params": cfg.num_params, "num_layers": cfg.num_layers,
                      "param_dtype": cfg.param_dtype, "dtype": cfg.dtype},
            "versions": _versions()}
  if training:
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devs)
    if values.num_slices > 1 and (mesh.shape["data"] % values.num_slices or mesh.devices.size != len(devs)):
      # devices come slice by slice, so the outermost axis, data, is the one that crosses DCN (pure data
      # parallelism between slices: only the gradient all-reduce travels over the slower network)
      raise PlanError(f"{values.num_slices} slices: the mesh must span all {len(devs)} devices with --config.mesh.data "
                      f"a multiple of {values.num_slices} (data is the axis across slices), got {dict(mesh.shape)}")
    if mesh.devices.size < len(devs):
      print(f"[plan] the mesh {dict(mesh.shape)} uses {mesh.devices.size} of the topology's {len(devs)} devices",
            flush=True)
    plans = list(programs.training_programs(command, config, cfg, mesh, device))
    step = next(p for p in plans if p.name == "train_step")
    report["training"] = _training_figures(config, cfg, mesh, step, chip, per_chip)
  else:
    tensor = values.tensor or config.engine.get("tensor", 0) or len(devs)
    mesh = sharding.make_mesh(1, 1, tensor, devices=devs[:tensor])
    max_len = config.engine.max_seq_len or _default_serving_length(config, cfg)
    slots = config.engine.max_concurrent_decodes or _slots_that_fit(config.engine, cfg, mesh, device, max_len)
    shape = programs.ServingShape(slots, max_len, config.engine.get("decode_steps", 16),
                                  values.all_buckets, _default_prefix_cache_bytes())
    plans, serving = programs.serving_programs(cfg, mesh, device, shape)
    serving["replicas"] = len(devs) // tensor
    report["serving"] = serving
  report["mesh"] = dict(mesh.shape)
  report["programs"] = [dict(dataclasses.asdict(p), fits=p.fits) for p in plans]
  print_table(plans)
  _print_figures(report)
  misfits = [p for p in plans if not p.fits]
  report["fits"] = not misfits
  if values.output:
    write_json(values.output, report)
    print(f"[plan] wrote {values.output}")
  for p in misfits:
    print(f"{PROG}: {p.name} needs {_gb(p.total_bytes)} GB per device, {_gb(p.total_bytes - p.hbm_bytes)} GB over "
          f"the {_gb(p.hbm_bytes)} GB of HBM per device of {chip.name}. To shrink it: "
          + "; ".join(shrink_advice(command, config, p, mesh, report.get("serving", {}).get("max_seq_len", 0))),
          file=sys.stderr)
  return EXIT_MISFIT if misfits else 0


def _default_serving_length(config, cfg) -> int:
  """What engine.max_seq_len 0 becomes when the command runs: the model's positions for generate and search;
  for eval the longest prompt plus the budget, planned as max_new_tokens + 1,024 prompt tokens."""
  from retro_jax.engine.serving import position_limit  # pylint: disable=import-outside-toplevel
  limit = position_limit(cfg)
  length = min(limit, config.eval.max_new_tokens + 1024) if "eval" in config else limit
  print(f"[plan] engine.max_seq_len is 0: planning {length:,} tokens ("
        + ("max_new_tokens + 1,024 prompt tokens" if "eval" in config else "the model's positions") + ")", flush=True)
  return length


def _slots_that_fit(engine, cfg, mesh, device, max_len: int) -> int:
  """What engine.max_concurrent_decodes 0 becomes on this chip: the slots whose KV fits the budget, with the
  chip's HBM in place of the memory the engine would query on the device (kv_budget.py)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from retro_jax import sharding  # pylint: disable=import-outside-toplevel
  from retro_jax.engine import kv_budget  # pylint: disable=import-outside-toplevel
  from retro_jax.models.qwen2 import Qwen2ForCausalLM  # pylint: disable=import-outside-toplevel
  state = nnx.state(nnx.eval_shape(lambda: Qwen2ForCausalLM(cfg, nnx.Rngs(0))))
  weights = kv_budget.per_device_weight_bytes(state, mesh, sharding.SERVE_RULES)
  budget = engine.get("kv_memory_bytes", 0) or int(
      engine.get("kv_memory_fraction", kv_budget.DEFAULT_KV_MEMORY_FRACTION) * max(0, device.hbm_bytes - weights))
  try:
    _, slots = kv_budget.plan_slots(cfg, state, mesh, sharding.SERVE_RULES, max_concurrent_decodes=0,
                                    max_seq_len=max_len, kv_memory_bytes=max(budget, 1))
  except kv_budget.KVBudgetError:
    raise PlanError(f"engine.max_concurrent_decodes is 0 and no decode slot of {max_len:,} tokens fits the KV "
                    f"budget of {budget / 1e9:.1f} GB per device (weights: {weights / 1e9:.1f} GB): lower "
                    "engine.max_seq_len, serve in bfloat16 or on more chips (--tensor)") from None
  print(f"[plan] engine.max_concurrent_decodes is 0: planning {slots} slots, what a KV budget of "
        f"{budget / 1e9:.1f} GB per device holds at {max_len:,} tokens", flush=True)
  return slots


def _default_prefix_cache_bytes() -> int:
  """The prefix cache the CLIs' text generator keeps on device (its default: the CLIs do not set it)."""
  import inspect  # pylint: disable=import-outside-toplevel
  from retro_jax.engine.serving import load_text_generator  # pylint: disable=import-outside-toplevel
  return inspect.signature(load_text_generator).parameters["prefix_cache_bytes"].default


def _prod(sizes) -> int:
  out = 1
  for s in sizes:
    out *= s
  return out


def _training_figures(config, cfg, mesh, step, chip, per_chip) -> dict:
  from retro_jax.train import metrics  # pylint: disable=import-outside-toplevel
  tokens = config.batch_size * config.data.seq_len * (2 if "dpo" in config else 1)
  per_token = metrics.training_flops_per_token(cfg, config.data.seq_len)
  chips_ = mesh.devices.size / per_chip
  at_mfu = TRAINING_MFU * chip.peak_bf16_flops * chips_ / per_token
  return {"tokens_per_step": tokens, "model_flops_per_token": per_token,
          "tokens_per_s_at_40pct_mfu": at_mfu, "step_s_at_40pct_mfu": tokens / at_mfu,
          "step_s_roofline": step.roofline_s, "tokens_per_s_roofline": step.roofline_s and tokens / step.roofline_s,
          "model_flops_per_step_per_device": per_token * tokens / mesh.devices.size,
          "xla_flops_per_step_per_device": step.flops}


def _print_figures(report: dict) -> None:
  if "training" in report and report["training"]["step_s_roofline"]:
    t = report["training"]
    print(f"[plan] train step: {t['tokens_per_step']:,} tokens; at 40% MFU {t['tokens_per_s_at_40pct_mfu']:,.0f} "
          f"tokens/s ({t['step_s_at_40pct_mfu']:.2f} s/step); roofline {t['step_s_roofline']:.2f} s/step "
          f"({t['tokens_per_s_roofline']:,.0f} tokens/s)")
  if "serving" in report:
    s = report["serving"]
    print(f"[plan] per device: weights {_gb(s['weights_bytes'])} GB, KV cache {_gb(s['kv_cache_bytes'])} GB "
          f"({s['max_concurrent_decodes']} slots x {s['max_seq_len']} tokens, {s['kv_bytes_per_token']:.0f} B/token), "
          f"prefix cache {_gb(s['prefix_cache_bytes'])} GB; room for {s['kv_tokens_that_fit']:,} KV tokens")
    if s["decode_tokens_per_s_roofline"]:
      print(f"[plan] decode at the roofline, every slot at full length: {s['decode_tokens_per_s_roofline']:,.0f} "
            f"tokens/s per replica ({s['decode_step_roofline_s'] * 1e3:.2f} ms/step), {s['replicas']} replica(s); "
            f"reading only the weights and KV once a step: {s['decode_tokens_per_s_read_bound']:,.0f} tokens/s")
