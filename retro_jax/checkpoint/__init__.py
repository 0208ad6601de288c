"""Checkpoint IO: HF safetensors <-> params (sharded load straight onto the mesh, export back)."""
from retro_jax.checkpoint.hf import load_pretrained, save_pretrained, shard_model
from retro_jax.checkpoint.safetensors_io import CheckpointError

__all__ = ["CheckpointError", "load_pretrained", "save_pretrained", "shard_model"]
