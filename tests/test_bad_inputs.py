"""The bad-input matrix: search, generate, sft and eval, called as a user calls them (`retro_jax.cli.main`), with
the bundled tiny reasoner as the real model.

Two kinds of outcome, and nothing else (no traceback, no silent drop):
- a mistake in the command (a missing or pickle-only model dir, a misspelled key or enum, a path that does not
  exist, an empty file): exit status 2 and one line on stderr, `retro-jax <command>: <problem>; <fix>`, before
  any model is loaded;
- bad records inside a good file (a malformed line, a missing field, no `</think>`, an over-long record): each
  gets its own status or is counted by reason, and the good records are still processed.
"""
import json
import os
import shutil

import pytest

import retro_jax.cli
from retro_jax.demo import DEFAULT_MODEL

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
LONG_QUESTION = "What is " + "1 + " * 100 + "1?"  # ~300 tokens: over the 256 positions the runs below allow
GOOD_TRACE = "<think>\nCompute 3 + 4 = 7.\n\nWait, check: 3 + 4 = 7.\n</think>\n\nThe answer is \\boxed{7}."
WRONG_TRACE = "<think>\nCompute 3 + 4 = 8.\n\nHmm, yes 8.\n</think>\n\nThe answer is \\boxed{8}."
SMALL_ENGINE = ["--config.engine.max_seq_len=256", "--config.engine.max_concurrent_decodes=4",
                "--config.progress=False", "--config.grading.num_workers=1"]


def write_lines(path, lines) -> str:
  path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
  return str(path)


