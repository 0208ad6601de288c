"""What the viewer shows of each output record: a light index entry, a detail payload, and the run's statistics.

The viewer reads the outputs of `retro-jax search` (Retro-Search records) and `retro-jax tree` (one MCTS tree per
record); a record's kind comes from its fields, so one report may hold both. Traces are cut with the search's own
segmentation (`search.traces`), so the boundaries the report marks are the ones the search tried.

A record's detail keeps the original trace once and, for a revised trace, only the steps after the part it
shares with the original: traces are the bulk of an output, and the revision's prefix is the original's by
construction (the search keeps steps [0, b) of the trace it revises at boundary b).
"""
from __future__ import annotations

import collections
import dataclasses
import statistics
from typing import Any, Sequence

from retro_jax.search import traces

QUESTION_PREVIEW_CHARS = 240  # the index keeps this much of a question: enough to search and to recognise it
COUNT_FIELDS = ("tokens", "steps", "thoughts")


def record_kind(record: Any) -> str:
  """"tree" (has a node list), "search" (has a trace), "error" (a failed record) or "other"."""
  if not isinstance(record, dict):
    return "other"
  if isinstance(record.get("nodes"), list):
    return "tree"
  if isinstance(record.get("trace"), str):
    return "search"
  return "error" if record.get("status") == "error" else "other"


def _number(value: Any) -> float | None:
  return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _text(value: Any) -> str:
  return value if isinstance(value, str) else ("" if value is None else str(value))


def _segmented(text: str, keywords: Sequence[str]) -> dict:
  """head, steps, solution and thought boundaries of a trace; a trace whose thinking never closes is all
  thinking (what the search's thought counting does with truncated responses)."""
  parsed = traces.parse_trace(text, require_close=False)
  return {"head": parsed.head, "steps": list(parsed.steps), "solution": parsed.solution,
          "bounds": list(traces.boundaries(parsed, keywords))}


def _shared_steps(original: list[str], revised: list[str], accepted: list[int]) -> int:
  """How many leading steps the revision keeps from the original: its first accepted boundary when the two
  traces agree up to there (the search's cut), else their common run of steps."""
  common = 0
  for before, after in zip(original, revised):
    if before != after:
      break
    common += 1
  first = accepted[0] if accepted else None
  return first if isinstance(first, int) and 0 < first <= common else common


def _rollouts(record: dict) -> list[dict] | None:
  """The kept rollouts (`search.keep_rollouts`): a list of dicts under "rollouts" (where the search otherwise
  stores a count) or "kept_rollouts"."""
  for key in ("kept_rollouts", "rollouts"):
    value = record.get(key)
    if isinstance(value, list) and all(isinstance(item, dict) for item in value):
      return value
  return None


def _scalars(record: dict, skip: Sequence[str]) -> dict:
  return {k: v for k, v in record.items() if k not in skip and (v is None or isinstance(v, (str, int, float, bool)))}


_SEARCH_TEXT_FIELDS = ("id", "question", "answer", "trace", "revised_trace", "status", "reason", "rollouts",
                       "kept_rollouts", "accepted_boundaries")


def search_detail(record: dict, keywords: Sequence[str]) -> dict:
  original = _segmented(record["trace"], keywords)
  accepted = [b for b in record.get("accepted_boundaries") or [] if isinstance(b, int)]
  detail = {"kind": "search", "question": _text(record.get("question")), "answer": _text(record.get("answer")),
            "reason": _text(record.get("reason")), "original": original, "accepted": accepted,
            "counts": _scalars(record, _SEARCH_TEXT_FIELDS), "revised": None, "rollouts": _rollouts(record)}
  revised_text = record.get("revised_trace")
  if isinstance(revised_text, str) and revised_text != record["trace"]:
    revised = _segmented(revised_text, keywords)
    keep = _shared_steps(original["steps"], revised["steps"], accepted)
    detail["revised"] = {"keep": keep, "steps": revised["steps"][keep:], "solution": revised["solution"],
                         "bounds": revised["bounds"]}
  return detail


