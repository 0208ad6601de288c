"""Serving from the CLIs on a sharded mesh: engine.tensor chips per replica x engine.replicas_per_host replicas
over the 8 fake devices give the outputs of one device (float32, greedy: tensor parallelism reorders sums, which
must not change an argmax with the margins of this model)."""
import json

import jax
import pytest

from retro_jax import sharding
from retro_jax.search import cli
from retro_jax.tasks.arithmetic import make_splits, write_problems
from tests.hf_fixtures import save_char_tokenizer, save_tiny_qwen2


def test_serving_mesh_layouts():
  shape = lambda mesh: (mesh.shape["data"], mesh.shape["tensor"])
  assert shape(sharding.serving_mesh(tensor_dims=(8, 2, 128, 128))) == (4, 2)  # the 2 KV heads bound tensor
  assert shape(sharding.serving_mesh(tensor_dims=(6, 2, 512, 405))) == (8, 1)  # an odd vocabulary: replicas only
  assert shape(sharding.serving_mesh(tensor=4, tensor_dims=(8, 4, 128, 128))) == (2, 4)
  assert shape(sharding.serving_mesh(replicas=2, tensor_dims=(8, 4, 128, 128))) == (2, 4)
  assert shape(sharding.serving_mesh(tensor=1, replicas=1)) == (1, 1)
  # Automatic replicas split the decode slots evenly: 4 slots on 8 one-chip replicas leave 4 chips idle.
  assert shape(sharding.serving_mesh(tensor_dims=(6, 1, 512, 405), slots=4)) == (4, 1)
  assert shape(sharding.serving_mesh(tensor_dims=(6, 1, 512, 405), slots=6)) == (6, 1)
  assert set(sharding.serving_mesh().devices.flat) <= set(jax.local_devices())
  with pytest.raises(sharding.ShardingError, match="need 12 local devices"):
    sharding.serving_mesh(tensor=4, replicas=3)


def test_generate_cli_on_a_sharded_mesh_equals_one_device(tmp_path):
  model = tmp_path / "model"
  save_tiny_qwen2(str(model), vocab_size=128, intermediate_size=128, num_heads=8, num_kv_heads=2)
  save_char_tokenizer(str(model))
  problems, _ = make_splits(seed=3, n_train=12, n_eval=0)
  write_problems(tmp_path / "problems.jsonl", problems)
  outputs = {}
  for tensor, replicas in ((1, 1), (2, 4)):
    output = tmp_path / f"traces_{tensor}x{replicas}.jsonl"
    assert cli.generate_main([
        "--model", str(model), "--input", str(tmp_path / "problems.jsonl"), "--output", str(output),
        "--config.generate.temperature=0.0", "--config.generate.num_samples=1", "--config.generate.max_new_tokens=16",
        "--config.engine.max_seq_len=128", "--config.engine.max_concurrent_decodes=8", "--config.progress=False",
        "--config.grading.num_workers=1", f"--config.engine.tensor={tensor}",
        f"--config.engine.replicas_per_host={replicas}"]) == 0
    outputs[tensor] = sorted((r["id"], r["trace"]) for r in map(json.loads, output.read_text().splitlines()))
  assert len(outputs[1]) == 12 and len({trace for _, trace in outputs[1]}) > 1
  assert outputs[2] == outputs[1]
