"""SFT and DPO trainers on the device mesh: data (render, mask, pack), grain input, losses, optax, orbax.

Public API (imported lazily, so `retro-jax --help` does not pay for jax/orbax/grain):
- `run_sft(config, on_step=None) -> dict` and `run_dpo(config, on_step=None) -> dict`: whole jobs;
- `sft_config()` / `dpo_config()`: the default ml_collections configs every experiment file starts from;
- `sft_main(argv)` / `dpo_main(argv)`: the `retro-jax sft` / `retro-jax dpo` entry points.
"""
import importlib

_EXPORTS = {
    "run_sft": "retro_jax.train.sft",
    "run_dpo": "retro_jax.train.dpo",
    "sft_config": "retro_jax.train.config",
    "dpo_config": "retro_jax.train.config",
    "sft_main": "retro_jax.train.cli",
    "dpo_main": "retro_jax.train.cli",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'retro_jax.train' has no attribute {name!r}")
