"""Benchmark registry: field mapping of every benchmark on small JSONL fixtures, local overrides, the HF path."""
import json
import sys
import types

import pytest

from retro_jax.eval import benchmarks
from retro_jax.tasks import arithmetic


def write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
  return str(path)


# Two records per benchmark in the hub dataset's own field names, and the Problems they must map to.
HUB_FIXTURES = {
    "aime24": ([{"id": 60, "problem": "Find $x$.", "solution": "... \\boxed{204}", "answer": "204", "url": "u"},
                {"id": 61, "problem": "Find $y$.", "solution": "...", "answer": "25", "url": "u"}],
               [("60", "Find $x$.", "204"), ("61", "Find $y$.", "25")]),
    "aime25": ([{"id": "0", "problem": "P1", "answer": "70"}, {"id": "1", "problem": "P2", "answer": "588"}],
               [("0", "P1", "70"), ("1", "P2", "588")]),
    "amc23": ([{"id": 0, "question": "Q1", "answer": 27.0, "url": "u"}, {"id": 1, "question": "Q2", "answer": 4}],
              [("0", "Q1", "27.0"), ("1", "Q2", "4")]),
    "math500": ([{"problem": "Convert $(0,3)$.", "solution": "...", "answer": "\\left( 3, \\frac{\\pi}{2} \\right)",
                  "subject": "Precalculus", "level": 2, "unique_id": "test/precalculus/807.json"},
                 {"problem": "Compute $1+1$.", "answer": "2", "unique_id": "test/algebra/1.json"}],
                [("test/precalculus/807.json", "Convert $(0,3)$.", "\\left( 3, \\frac{\\pi}{2} \\right)"),
                 ("test/algebra/1.json", "Compute $1+1$.", "2")]),
    "gsm8k": ([{"question": "Janet sells eggs.", "answer": "She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 18"},
               {"question": "A store sells pens.", "answer": "It costs 1,000 + 200 = 1,200.\n#### 1200"}],
              [("gsm8k-00000", "Janet sells eggs.", "18"), ("gsm8k-00001", "A store sells pens.", "1200")]),
    "olympiadbench": ([{"id": 2231, "question": "Find all $n$.", "final_answer": ["$4$", "$5$"],
                        "is_multiple_answer": True, "unit": None},
                       {"id": 2232, "question": "Compute $m$.", "final_answer": ["$\\frac{1}{2}$"]}],
                      [("2231", "Find all $n$.", "$4$, $5$"), ("2232", "Compute $m$.", "$\\frac{1}{2}$")]),
    "gaokao2023en": ([{"question": "Given set $A$...", "answer": "C", "id": 0},
                      {"question": "Find $a_n$.", "answer": "$2^{n}$", "id": 1}],
                     [("0", "Given set $A$...", "C"), ("1", "Find $a_n$.", "$2^{n}$")]),
}


def test_the_seven_field_benchmarks_are_registered_with_their_hub_ids():
  assert benchmarks.FIELD_BENCHMARKS == ("aime24", "aime25", "amc23", "math500", "gsm8k", "olympiadbench",
                                         "gaokao2023en")
  for name in benchmarks.FIELD_BENCHMARKS:
    spec = benchmarks.get_spec(name)
    assert spec.in_average and spec.hf_path and spec.split
    assert "\\boxed{}" in spec.prompt_template and "{question}" in spec.prompt_template
  assert benchmarks.get_spec("gsm8k").hf_config == "main"
  assert benchmarks.get_spec("olympiadbench").hf_config == "OE_TO_maths_en_COMP"
  assert not benchmarks.get_spec("tiny_arith").in_average


@pytest.mark.parametrize("name", sorted(HUB_FIXTURES))
def test_field_mapping_of_a_hub_export(tmp_path, name):
  records, expected = HUB_FIXTURES[name]
  path = write_jsonl(tmp_path / f"{name}.jsonl", records)
  problems = benchmarks.load_benchmark(name, path=path)
  assert [(p.id, p.question, p.answer) for p in problems] == expected
  # The same file found through a data directory gives the same problems.
  assert benchmarks.load_benchmark(name, data_dir=str(tmp_path)) == problems


def test_normalised_records_load_for_a_hub_benchmark(tmp_path):
  path = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "question": "Q?", "answer": "7"}])
  assert benchmarks.load_benchmark("math500", path=path) == [benchmarks.Problem("a", "Q?", "7")]


def test_limit_keeps_the_first_problems(tmp_path):
  path = write_jsonl(tmp_path / "g.jsonl", [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(5)])
  problems = benchmarks.load_benchmark("gsm8k", path=path, limit=2)
  assert [(p.id, p.answer) for p in problems] == [("gsm8k-00000", "0"), ("gsm8k-00001", "1")]


