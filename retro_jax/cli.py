"""`retro-jax` entry point: one subcommand per stage of checkpoint -> model -> engine -> search -> train -> eval.

Each subcommand lives with its stage and is imported only when called, so `retro-jax search --help` does not pay
for importing the trainer (and a broken optional stage cannot take the others down).
"""
from __future__ import annotations

import importlib
import sys

# name -> (module, function, one-line help)
SUBCOMMANDS = {
    "generate": ("retro_jax.search.cli", "generate_main", "sample k traces per problem and grade them"),
    "search": ("retro_jax.search.cli", "search_main", "Retro-Search: revise traces at their thought switches"),
    "sft": ("retro_jax.train.cli", "sft_main", "supervised fine-tuning on (revised) traces"),
    "dpo": ("retro_jax.train.cli", "dpo_main", "conservative DPO with shared-prefix masking and an SFT term"),
    "eval": ("retro_jax.eval.cli", "eval_main", "accuracy and response length on the math benchmarks"),
    "plan": ("retro_jax.plan.cli", "plan_main", "compile a config's programs for a TPU topology: memory, FLOPs, roofline"),
    "demo": ("retro_jax.demo", "main", "the self-improvement loop end to end on the bundled tiny reasoner"),
    "build-tiny-reasoner": ("retro_jax.tasks.build", "main", "rebuild the bundled tiny reasoner from scratch"),
}


def usage() -> str:
  width = max(map(len, SUBCOMMANDS))
  lines = ["usage: retro-jax <command> [flags]   (retro-jax <command> --help for its flags)", "", "commands:"]
  lines += [f"  {name:<{width}}  {text}" for name, (_, _, text) in SUBCOMMANDS.items()]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(usage())
    return 0
  name, rest = argv[0], argv[1:]
  if name not in SUBCOMMANDS:
    print(f"retro-jax: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
    return 2
  module_name, function, _ = SUBCOMMANDS[name]
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name is None or not module_name.startswith(e.name):
      raise
    print(f"retro-jax {name}: this capability is not built yet ({module_name} is missing).", file=sys.stderr)
    return 2
  return int(getattr(module, function)(rest) or 0)


if __name__ == "__main__":
  sys.exit(main())
