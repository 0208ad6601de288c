"""`retro-jax plan`: AOT-compile a config's programs for a TPU topology on any machine (see cli.py)."""
