"""Pairs from trees: hand-computed length bins and pair mining; then trees the tiny reasoner grows through
`retro-jax tree`, their invariants, and their pairs graded by the project's grader and read by the trainers."""
import json
import os

import pytest

from retro_jax import cli
from retro_jax.grading import Grader
from retro_jax.search import pairs
from tests.tree_fakes import check_invariants

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def node(node_id, parent, kind, text, correct=None):
  return {"id": node_id, "parent": parent, "type": kind, "text": text, "correct": correct}


# Thoughts end with "|"; lengths below count thoughts (the length unit is a parameter).
TREE = {"id": "t", "question": "q", "answer": "1", "status": "success", "nodes": [
    node(0, None, "base", ""),
    node(1, 0, "thinking", "A|"), node(2, 0, "thinking", "B|"),
    node(3, 1, "answer", "\\boxed{1}", True),  # A: 1 thought, right
    node(4, 1, "thinking", "C|"),
    node(5, 4, "answer", "so \\boxed{1}", True),  # A C: 2
    node(6, 4, "thinking", "D|"), node(7, 6, "thinking", "E|"),
    node(8, 7, "answer", "\\boxed{1}", True),  # A C D E: 4
    node(9, 2, "answer", "\\boxed{2}", False),  # B: wrong
    node(10, 4, "answer", "\\boxed{3}", False),  # A C: wrong
    node(11, 6, "answer", "\\boxed{1}", True),  # A C D: 3
    node(12, 6, "answer", "\\boxed{1}", True),  # A C D again: the same trace, counted once
]}


def thoughts(trace):
  return trace.count("|")


def test_paths_render_as_traces():
  assert pairs.render_path(["A|", "C|\n", "\\boxed{1}"]) == "<think>\nA|C|\n</think>\n\n\\boxed{1}"
  tiny = ["Compute 2 + 3 = 5.\n\n", "So the answer is 5.\n</think>\n\nThe answer is \\boxed{5}."]
  assert pairs.render_path(tiny) == "<think>\n" + "".join(tiny)
  paths = pairs.tree_paths(TREE, thoughts)
  assert [p.node for p in paths] == [3, 5, 8, 9, 10, 11]
  assert [p.length for p in paths] == [1, 2, 4, 1, 2, 3]


def test_length_bins_are_relative_to_the_problem():
  # lengths 1, 2, 4, 3: r = 0, 1/3, 1, 2/3
  assert pairs.length_bins([1, 2, 4, 3]) == [{"short"}, {"medium"}, {"long"}, {"long"}]
  assert pairs.length_bins([100, 200, 400, 300]) == pairs.length_bins([1, 2, 4, 3])
  assert pairs.length_bins([7, 7]) == [set(pairs.BINS)] * 2


def test_sft_takes_the_long_paths_and_dpo_pairs_the_short_ones_with_the_least_shared_wrong_path():
  sft, dpo = pairs.mine_tree(TREE, pairs.PairsConfig(), thoughts)
  assert [r["node"] for r in sft] == [8, 11] and sft[0]["trace"] == "<think>\nA|C|D|E|\n</think>\n\n\\boxed{1}"
  assert all(r["question"] == "q" and r["bins"] == ["long"] for r in sft)
  # chosen A (node 3). Wrong B shares "<think>\n" (8 chars); wrong A C shares "<think>\nA|" (10)
  (pair,) = dpo
  assert (pair["chosen_node"], pair["rejected_node"]) == (3, 9)
  assert pair["chosen"] == "<think>\nA|\n</think>\n\n\\boxed{1}"
  assert pair["rejected"] == "<think>\nB|\n</think>\n\n\\boxed{2}"
  assert pair["shared_prefix_chars"] == 8 and pair["shared_prefix_nodes"] == 0
  # both choices are configurable: medium paths (A C) as chosen too; short ones to SFT
  sft, dpo = pairs.mine_tree(TREE, pairs.PairsConfig(sft_bins=("short",), chosen_bins=("short", "medium")), thoughts)
  assert [r["node"] for r in sft] == [3] and [(p["chosen_node"], p["rejected_node"]) for p in dpo] == [(3, 9), (5, 9)]
  with pytest.raises(ValueError, match="unknown bins"):
    pairs.PairsConfig(sft_bins=("longest",))