def read_records(path) -> dict:
  return {r["id"]: r for r in map(json.loads, open(path, encoding="utf-8"))}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  """Input files shared by the cases: problems, traces, an empty file, and a model dir with only a pickle."""
  root = tmp_path_factory.mktemp("bad_inputs")
  pickle_only = root / "pickle_only"
  pickle_only.mkdir()
  for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(DEFAULT_MODEL, name), pickle_only / name)
  (pickle_only / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")  # a pickle: never to be opened
  problems = write_lines(root / "problems.jsonl", [
      {"id": "p1", "question": "What is 3 + 4?", "answer": "7"},
      "{not json",
      {"id": "no_answer", "question": "What is 1 + 1?"},
      {"id": "long", "question": LONG_QUESTION, "answer": "101"},
      {"id": "p2", "question": "What is 5 * 2?", "answer": "10"},
  ])
  traces = write_lines(root / "traces.jsonl", [
      {"id": "good", "question": "What is 3 + 4?", "answer": "7", "trace": GOOD_TRACE},
      "{not json",
      {"id": "no_trace", "question": "What is 3 + 4?", "answer": "7"},
      {"id": "unclosed", "question": "What is 3 + 4?", "answer": "7", "trace": "<think>\nCompute 3 + 4 = 8"},
      {"id": "wrong", "question": "What is 3 + 4?", "answer": "7", "trace": WRONG_TRACE},
      {"id": "long", "question": LONG_QUESTION, "answer": "101", "trace": GOOD_TRACE},
  ])
  empty = write_lines(root / "empty.jsonl", ["", "  "])
  return {"root": root, "pickle_only": str(pickle_only), "problems": problems, "traces": traces, "empty": empty}


def _one_line_error(capsys, argv, command, expected):
  assert retro_jax.cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith(f"retro-jax {command}: ") and "Traceback" not in err, err
  assert expected in err, err


def _sft_argv(train_path, workdir, *extra):
  return ["sft", "--config", os.path.join(CONFIGS, "tiny_reasoner_sft.py"), f"--config.data.train_path={train_path}",
          f"--config.workdir={workdir}", "--config.mesh.fsdp=1", *extra]


def _mistakes(paths):
  """(command, argv, text the one line must hold) for every mistake in a command."""
  root, out = paths["root"], str(paths["root"] / "out.jsonl")
  problems, traces, empty = paths["problems"], paths["traces"], paths["empty"]
  cases = []
  for command, data in (("search", traces), ("generate", problems)):
    good = ["--input", data, "--output", out, "--model", DEFAULT_MODEL]
    cases += [
        (command, [command, "--input", data, "--output", out, "--model", str(root / "absent")], "does not exist"),
        (command, [command, "--input", data, "--output", out, "--model", paths["pickle_only"]],
         "only pytorch_model.bin: pickled weights are never loaded"),
        (command, [command, "--input", str(root / "absent.jsonl"), "--output", out, "--model", DEFAULT_MODEL],
         "input file"),
        (command, [command, "--input", data, "--output", str(root / "no_dir" / "o.jsonl"), "--model", DEFAULT_MODEL],
         "output folder"),
        (command, [command, "--input", empty, "--output", out, "--model", DEFAULT_MODEL], "is empty"),
        (command, [command, *good, "--config.engine.max_seq_len=4096"], "beyond the model's 512 positions"),
        (command, [command, *good, "--config.chat_template=qwen"], "chat_template='qwen' is not one of"),
    ]
  cases += [
      ("search", ["search", "--input", traces, "--output", out, "--model", DEFAULT_MODEL, "--config.search.gama=0.5"],
       "unknown config key --config.search.gama (did you mean 'gamma'?)"),
      ("search", ["search", "--input", traces, "--output", out, "--model", DEFAULT_MODEL,
                  "--config.search.mode=fulll"], "--config.search.mode='fulll' is not one of 'full', 'partial' "
                                                 "(did you mean 'full'?)"),
      ("generate", ["generate", "--input", problems, "--output", out, "--model", DEFAULT_MODEL,
                    "--config.generate.top_p=0"], "top_p must be in (0, 1]"),
      ("sft", _sft_argv(traces, root / "w", f"--config.model_dir={root / 'absent'}"), "does not exist"),
      ("sft", _sft_argv(traces, root / "w", f"--config.model_dir={paths['pickle_only']}"), "pytorch_model.bin"),
      ("sft", _sft_argv(root / "absent.jsonl", root / "w"), "input file"),
      ("sft", _sft_argv(empty, root / "w"), "is empty"),
      ("sft", _sft_argv(traces, root / "w", "--config.data.trace_feild=trace"),
       "unknown config key --config.data.trace_feild (did you mean 'trace_field'?)"),
      ("sft", _sft_argv(traces, root / "w", "--config.data.truncation=dorp"), "is not one of 'drop', 'truncate'"),
      ("sft", ["sft", "--config", str(root / "absent_config.py")], "config file"),
      ("eval", ["eval", "--model", str(root / "absent"), "--benchmarks", f"tiny_arith={problems}"], "does not exist"),
      ("eval", ["eval", "--model", paths["pickle_only"], "--benchmarks", f"tiny_arith={problems}"],
       "pytorch_model.bin"),
      ("eval", ["eval", "--model", DEFAULT_MODEL, "--benchmarks", f"tiny_arith={root / 'absent.jsonl'}"],
       "no such benchmark file"),
      ("eval", ["eval", "--model", DEFAULT_MODEL, "--benchmarks", f"tiny_arith={empty}"], "no usable record"),
      ("eval", ["eval", "--model", DEFAULT_MODEL, "--config.eval.mods=greedy"],
       "unknown config key --config.eval.mods (did you mean 'modes'?)"),
      ("eval", ["eval", "--model", DEFAULT_MODEL, "--benchmarks", f"tiny_arith={problems}", "--modes=greedyy"],
       "modes must be a non-empty subset"),
  ]
  return cases


def test_every_mistake_in_a_command_is_one_line_and_exit_2(paths, capsys):
  for command, argv, expected in _mistakes(paths):
    _one_line_error(capsys, argv, command, expected)
  assert not os.path.exists(paths["root"] / "out.jsonl")  # nothing ran


def test_search_gives_each_bad_record_a_status_and_keeps_the_good_ones(paths, capsys):
  out = paths["root"] / "search.jsonl"
  argv = ["search", "--input", paths["traces"], "--output", str(out), "--model", DEFAULT_MODEL, *SMALL_ENGINE,
          "--config.search.max_rollout_tokens=48", "--config.search.keep_rollouts=True"]
  assert retro_jax.cli.main(argv) == 0
  records = read_records(out)
  assert records["good"]["status"] in ("revised", "unchanged") and records["good"]["correct_before"]
  assert all({"text", "tokens", "correct"} <= set(r) for r in records["good"]["rollouts"])
  assert len(records["good"]["rollouts"]) == records["good"]["num_rollouts"] >= 1
  assert records["wrong"]["status"] == "skipped_incorrect"
  assert records["unclosed"]["status"] == "skipped_incorrect" and "</think>" in records["unclosed"]["reason"]
  assert records["no_trace"] == {"id": "no_trace", "status": "error", "reason": "missing field 'trace'", "row": 2}
  assert records["row-1"]["status"] == "error" and "line 2: not JSON" in records["row-1"]["reason"]
  assert records["long"]["status"] == "error" and records["long"]["retry_on_resume"]
  assert "does not fit engine.max_seq_len=256" in records["long"]["reason"]
  summary = json.loads((paths["root"] / "search.summary.json").read_text())
  assert (summary["records"], summary["error"], summary["errors_too_long"]) == (6, 3, 1)
  assert "Traceback" not in capsys.readouterr().err


def test_generate_errors_over_long_prompts_and_clamps_budgets(paths):
  out = paths["root"] / "traces_out.jsonl"
  argv = ["generate", "--input", paths["problems"], "--output", str(out), "--model", DEFAULT_MODEL, *SMALL_ENGINE,
          "--config.generate.num_samples=1"]
  assert retro_jax.cli.main(argv) == 0
  records = read_records(out)
  assert set(records) == {"p1#0", "p2#0", "row-1", "no_answer", "long"}
  assert records["no_answer"]["reason"] == "missing field 'answer'"
  assert records["long"]["retry_on_resume"] and "does not fit" in records["long"]["reason"]
  for sample in (records["p1#0"], records["p2#0"]):  # 16384 tokens do not fit after the prompt: cut to fit
    assert sample["budget_clamped"] and sample["num_tokens"] > 0 and sample["trace"]
  summary = json.loads((paths["root"] / "traces_out.summary.json").read_text())
  assert (summary["samples"], summary["errors"], summary["budget_clamped"], summary["errors_too_long"]) == (2, 3, 2, 1)
  # A resume runs the over-long record again (here with the same limit, so it is an error again) and nothing else.
  assert retro_jax.cli.main(argv) == 0
  assert read_records(out) == records


def test_sft_drops_bad_records_by_reason_and_trains_on_the_good_ones(paths, capsys):
  good = [{"question": f"What is {i} + 1?", "trace": f"<think>\n{i} + 1 = {i + 1}\n</think>\n\\boxed{{{i + 1}}}",
           "status": "revised"} for i in range(4)]
  lines = [*good, "{not json", {"question": "q"},  # malformed, missing field
           {"question": "q", "trace": "<think>\nno end", "status": "unchanged"},  # no </think>
           dict(good[0], status="skipped_incorrect"), dict(good[0], status="error"),  # not selected
           dict(good[0], trace=good[0]["trace"] + " pad" * 200)]  # over seq_len
  train = write_lines(paths["root"] / "sft.jsonl", lines)
  workdir = paths["root"] / "sft_run"
  extra = ["--config.data.trace_field=trace", "--config.data.seq_len=96", "--config.data.packing=False",
           "--config.data.eval_fraction=0", "--config.num_train_steps=1", "--config.eval_at_start=False",
           "--config.export=False", "--config.tensorboard=False", "--config.checkpoint_every_steps=0"]
  _one_line_error(capsys, _sft_argv(train, paths["root"] / "sft_small", *extra, "--config.batch_size=8"), "sft",
                  "fewer than one batch")
  assert retro_jax.cli.main(_sft_argv(train, workdir, *extra, "--config.batch_size=2")) == 0
  data = json.loads((workdir / "summary.json").read_text())["data"]
  assert (data["lines"], data["bad_lines"], data["missing_field"]) == (10, 2, {"trace": 1})
  assert data["dropped_by_status"] == {"skipped_incorrect": 1, "error": 1}
  assert (data["dropped_unclosed_thinking"], data["dropped_too_long"], data["train_examples"]) == (1, 1, 4)


def test_eval_evaluates_the_good_records_and_lists_the_bad_ones(paths, capsys):
  output = paths["root"] / "eval"
  argv = ["eval", "--model", DEFAULT_MODEL, "--benchmarks", f"tiny_arith={paths['problems']}", "--modes=greedy",
          "--max_new_tokens=24", "--output", str(output), "--config.engine.max_seq_len=256",
          "--config.progress=False", "--config.grading.num_workers=1"]
  assert retro_jax.cli.main(argv) == 0
  err = capsys.readouterr().err
  assert "Traceback" not in err and "3 records left out" in err
  samples = [json.loads(line) for line in open(output / "samples" / "tiny_arith.jsonl", encoding="utf-8")]
  assert sorted(s["question_id"] for s in samples) == ["p1", "p2"]
  summary = json.loads((output / "summary.json").read_text())
  reasons = " | ".join(b["reason"] for b in summary["bad_records"])
  assert len(summary["bad_records"]) == 3 and "line 2: not JSON" in reasons and "no 'answer' field" in reasons
  assert "does not fit engine.max_seq_len=256" in reasons
