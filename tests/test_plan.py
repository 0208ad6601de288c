"""`retro-jax plan`: AOT compiles for a TPU topology (libtpu, no TPU), checked against hand-computed bytes.

Small on purpose (one layer, short rows): each compile for the TPU target costs seconds on 2 cores.
"""
import json
import os

import jax
import pytest
from flax import nnx

import retro_jax
from retro_jax import sharding
from retro_jax.engine import Qwen2Engine
from retro_jax.models.config import Qwen2Config
from retro_jax.models.qwen2 import Qwen2ForCausalLM
from retro_jax.plan import chips
from retro_jax.plan.cli import plan_main

TINY = os.path.join(os.path.dirname(retro_jax.__file__), "assets", "tiny_reasoner")
SMALL_SFT = ["--config", "configs/tiny_reasoner_sft.py", "--topology", "v5e:2x2", "--num_layers", "2",
             "--config.data.seq_len=128", "--config.loss_chunk_size=128"]


def _by_name(plan):
  return {p["name"]: p for p in plan["programs"]}


def _plan(argv, tmp_path, name="plan.json"):
  out = str(tmp_path / name)
  code = plan_main(argv + ["--output", out])
  with open(out, encoding="utf-8") as f:
    return code, json.load(f)


def test_sft_plan_bytes_match_the_train_state_by_hand(tmp_path, capsys):
  # Replicated params (data=4) make the per-device train state countable by hand: float32 params, Adam's m and
  # v, plus a few scalars (step, schedule and Adam counts, the rng key); the batch adds 5 int32 [rows, t] arrays.
  # TPU memory tiles pad an array's minor dims (this model's head_dim of 32 fills a quarter of a 128 lane tile),
  # so the compiled figure may exceed the count by that padding, never fall below it.
  code, plan = _plan(SMALL_SFT + ["--config.mesh.data=4", "--config.mesh.fsdp=1", "--config.batch_size=8"],
                     tmp_path)
  assert code == 0
  params = Qwen2Config.from_pretrained(TINY).replace(num_layers=2).num_params
  batch = 5 * 4 * (8 // 4) * 128
  assert [p["name"] for p in plan["programs"]] == ["loss_and_grad", "train_step", "eval_step"]
  micro, step, eval_ = plan["programs"]
  state = 3 * 4 * params
  # one micro-batch (here the whole batch: no accumulation) reads the params and writes their gradients, with
  # Adam's m and v resident, and does the step's work less the optimizer update
  assert 4 * params + batch <= micro["argument_bytes"] <= 1.15 * (4 * params + batch)
  assert 4 * params <= micro["output_bytes"] <= 1.15 * 4 * params
  assert micro["resident_bytes"] == eval_["resident_bytes"]
  assert 0.9 <= micro["flops"] / step["flops"] <= 1.0
  assert state + batch <= step["argument_bytes"] <= 1.15 * (state + batch)
  assert step["alias_bytes"] >= state  # the state is donated: updated in place
  assert step["total_bytes"] == (step["argument_bytes"] + step["output_bytes"] - step["alias_bytes"]
                                 + step["temp_bytes"])
  assert 0 <= eval_["resident_bytes"] - 2 * 4 * params <= 64  # Adam's m and v stay on device during eval (counted
  # from the shapes, unpadded)
  assert plan["topology"]["name"] == "v5e:2x2" and plan["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  assert plan["versions"]["libtpu"] != "not installed"
  # XLA's FLOPs of one step on one device against the trainer's model-FLOPs count: no remat, so the hardware does
  # the model's work plus the masked half of causal attention, the norms and the softmaxes (a few % at t=128).
  # (Splash attention's Pallas kernel is counted by its own cost estimate, a little under the model's count.)
  # XLA counts the layers' scan body once; the plan costs one layer from a 1-layer and an unrolled 2-layer
  # compile, so both layers are in the count (XLA's own count alone: ~0.6 of the model's here).
  model = plan["training"]["model_flops_per_step_per_device"]
  assert 0.95 <= step["flops"] / model <= 1.15
  assert step["uncounted_loops"] == 0
  assert step["roofline_s"] == pytest.approx(max(step["flops"] / 197e12, step["bytes_accessed"] / 819e9))
  assert "train step: 1,024 tokens" in capsys.readouterr().out


def test_misfit_exits_nonzero_naming_the_program_and_the_fix(tmp_path, capsys):
  # a 0.5B-shape vocabulary, 64 rows of 2048 per device in one micro-batch: the logits chunks overflow 16 GB.
  # Two layers, so the shallow compiles that cost the layers' scan are refused for HBM too (and must not crash)
  code, plan = _plan(["--config", "configs/tiny_reasoner_sft.py", "--topology", "v5e:2x2", "--shape", "qwen2.5-0.5b",
                      "--num_layers", "2", "--config.batch_size=256", "--config.data.seq_len=2048"], tmp_path)
  assert code == 1 and not plan["fits"]
  step = _by_name(plan)["train_step"]
  assert step["total_bytes"] > 16e9 and not step["fits"]
  err = capsys.readouterr().err
  assert "train_step needs" in err and "GB over the 16.00 GB" in err
  assert "--config.grad_accum_steps=64" in err and "--config.remat=full" in err
  assert "loss_and_grad needs" in err and err.count("--config.grad_accum_steps=64") == 2  # the micro-batch, too


def test_generate_plan_reports_kv_bytes_and_decode_roofline(tmp_path):
  code, plan = _plan(["--command", "generate", "--model", TINY, "--topology", "v5e:2x2", "--tensor", "1",
                      "--config.engine.max_concurrent_decodes=2", "--config.engine.max_seq_len=128"], tmp_path)
  assert code == 0
  cfg = Qwen2Config.from_pretrained(TINY)
  serving = plan["serving"]
  # keys and values, every layer, slot and position, float32 (one chip per replica: its vocab of 405 does not
  # split over tensor), so the 4 chips hold 4 replicas
  kv = 2 * cfg.num_layers * 2 * 128 * cfg.num_kv_heads * cfg.head_dim * 4
  assert serving["kv_cache_bytes"] == kv and serving["replicas"] == 4
  assert serving["kv_bytes_per_token"] == kv / (2 * 128)
  names = [p["name"] for p in plan["programs"]]
  assert names == ["prefill[2x128]", "insert[2x128]", "generate[128]"]  # the largest prefill batch
  generate = plan["programs"][-1]
  assert generate["argument_bytes"] >= serving["weights_bytes"] + kv
  assert generate["loop_scale"] == 16  # XLA counts the scan over decode steps once
  assert serving["decode_tokens_per_s_roofline"] == pytest.approx(2 * 16 / generate["roofline_s"])
  assert serving["decode_tokens_per_s_read_bound"] == pytest.approx(2 * 819e9 / (serving["weights_bytes"] + kv))


def test_generate_updates_the_kv_cache_in_place():
  # The decode loop writes each new token into the carried cache. A per-row dynamic_update_slice vmapped over the
  # slots made XLA pick a batch-major layout inside the loop and copy the whole cache in and out: 2.04x the KV
  # cache in temporaries at this shape (the 7B search plan: 94.3 of 95 GB per chip), 0.02x with the scatter of
  # kv_cache.write_rows. Head dim 128 and one KV head per chip, as the 7B and 32B models serve on tensor=4; two
  # layers (one layer did not show the copy). Only the generate program is compiled, for v5e.
  cfg = Qwen2Config(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=8,
                    num_kv_heads=4, head_dim=128, max_position_embeddings=4096, dtype="bfloat16",
                    param_dtype="bfloat16")
  mesh = sharding.make_mesh(1, 1, 4, devices=chips.devices("v5e:2x2"))
  model = nnx.eval_shape(lambda: Qwen2ForCausalLM(cfg, nnx.Rngs(0)))
  engine = Qwen2Engine(model, max_concurrent_decodes=16, max_seq_len=4096, mesh=mesh, kv_memory_bytes=1 << 40,
                       kv_page_size=0)
  state = nnx.state(model)
  shardings = nnx.to_pure_dict(sharding.state_shardings(state, mesh, sharding.SERVE_RULES))
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nnx.to_pure_dict(state),
                        shardings)
  lowered = dict(engine.lowered_programs(params, prefill_lengths=[16], attend_lengths=[4096]))["generate[4096]"]
  memory = lowered.compile().memory_analysis()
  kv = 2 * 2 * 16 * 4096 * 1 * 128 * 2  # keys and values, 2 layers, 16 slots, one KV head per chip, bf16
  assert memory.temp_size_in_bytes < 0.25 * kv
  assert memory.alias_size_in_bytes >= kv  # the donated cache comes back in the same buffers


@pytest.mark.parametrize("argv, message", [
    ([], "--config FILE or --command"),
    (["--config", "configs/tiny_reasoner_sft.py", "--topology", "v9z:2x2"], "unknown TPU generation"),
    (["--config", "configs/tiny_reasoner_sft.py", "--topology", "v5e:2x2", "--config.mesh.data=8",
      "--config.mesh.fsdp=1"], "needs 8 devices, only 4"),
    (["--command", "search", "--model", "/nowhere/model"], "pass --shape"),
    (["--config", "configs/tiny_reasoner_sft.py", "--topology", "v5e:2x2", "--num_slices", "2"],
     "data is the axis across slices"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
  assert plan_main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert message in err and "\n" not in err


def test_accelerator_types_map_to_slice_shapes():
  assert chips.resolve("v5p-32")[1] == "v5p:2x2x4"  # v5p counts TensorCores: 16 chips
  assert chips.resolve("v4-8")[1] == "v4:2x2x1"
  assert chips.resolve("v5litepod-16")[1] == "v5e:4x4"  # v5e counts chips
  assert chips.resolve("v6e-8")[1] == "v6e:2x4"
  assert chips.resolve("v5p:4x4x8")[1] == "v5p:4x4x8"