def test_a_tree_without_wrong_paths_gives_sft_records_and_no_pairs():
  right_only = dict(TREE, nodes=[dict(n, correct=True) if n["id"] in (9, 10) else n for n in TREE["nodes"]])
  sft, dpo = pairs.mine_tree(right_only, pairs.PairsConfig(), thoughts)
  assert sft and not dpo


def test_pairs_cli_counts_bad_lines_and_error_trees(tmp_path):
  trees = tmp_path / "trees.jsonl"
  trees.write_text("\n".join([json.dumps(TREE), "not json", json.dumps({"id": "x", "status": "error", "reason": "r"}),
                              json.dumps({"id": "y", "nodes": "none"})]) + "\n")
  assert cli.main(["pairs", "--input", str(trees), "--output", str(tmp_path / "out")]) == 0
  summary = json.loads((tmp_path / "out" / "summary.json").read_text())
  assert summary["trees"] == 1 and summary["error_trees_skipped"] == 1 and summary["unreadable_lines"] == 2
  # in characters the correct paths are 30, 35, 36 and 34 long: three long ones, one short
  assert summary["sft_records"] == 3 and summary["dpo_pairs"] == 1 and summary["sft_length_mean"] == 35
  assert cli.main(["pairs", "--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o")]) == 2
  assert cli.main(["pairs", "--input", str(trees), "--output", str(tmp_path / "o"),
                   "--config.pairs.sft_bins=('huge',)"]) == 2


def test_tiny_reasoner_trees_keep_the_invariants_and_their_pairs_grade_and_train(tmp_path):
  from retro_jax.tasks import arithmetic
  from retro_jax.tokenization import load_tokenizer
  from retro_jax.train import data

  problems = tmp_path / "problems.jsonl"
  train, _ = arithmetic.make_splits(seed=5, n_train=6, n_eval=0)
  arithmetic.write_problems(problems, train)
  out = tmp_path / "trees.jsonl"
  config = os.path.join(REPO_ROOT, "configs", "tiny_reasoner_tree.py")
  argv = ["tree", "--config", config, "--input", str(problems), "--output", str(out), "--config.progress=False",
          "--config.tree.max_rollouts=4", "--config.tree.thresholds=(2.0, 4.0)"]
  assert cli.main(argv) == 0
  trees = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(trees) == 6 and all(t["status"] in ("success", "failure") for t in trees)
  for tree in trees:
    check_invariants(tree, max_depth=10)
  assert cli.main(["pairs", "--input", str(out), "--output", str(tmp_path / "pairs"), "--model",
                   os.path.join(REPO_ROOT, "retro_jax", "assets", "tiny_reasoner")]) == 0
  sft = [json.loads(line) for line in (tmp_path / "pairs" / "sft.jsonl").read_text().splitlines()]
  dpo = [json.loads(line) for line in (tmp_path / "pairs" / "dpo.jsonl").read_text().splitlines()]
  assert sft and dpo
  with Grader(num_workers=1) as grader:
    assert all(g.correct for g in grader.grade_many([(r["answer"], r["trace"]) for r in sft]))
    assert all(g.correct for g in grader.grade_many([(p["answer"], p["chosen"]) for p in dpo]))
    assert not any(g.correct for g in grader.grade_many([(p["answer"], p["rejected"]) for p in dpo]))
  for pair in dpo:
    k = pair["shared_prefix_chars"]
    assert pair["chosen"][:k] == pair["rejected"][:k] and pair["chosen"][k:k + 1] != pair["rejected"][k:k + 1]
  # what `retro-jax sft` and `retro-jax dpo` read with their default fields, every record kept
  tokenizer = load_tokenizer(os.path.join(REPO_ROOT, "retro_jax", "assets", "tiny_reasoner"))
  sft_records, stats = data.read_training_records(str(tmp_path / "pairs" / "sft.jsonl"), ("question", "trace"))
  assert stats.skipped == 0 and data.tokenize_sft(sft_records, tokenizer, question_field="question",
                                                  trace_field="trace", seq_len=320)[1].kept == len(sft)
  dpo_records, stats = data.read_training_records(str(tmp_path / "pairs" / "dpo.jsonl"), ("question", "chosen", "rejected"))
  assert stats.skipped == 0 and data.tokenize_dpo(dpo_records, tokenizer, question_field="question",
                                                  chosen_field="chosen", rejected_field="rejected",
                                                  seq_len=320)[1].kept == len(dpo)
