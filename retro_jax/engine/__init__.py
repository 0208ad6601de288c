"""JetStream-contract decoding engine: api, Qwen2 engine, sampling + constraints, prefix cache, driver.

Search and eval use only `requests` (the narrow interface) and a `TextGenerator` from `serving`.
"""
from retro_jax.engine.api import Engine, ResultTokens, SlotData
from retro_jax.engine.driver import Driver, DriverStats
from retro_jax.engine.prefix_cache import PrefixCache
from retro_jax.engine.qwen2_engine import DecodeState, ExistingPrefix, Prefix, Qwen2Engine, load_engine
from retro_jax.engine.requests import (GREEDY, R1_SAMPLING, Completion, GenerationRequest, GenerationResult,
                                       RequestQueue, SamplingParams, TextGenerator)
from retro_jax.engine.serving import load_text_generator, text_generator_from_model

__all__ = [
    "Completion", "DecodeState", "Driver", "DriverStats", "Engine", "ExistingPrefix", "GREEDY", "GenerationRequest",
    "GenerationResult", "Prefix", "PrefixCache", "Qwen2Engine", "R1_SAMPLING", "RequestQueue", "ResultTokens",
    "SamplingParams", "SlotData", "TextGenerator", "load_engine", "load_text_generator", "text_generator_from_model",
]
