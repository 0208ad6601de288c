"""`retro-jax eval`: flags and config, errors, `--compare`, and a run on a tiny random model through the engine."""
import json
import os

import pytest

import retro_jax.cli
from retro_jax.eval import cli, report, runner
from tests import test_eval_runner as fake


def test_shortcuts_and_overrides():
  config, names = cli.parse_config(["--config.eval.temperature=0.0", "--k", "8", "--benchmarks=aime24,gsm8k",
                                    "--model=m", "--config.engine.dtype=bfloat16", "--limit=5"])
  assert (config.eval.k, config.eval.temperature, config.benchmarks, config.model) == (8, 0.0, "aime24,gsm8k", "m")
  assert (config.engine.dtype, config.limit, config.output, names) == ("bfloat16", 5, "eval_output", None)
  settings = cli.eval_config(config)
  assert (settings.k, settings.temperature, settings.top_p, settings.name) == (8, 0.0, 0.95, "m")
  assert settings.modes == ("greedy", "sampled") and settings.prompt_template is None


def test_config_file(tmp_path):
  path = tmp_path / "my_eval.py"
  path.write_text("from retro_jax.eval.cli import default_eval_config\n\n"
                  "def get_config():\n  config = default_eval_config()\n  config.eval.k = 16\n"
                  "  config.benchmarks = 'math500'\n  return config\n")
  config, _ = cli.parse_config(["--config", str(path), "--config.eval.max_new_tokens=1024", "--seed=3"])
  assert (config.eval.k, config.benchmarks, config.eval.max_new_tokens, config.seed) == (16, "math500", 1024, 3)


def test_usage_and_errors(capsys, tmp_path):
  assert cli.eval_main(["--help"]) == 0
  assert "--compare" in capsys.readouterr().out
  assert retro_jax.cli.main(["eval", "--k=abc"]) == 2
  assert "flag --k=abc: invalid literal" in capsys.readouterr().err
  assert retro_jax.cli.main(["eval", "--benchmarks=aime24"]) == 2
  assert "--model is not given" in capsys.readouterr().err
  # A bad benchmark fails before any model is loaded (the model directory does not even exist).
  assert retro_jax.cli.main(["eval", "--model", str(tmp_path / "absent"), "--benchmarks=nope"]) == 2
  assert "unknown benchmark 'nope'" in capsys.readouterr().err


def test_compare_from_summary_files(tmp_path, capsys):
  before = fake.run_eval(tmp_path / "before")
  after = json.loads(json.dumps(before))
  after["benchmarks"]["toy"]["sampled"]["mean_length"] /= 2
  (tmp_path / "after.json").write_text(json.dumps(after))
  capsys.readouterr()
  assert cli.eval_main(["--compare", str(tmp_path / "before" / report.SUMMARY_FILE), str(tmp_path / "after.json"),
                        "--names=base,sft", "--output", str(tmp_path / "cmp")]) == 0
  table = capsys.readouterr().out
  assert "| Benchmark | pass@1 base | pass@1 sft |" in table and "-50.0%" in table
  assert (tmp_path / "cmp" / "comparison.md").read_text() in table
  for name in ("comparison_accuracy_vs_length.png", "comparison_length_histogram.png"):
    assert os.path.getsize(tmp_path / "cmp" / name) > 0


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
  """A random transformers Qwen2 and a character tokenizer saved in HF format (no hub, no real weights)."""
  pytest.importorskip("torch")
  from tests.hf_fixtures import save_char_tokenizer, save_tiny_qwen2  # pylint: disable=import-outside-toplevel
  model_dir = str(tmp_path_factory.mktemp("tiny_qwen2"))
  save_tiny_qwen2(model_dir, vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                  num_kv_heads=2)
  save_char_tokenizer(model_dir)
  return model_dir


def test_cli_on_a_tiny_random_model_writes_every_file_and_resumes(tiny_model_dir, tmp_path, capsys):
  problems = tmp_path / "eval.jsonl"
  problems.write_text("".join(json.dumps({"id": f"p{i}", "question": f"What is {i} + 1?", "answer": str(i + 1)})
                              + "\n" for i in range(3)))
  output = tmp_path / "out"
  argv = ["--model", tiny_model_dir, "--benchmarks", f"tiny_arith={problems}", "--k=2", "--max_new_tokens=6",
          "--output", str(output), "--config.engine.max_concurrent_decodes=4", "--config.progress=false"]
  assert cli.eval_main(argv) == 0
  for name in ("samples/tiny_arith.jsonl", "run_config.json", "summary.json", "results.md",
               "accuracy_vs_length.png", "length_histogram.png"):
    assert os.path.getsize(output / name) > 0, name
  rows = runner.read_samples(runner.sample_path(str(output), "tiny_arith"))
  assert sorted((r["question_id"], r["mode"], r["sample_index"]) for r in rows) == sorted(
      [(f"p{i}", "greedy", 0) for i in range(3)] + [(f"p{i}", "sampled", j) for i in range(3) for j in range(2)])
  for row in rows:
    assert 0 < row["length"] <= 6 and row["finish_reason"] in ("eos", "length")
    assert isinstance(row["response"], str) and isinstance(row["correct"], bool)
  summary = report.load_summary(str(output / "summary.json"))
  assert summary["name"] == os.path.basename(tiny_model_dir)
  assert summary["benchmarks"]["tiny_arith"]["sampled"]["num_samples"] == 6
  assert "| TinyArith | 3 |" in capsys.readouterr().out
  before = (output / "samples" / "tiny_arith.jsonl").read_bytes()
  assert cli.eval_main(argv) == 0  # finished: nothing is generated or appended, the report is the same
  assert (output / "samples" / "tiny_arith.jsonl").read_bytes() == before
  resumed = report.load_summary(str(output / "summary.json"))
  assert resumed["benchmarks"] == summary["benchmarks"]
