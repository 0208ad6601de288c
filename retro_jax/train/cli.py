"""`retro-jax sft` and `retro-jax dpo`: an ml_collections config file plus `--config.key=value` overrides.

    retro-jax sft --config configs/tiny_reasoner_sft.py --config.data.train_path=out/search.jsonl \\
        --config.workdir=out/sft
    retro-jax sft --config configs/tiny_reasoner_sft.py:scratch ...   # get_config("scratch")

`argv` is what follows the subcommand. The run summary (without the per-step history) is printed as JSON and
written to <workdir>/summary.json; the exit status is 0 when training finished, 3 when it stopped on a
preemption signal (its checkpoint is saved: run the same command again to resume).
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Callable, Sequence

import ml_collections

from retro_jax import config_cli
from retro_jax.user_errors import UserError

EXIT_PREEMPTED = 3


def parse_config(argv: Sequence[str], command: str) -> ml_collections.ConfigDict:
  """The config named by `--config FILE[:ARG]`, with every `--config.key=value` override applied."""
  if any(a in ("-h", "--help", "--helpfull") for a in argv):
    print(__doc__)
    raise SystemExit(0)
  config, _ = config_cli.parse_config(argv, prog=f"retro-jax {command}", lock_config=True)
  if config is None:
    raise UserError("--config FILE is not given", f"pass one, e.g. --config configs/tiny_reasoner_{command}.py")
  return config


def _main(argv: Sequence[str], command: str, run: Callable) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  config = parse_config(argv, command)
  summary = run(config)
  short = {k: v for k, v in summary.items() if k != "history"}
  text = json.dumps(short, indent=2, default=str)
  import jax  # deferred with the trainers

  if jax.process_index() == 0:
    os.makedirs(config.workdir, exist_ok=True)
    with open(os.path.join(config.workdir, "summary.json"), "w", encoding="utf-8") as f:
      f.write(text + "\n")
  print(text)
  return EXIT_PREEMPTED if summary["preempted"] else 0


def sft_main(argv: Sequence[str] | None = None) -> int:
  from retro_jax.train.sft import run_sft  # deferred: keeps `retro-jax --help` fast

  return _main(sys.argv[1:] if argv is None else argv, "sft", run_sft)


def dpo_main(argv: Sequence[str] | None = None) -> int:
  from retro_jax.train.dpo import run_dpo

  return _main(sys.argv[1:] if argv is None else argv, "dpo", run_dpo)
