"""Qwen2-family model config, read from and written to HF `config.json`.

Two config.json dialects exist in the wild and both must load:
- transformers 4.x (every published Qwen2.5 / DeepSeek-R1-Distill-Qwen checkpoint): top-level `rope_theta`,
  `rope_scaling`, `torch_dtype`;
- transformers 5.x: `rope_parameters` (holding `rope_theta` and the scaling type) and `dtype`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp

from retro_jax.user_errors import UserError

SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn")
ATTENTION_IMPLEMENTATIONS = ("auto", "blockwise", "splash", "cudnn", "xla")  # see attention.py
PAGED_ATTENTION_IMPLEMENTATIONS = ("auto", "gather", "pallas_tpu", "pallas_gpu")  # see paged_attention.py
# Rematerialisation of each scanned layer: "full" keeps only the layer's input for the backward pass, "dots"
# also its matmul outputs (more memory, less recompute).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(UserError):  # a UserError is a ValueError; the CLI prints it as one line
  """A config.json this port cannot serve faithfully (rather than silently computing something else)."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling. `rope_type` 'default' means none.

  yarn fields follow transformers' `_compute_yarn_parameters` so long-context Qwen2.5 configs give the same
  frequencies and attention factor as the reference.
  """

  rope_type: str = "default"
  factor: float = 1.0
  original_max_position_embeddings: int | None = None
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  attention_factor: float | None = None
  mscale: float | None = None
  mscale_all_dim: float | None = None
  truncate: bool = True

  @classmethod
  def from_hf(cls, raw: dict[str, Any] | None) -> RopeScaling:
    if not raw:
      return cls()
    rope_type = raw.get("rope_type", raw.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
      raise ConfigError(
          f"rope scaling type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    return cls(
        rope_type=rope_type,
        factor=float(raw.get("factor", 1.0)),
        original_max_position_embeddings=raw.get("original_max_position_embeddings"),
        beta_fast=float(raw.get("beta_fast") or 32.0),
        beta_slow=float(raw.get("beta_slow") or 1.0),
        attention_factor=raw.get("attention_factor"),
        mscale=raw.get("mscale"),
        mscale_all_dim=raw.get("mscale_all_dim"),
        truncate=bool(raw.get("truncate", True)),
    )

  def to_hf(self) -> dict[str, Any] | None:
    if self.rope_type == "default":
      return None
    out: dict[str, Any] = {"rope_type": self.rope_type, "factor": self.factor}
    if self.rope_type == "yarn":
      out.update(beta_fast=self.beta_fast, beta_slow=self.beta_slow, truncate=self.truncate)
      if self.original_max_position_embeddings is not None:
        out["original_max_position_embeddings"] = self.original_max_position_embeddings
      for key in ("attention_factor", "mscale", "mscale_all_dim"):
        if getattr(self, key) is not None:
          out[key] = getattr(self, key)
    return out


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
  """Architecture hyper-parameters plus what we choose: storage and compute dtypes, the full-sequence attention
  implementation and the remat policy (neither is written to config.json)."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 1e6
  rope_scaling: RopeScaling = RopeScaling()
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 32768
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype of matmuls; norms, softmax and logits stay float32
  attention: str = "auto"  # full-sequence attention: "auto" picks by platform (attention.py)
  paged_attention: str = "auto"  # decode attention over a paged KV pool: "auto" picks by platform
  remat: str = "none"  # default remat policy of the scanned layers (REMAT_POLICIES)
  # lax.scan's unroll of the layer loop: 1 compiles one layer; `retro-jax plan` unrolls a 2-layer copy to cost one
  # layer, since XLA's cost model counts a loop body once
  scan_unroll: int = 1

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
          f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads ({self.num_kv_heads})")
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise ConfigError(f"attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {self.attention!r}")
    if self.paged_attention not in PAGED_ATTENTION_IMPLEMENTATIONS:
      raise ConfigError(f"paged_attention must be one of {PAGED_ATTENTION_IMPLEMENTATIONS}, "
                        f"got {self.paged_attention!r}")
    if self.remat not in REMAT_POLICIES:
      raise ConfigError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
    for name in ("param_dtype", "dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ConfigError(f"{name} must be one of {sorted(_DTYPES)}, got {getattr(self, name)!r}")

  @property
  def jnp_param_dtype(self):
    return _DTYPES[self.param_dtype]

  @property
  def jnp_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def num_params(self) -> int:
    d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
    attn = d * h * (self.num_heads * 2 + self.num_kv_heads * 2) + h * (self.num_heads + 2 * self.num_kv_heads)
    layer = attn + 3 * d * f + 2 * d
    embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
    return self.num_layers * layer + embed + d

  def replace(self, **changes) -> Qwen2Config:
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_hf_dict(cls, raw: dict[str, Any], *, param_dtype: str | None = None,
                   dtype: str | None = None) -> Qwen2Config:
    """Reads either config.json dialect. `param_dtype`/`dtype` default to the checkpoint's own dtype."""
    model_type = raw.get("model_type", "qwen2")
    if model_type != "qwen2":
      raise ConfigError(f"model_type {model_type!r} is not a Qwen2-family model (expected 'qwen2')")
    if raw.get("use_sliding_window", False):
      raise ConfigError("use_sliding_window=True is not supported (no published Qwen2.5 checkpoint enables it)")
    rope_params = raw.get("rope_parameters") or {}
    rope_theta = raw.get("rope_theta", rope_params.get("rope_theta", 1e6))
    scaling_raw = raw.get("rope_scaling")
    if scaling_raw is None and rope_params.get("rope_type", "default") != "default":
      scaling_raw = rope_params
    ckpt_dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    if ckpt_dtype not in _DTYPES:
      ckpt_dtype = "float32"
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    num_heads = raw["num_attention_heads"]
    return cls(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=raw.get("num_key_value_heads", num_heads),
        head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
        rope_theta=float(rope_theta),
        rope_scaling=RopeScaling.from_hf(scaling_raw),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids,
        param_dtype=param_dtype or ckpt_dtype,
        dtype=dtype or ckpt_dtype,
    )

  def to_hf_dict(self) -> dict[str, Any]:
    """Writes the transformers-4.x dialect, which both 4.x and 5.x read."""
    out: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rope_theta": self.rope_theta,
        "rope_scaling": self.rope_scaling.to_hf(),
        "rms_norm_eps": self.rms_norm_eps,
        "tie_word_embeddings": self.tie_word_embeddings,
        "max_position_embeddings": self.max_position_embeddings,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "torch_dtype": self.param_dtype,
    }
    if self.bos_token_id is not None:
      out["bos_token_id"] = self.bos_token_id
    if self.eos_token_ids:
      out["eos_token_id"] = (self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids))
    return out

  @classmethod
  def from_pretrained(cls, model_dir: str, **dtypes) -> Qwen2Config:
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"no config.json in {model_dir!r}: not an HF model directory")
    with open(path, encoding="utf-8") as f:
      return cls.from_hf_dict(json.load(f), **dtypes)


# Published Qwen2-family shapes, for random-weight speed work without the checkpoints (benchmarks, capacity
# planning). Loading a real checkpoint always reads its own config.json instead.
_QWEN25_VOCAB = 151936
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(vocab_size=_QWEN25_VOCAB, hidden_size=896, intermediate_size=4864, num_layers=24,
                         num_heads=14, num_kv_heads=2, head_dim=64, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(vocab_size=_QWEN25_VOCAB, hidden_size=1536, intermediate_size=8960, num_layers=28,
                         num_heads=12, num_kv_heads=2, head_dim=128, tie_word_embeddings=True),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                       num_kv_heads=4, head_dim=128, tie_word_embeddings=False),
    "qwen2.5-32b": dict(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_layers=64, num_heads=40,
                        num_kv_heads=8, head_dim=128, tie_word_embeddings=False),
}


def shape_config(name: str, **overrides) -> Qwen2Config:
  """A Qwen2Config of a published shape (see SHAPES), e.g. shape_config("qwen2.5-1.5b", dtype="bfloat16")."""
  if name not in SHAPES:
    raise ConfigError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
  return Qwen2Config(**{**SHAPES[name], **overrides})
