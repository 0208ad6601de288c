"""Tree-CoT MCTS with a scripted engine: hand-computed trees (UCT, backprop, backtracking, stop rules), the runner
(batching, bad input, kill and resume) and the invariants on trees the tiny reasoner grows through the CLI."""
import json
import math
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from retro_jax import demo
from retro_jax.search import runner, tree_runner
from retro_jax.search.tree import TreeConfig, TreeContext, TreeProblem, TreeSearch, uct_score
from tests.fakes import ExactGrader, ScriptedGenerator, render
from tests.test_search_runner import output_lines as lines, write_jsonl
from tests.tree_fakes import arithmetic_rollout, check_invariants, config, problems, runner_config

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def grow(tree_config, script, question="q", answer="1", record_id="r"):
  """Runs one tree to the end with the scripted engine; returns (output record, requests served)."""
  generator = ScriptedGenerator(script)
  tree = TreeSearch(TreeContext(tree_config, generator.encode, ExactGrader().grade_many),
                    TreeProblem(record_id, question, answer, render(question)))
  while (request := tree.next_request()) is not None:
    generator.requests.append(request)
    tree.on_result(generator.complete(request))
  (record,) = tree.outputs()
  check_invariants(record, tree_config.max_depth)
  return record, [generator.decode(r.prompt_tokens) for r in generator.requests]


def a_or_b(prompt, index):
  """Two thinking children "A" and "B"; an answer under A is right (gold 1), under B wrong."""
  if prompt.endswith("[answer]"):
    return "\\boxed{1}|" if "[thinking]A|" in prompt else "\\boxed{2}|"
  return "AB"[index] + "|"


def visits(record):
  return [(n["visits"], n["total_reward"]) for n in record["nodes"]]


def test_uct_choices_and_backprop_counts_by_hand():
  # Rollouts 1, 2 visit the unvisited children A then B. Then UCT (c = 1.414), A = 1/1 ... B = 0/1:
  # 3: A 1 + c*sqrt(2 ln 2 / 1) = 2.665 > B 1.665;  4: A 2.482 > B 2.096;  5: A 2.359 > B 2.354;
  # 6: A 2.268 < B 2.537 -> B;  7: A 2.338 > B 1.893.  After 7 rollouts: A 5 visits, B 2; reward 5 >= 5 stops.
  assert uct_score(1, 1, 2, 1.414) == pytest.approx(1 + 1.414 * math.sqrt(2 * math.log(2)))
  record, prompts = grow(config({"base": {"thinking": 2}, "thinking": {"answer": 1}}, max_rollouts=4,
                                thresholds=(5, 100)), a_or_b)
  assert record["status"] == "success" and record["rollouts"] == 7
  # nodes: 0 root, 1 A, 2 B, 3 answer under A (right), 4 answer under B (wrong)
  assert [n["text"] for n in record["nodes"]] == ["", "[thinking]A|", "[thinking]B|", "[answer]\\boxed{1}|",
                                                 "[answer]\\boxed{2}|"]
  assert visits(record) == [(7, 5.0), (5, 5.0), (2, 0.0), (5, 5.0), (2, 0.0)]
  assert [n["correct"] for n in record["nodes"]] == [None, None, None, True, False]
  # one request per expansion: the root's two thinking children as one n = 2 request, one answer under each
  assert prompts == ["Question: q\n<think>\n[thinking]", "Question: q\n<think>\n[thinking]A|[answer]",
                     "Question: q\n<think>\n[thinking]B|[answer]"]
  # stopping one rollout earlier (rollouts > 4 and reward >= 4): after rollout 5, B still at one visit
  record, _ = grow(config({"base": {"thinking": 2}, "thinking": {"answer": 1}}, max_rollouts=4,
                          thresholds=(4, 100)), a_or_b)
  assert record["rollouts"] == 5 and visits(record)[1:3] == [(4, 4.0), (1, 0.0)]


def test_ties_are_broken_by_the_record_seed():
  both_right = lambda prompt, index: "\\boxed{1}|" if prompt.endswith("[answer]") else "AB"[index] + "|"
  tree = {"base": {"thinking": 2}, "thinking": {"answer": 1}}
  firsts = set()
  for seed in range(8):
    record, _ = grow(config(tree, max_rollouts=2, thresholds=(3, 100), seed=seed), both_right)
    again, _ = grow(config(tree, max_rollouts=2, thresholds=(3, 100), seed=seed), both_right)
    assert again == record
    # rollouts 1, 2 visit A and B; 3 is a tie (both 1/1) that the seeded generator breaks
    firsts.add(record["nodes"][1]["visits"])
  assert firsts == {1, 2}


