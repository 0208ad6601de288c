"""The runner, generate and the CLI config: many records over one scripted engine, bad input, kill and resume."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

import retro_jax.cli
from retro_jax.search import cli, generate, runner
from retro_jax.search.retro_search import SearchConfig
from tests.fakes import ExactGrader, ScriptedGenerator, render, synthetic_records, synthetic_rollout

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def write_jsonl(path, records):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
  return str(path)


def search_file(input_path, output_path, slots=4, in_flight=8, max_seq_len=None, **options):
  generator = ScriptedGenerator(synthetic_rollout, slots=slots, max_seq_len=max_seq_len)
  rows, total = runner.open_input(input_path)
  summary = runner.run_search(rows, generator=generator, render_prompt=render, grader=ExactGrader(),
                              output_path=str(output_path), max_records_in_flight=in_flight, total=total,
                              progress=False, **options)
  return summary, generator


def output_lines(path):
  return [line for line in pathlib.Path(path).read_text().splitlines() if line]


def test_search_end_to_end_statuses_and_counts(tmp_path, capsys):
  input_path = write_jsonl(tmp_path / "in.jsonl", synthetic_records(30))
  summary, generator = search_file(input_path, tmp_path / "out.jsonl")
  records = [json.loads(line) for line in output_lines(tmp_path / "out.jsonl")]
  assert sorted(r["id"] for r in records) == sorted(f"r{i}" for i in range(30))
  by_id = {r["id"]: r for r in records}
  for i in range(30):
    assert (by_id[f"r{i}"]["status"] == "skipped_incorrect") == (i % 3 == 0)
  for record in records:
    assert record["correct_after"] == (record["status"] != "skipped_incorrect")
    if record["status"] == "revised":
      assert record["steps_after"] < record["steps_before"] and record["accepted_boundaries"]
      assert record["revised_trace"] != record["trace"]
    else:
      assert record["revised_trace"] == record["trace"] and not record["accepted_boundaries"]
  statuses = [r["status"] for r in records]
  assert summary["records"] == 30 and summary["error"] == 0 and summary["skipped_incorrect"] == 10
  assert summary["revised"] == statuses.count("revised") > 0
  assert summary["unchanged"] == statuses.count("unchanged") > 0
  assert summary["accuracy_before"] == pytest.approx(20 / 30) == summary["accuracy_after"]
  assert summary["tokens_after_mean"] < summary["tokens_before_mean"]
  assert summary["rollouts"] == len(generator.requests) == sum(r["boundaries_tried"] for r in records)
  assert generator.max_in_flight == 4  # the decode slots were kept full
  assert json.loads((tmp_path / "out.summary.json").read_text()) == summary
  assert "revised" in capsys.readouterr().out


def test_results_do_not_depend_on_batching(tmp_path):
  input_path = write_jsonl(tmp_path / "in.jsonl", synthetic_records(20))
  search_file(input_path, tmp_path / "one.jsonl", slots=1, in_flight=1)
  search_file(input_path, tmp_path / "many.jsonl", slots=8, in_flight=64)
  assert sorted(output_lines(tmp_path / "one.jsonl")) == sorted(output_lines(tmp_path / "many.jsonl"))


def test_malformed_lines_become_error_records(tmp_path):
  good = synthetic_records(2)
  lines = [
      good[0],
      "this is not json {",
      "[1, 2]",
      "",
      {"id": "no_trace", "question": "q", "answer": "1"},
      {"id": "empty", "question": "q", "answer": "1", "trace": "  \n"},
      {"id": "unclosed", "question": "q", "answer": "1", "trace": "<think>\nthinking forever"},
      {"id": ["not", "an", "id"], "question": "q", "answer": "1", "trace": good[1]["trace"]},
      {"id": "long", "question": "x" * 500, "answer": "1", "trace": good[1]["trace"]},
      dict(good[0], question="the same id again"),
      good[1],
  ]
  input_path = write_jsonl(tmp_path / "in.jsonl", lines)
  summary, _ = search_file(input_path, tmp_path / "out.jsonl", config=SearchConfig(max_prompt_tokens=200))
  records = {r["id"]: r for r in map(json.loads, output_lines(tmp_path / "out.jsonl"))}
  reasons = {record_id: r.get("reason") for record_id, r in records.items() if r["status"] == "error"}
  assert reasons["row-1"].startswith("line 2: not JSON")
  assert reasons["row-2"] == "line 3: not a JSON object"
  assert reasons["no_trace"] == "missing field 'trace'"
  assert reasons["empty"] == "empty trace"
  # Correctness comes first: an unclosed trace without an answer is incorrect, so it is skipped, with the reason.
  assert records["unclosed"]["status"] == "skipped_incorrect" and "</think>" in records["unclosed"]["reason"]
  assert reasons["row-7"] == "field 'id' is not a string or an integer"
  assert "max_prompt_tokens" in reasons["long"]
  assert records["r0"]["question"] == good[0]["question"]  # the first of two records with one id is kept
  assert records["r1"]["status"] != "error"
  assert len(records) == len(output_lines(tmp_path / "out.jsonl")) == 9
  assert summary["error"] == 6 and summary["duplicate_ids_skipped"] == 1


def test_field_mapping_with_nested_paths(tmp_path):
  record = synthetic_records(2)[1]
  nested = {"uid": record["id"], "problem": record["question"], "gold": {"value": record["answer"]},
            "conversations": [{"value": record["question"]}, {"value": record["trace"]}]}
  input_path = write_jsonl(tmp_path / "in.jsonl", [nested])
  fields = runner.FieldMap(id="uid", question="problem", answer="gold.value", trace="conversations.1.value")
  search_file(input_path, tmp_path / "out.jsonl", fields=fields)
  (output,) = map(json.loads, output_lines(tmp_path / "out.jsonl"))
  assert output["id"] == "r1" and output["status"] in ("revised", "unchanged")
  assert output["trace"] == record["trace"]


def test_resume_skips_finished_ids_and_drops_a_cut_line(tmp_path):
  input_path = write_jsonl(tmp_path / "in.jsonl", synthetic_records(12))
  search_file(input_path, tmp_path / "reference.jsonl")
  out = tmp_path / "out.jsonl"
  search_file(input_path, out, limit=5)
  assert len(output_lines(out)) == 5
  with open(out, "a", encoding="utf-8") as file:
    file.write('{"id": "r9", "status": "rev')  # a write cut by a kill
  _, generator = search_file(input_path, out)
  done_first = {f"q{i}:" for i in range(5)}
  prompts = [generator.decode(r.prompt_tokens) for r in generator.requests]
  assert not any(p.split("Question: ")[1].split(" ")[0] in done_first for p in prompts)
  assert sorted(output_lines(out)) == sorted(output_lines(tmp_path / "reference.jsonl"))


def test_sequence_limit_errors_long_prompts_clamps_budgets_and_a_resume_reruns_them(tmp_path):
  records = synthetic_records(6)
  records[4]["question"] += " padding" * 40  # a prompt of ~350 characters (one token each)
  input_path = write_jsonl(tmp_path / "in.jsonl", records)
  out = tmp_path / "out.jsonl"
  summary, generator = search_file(input_path, out, max_seq_len=300)
  first = {r["id"]: r for r in map(json.loads, output_lines(out))}
  assert first["r4"]["status"] == "error" and first["r4"]["retry_on_resume"]
  assert "does not fit engine.max_seq_len=300" in first["r4"]["reason"]
  # Every rollout budget (suffix + 256 allowance) is cut to what fits after its prompt, and counted.
  assert all(len(r.prompt_tokens) + r.max_new_tokens <= 300 for r in generator.requests)
  assert summary["budgets_clamped"] == sum(r["budgets_clamped"] for r in first.values() if r["status"] != "error")
  assert summary["budgets_clamped"] > 0 and summary["errors_too_long"] == 1
  # A resume with a larger limit runs the over-long record, and only that one.
  summary, generator = search_file(input_path, out, max_seq_len=4096)
  second = {r["id"]: r for r in map(json.loads, output_lines(out))}
  assert second["r4"]["status"] != "error" and summary["errors_too_long"] == 0
  assert {k: v for k, v in second.items() if k != "r4"} == {k: v for k, v in first.items() if k != "r4"}
  assert {generator.decode(r.prompt_tokens).split(" ")[1] for r in generator.requests} == {"q4:"}


def test_kill_and_resume_gives_the_records_of_an_uninterrupted_run(tmp_path):
  input_path = write_jsonl(tmp_path / "in.jsonl", synthetic_records(40))
  reference = tmp_path / "reference.jsonl"
  subprocess.run([sys.executable, "-m", "tests.fakes", input_path, str(reference), "0"], cwd=REPO_ROOT,
                 check=True, capture_output=True)
  out = tmp_path / "out.jsonl"
  job = subprocess.Popen([sys.executable, "-m", "tests.fakes", input_path, str(out), "0.02"], cwd=REPO_ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 60
  while time.monotonic() < deadline and (not out.exists() or len(output_lines(out)) < 8):
    time.sleep(0.01)
  job.send_signal(signal.SIGKILL)
  job.wait()
  written_before_kill = len(output_lines(out))
  assert 8 <= written_before_kill < 40, "the run was not killed mid-way"
  subprocess.run([sys.executable, "-m", "tests.fakes", input_path, str(out), "0"], cwd=REPO_ROOT, check=True,
                 capture_output=True)
  lines = output_lines(out)
  assert len({json.loads(line)["id"] for line in lines}) == len(lines) == 40
  assert sorted(lines) == sorted(output_lines(reference))


def test_writer_never_writes_an_id_twice(tmp_path):
  path = str(tmp_path / "w.jsonl")
  with runner.ResumableJsonlWriter(path) as writer:
    assert writer.write([{"id": 1}, {"id": "1"}, {"id": 1}]) == [{"id": 1}, {"id": "1"}]
    assert writer.write([{"id": 1, "again": True}]) == []
  with runner.ResumableJsonlWriter(path) as writer:
    assert 1 in writer and "1" in writer and len(writer) == 2
    assert writer.write([{"id": 1}, {"id": 2}]) == [{"id": 2}]
  assert [json.loads(line)["id"] for line in output_lines(path)] == [1, "1", 2]


def test_get_field():
  data = {"a.b": 1, "a": {"b": 2, "c": [{"d": 3}]}}
  assert runner.get_field(data, "a.b") == 1  # an exact key wins
  assert runner.get_field(data, "a.c.0.d") == 3
  with pytest.raises(KeyError):
    runner.get_field(data, "a.c.1.d")


def _problems(count):
  return [{"id": f"p{i}", "question": f"q{i}: the answer is {20 + i}", "answer": 20 + i} for i in range(count)]


def test_generate_samples_grades_and_resumes(tmp_path):
  input_path = write_jsonl(tmp_path / "problems.jsonl", _problems(6) + ["not json"])
  out = tmp_path / "traces.jsonl"

  def run():
    generator = ScriptedGenerator(synthetic_rollout, slots=2)
    rows, total = runner.open_input(input_path)
    summary = generate.run_generate(rows, generator=generator, render_prompt=render, grader=ExactGrader(),
                                    output_path=str(out), config=generate.GenerateConfig(num_samples=3),
                                    total=total, progress=False)
    return summary, generator

  summary, generator = run()
  records = [json.loads(line) for line in output_lines(out)]
  samples = [r for r in records if r.get("status") != "error"]
  assert len(samples) == 18 and summary["samples"] == 18 and summary["errors"] == 1
  assert all(r.n == 3 and r.max_new_tokens == 16384 for r in generator.requests)
  for record in samples:
    assert record["id"] == f"{record['problem_id']}#{record['sample_index']}"
    assert record["trace"] == synthetic_rollout(render(record["question"]), record["sample_index"])
    assert record["correct"] == (record["predicted"] == record["answer"])
  assert summary["pass_rate"] == pytest.approx(sum(r["correct"] for r in samples) / 18)
  assert 0 < summary["pass_rate"] < 1
  # A problem cut half-way (one of its samples missing) is sampled again; only the missing line is added.
  kept = [line for line in output_lines(out) if json.loads(line)["id"] != "p2#1"]
  out.write_text("\n".join(kept) + "\n")
  _, generator = run()
  assert [generator.decode(r.prompt_tokens) for r in generator.requests] == [render("q2: the answer is 22")]
  assert sorted(output_lines(out)) == sorted(json.dumps(r, ensure_ascii=False) for r in records)


def test_parse_config_flags_and_shortcuts():
  config = cli.parse_config(["--config.search.mode=partial", "--config.search.keywords=('Wait', 'Hmm')",
                             "--input=in.jsonl", "--limit=7", "--seed=3"], cli.default_search_config(), "t")
  assert config.search.mode == "partial" and config.search.keywords == ("Wait", "Hmm")
  assert (config.input, config.limit, config.seed, config.output) == ("in.jsonl", 7, 3, "")
  search_config = cli.search_config(config)
  assert search_config.mode == "partial" and search_config.seed == 3 and search_config.gamma == 0.99


def test_cli_usage_and_errors(capsys):
  assert cli.search_main(["--help"]) == 0
  assert "rollouts_per_boundary: 1" in capsys.readouterr().out
  assert retro_jax.cli.main(["generate", "--input=in.jsonl"]) == 2
  assert capsys.readouterr().err == ("retro-jax generate: --output, --model not given; pass them as flags or set "
                                     "them in the config\n")
  assert retro_jax.cli.main(["search", "--no_such_flag=1"]) == 2
  assert "Unknown command line flag 'no_such_flag'" in capsys.readouterr().err


def test_config_file(tmp_path):
  path = tmp_path / "my_config.py"
  path.write_text("from retro_jax.search.cli import default_generate_config\n\n"
                  "def get_config():\n  config = default_generate_config()\n  config.generate.num_samples = 8\n"
                  "  config.limit = 4\n  return config\n")
  config = cli.parse_config(["--config", str(path), "--config.generate.temperature=0.0", "--model=m"],
                            cli.default_generate_config(), "t")
  assert (config.generate.num_samples, config.generate.temperature, config.limit, config.model) == (8, 0.0, 4, "m")


def test_search_from_config_with_the_real_grader(tmp_path):
  config = cli.default_search_config()
  config.input = write_jsonl(tmp_path / "in.jsonl", synthetic_records(6))
  config.output = str(tmp_path / "out.jsonl")
  config.progress = False
  summary = cli.run_search_from_config(config, ScriptedGenerator(synthetic_rollout), render)
  assert summary["records"] == 6 and summary["skipped_incorrect"] == 2 and summary["error"] == 0
  assert summary["revised"] + summary["unchanged"] == 4
  assert summary["grading"]["ok"] >= 6
  assert os.path.exists(tmp_path / "out.summary.json")


def test_hf_input_needs_datasets(monkeypatch):
  monkeypatch.setitem(sys.modules, "datasets", None)  # as if the [hf] extra were not installed: import fails
  with pytest.raises(ImportError, match=r"retro_jax\[hf\]"):
    runner.open_input("hf:some/dataset")
