"""Scripted trees: thought styles that read easily, a rollout script, the invariants every written tree must keep.

Run as a script, it drives `run_trees` over scripted problems for the kill-and-resume test.
"""
from __future__ import annotations

import re
import sys
from typing import Sequence

from retro_jax.search.tree import ANSWER, ThoughtStyle, TreeConfig

TYPES = ("sub_task", "thinking", "hypothesis", "reflection", "double_check", "thinking_from_scratch", "answer")
# "[type]" + text + "|": a node's text says what it is; the reflection is fixed text, as the paper allows.
STYLES = {t: ThoughtStyle(f"[{t}]", "|") for t in TYPES}
STYLES["reflection"] = ThoughtStyle("[reflection]", "|", fixed_text="[reflection]R|")


def config(action_tree: dict, **options) -> TreeConfig:
  return TreeConfig(action_tree=action_tree, styles=STYLES, **options)


def check_invariants(tree: dict, max_depth: int) -> None:
  """Issue 15's tree invariants, plus the structure the viewer relies on."""
  nodes = tree["nodes"]
  assert [n["id"] for n in nodes] == list(range(len(nodes)))
  assert nodes[0]["parent"] is None and nodes[0]["depth"] == 0
  assert nodes[0]["visits"] == tree["rollouts"]
  children: dict[int, list[dict]] = {n["id"]: [] for n in nodes}
  for node in nodes[1:]:
    assert node["parent"] < node["id"] and node["depth"] == nodes[node["parent"]]["depth"] + 1 <= max_depth
    children[node["parent"]].append(node)
  for node in nodes:
    assert 0 <= node["total_reward"] <= node["visits"]
    if node["type"] == ANSWER:
      assert not children[node["id"]]
      assert node["total_reward"] == (node["visits"] if node["correct"] else 0)
    else:
      assert node["visits"] == sum(c["visits"] for c in children[node["id"]]) + node["ended"]
      if node["ended"]:  # a rollout ends short of an answer only at the depth limit or a dead end
        assert node["depth"] == max_depth or not node["closed"] or not children[node["id"]]


def arithmetic_rollout(prompt: str, index: int) -> str:
  """For problems "q<i>: the answer is <a>": an answer node is right once the path has two thinking nodes or a
  restart, else off by one; other nodes are "t<i>|" (sample i). Depends only on the prompt and the index."""
  if prompt.endswith("[answer]"):
    gold = int(re.search(r"answer is (\d+)", prompt).group(1))
    right = prompt.count("[thinking]") >= 2 or "[thinking_from_scratch]" in prompt
    return f"\\boxed{{{gold if right else gold + 1}}}|"
  return f"t{index}|"


ARITHMETIC_TREE = {"base": {"thinking": 2}, "thinking": {"thinking": 1, "double_check": 1},
                   "double_check": {"answer": 1}, "reflection": {"thinking_from_scratch": 1},
                   "thinking_from_scratch": {"answer": 1}}


def runner_config() -> TreeConfig:
  return config(ARITHMETIC_TREE, max_depth=6, max_rollouts=4, thresholds=(3, 6), max_prompt_tokens=60)


def problems(count: int) -> list[dict]:
  return [{"id": f"p{i}", "question": f"q{i}: the answer is {10 + i}", "answer": 10 + i} for i in range(count)]


def _main(argv: Sequence[str]) -> None:
  """`python -m tests.tree_fakes INPUT OUTPUT DELAY_S`: trees of scripted problems with the scripted engine."""
  from retro_jax.search import runner, tree_runner  # pylint: disable=import-outside-toplevel
  from tests.fakes import ExactGrader, ScriptedGenerator, render  # pylint: disable=import-outside-toplevel

  input_path, output_path, delay_s = argv[0], argv[1], float(argv[2])
  rows, total = runner.open_input(input_path)
  tree_runner.run_trees(rows, generator=ScriptedGenerator(arithmetic_rollout, slots=3, delay_s=delay_s),
                        render_prompt=render, grader=ExactGrader(), output_path=output_path,
                        config=runner_config(),
                        max_trees_in_flight=4, total=total, progress=False)


if __name__ == "__main__":
  _main(sys.argv[1:])