def test_tiny_arith_reads_the_task_eval_file(tmp_path):
  _, held_out = arithmetic.make_splits(seed=0, n_train=5, n_eval=6)
  path = tmp_path / "eval.jsonl"
  arithmetic.write_problems(path, held_out)
  problems = benchmarks.load_benchmark("tiny_arith", path=str(path))
  assert [(p.id, p.question, p.answer) for p in problems] == [(q.id, q.question, str(q.answer)) for q in held_out]


def test_custom_jsonl_with_its_own_field_names(tmp_path):
  path = write_jsonl(tmp_path / "mine.jsonl", [{"key": "k1", "prompt": "2+2?", "target": 4},
                                               {"key": "k2", "prompt": "3+3?", "target": 6}])
  selected = benchmarks.resolve(f"aime24,mine={path}", question_field="prompt", answer_field="target",
                                id_field="key")
  assert [spec.name for spec, _ in selected] == ["aime24", "mine"]
  spec, custom_path = selected[1]
  assert spec.prompt_template == "{question}" and not spec.in_average
  problems = benchmarks.load_benchmark(spec, path=custom_path)
  assert [(p.id, p.question, p.answer) for p in problems] == [("k1", "2+2?", "4"), ("k2", "3+3?", "6")]


def test_resolve_all_and_local_overrides(tmp_path):
  assert [s.name for s, _ in benchmarks.resolve("all")] == list(benchmarks.FIELD_BENCHMARKS)
  [(spec, path)] = benchmarks.resolve("tiny_arith=data/eval.jsonl")
  assert spec.name == "tiny_arith" and path == "data/eval.jsonl"
  with pytest.raises(benchmarks.BenchmarkError, match="unknown benchmark"):
    benchmarks.resolve("aime24,nope")
  with pytest.raises(benchmarks.BenchmarkError, match="twice"):
    benchmarks.resolve("aime24,aime24")


def test_bad_files_fail_with_the_line_or_field(tmp_path):
  missing = write_jsonl(tmp_path / "a.jsonl", [{"id": 1, "problem": "no answer here"}])
  with pytest.raises(benchmarks.BenchmarkError, match="no 'answer' field"):
    benchmarks.load_benchmark("aime24", path=missing)
  broken = tmp_path / "b.jsonl"
  broken.write_text('{"question": "q", "answer": "1"}\n{not json\n', encoding="utf-8")
  with pytest.raises(benchmarks.BenchmarkError, match="line 2: not JSON"):
    benchmarks.load_benchmark("tiny_arith", path=str(broken))
  duplicated = write_jsonl(tmp_path / "c.jsonl", [{"id": 1, "question": "q", "answer": "1"}] * 2)
  with pytest.raises(benchmarks.BenchmarkError, match="repeats question id"):
    benchmarks.load_benchmark("tiny_arith", path=duplicated)
  bad = []  # given a list, the loader keeps the good records and lists the bad ones
  assert benchmarks.load_benchmark("tiny_arith", path=duplicated, bad_records=bad) == [
      benchmarks.Problem("1", "q", "1")]
  assert benchmarks.load_benchmark("tiny_arith", path=str(broken), bad_records=bad) == [
      benchmarks.Problem("tiny_arith-00000", "q", "1")]
  assert [b["record"] for b in bad] == [1, 1]
  assert "repeats question id '1'" in bad[0]["reason"] and "line 2: not JSON" in bad[1]["reason"]
  with pytest.raises(benchmarks.BenchmarkError, match="no such benchmark file"):
    benchmarks.load_benchmark("tiny_arith", path=str(tmp_path / "absent.jsonl"))


def test_hub_loading_goes_through_datasets(monkeypatch):
  calls = []

  def load_dataset(path, name=None, split=None):
    calls.append((path, name, split))
    return [{"id": 7, "question": "Q", "final_answer": ["$1$", "$2$"]}]

  monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
  problems = benchmarks.load_benchmark("olympiadbench")
  assert calls == [("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train")]
  assert problems == [benchmarks.Problem("7", "Q", "$1$, $2$")]


def test_hub_loading_errors_say_how_to_work_offline(monkeypatch):
  monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
  with pytest.raises(benchmarks.BenchmarkError, match=r"retro_jax\[hf\]"):
    benchmarks.load_benchmark("aime24")

  def offline(*args, **kwargs):
    raise ConnectionError("offline")

  monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
  with pytest.raises(benchmarks.BenchmarkError, match="local JSONL"):
    benchmarks.load_benchmark("math500")
  with pytest.raises(benchmarks.BenchmarkError, match="no HF dataset"):
    benchmarks.load_benchmark("tiny_arith")
