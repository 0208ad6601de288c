"""Building a `TextGenerator`: from an HF model directory (CLIs) or from a model in memory (tests, demo)."""
from __future__ import annotations

import sys

from jax.sharding import Mesh

from retro_jax import sharding

from retro_jax.engine.driver import Driver, Tokenizer
from retro_jax.engine.kv_budget import DEFAULT_KV_MEMORY_FRACTION
from retro_jax.engine.qwen2_engine import Qwen2Engine, load_engine
from retro_jax.models.config import Qwen2Config
from retro_jax.models.qwen2 import Qwen2ForCausalLM
from retro_jax.user_errors import UserError


def position_limit(config: Qwen2Config) -> int:
  """Positions the model handles: `max_position_embeddings`, or, when its config.json sets RoPE scaling
  (YaRN, linear...), the scaled length factor x original positions, which is what that scaling is for."""
  if config.rope_scaling.rope_type == "default":
    return config.max_position_embeddings
  original = config.rope_scaling.original_max_position_embeddings or config.max_position_embeddings
  return max(config.max_position_embeddings, int(config.rope_scaling.factor * original))


def resolve_max_seq_len(model_dir: str, max_seq_len: int, option: str = "--config.engine.max_seq_len") -> int:
  """The engine's sequence limit: `max_seq_len`, or the model's position limit when it is 0. A limit beyond the
  model's positions is refused (the model was never trained there, so its outputs would be silently wrong)."""
  limit = position_limit(Qwen2Config.from_pretrained(model_dir))
  if max_seq_len <= 0:
    return limit
  if max_seq_len > limit:
    raise UserError(f"{option}={max_seq_len} is beyond the model's {limit} positions (max_position_embeddings in "
                    f"{model_dir}/config.json)", f"lower it to {limit} or less (0 means the model's limit), or "
                    "set rope_scaling in config.json to extend the context explicitly")
  return max_seq_len


def load_text_generator(model_dir: str, *, max_concurrent_decodes: int = 8, max_seq_len: int = 2048,
                        dtype: str = "float32", mesh: Mesh | None = None, decode_steps: int = 16,
                        prefix_cache_bytes: int = 1 << 30, progress: bool = True,
                        kv_memory_fraction: float = DEFAULT_KV_MEMORY_FRACTION, kv_memory_bytes: int = 0,
                        kv_page_size: int = 16, kv_dtype: str = "") -> Driver:
  """A `TextGenerator` over an HF checkpoint directory (config.json, safetensors, tokenizer files).

  `dtype` is both the storage and the compute dtype ("float32", "bfloat16"). EOS ids are the tokenizer's
  plus the config's. See driver.py for the over-long, EOS and stop-string policies. `max_concurrent_decodes`
  0 takes as many slots as the KV budget (`kv_memory_fraction` / `kv_memory_bytes`, kv_budget.py) holds;
  slots that do not fit raise `KVBudgetError` before any KV is allocated. `kv_page_size` > 0 makes the budget a
  pool of pages that slots take as their tokens arrive (engine/paging.py); 0 reserves a dense row per slot.
  `kv_dtype` "int8" stores that pool as int8 with per-position, per-head scales.
  """
  from retro_jax.tokenization import load_tokenizer  # pylint: disable=import-outside-toplevel

  tokenizer = load_tokenizer(model_dir)
  eos = tuple(dict.fromkeys(tuple(tokenizer.eos_token_ids) + Qwen2Config.from_pretrained(model_dir).eos_token_ids))
  engine = load_engine(model_dir, mesh=mesh, dtype=dtype, max_concurrent_decodes=max_concurrent_decodes,
                       max_seq_len=max_seq_len, decode_steps=decode_steps, eos_token_ids=eos,
                       kv_memory_fraction=kv_memory_fraction, kv_memory_bytes=kv_memory_bytes, kv_page_size=kv_page_size,
                       kv_dtype=kv_dtype)
  if progress:
    print(f"[engine] {engine.kv_budget.describe(engine.max_concurrent_decodes, engine.max_seq_len, kv_page_size)}",
          file=sys.stderr)
  return Driver(engine, tokenizer, prefix_cache_bytes=prefix_cache_bytes, progress=progress)


def text_generator_from_model(model: Qwen2ForCausalLM, tokenizer: Tokenizer, *, max_concurrent_decodes: int = 8,
                              max_seq_len: int = 2048, mesh: Mesh | None = None,
                              eos_token_ids: tuple[int, ...] | None = None, prefix_cache_bytes: int = 1 << 30,
                              progress: bool = True, **engine_kwargs) -> Driver:
  """A `TextGenerator` over an in-memory model (params are moved onto `mesh`).

  `eos_token_ids` defaults to the tokenizer's `eos_token_ids` when it has them, else the model config's.
  `engine_kwargs` go to `Qwen2Engine` (decode_steps, min_prefill_bucket, min_attend_bucket, kv_memory_*).
  """
  if eos_token_ids is None:
    eos_token_ids = tuple(getattr(tokenizer, "eos_token_ids", ()) or model.config.eos_token_ids)
  engine = Qwen2Engine(model, max_concurrent_decodes=max_concurrent_decodes, max_seq_len=max_seq_len, mesh=mesh,
                       eos_token_ids=eos_token_ids, **engine_kwargs)
  return Driver(engine, tokenizer, prefix_cache_bytes=prefix_cache_bytes, progress=progress)


def serving_mesh_for(model_dir: str, engine) -> Mesh:
  """This process's serving mesh from a CLI's `engine.tensor` / `engine.replicas_per_host` and the model's shape
  (see sharding.serving_mesh)."""
  model = Qwen2Config.from_pretrained(model_dir)
  return sharding.serving_mesh(engine.tensor, engine.replicas_per_host, tensor_dims=(
      model.num_heads, model.num_kv_heads, model.intermediate_size, model.vocab_size),
      slots=engine.max_concurrent_decodes)
