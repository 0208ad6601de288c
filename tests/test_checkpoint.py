"""HF checkpoint IO: both config.json dialects, sharded index files, mesh loading, export round trip, bad input."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retro_jax import sharding
from retro_jax.checkpoint import CheckpointError, load_pretrained, save_pretrained
from retro_jax.checkpoint.safetensors_io import SafetensorsDir, write_safetensors_dir
from retro_jax.models import ConfigError, Qwen2Config
from tests.hf_fixtures import save_tiny_qwen2, torch_logits

TOKENS = np.random.RandomState(0).randint(2, 96, (8, 11)).astype(np.int32)
POSITIONS = jnp.broadcast_to(jnp.arange(11), (8, 11))


def _logits(model, tokens=TOKENS):
  return np.asarray(model(jnp.asarray(tokens), POSITIONS[:len(tokens)])[0])


def test_sharded_index_checkpoint_loads(tmp_path):
  ref_model = save_tiny_qwen2(str(tmp_path), max_shard_size="40KB")
  assert os.path.exists(tmp_path / "model.safetensors.index.json")
  assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
  model = load_pretrained(str(tmp_path))
  np.testing.assert_allclose(_logits(model), torch_logits(ref_model, TOKENS), rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [dict(data=4, tensor=2), dict(data=8), dict(fsdp=2, tensor=2, data=2)])
def test_mesh_load_equals_single_device(tmp_path, shape):
  save_tiny_qwen2(str(tmp_path), num_kv_heads=2)
  single = _logits(load_pretrained(str(tmp_path)))
  mesh = sharding.make_mesh(**shape)
  for rules in (sharding.SERVE_RULES, sharding.TRAIN_RULES):
    model = load_pretrained(str(tmp_path), mesh=mesh, rules=rules)
    kernel = model.layers.attention.k_kernel[...]  # [layers, d, k, h], layers stacked
    assert len(kernel.sharding.device_set) == mesh.size
    with sharding.use_rules(mesh, rules):
      sharded = jax.jit(lambda tokens: model(tokens, POSITIONS)[0])(jnp.asarray(TOKENS))
    np.testing.assert_allclose(np.asarray(sharded), single, rtol=0, atol=1e-5)


def test_tensor_parallel_beyond_kv_heads_is_a_clear_error(tmp_path):
  save_tiny_qwen2(str(tmp_path), num_kv_heads=2)
  with pytest.raises(sharding.ShardingError, match="kv_heads.*bounded by the number of KV heads"):
    load_pretrained(str(tmp_path), mesh=sharding.make_mesh(tensor=4, data=2))


@pytest.mark.parametrize("tie", [True, False])
def test_export_round_trip_through_transformers(tmp_path, tie):
  import transformers

  save_tiny_qwen2(str(tmp_path / "src"), tie_word_embeddings=tie)
  model = load_pretrained(str(tmp_path / "src"), mesh=sharding.make_mesh(data=4, tensor=2))
  save_pretrained(model, str(tmp_path / "out"), max_shard_bytes=60_000)
  assert os.path.exists(tmp_path / "out" / "model.safetensors.index.json")
  reloaded = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path / "out"))
  assert reloaded.config.tie_word_embeddings == tie
  np.testing.assert_allclose(torch_logits(reloaded, TOKENS), _logits(model), rtol=0, atol=1e-5)
  again = load_pretrained(str(tmp_path / "out"))  # and our own loader reads our export
  np.testing.assert_allclose(_logits(again), _logits(model), rtol=0, atol=1e-5)


def test_bfloat16_export_keeps_bits(tmp_path):
  save_tiny_qwen2(str(tmp_path / "src"), dtype="bfloat16")
  model = load_pretrained(str(tmp_path / "src"))
  save_pretrained(model, str(tmp_path / "out"))
  src, out = SafetensorsDir(str(tmp_path / "src")), SafetensorsDir(str(tmp_path / "out"))
  assert src.keys() - {"lm_head.weight"} <= out.keys()
  for key in src.keys():
    np.testing.assert_array_equal(np.asarray(src.get(key)), np.asarray(out.get(key)))


def _rewrite(model_dir, drop=None, replace=None, add=None):
  store = SafetensorsDir(model_dir)
  tensors = [(k, np.array(store.get(k))) for k in sorted(store.keys()) if k != drop]
  if replace:
    tensors = [(k, replace[1] if k == replace[0] else v) for k, v in tensors]
  if add:
    tensors.append(add)
  for name in os.listdir(model_dir):
    if name.endswith(".safetensors"):
      os.remove(os.path.join(model_dir, name))
  write_safetensors_dir(model_dir, tensors)


def test_missing_tensor_is_named(tmp_path):
  save_tiny_qwen2(str(tmp_path))
  _rewrite(str(tmp_path), drop="model.layers.1.self_attn.k_proj.bias")
  with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.self_attn\.k_proj\.bias'"):
    load_pretrained(str(tmp_path))


def test_wrong_shape_is_named(tmp_path):
  save_tiny_qwen2(str(tmp_path))
  _rewrite(str(tmp_path), replace=("model.layers.0.mlp.up_proj.weight", np.zeros((100, 64), np.float32)))
  with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight' has shape \(100, 64\), "
                                            r"expected \(128, 64\)"):
    load_pretrained(str(tmp_path))


def test_unexpected_tensor_is_named(tmp_path):
  save_tiny_qwen2(str(tmp_path))
  _rewrite(str(tmp_path), add=("model.layers.5.self_attn.q_proj.weight", np.zeros((4, 4), np.float32)))
  with pytest.raises(CheckpointError, match=r"unexpected tensors.*model\.layers\.5\.self_attn\.q_proj\.weight"):
    load_pretrained(str(tmp_path))


def test_pickle_checkpoints_are_refused(tmp_path):
  save_tiny_qwen2(str(tmp_path))
  os.remove(tmp_path / "model.safetensors")
  (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
  with pytest.raises(CheckpointError, match="pickled .bin files are refused"):
    load_pretrained(str(tmp_path))


@pytest.mark.parametrize("rope_scaling", [{"rope_type": "dynamic", "factor": 2.0},
                                          {"type": "longrope", "factor": 2.0}])
def test_unsupported_rope_type_is_a_clear_error(rope_scaling):
  raw = {"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
         "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "rope_scaling": rope_scaling}
  with pytest.raises(ConfigError, match="rope scaling type .* is not supported"):
    Qwen2Config.from_hf_dict(raw)


BASE_KEYS = {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
             "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
             "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
             "bos_token_id": 151646, "eos_token_id": 151643}


def test_transformers4_config_dialect():
  """As in the published DeepSeek-R1-Distill-Qwen-7B config.json."""
  config = Qwen2Config.from_hf_dict({**BASE_KEYS, "rope_theta": 10000, "rope_scaling": None,
                                     "torch_dtype": "bfloat16", "use_sliding_window": False})
  assert (config.rope_theta, config.rope_scaling.rope_type, config.param_dtype) == (10000.0, "default", "bfloat16")
  assert config.head_dim == 128 and config.eos_token_ids == (151643,)


def test_transformers5_config_dialect():
  config = Qwen2Config.from_hf_dict({**BASE_KEYS, "dtype": "bfloat16",
                                     "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                                         "original_max_position_embeddings": 32768}})
  assert config.rope_theta == 1e6 and config.param_dtype == "bfloat16"
  assert config.rope_scaling.rope_type == "yarn" and config.rope_scaling.factor == 4.0


def test_saved_config_reloads_in_both_directions(tmp_path):
  import transformers

  config = Qwen2Config.from_hf_dict({**BASE_KEYS, "rope_theta": 1e6,
                                     "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": 32768}})
  (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
  assert Qwen2Config.from_pretrained(str(tmp_path)) == config
  theirs = transformers.AutoConfig.from_pretrained(str(tmp_path))
  assert theirs.num_key_value_heads == 4 and theirs.rope_parameters["rope_type"] == "yarn"


@pytest.mark.parametrize("name,published", [("qwen2.5-0.5b", 494_032_768), ("qwen2.5-1.5b", 1_543_714_304),
                                            ("qwen2.5-7b", 7_615_616_512), ("qwen2.5-32b", 32_763_876_352)])
def test_shape_presets_have_the_published_parameter_counts(name, published):
  from retro_jax.models.config import shape_config
  assert shape_config(name).num_params == published  # the model cards' totals
