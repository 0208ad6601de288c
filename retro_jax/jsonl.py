"""JSONL, the format of every record file the pipeline reads or writes (problems, traces, search output, samples).

Reading reports a bad line as that line's error (`Line.error`) instead of failing the file, so every command
can keep the good records and report the bad ones by line number. Whole files are written atomically (beside
the target, then renamed): a killed job leaves the old file or the new one, never a truncated one that a resumed
job would take as finished. The append-only writer of resumable runs is `search.runner.ResumableJsonlWriter`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Iterator

from retro_jax.user_errors import UserError


@dataclasses.dataclass(frozen=True)
class Line:
  """One non-blank line: `index` is its 0-based line number; `error` says why it is not a JSON object."""

  index: int
  data: Any
  error: str | None = None


def read_lines(path: str) -> Iterator[Line]:
  """Every non-blank line of a JSONL file, decoded; a line that is not a JSON object carries its error."""
  with open(path, encoding="utf-8") as file:
    for index, text in enumerate(file):
      if not text.strip():
        continue
      try:
        data = json.loads(text)
      except json.JSONDecodeError as error:
        yield Line(index, None, f"line {index + 1}: not JSON ({error.msg})")
        continue
      if not isinstance(data, dict):
        yield Line(index, data, f"line {index + 1}: not a JSON object")
      else:
        yield Line(index, data)


def read_jsonl(path: str) -> Iterator[dict]:
  """The records of a file the pipeline wrote itself; a bad line there means the file is not ours (UserError)."""
  for line in read_lines(path):
    if line.error is not None:
      raise UserError(f"{path}: {line.error}", "this file was not written by retro-jax, or was edited; fix or "
                      "move it")
    yield line.data


def count_lines(path: str) -> int:
  """Non-blank lines: the records a progress bar can expect."""
  with open(path, encoding="utf-8") as file:
    return sum(1 for text in file if text.strip())


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
  """Writes one JSON object per line, atomically, creating the folder; returns the number of lines."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  count = 0
  with open(path + ".tmp", "w", encoding="utf-8") as file:
    for record in records:
      file.write(json.dumps(record, ensure_ascii=False) + "\n")
      count += 1
  os.replace(path + ".tmp", path)
  return count


def write_json(path: str, payload: Any) -> None:
  """One JSON document (a summary, a report), atomically, creating the folder."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(f"{path}.tmp", "w", encoding="utf-8") as file:
    json.dump(payload, file, indent=2)
    file.write("\n")
  os.replace(f"{path}.tmp", path)
