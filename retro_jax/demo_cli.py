"""`retro-jax demo`: the two end-to-end demos on the bundled tiny reasoner behind one command.

`--method retro` (the default) runs Retro-Search self-improvement (`demo.py`); `--method treecot` the tree-CoT
data method (`demo_treecot.py`). Kept apart from both so that neither demo imports the other's runner.
"""
from __future__ import annotations

import argparse
import os

from retro_jax import demo


def argument_parser() -> argparse.ArgumentParser:
  """The command's flags (also what `--dry-run` parses)."""
  parser = argparse.ArgumentParser(prog="retro-jax demo", description=demo.__doc__.splitlines()[0])
  parser.add_argument("--output", default="retro_jax_demo", help="output directory (resumed when it exists)")
  parser.add_argument("--model", default=demo.DEFAULT_MODEL,
                      help="the model to improve (default: the tiny reasoner)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--quick", action="store_true", help="a ~2-minute smoke run of every stage")
  parser.add_argument("--method", choices=("retro", "treecot"), default="retro",
                      help="retro: Retro-Search self-improvement; treecot: tree-CoT data, SFT, cDPO vs DPO")
  return parser


def main(argv: list[str]) -> int:
  args = argument_parser().parse_args(argv)
  if args.method == "treecot":
    from retro_jax.demo_treecot import TreeDemoConfig, run_treecot_demo  # pylint: disable=import-outside-toplevel
    make = TreeDemoConfig.quick if args.quick else TreeDemoConfig
    run_treecot_demo(make(output=args.output, model_dir=args.model, seed=args.seed))
    print(f"report: {os.path.join(args.output, 'report.md')}")
    return 0
  make = demo.DemoConfig.quick if args.quick else demo.DemoConfig
  result = demo.run_demo(make(output=args.output, model_dir=args.model, seed=args.seed))
  missed = [name for name, ok in result["checks"].items() if not ok]
  print(f"report: {os.path.join(args.output, 'report.md')}"
        + (f"\n(expected result not reached: {'; '.join(missed)})" if missed and not args.quick else ""))
  return 0