def test_a_wrong_answer_adds_a_reflection_under_the_nearest_double_check():
  tree = {"base": {"thinking": 1}, "thinking": {"double_check": 1}, "double_check": {"answer": 1},
          "reflection": {"thinking_from_scratch": 1}, "thinking_from_scratch": {"answer": 1}}
  script = lambda prompt, index: (("\\boxed{1}|" if "[thinking_from_scratch]" in prompt else "\\boxed{2}|")
                                  if prompt.endswith("[answer]") else "x|")
  record, prompts = grow(config(tree, max_rollouts=1, thresholds=(1, 1)), script)
  types = [(n["id"], n["parent"], n["type"]) for n in record["nodes"]]
  assert types == [(0, None, "base"), (1, 0, "thinking"), (2, 1, "double_check"), (3, 2, "answer"),
                   (4, 2, "reflection"), (5, 4, "thinking_from_scratch"), (6, 5, "answer")]
  assert record["nodes"][4]["text"] == "[reflection]R|"  # fixed text: no request for it
  assert len(prompts) == 5 and prompts[3] == "Question: q\n<think>\n[thinking]x|[double_check]x|[reflection]R|" \
                                             "[thinking_from_scratch]"
  assert record["status"] == "success" and record["rollouts"] == 2
  assert visits(record) == [(2, 1.0), (2, 1.0), (2, 1.0), (1, 0.0), (1, 1.0), (1, 1.0), (1, 1.0)]


def test_stop_with_failure_after_four_times_max_rollouts():
  record, prompts = grow(config({"base": {"answer": 2}}, max_rollouts=2), lambda p, i: "\\boxed{7}|")
  assert record["status"] == "failure" and record["rollouts"] == 9 and len(prompts) == 1
  assert record["nodes"][0]["visits"] == 9 and record["nodes"][1]["visits"] + record["nodes"][2]["visits"] == 9
  # the reward threshold thresholds[1] stops a tree at once: two right answers, t1 = 2
  record, _ = grow(config({"base": {"answer": 2}}, thresholds=(1, 2)), lambda p, i: "\\boxed{1}|")
  assert record["status"] == "success" and record["rollouts"] == 2


def test_rollouts_end_at_the_depth_limit_and_at_dead_ends():
  chain = {"base": {"thinking": 1}, "thinking": {"thinking": 1}}
  record, _ = grow(config(chain, max_depth=3, max_rollouts=1), lambda p, i: "x|")
  assert [n["depth"] for n in record["nodes"]] == [0, 1, 2, 3]
  assert record["nodes"][3]["ended"] == record["rollouts"] == 5 and record["status"] == "failure"
  # a thought that never reaches its closing text is a dead end: the rollout ends there, reward 0
  record, _ = grow(config(chain, max_depth=3, max_rollouts=1), lambda p, i: "x" if p.count("[thinking]") == 2 else "x|")
  assert len(record["nodes"]) == 3 and not record["nodes"][2]["closed"] and record["nodes"][2]["ended"] == 5


def test_config_is_checked():
  with pytest.raises(ValueError, match="no thought style"):
    TreeConfig(action_tree={"base": {"musing": 1}})
  with pytest.raises(ValueError, match="thresholds"):
    TreeConfig(thresholds=(8, 4))
  with pytest.raises(ValueError, match="'base'"):
    TreeConfig(action_tree={"thinking": {}})


# ---- the runner ----

def run_file(input_path, output_path, slots=4, in_flight=8):
  generator = ScriptedGenerator(arithmetic_rollout, slots=slots)
  rows, total = runner.open_input(input_path)
  summary = tree_runner.run_trees(
      rows, generator=generator, render_prompt=render, grader=ExactGrader(), output_path=str(output_path),
      config=runner_config(),
      max_trees_in_flight=in_flight, total=total, progress=False)
  return summary, generator


def test_many_trees_over_one_engine_with_bad_input(tmp_path):
  bad = ["not json {", {"id": "no_answer", "question": "q"}, {"id": "long", "question": "x" * 80, "answer": 1}]
  input_path = write_jsonl(tmp_path / "in.jsonl", problems(12) + bad)
  summary, generator = run_file(input_path, tmp_path / "out.jsonl")
  records = {r["id"]: r for r in map(json.loads, lines(tmp_path / "out.jsonl"))}
  assert records["row-12"]["status"] == "error" and "not JSON" in records["row-12"]["reason"]
  assert records["no_answer"]["reason"] == "missing field 'answer'"
  assert "max_prompt_tokens" in records["long"]["reason"]
  trees = [records[f"p{i}"] for i in range(12)]
  for tree in trees:
    check_invariants(tree, max_depth=6)
    assert tree["status"] == "success" and tree["nodes"][0]["total_reward"] >= 3
  assert summary["records"] == 15 and summary["error"] == 3 and summary["success"] == 12
  assert summary["requests"] == len(generator.requests) == sum(t["requests"] for t in trees)
  assert generator.max_in_flight == 4  # the decode slots were kept full with nodes of several trees


