"""Training data from tree-CoT trees: SFT records from correct paths, thought-length balance, DPO pairs.

- A **path** is the root-to-answer text of one answer node, rendered as a reasoning trace: `<think>\\n`, the
  thoughts, then the answer. When the answer node already closes the thinking (the tiny reasoner writes
  "So the answer is 38.\\n</think>\\n\\nThe answer is \\boxed{38}." as one node) the path is the trace as it is;
  otherwise `\\n</think>\\n\\n` goes between the last thought and the answer node. The records carry the question
  and the trace, so `retro-jax sft` and `retro-jax dpo` render them with the model's chat template unchanged.
- **Length balance** bins the distinct correct paths of one problem by relative length,
  r = (L - L_min) / (L_max - L_min): short (r < 1/3), medium (r < 2/3), long. Relative, not fixed token
  thresholds, so an easy problem's long path and a hard problem's short one are judged within their problem.
  When all correct paths of a problem have one length there is no short or long: each is in every bin.
  By default the long paths go to SFT and the short ones to DPO's chosen side.
- **DPO pairs**: each chosen path is paired with the wrong path (an answer node graded wrong) whose trace shares
  the shortest common prefix with it, in characters (ties: the fewest shared nodes, then the lowest node id).
  Text, not tree structure, decides: sibling nodes often hold the same text, and the text is what the DPO loss's
  shared-prefix mask sees. `shared_prefix_chars` and `shared_prefix_nodes` record both.
Identical texts under different nodes (siblings sampled alike) count once.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import statistics
from typing import Callable, Iterable, Sequence

from retro_jax import jsonl
from retro_jax.search.tree import ANSWER, path_ids


THINK_OPEN, THINK_CLOSE = "<think>\n", "</think>"
BINS = ("short", "medium", "long")
Length = Callable[[str], int]


@dataclasses.dataclass(frozen=True)
class PairsConfig:
  sft_bins: tuple[str, ...] = ("long",)
  chosen_bins: tuple[str, ...] = ("short",)

  def __post_init__(self):
    for name in ("sft_bins", "chosen_bins"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
      unknown = set(getattr(self, name)) - set(BINS)
      if unknown:
        raise ValueError(f"{name}: unknown bins {sorted(unknown)}; use {BINS}")


@dataclasses.dataclass(frozen=True)
class Path:
  node: int  # the answer node
  ids: tuple[int, ...]  # root to answer
  trace: str
  correct: bool
  length: int


def render_path(texts: Sequence[str]) -> str:
  """The reasoning trace of a path's node texts (root excluded), as the module docstring says."""
  *thoughts, answer = texts
  thinking = "".join(thoughts)
  if THINK_CLOSE in answer:
    return THINK_OPEN + thinking + answer
  return THINK_OPEN + thinking.rstrip("\n") + "\n" + THINK_CLOSE + "\n\n" + answer


def tree_paths(tree: dict, length: Length) -> list[Path]:
  """Every answer node's path, distinct traces only (the lowest node id keeps a repeated text)."""
  nodes, paths, seen = tree["nodes"], [], set()
  for node in nodes:
    if node["type"] != ANSWER:
      continue
    ids = tuple(path_ids(nodes, node["id"]))
    trace = render_path([nodes[i]["text"] for i in ids[1:]])
    if trace not in seen:
      seen.add(trace)
      paths.append(Path(node["id"], ids, trace, bool(node["correct"]), length(trace)))
  return paths


def length_bins(lengths: Sequence[int]) -> list[frozenset[str]]:
  """The bins of each length within its problem (see the module docstring)."""
  low, high = min(lengths), max(lengths)
  if low == high:
    return [frozenset(BINS)] * len(lengths)
  return [frozenset([BINS[min(2, int(3 * (n - low) / (high - low)))]]) for n in lengths]


def shared_nodes(a: Path, b: Path) -> int:
  """Nodes below the root the two paths share."""
  return next((i for i, (x, y) in enumerate(zip(a.ids[1:], b.ids[1:])) if x != y), min(len(a.ids), len(b.ids)) - 1)


def shared_chars(a: str, b: str) -> int:
  return len(os.path.commonprefix([a, b]))


