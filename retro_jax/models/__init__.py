"""Qwen2-family model: config, the NNX module with its pure forward, and the external KV cache."""
from retro_jax.models.config import ConfigError, Qwen2Config, RopeScaling
from retro_jax.models.kv_cache import KVCache
from retro_jax.models.qwen2 import Qwen2ForCausalLM, forward, positions_from_segment_ids

__all__ = ["ConfigError", "KVCache", "Qwen2Config", "Qwen2ForCausalLM", "RopeScaling", "forward",
           "positions_from_segment_ids"]
