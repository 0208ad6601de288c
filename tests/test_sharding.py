"""`sharding.constrain`: applied when the dimensions divide the mesh, dropped with one warning when not."""
import logging

import jax
import jax.numpy as jnp

from retro_jax import sharding


def _lowered_text(x, mesh):
  with sharding.use_rules(mesh, sharding.TRAIN_RULES):
    return jax.jit(lambda x: sharding.constrain(x, ("batch", None)) * 2).lower(x).as_text()


def test_constrain_applies_or_drops_with_one_warning(caplog):
  mesh = sharding.make_mesh(data=4, devices=jax.devices()[:4])
  with caplog.at_level(logging.WARNING, logger="retro_jax.sharding"):
    assert "sharding_constraint" in _lowered_text(jnp.ones((8, 3)), mesh)
    assert not caplog.records
    for rows in (1, 2, 6):  # none divides by 4: dropped each time, warned about once
      assert "sharding_constraint" not in _lowered_text(jnp.ones((rows, 3)), mesh)
  assert len(caplog.records) == 1
  assert "'batch' of size 1 over ('data', 'fsdp') (4 ways)" in caplog.records[0].getMessage()