def mine_tree(tree: dict, config: PairsConfig, length: Length) -> tuple[list[dict], list[dict]]:
  """(SFT records, DPO pairs) of one tree."""
  paths = tree_paths(tree, length)
  correct = [p for p in paths if p.correct]
  wrong = [p for p in paths if not p.correct]
  if not correct:
    return [], []
  base = {"question": tree["question"], "answer": tree["answer"], "tree_id": tree["id"]}
  sft, dpo = [], []
  for path, bins in zip(correct, length_bins([p.length for p in correct])):
    if bins & set(config.sft_bins):
      sft.append({**base, "id": f"{tree['id']}#{path.node}", "trace": path.trace, "length": path.length,
                  "bins": sorted(bins), "node": path.node})
    if wrong and bins & set(config.chosen_bins):
      rejected = min(wrong, key=lambda w, p=path: (shared_chars(p.trace, w.trace), shared_nodes(p, w), w.node))
      dpo.append({**base, "id": f"{tree['id']}#{path.node}-{rejected.node}", "chosen": path.trace,
                  "rejected": rejected.trace, "shared_prefix_nodes": shared_nodes(path, rejected),
                  "shared_prefix_chars": shared_chars(path.trace, rejected.trace), "chosen_length": path.length,
                  "rejected_length": rejected.length, "chosen_node": path.node, "rejected_node": rejected.node})
  return sft, dpo


def mine(trees: Iterable[dict], config: PairsConfig, length: Length) -> tuple[list[dict], list[dict], dict]:
  """SFT records, DPO pairs and counts over trees; error trees are counted and passed over."""
  sft, dpo = [], []
  counts = collections.Counter()
  for tree in trees:
    if tree.get("status") == "error":
      counts["error_trees_skipped"] += 1
      continue
    counts["trees"] += 1
    tree_sft, tree_dpo = mine_tree(tree, config, length)
    counts["trees_with_sft"] += bool(tree_sft)
    counts["trees_with_pairs"] += bool(tree_dpo)
    sft += tree_sft
    dpo += tree_dpo
  summary = dict(counts, sft_records=len(sft), dpo_pairs=len(dpo),
                 sft_length_mean=_mean([r["length"] for r in sft]),
                 chosen_length_mean=_mean([r["chosen_length"] for r in dpo]),
                 rejected_length_mean=_mean([r["rejected_length"] for r in dpo]),
                 shared_prefix_chars_mean=_mean([r["shared_prefix_chars"] for r in dpo]))
  return sft, dpo, summary


def read_trees(path: str, counts: collections.Counter) -> Iterable[dict]:
  """Trees of a `retro-jax tree` output; lines that are not trees are counted (`unreadable_lines`)."""
  for row in jsonl.read_lines(path):
    data = row.data
    if row.error or not isinstance(data, dict) or not (data.get("status") == "error" or _is_tree(data)):
      counts["unreadable_lines"] += 1
      continue
    yield data


def _is_tree(data: dict) -> bool:
  """The fields mining reads, node i at position i, and every parent before its child."""
  fields = ("id", "type", "text", "parent", "correct")
  return (all(k in data for k in ("id", "question", "answer", "nodes")) and isinstance(data["nodes"], list)
          and all(isinstance(n, dict) and all(k in n for k in fields) and n["id"] == i
                  and (n["parent"] is None) == (i == 0) and (i == 0 or 0 <= n["parent"] < i)
                  for i, n in enumerate(data["nodes"])))


def write_pairs(input_path: str, output_dir: str, config: PairsConfig, length: Length) -> dict:
  """Writes `sft.jsonl`, `dpo.jsonl` and `summary.json` under `output_dir`; returns the summary."""
  counts: collections.Counter = collections.Counter()
  sft, dpo, summary = mine(read_trees(input_path, counts), config, length)
  summary["unreadable_lines"] = counts["unreadable_lines"]
  jsonl.write_jsonl(os.path.join(output_dir, "sft.jsonl"), sft)
  jsonl.write_jsonl(os.path.join(output_dir, "dpo.jsonl"), dpo)
  jsonl.write_json(os.path.join(output_dir, "summary.json"), summary)
  return summary


def token_length(model_dir: str) -> Length:
  from retro_jax.tokenization import load_tokenizer  # pylint: disable=import-outside-toplevel

  tokenizer = load_tokenizer(model_dir)
  return lambda text: len(tokenizer.encode(text))


def _mean(values: list) -> float | None:
  return statistics.fmean(values) if values else None
