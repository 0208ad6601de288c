"""Mistakes a user can fix (a wrong path, a misspelled option, data that cannot train), kept apart from bugs.

Code that finds such a mistake raises `UserError(problem, fix)`; `retro_jax.cli.main` is the one place that
catches it, prints `retro-jax <command>: <problem>; <fix>` on one line and exits with status 2. Every other
exception is a bug and keeps its traceback. The checks below are the ones several subcommands share; each runs
before anything slow (loading a model, compiling), so a typo costs a second, not a minute.
"""
from __future__ import annotations

import difflib
import os
from typing import Iterable

EXIT_USER_ERROR = 2

# What an HF model directory must hold for us to load it (weights as safetensors only: pickles are never read).
MODEL_FILES = ("config.json", "tokenizer.json")
SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")


class UserError(ValueError):
  """A problem the user can fix, with the fix; `str()` is the one line the CLI prints. A ValueError, so code
  that validated with ValueError before keeps its callers' `except` clauses working."""

  def __init__(self, problem: str, fix: str = ""):
    super().__init__(f"{problem}; {fix}" if fix else problem)
    self.problem, self.fix = problem, fix


def did_you_mean(value: str, choices: Iterable[str]) -> str:
  """` (did you mean 'x'?)` for the closest choice, or "" when none is close."""
  close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
  return f" (did you mean {close[0]!r}?)" if close else ""


def check_choice(option: str, value: str, choices: Iterable[str]) -> None:
  """Refuses a value outside `choices` (an enum-like option, e.g. `--config.search.mode`)."""
  choices = tuple(choices)
  if value not in choices:
    raise UserError(f"{option}={value!r} is not one of {', '.join(map(repr, choices))}{did_you_mean(value, choices)}",
                    f"set {option} to one of them")


def check_model_dir(path: str, option: str = "--model") -> None:
  """An HF model directory we can load: config.json, tokenizer.json and safetensors weights."""
  if not path:
    raise UserError(f"{option} is not set", f"pass {option} DIR (an HF model directory)")
  if not os.path.isdir(path):
    raise UserError(f"model directory {path!r} does not exist", f"check {option}")
  missing = [name for name in MODEL_FILES if not os.path.exists(os.path.join(path, name))]
  if missing:
    raise UserError(f"{path!r} is not an HF model directory (no {' or '.join(missing)})",
                    f"point {option} at a directory holding config.json, tokenizer.json and model.safetensors")
  if not any(os.path.exists(os.path.join(path, name)) for name in SAFETENSORS_FILES):
    pickles = sorted(name for name in os.listdir(path) if name.endswith((".bin", ".pt", ".pth", ".ckpt")))
    found = f" (only {', '.join(pickles)}: pickled weights are never loaded)" if pickles else ""
    raise UserError(f"no model.safetensors in {path!r}{found}",
                    "convert the weights to safetensors, e.g. transformers' save_pretrained(..., "
                    "safe_serialization=True)")


def check_input_file(path: str, option: str = "--input") -> None:
  """A JSONL input that exists and holds at least one non-blank line (an empty file is a wrong path, usually)."""
  if not path:
    raise UserError(f"{option} is not set", f"pass {option} FILE.jsonl")
  if not os.path.isfile(path):
    what = "is a directory, not a file" if os.path.isdir(path) else "does not exist"
    raise UserError(f"input file {path!r} {what}", f"check {option}")
  with open(path, encoding="utf-8", errors="replace") as file:
    if not any(line.strip() for line in file):
      raise UserError(f"input file {path!r} is empty (no records)", f"check {option}")


def check_output_file(path: str, option: str = "--output") -> None:
  """An output file whose folder exists (we do not create folders from a path that may hold a typo)."""
  if not path:
    raise UserError(f"{option} is not set", f"pass {option} FILE.jsonl")
  if os.path.isdir(path):
    raise UserError(f"output {path!r} is a directory", f"pass {option} a file path, e.g. {path}/out.jsonl")
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise UserError(f"output folder {os.path.dirname(path)!r} does not exist", f"create it or fix {option}")
