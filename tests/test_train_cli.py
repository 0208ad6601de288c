"""`retro-jax sft` / `retro-jax dpo` flags, and the experiment configs (the real-run meshes are checked
against the real model shapes on an abstract mesh of the stated size)."""
import json
import os

import pytest
from flax import nnx
from jax.sharding import AbstractMesh

from retro_jax import sharding
from retro_jax.models.config import Qwen2Config
from retro_jax.models.qwen2 import Qwen2ForCausalLM
from retro_jax.train import cli
from retro_jax.user_errors import UserError
from tests.hf_fixtures import save_char_tokenizer
from tests.train_helpers import arithmetic_records, write_jsonl

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def test_sft_main_builds_a_model_from_scratch_with_overrides(tmp_path):
  base = str(tmp_path / "tokenizer")
  save_char_tokenizer(base)  # init="scratch" needs only a tokenizer
  train = write_jsonl(str(tmp_path / "search.jsonl"), arithmetic_records(8))  # has `revised_trace`
  workdir = str(tmp_path / "run")
  code = cli.sft_main([
      "--config", os.path.join(CONFIGS, "tiny_reasoner_sft.py") + ":scratch", f"--config.tokenizer_dir={base}",
      f"--config.data.train_path={train}", f"--config.workdir={workdir}", "--config.data.trace_field=revised_trace",
      "--config.data.seq_len=64", "--config.batch_size=2", "--config.num_train_steps=2", "--config.mesh.fsdp=1",
      "--config.model.hidden_size=32", "--config.model.intermediate_size=64", "--config.model.num_layers=1",
      "--config.model.num_heads=4", "--config.model.head_dim=8", "--config.model.vocab_size=96",
      "--config.data.eval_fraction=0.0"])
  assert code == 0
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
    summary = json.load(f)
  assert summary["step"] == 2 and summary["data"]["train_examples"] == 8
  config = Qwen2Config.from_pretrained(summary["export_dir"])
  assert (config.num_layers, config.hidden_size, config.tie_word_embeddings) == (1, 32, True)


def test_bad_flags_fail_with_a_message():
  with pytest.raises(UserError, match="--config FILE is not given"):
    cli.parse_config([], "sft")
  # A typo in a key is an error, not a silently ignored setting.
  with pytest.raises(UserError, match="unknown config key --config.dpo.betta \\(did you mean 'beta'\\?\\)"):
    cli.parse_config(["--config", os.path.join(CONFIGS, "tiny_reasoner_dpo.py"), "--config.dpo.betta=1"], "dpo")
  with pytest.raises(UserError, match="confg"):
    cli.parse_config(["--confg", os.path.join(CONFIGS, "tiny_reasoner_dpo.py")], "dpo")


# config file -> (model shape, chips of the stated TPU slice). Two layers stand for the real 28 / 64: every
# layer has the same shapes, and the check is about how each dimension splits over the mesh.
REAL_RUNS = {
    "r1_distill_7b_self_improve.py": (dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                           num_layers=2, num_heads=28, num_kv_heads=4, head_dim=128), 16),
    "qwen25_32b_weak_to_strong.py": (dict(vocab_size=152064, hidden_size=5120, intermediate_size=27648,
                                          num_layers=2, num_heads=40, num_kv_heads=8, head_dim=128), 128),
}


@pytest.mark.parametrize("name", sorted(REAL_RUNS))
def test_real_run_configs_fit_their_mesh(name):
  config = cli.parse_config(["--config", os.path.join(CONFIGS, name)], "sft")
  shape, chips = REAL_RUNS[name]
  sizes = (config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  assert sizes[0] * sizes[1] * sizes[2] == chips
  mesh = AbstractMesh(sizes, sharding.MESH_AXES)
  abstract = nnx.eval_shape(lambda: Qwen2ForCausalLM(Qwen2Config(**shape), nnx.Rngs(0)))
  sharding.state_shardings(nnx.state(abstract), mesh, sharding.TRAIN_RULES)  # raises if a dim does not split
  micro = config.batch_size // config.grad_accum_steps
  assert micro * config.grad_accum_steps == config.batch_size and micro % (sizes[0] * sizes[1]) == 0
  assert config.mesh.tensor <= 4  # one v5p host: each host feeds its own batch shard
  assert config.data.trace_field == "revised_trace" and config.remat == "full"


def test_tiny_configs_load():
  sft = cli.parse_config(["--config", os.path.join(CONFIGS, "tiny_reasoner_sft.py")], "sft")
  assert sft.init == "pretrained" and sft.data.trace_field == "revised_trace"
  dpo = cli.parse_config(["--config", os.path.join(CONFIGS, "tiny_reasoner_dpo.py")], "dpo")
  assert (dpo.data.chosen_field, dpo.data.rejected_field, dpo.dpo.mask_shared_prefix) == ("revised_trace", "trace",
                                                                                          True)
