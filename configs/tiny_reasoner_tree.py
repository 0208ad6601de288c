"""Tree-CoT with the bundled tiny reasoner (2 CPU cores): the node types mapped onto its own step boundaries.

The tiny reasoner was trained on arithmetic traces, not on `<thinking>` tags, so a node here is one of its
natural steps: no opening tag, the step's usual first words as the prefill phrase, and the blank line that ends
every step ("\\n\\n") as the closing text.
- thinking: "Compute" -> " 27 + 20 = 47.\\n\\n" (one operation of the main line);
- double_check: "Wait, let me double-check:" / "Let me verify:" -> a re-computed operation;
- answer: "So the answer is" -> " 38.\\n</think>\\n\\nThe answer is \\boxed{38}." (to the end of sequence);
  an answer written before the derivation is finished is wrong, which is where the wrong paths come from;
- reflection: fixed text "Actually, let me simplify the whole expression:" (the task's restart opener);
- thinking_from_scratch: no prefill: the model continues the restart with its rewritten expression.

    retro-jax tree --config configs/tiny_reasoner_tree.py --input problems.jsonl --output trees.jsonl
"""
import os

import retro_jax
from retro_jax.search.tree import ThoughtStyle
from retro_jax.search.tree_cli import default_tree_config, tree_section

TINY_REASONER_DIR = os.path.join(os.path.dirname(retro_jax.__file__), "assets", "tiny_reasoner")
STEP_END = "\n\n"
ACTION_TREE = {
    "base": {"thinking": 2},
    "thinking": {"thinking": 1, "double_check": 1, "answer": 1},
    "double_check": {"answer": 1},
    "reflection": {"thinking_from_scratch": 1},
    "thinking_from_scratch": {"thinking": 1, "answer": 1},
    "answer": {},
}
STYLES = {
    "thinking": ThoughtStyle("", STEP_END, ("Compute",)),
    "double_check": ThoughtStyle("", STEP_END, ("Wait, let me double-check:", "Let me verify:")),
    "answer": ThoughtStyle("", "", ("So the answer is",)),
    "reflection": ThoughtStyle("", "", fixed_text="Actually, let me simplify the whole expression:"),
    "thinking_from_scratch": ThoughtStyle("", STEP_END),
}


def get_config():
  c = default_tree_config()
  c.model = TINY_REASONER_DIR
  c.engine.max_concurrent_decodes = 32
  c.engine.max_seq_len = 512
  c.max_trees_in_flight = 64
  # A level-4 problem needs 4 steps + answer; double checks and a restart add a few.
  c.tree = tree_section(ACTION_TREE, STYLES, max_depth=10, max_rollouts=8, thresholds=(3.0, 6.0),
                        max_node_tokens=48, max_prompt_tokens=256)
  return c