def tree_detail(record: dict) -> dict:
  nodes = [{"id": node.get("id"), "parent": node.get("parent"), "type": _text(node.get("type")),
            "text": _text(node.get("text")), "visits": _number(node.get("visits")),
            "reward": _number(node.get("total_reward")), "depth": _number(node.get("depth")),
            "correct": node.get("correct") if isinstance(node.get("correct"), bool) else None}
           for node in record["nodes"] if isinstance(node, dict)]
  return {"kind": "tree", "question": _text(record.get("question")), "answer": _text(record.get("answer")),
          "nodes": nodes, "counts": _scalars(record, ("id", "question", "answer", "status", "nodes")),
          "rollouts": _rollouts(record)}


def other_detail(record: Any, reason: str = "") -> dict:
  fields = _scalars(record, ("id", "status")) if isinstance(record, dict) else {"value": _text(record)}
  return {"kind": "other", "reason": reason or _text(fields.pop("reason", "")), "counts": fields}


def record_id(record: Any, line: int) -> str:
  value = record.get("id") if isinstance(record, dict) else None
  return _text(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else f"line-{line + 1}"


def index_entry(position: int, line: int, record: Any, kind: str, chunk: int) -> dict:
  """What the page sorts, filters and lists without opening a record's detail: short keys, since the index
  of a 10,000-record output is parsed at load."""
  status = _text(record.get("status")) if isinstance(record, dict) else "unreadable"
  record = record if isinstance(record, dict) else {}
  status = status or "unknown"
  entry = {"n": position, "line": line + 1, "id": record_id(record, line), "kind": kind, "status": status,
           "q": _text(record.get("question"))[:QUESTION_PREVIEW_CHARS], "a": _text(record.get("answer"))[:80],
           "c": chunk}
  for field in COUNT_FIELDS:
    entry[field[:2] + "b"] = _number(record.get(f"{field}_before"))
    entry[field[:2] + "a"] = _number(record.get(f"{field}_after"))
  if kind == "tree":
    entry["nodes"] = len(record["nodes"])
  return entry


@dataclasses.dataclass
class RunStatistics:
  """Counts by status and the length figures of the summary header, gathered one record at a time."""

  statuses: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  tokens_before: list = dataclasses.field(default_factory=list)
  tokens_after: list = dataclasses.field(default_factory=list)
  steps_before: list = dataclasses.field(default_factory=list)
  steps_after: list = dataclasses.field(default_factory=list)
  revised_tokens_saved: list = dataclasses.field(default_factory=list)
  revised_steps_saved: list = dataclasses.field(default_factory=list)

  def add(self, entry: dict) -> None:
    self.statuses[entry["status"]] += 1
    if entry["kind"] != "search" or entry["status"] == "error" or None in (entry["tob"], entry["toa"]):
      return
    self.tokens_before.append(entry["tob"])
    self.tokens_after.append(entry["toa"])
    steps_saved = (entry["stb"] - entry["sta"]) if None not in (entry["stb"], entry["sta"]) else None
    if steps_saved is not None:
      self.steps_before.append(entry["stb"])
      self.steps_after.append(entry["sta"])
    if entry["status"] in ("revised", "recovered"):
      self.revised_tokens_saved.append(entry["tob"] - entry["toa"])
      if steps_saved is not None:
        self.revised_steps_saved.append(steps_saved)

  def savings(self) -> list[dict]:
    """Mean and median savings in tokens and steps, over every searched record and over the revised ones."""
    tokens_saved = [b - a for b, a in zip(self.tokens_before, self.tokens_after)]
    steps_saved = [b - a for b, a in zip(self.steps_before, self.steps_after)]
    rows = []
    for label, values in (("tokens saved, all searched", tokens_saved), ("steps saved, all searched", steps_saved),
                          ("tokens saved, revised", self.revised_tokens_saved),
                          ("steps saved, revised", self.revised_steps_saved)):
      rows.append({"label": label, "records": len(values),
                   "mean": statistics.fmean(values) if values else None,
                   "median": statistics.median(values) if values else None})
    return rows