def test_trees_do_not_depend_on_batching(tmp_path):
  input_path = write_jsonl(tmp_path / "in.jsonl", problems(10))
  run_file(input_path, tmp_path / "one.jsonl", slots=1, in_flight=1)
  run_file(input_path, tmp_path / "many.jsonl", slots=8, in_flight=64)
  assert sorted(lines(tmp_path / "one.jsonl")) == sorted(lines(tmp_path / "many.jsonl"))


def test_sigkill_then_resume_gives_the_trees_of_an_uninterrupted_run(tmp_path):
  input_path = write_jsonl(tmp_path / "in.jsonl", problems(40))
  reference = tmp_path / "reference.jsonl"
  run_file(input_path, reference)
  out = tmp_path / "out.jsonl"
  job = subprocess.Popen([sys.executable, "-m", "tests.tree_fakes", input_path, str(out), "0.01"], cwd=REPO_ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 60
  while time.monotonic() < deadline and (not out.exists() or len(lines(out)) < 8):
    time.sleep(0.01)
  job.send_signal(signal.SIGKILL)
  job.wait()
  assert 8 <= len(lines(out)) < 40, "the run was not killed mid-way"
  subprocess.run([sys.executable, "-m", "tests.tree_fakes", input_path, str(out), "0"], cwd=REPO_ROOT, check=True,
                 capture_output=True)
  assert len({json.loads(line)["id"] for line in lines(out)}) == len(lines(out)) == 40
  assert sorted(lines(out)) == sorted(lines(reference))


def test_a_second_model_writes_the_node_types_named_for_it(tmp_path):
  input_path = write_jsonl(tmp_path / "in.jsonl", problems(6))
  first = ScriptedGenerator(arithmetic_rollout, slots=2)
  second = ScriptedGenerator(lambda prompt, index: "second|" if not prompt.endswith("[answer]")
                             else arithmetic_rollout(prompt, index), slots=2)
  rows, total = runner.open_input(input_path)
  tree_config = config(runner_config().action_tree, max_depth=6, max_rollouts=4, thresholds=(3, 6),
                       second_model_types=("double_check", "thinking_from_scratch"))
  tree_runner.run_trees(rows, generator=first, second_generator=second, render_prompt=render, grader=ExactGrader(),
                        output_path=str(tmp_path / "out.jsonl"), config=tree_config, total=total, progress=False)
  trees = [json.loads(line) for line in lines(tmp_path / "out.jsonl")]
  for tree in trees:
    check_invariants(tree, max_depth=6)
  nodes = [n for tree in trees for n in tree["nodes"]]
  for node in nodes:
    if node["type"] in ("double_check", "thinking_from_scratch"):
      assert node["text"].endswith("]second|")
    elif node["type"] not in ("base", "reflection"):
      assert "second" not in node["text"]
  assert {n["type"] for n in nodes} >= {"double_check", "thinking_from_scratch", "thinking", "answer"}
  second_prompts = [second.decode(r.prompt_tokens) for r in second.requests]
  assert second_prompts and all(p.endswith(("[double_check]", "[thinking_from_scratch]")) for p in second_prompts)
  assert not any(first.decode(r.prompt_tokens).endswith("[double_check]") for r in first.requests)
  with pytest.raises(ValueError, match="need a second model"):
    tree_runner.run_trees(iter(()), generator=first, render_prompt=render, grader=ExactGrader(),
                          output_path=str(tmp_path / "x.jsonl"), config=tree_config, progress=False)


def test_tree_cli_refuses_bad_settings_in_one_line(tmp_path, capsys):
  from retro_jax import cli
  input_path = write_jsonl(tmp_path / "in.jsonl", problems(1))
  common = ["--output", str(tmp_path / "out.jsonl"), "--model", demo.DEFAULT_MODEL]
  assert cli.main(["tree", "--input", str(tmp_path / "missing.jsonl"), *common]) == 2
  assert cli.main(["tree", "--input", input_path, *common, "--config.tree.thresholds=(8.0, 4.0)"]) == 2
  assert cli.main(["tree", "--input", input_path, *common, "--config.tree.second_model_types=('answer',)"]) == 2
  assert cli.main(["tree", "--input", input_path, *common, "--config.tree.max_rollouts=0"]) == 2
  errors = capsys.readouterr().err.strip().splitlines()
  assert len(errors) == 4 and all(line.startswith("retro-jax tree: ") for line in errors)
  assert "does not exist" in errors[0] and "thresholds" in errors[1] and "second model" in errors[2]
