"""Per-device memory of the SFT loss + grad at long sequence lengths, AOT-compiled for a TPU topology on a CPU host.

What issue 13 measures: the project's SFT loss (`sft.sft_logprobs` -> masked NLL sum) and its gradient for a
published shape (default qwen2.5-7b) on v5p 16 chips, fsdp 4 x tensor 4 (TRAIN_RULES), one packed row per fsdp
shard, float32 master params, bfloat16 compute, full remat. Each case is compiled by libtpu (no TPU needed:
`jax.experimental.topologies`) and XLA's buffer assignment gives the temp bytes per device; the dense "xla"
attention (the [t, t] scores the model used before) is compiled in the same run as the peer.

  TPU_SKIP_MDS_QUERY=1 python benchmarks/train_memory_aot.py --cases splash:16384,splash:32768,xla:16384

Writes benchmarks/results/train_memory_aot.json (merged by case, so cases can be added in separate runs).
Needs libtpu (`pip install 'jax[tpu]'`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # libtpu otherwise waits minutes for cloud metadata
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # this host computes nothing; the TPU devices come from libtpu
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes on a shared host may hold libtpu

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from retro_jax import sharding  # noqa: E402
from retro_jax.models.config import shape_config  # noqa: E402
from retro_jax.models.qwen2 import Qwen2ForCausalLM  # noqa: E402
from retro_jax.train import losses, sft  # noqa: E402

GIB = 2**30


def compile_case(shape: str, attention: str, seq_len: int, *, topology: str, fsdp: int, tensor: int, remat: str,
                 num_layers: int | None, loss_chunk_size: int) -> dict:
  devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
  mesh = sharding.make_mesh(data=len(devices) // (fsdp * tensor), fsdp=fsdp, tensor=tensor, devices=devices)
  overrides = dict(param_dtype="float32", dtype="bfloat16", attention=attention, remat=remat)
  if num_layers:
    overrides["num_layers"] = num_layers
  cfg = shape_config(shape, **overrides)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Qwen2ForCausalLM(cfg, nnx.Rngs(0))))
  shardings = sharding.state_shardings(abstract, mesh, sharding.TRAIN_RULES)
  params = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), abstract, shardings,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
  rows = mesh.shape["data"] * fsdp  # one row per data x fsdp shard
  row_sharding = NamedSharding(mesh, sharding.TRAIN_RULES.spec(("batch", None)))
  batch = {name: jax.ShapeDtypeStruct((rows, seq_len), jnp.int32, sharding=row_sharding)
           for name in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
  train_config = ml_collections.ConfigDict({"remat": remat, "loss_chunk_size": loss_chunk_size})

  def loss(params, batch):
    model = nnx.merge(graphdef, params)
    nll, _ = losses.masked_nll_sum(sft.sft_logprobs(model, batch, train_config), batch["loss_mask"])
    return nll

  step = jax.jit(jax.value_and_grad(loss), out_shardings=(NamedSharding(mesh, jax.sharding.PartitionSpec()),
                                                          shardings))
  start, start_cpu = time.perf_counter(), time.process_time()
  with sharding.use_rules(mesh, sharding.TRAIN_RULES):
    lowered = step.lower(params, batch)
  compiled = lowered.compile()
  # CPU seconds of all threads as well as wall time: on a shared host the wall time says more about the
  # neighbours than about the compile
  compile_s, compile_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
  memory = compiled.memory_analysis()
  return {
      "case": f"{attention}:{seq_len}", "attention": attention, "seq_len": seq_len, "rows": rows,
      "num_layers": cfg.num_layers, "compile_s": round(compile_s, 1), "compile_cpu_s": round(compile_cpu_s, 1),
      "temp_gib_per_device": round(memory.temp_size_in_bytes / GIB, 3),
      "argument_gib_per_device": round(memory.argument_size_in_bytes / GIB, 3),
      "output_gib_per_device": round(memory.output_size_in_bytes / GIB, 3),
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shape", default="qwen2.5-7b")
  parser.add_argument("--topology", default="v5p:2x2x4")
  parser.add_argument("--fsdp", type=int, default=4)
  parser.add_argument("--tensor", type=int, default=4)
  parser.add_argument("--remat", default="full")
  parser.add_argument("--num-layers", type=int, default=0, help="0 = the shape's own")
  parser.add_argument("--loss-chunk-size", type=int, default=2048)
  parser.add_argument("--cases", default="splash:16384,splash:32768,xla:16384",
                      help="comma-separated attention:seq_len")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "train_memory_aot.json"))
  args = parser.parse_args(argv)
  try:
    cases = [(name, int(length)) for name, length in (c.split(":") for c in args.cases.split(","))]
  except ValueError:
    print(f"--cases: expected attention:seq_len pairs, got {args.cases!r}", file=sys.stderr)
    return 2
  report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "host": "CPU (AOT for TPU)",
                        "load_average_at_start": os.getloadavg()},
            "versions": {"jax": jax.__version__, "python": platform.python_version()},
            "settings": {"shape": args.shape, "topology": args.topology, "fsdp": args.fsdp, "tensor": args.tensor,
                         "remat": args.remat, "param_dtype": "float32", "compute_dtype": "bfloat16",
                         "loss_chunk_size": args.loss_chunk_size, "num_layers": args.num_layers or "all"},
            "cases": {}}
  if os.path.exists(args.out):
    with open(args.out, encoding="utf-8") as f:
      previous = json.load(f)
    if previous.get("settings") == report["settings"]:
      report["cases"] = previous.get("cases", {})
  for attention, seq_len in cases:
    result = compile_case(args.shape, attention, seq_len, topology=args.topology, fsdp=args.fsdp,
                          tensor=args.tensor, remat=args.remat, num_layers=args.num_layers or None,
                          loss_chunk_size=args.loss_chunk_size)
    print(json.dumps(result), flush=True)
    report["cases"][result["case"]] = result
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
