"""HF Qwen2 safetensors <-> our NNX params, by a table of key patterns (the tunix / jax-llm-examples way).

Loading builds the model abstractly (`nnx.eval_shape`, no weights allocated), then fills each parameter from
its memory-mapped tensor straight onto its target sharding with `jax.make_array_from_callback`: every device
copies only its own slice, so host memory peaks at about one shard of one stacked parameter (its slice of every
layer), and multi-host loads read only what each host needs. The model's layers are scanned, so each layer
parameter is one [num_layers, ...] array here and `model.layers.{i}.*` tensors in HF files; the mapping stacks
and unstacks them, and HF files look exactly as before from the outside.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Iterator

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, SingleDeviceSharding

from retro_jax import sharding as sharding_lib
from retro_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsDir, write_safetensors_dir
from retro_jax.models.config import Qwen2Config
from retro_jax.models.qwen2 import Qwen2ForCausalLM

# Converters between an HF tensor and our layout, given our parameter's shape.
#   linear_in  HF [out, in] (out = heads*head_dim)  <->  ours [in, heads, head_dim] / [in, out]
#   linear_out HF [d, heads*head_dim]               <->  ours [heads, head_dim, d]
#   bias       HF [heads*head_dim]                  <->  ours [heads, head_dim]
#   same       identical layout (embedding, norm scales)
_TO_OURS: dict[str, Callable[[np.ndarray, tuple], np.ndarray]] = {
    "linear_in": lambda a, shape: a.T.reshape(shape),
    "linear_out": lambda a, shape: a.T.reshape(shape),
    "bias": lambda a, shape: a.reshape(shape),
    "same": lambda a, shape: a,
}
_TO_HF: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "linear_in": lambda a: a.reshape(a.shape[0], -1).T,
    "linear_out": lambda a: a.reshape(-1, a.shape[-1]).T,
    "bias": lambda a: a.reshape(-1),
    "same": lambda a: a,
}

# (our path pattern, HF key template, converter); {i} is the layer index.
_LAYER_TABLE = (
    ("input_norm.scale", "input_layernorm.weight", "same"),
    ("post_attention_norm.scale", "post_attention_layernorm.weight", "same"),
    ("attention.q_kernel", "self_attn.q_proj.weight", "linear_in"),
    ("attention.q_bias", "self_attn.q_proj.bias", "bias"),
    ("attention.k_kernel", "self_attn.k_proj.weight", "linear_in"),
    ("attention.k_bias", "self_attn.k_proj.bias", "bias"),
    ("attention.v_kernel", "self_attn.v_proj.weight", "linear_in"),
    ("attention.v_bias", "self_attn.v_proj.bias", "bias"),
    ("attention.o_kernel", "self_attn.o_proj.weight", "linear_out"),
    ("mlp.gate_kernel", "mlp.gate_proj.weight", "linear_in"),
    ("mlp.up_kernel", "mlp.up_proj.weight", "linear_in"),
    ("mlp.down_kernel", "mlp.down_proj.weight", "linear_in"),
)
_GLOBAL_TABLE = {
    "embedding": ("model.embed_tokens.weight", "same"),
    "final_norm.scale": ("model.norm.weight", "same"),
    "lm_head": ("lm_head.weight", "linear_in"),
}
# Tensors some exporters add that carry nothing we need (recomputed rotary tables; a tied head's copy).
_IGNORABLE = re.compile(r".*rotary_emb\.inv_freq$")


def hf_key(path: str) -> tuple[str, str]:
  """Our dotted param path -> (HF key, converter name). Stacked layer params (e.g. 'layers.attention.q_kernel',
  [num_layers, ...]) give a template with `{i}` for the layer index."""
  if path in _GLOBAL_TABLE:
    return _GLOBAL_TABLE[path]
  if path.startswith("layers."):
    for ours, theirs, kind in _LAYER_TABLE:
      if path[len("layers."):] == ours:
        return f"model.layers.{{i}}.{theirs}", kind
  raise KeyError(f"no HF name for parameter {path!r}")


def _hf_keys(path: str, shape: tuple[int, ...]) -> tuple[list[str], str, tuple[int, ...]]:
  """(HF keys, converter, our per-tensor shape): one key per layer for a stacked param, else one."""
  key, kind = hf_key(path)
  if "{i}" in key:
    return [key.format(i=i) for i in range(shape[0])], kind, tuple(shape[1:])
  return [key], kind, tuple(shape)


def _dotted(path) -> str:
  return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _param_items(state: nnx.State) -> Iterator[tuple[str, Any]]:
  leaves = jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  for path, variable in leaves:
    yield _dotted(path), variable


def load_pretrained(model_dir: str, *, mesh: Mesh | None = None,
                    rules: sharding_lib.ShardingRules = sharding_lib.SERVE_RULES,
                    param_dtype: str | None = None, dtype: str | None = None) -> Qwen2ForCausalLM:
  """Loads an HF Qwen2 directory into a model whose params sit on `mesh` (one device when None)."""
  config = Qwen2Config.from_pretrained(model_dir, param_dtype=param_dtype, dtype=dtype)
  abstract_model = nnx.eval_shape(lambda: Qwen2ForCausalLM(config, nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract_model)
  if mesh is not None:
    shardings = dict(_param_items(sharding_lib.state_shardings(abstract_state, mesh, rules)))
  else:
    shardings = {}
  tensors = SafetensorsDir(model_dir)
  used = set()
  for path, variable in _param_items(abstract_state):
    keys, kind, shape = _hf_keys(path, variable.shape)
    expected_hf_shape = _TO_HF[kind](np.broadcast_to(np.uint8(0), shape)).shape  # no allocation
    for key in keys:
      if key not in tensors.keys():
        raise CheckpointError(f"missing tensor {key!r} (for parameter {path}) in {model_dir!r}")
      if tensors.shape(key) != expected_hf_shape:
        raise CheckpointError(
            f"tensor {key!r} has shape {tensors.shape(key)}, expected {expected_hf_shape} from config.json")
    ours = [_TO_OURS[kind](tensors.get(key), shape) for key in keys]  # still lazy views of the memory map
    target = shardings.get(path) or SingleDeviceSharding(jax.devices()[0])
    stacked = len(shape) < len(variable.shape)

    def read(index, ours=ours, dt=variable.dtype, stacked=stacked):
      if not stacked:
        return np.asarray(ours[0][index], dtype=dt)
      return np.stack([np.asarray(ours[i][index[1:]], dtype=dt) for i in range(len(ours))[index[0]]])

    variable.set_value(jax.make_array_from_callback(variable.shape, target, read))
    used.update(keys)
  unexpected = sorted(k for k in tensors.keys() - used
                      if not _IGNORABLE.match(k) and not (config.tie_word_embeddings and k == "lm_head.weight"))
  if unexpected:
    raise CheckpointError(f"unexpected tensors in {model_dir!r} (not part of a Qwen2 model with this config.json): "
                          f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
  return nnx.merge(graphdef, abstract_state)


def _gather_to_host(value: jax.Array) -> np.ndarray:
  """One whole parameter on this host. A multi-host array is all-gathered: a collective, so every process must
  gather the same parameters in the same order; host memory holds one parameter at a time."""
  if value.is_fully_addressable:
    return np.asarray(jax.device_get(value))
  return np.asarray(multihost_utils.process_allgather(value, tiled=True))


def _hf_tensors(model: Qwen2ForCausalLM, dtype) -> Iterator[tuple[str, np.ndarray]]:
  for path, variable in _param_items(nnx.state(model, nnx.Param)):
    keys, kind, shape = _hf_keys(path, variable.shape)
    value = variable.get_value()
    for i, key in enumerate(keys):
      # one tensor (one layer of a stacked param) at a time, all-gathered across hosts
      host = _gather_to_host(value if len(shape) == value.ndim else value[i])
      yield key, np.ascontiguousarray(_TO_HF[kind](host)).astype(dtype or host.dtype)


def save_pretrained(model: Qwen2ForCausalLM, out_dir: str, *, dtype: str | None = None,
                    max_shard_bytes: int = 5 * 2**30, extra_config: dict | None = None) -> None:
  """Writes config.json + safetensors that transformers' `Qwen2ForCausalLM.from_pretrained` loads.

  `dtype` ('bfloat16', 'float32') converts on the way out; default is the params' own dtype. Parameters are
  gathered one at a time, so host memory holds one parameter plus the safetensors shard being filled; in a
  multi-host job every process must call it, and process 0 writes.
  """
  config = model.config
  np_dtype = {"bfloat16": jax.numpy.bfloat16, "float32": np.float32, "float16": np.float16}.get(dtype) if dtype else None
  tensors = _hf_tensors(model, np_dtype)
  if jax.process_index() != 0:
    for _ in tensors:  # the other processes take part in every gather; process 0 writes
      pass
    return
  os.makedirs(out_dir, exist_ok=True)
  write_safetensors_dir(out_dir, tensors, max_shard_bytes=max_shard_bytes)
  hf_config = config.to_hf_dict()
  hf_config["torch_dtype"] = dtype or config.param_dtype
  hf_config.update(extra_config or {})
  with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf_config, f, indent=2)


def shard_model(model: Qwen2ForCausalLM, mesh: Mesh, rules: sharding_lib.ShardingRules) -> Qwen2ForCausalLM:
  """Moves an in-memory model's params onto `mesh` under `rules` (tests, freshly initialised models)."""
  graphdef, state = nnx.split(model)
  shardings = sharding_lib.state_shardings(state, mesh, rules)
  def place(variable: nnx.Variable, target) -> nnx.Variable:
    return variable.replace(jax.device_put(variable.get_value(), target))

  state = jax.tree.map(place, state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, state)
