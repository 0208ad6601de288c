"""`retro-jax <command> --dry-run ...`: parse and resolve a command line, print what it would run, exit 0.

It loads no weights, starts no process group and touches no device, so a pod command can be checked on a laptop
before the slice is rented, and the docs' command lines are checked by a test. What it resolves: the config
(defaults, file, overrides), the process group the environment asks for, the mesh settings, and the model and
tokenizer configs where their directories exist here. Paths that do not exist on this machine (a bucket mount,
the pod's data) are listed as warnings, not errors; a flag or key that does not parse is an error (exit 2).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Sequence

import ml_collections

from retro_jax import distributed

# Config keys that name inputs which must exist when the command runs (outputs are created by the run).
INPUT_KEYS = ("input", "model", "model_dir", "tokenizer_dir", "train_path", "eval_path", "data_dir")


def _search_config(command: str) -> Callable[[Sequence[str]], Any]:
  def resolve(argv: Sequence[str]) -> ml_collections.ConfigDict:
    from retro_jax.search import cli, tree_cli  # pylint: disable=import-outside-toplevel

    defaults = {"search": cli.default_search_config, "generate": cli.default_generate_config,
                "tree": tree_cli.default_tree_config}
    return cli.parse_config(argv, defaults[command](), f"retro-jax {command}")
  return resolve


def _pairs_config(argv: Sequence[str]) -> ml_collections.ConfigDict:
  from retro_jax.search import tree_cli  # pylint: disable=import-outside-toplevel

  return tree_cli.parse_pairs_config(argv)


def _train_config(command: str) -> Callable[[Sequence[str]], Any]:
  def resolve(argv: Sequence[str]) -> ml_collections.ConfigDict:
    from retro_jax.train import cli  # pylint: disable=import-outside-toplevel

    return cli.parse_config(argv, command)
  return resolve


def _eval_config(argv: Sequence[str]) -> ml_collections.ConfigDict:
  from retro_jax.eval import cli  # pylint: disable=import-outside-toplevel

  return cli.parse_config(argv)[0]


def _plan_config(argv: Sequence[str]) -> ml_collections.ConfigDict:
  from retro_jax.plan import cli  # pylint: disable=import-outside-toplevel

  return cli.parse(argv)[0]


def _argparse_config(module: str) -> Callable[[Sequence[str]], Any]:
  def resolve(argv: Sequence[str]) -> argparse.Namespace:
    import importlib  # pylint: disable=import-outside-toplevel

    return importlib.import_module(module).argument_parser().parse_args(argv)
  return resolve


RESOLVERS: dict[str, Callable[[Sequence[str]], Any]] = {
    "generate": _search_config("generate"), "search": _search_config("search"), "sft": _train_config("sft"),
    "dpo": _train_config("dpo"), "eval": _eval_config, "demo": _argparse_config("retro_jax.demo_cli"),
    "build-tiny-reasoner": _argparse_config("retro_jax.tasks.build"), "tree": _search_config("tree"),
    "pairs": _pairs_config, "view": _argparse_config("retro_jax.view.cli"), "plan": _plan_config,
}


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
  items = config.items() if isinstance(config, ml_collections.ConfigDict) else vars(config).items()
  flat = {}
  for key, value in items:
    if isinstance(value, ml_collections.ConfigDict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _missing_inputs(flat: dict[str, Any]) -> list[str]:
  warnings = []
  for key, value in flat.items():
    if key.rsplit(".", 1)[-1] in INPUT_KEYS and isinstance(value, str) and value and not value.startswith("hf:"):
      for path in value.split(","):  # eval's --benchmarks-style lists never reach here; data_dir is one path
        if not os.path.exists(path):
          warnings.append(f"{key}={path} does not exist here")
  return warnings


def _model_summaries(flat: dict[str, Any]) -> list[str]:
  """One line per existing model directory: its architecture, and its tokenizer's vocabulary."""
  from retro_jax.models.config import Qwen2Config  # pylint: disable=import-outside-toplevel
  from retro_jax.tokenization import load_tokenizer  # pylint: disable=import-outside-toplevel

  lines = []
  for key, value in flat.items():
    if key.rsplit(".", 1)[-1] in ("model", "model_dir", "tokenizer_dir") and isinstance(value, str) and value \
        and os.path.isdir(value):
      parts = []
      if os.path.exists(os.path.join(value, "config.json")):
        c = Qwen2Config.from_pretrained(value)
        parts.append(f"{c.num_layers} layers, d {c.hidden_size}, {c.num_heads}/{c.num_kv_heads} heads, "
                     f"vocab {c.vocab_size}")
      if os.path.exists(os.path.join(value, "tokenizer.json")):
        parts.append(f"tokenizer vocab {load_tokenizer(value).vocab_size}")
      lines.append(f"{key}: {'; '.join(parts) or 'no config.json or tokenizer.json'}")
  return lines


def main(command: str, argv: Sequence[str]) -> int:
  """Resolves `retro-jax <command> argv` and prints it; 0 when it parses, 2 when it does not."""
  prog = f"retro-jax {command}"
  try:
    config = RESOLVERS[command](argv)
    group = distributed.plan()
  except SystemExit as error:  # argparse exits after printing its message; the train CLI exits with its message
    if isinstance(error.code, str):
      print(error.code, file=sys.stderr)
    return 0 if error.code in (0, None) else 2
  except Exception as error:  # pylint: disable=broad-except  # flags.Error, config_flags' Attribute/Key/ValueError
    print(f"{prog}: {error}", file=sys.stderr)
    return 2
  flat = _flatten(config)
  print(f"{prog} --dry-run: parses; process group: {group.describe()}")
  for key, value in flat.items():
    print(f"  {key} = {value!r}")
  for line in _model_summaries(flat):
    print(f"  [model] {line}")
  for warning in _missing_inputs(flat):
    print(f"  [warning] {warning}")
  return 0
