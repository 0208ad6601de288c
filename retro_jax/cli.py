"""`retro-jax` entry point: one subcommand per stage of checkpoint -> model -> engine -> search -> train -> eval.

Each subcommand lives with its stage and is imported only when called, so `retro-jax search --help` does not pay
for importing the trainer (and a broken optional stage cannot take the others down).

A user's mistake (`user_errors.UserError`, raised where it is found) is printed here as one line,
`retro-jax <command>: <problem>; <fix>`, with exit status 2; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import importlib
import sys

from retro_jax import distributed
from retro_jax.user_errors import EXIT_USER_ERROR, UserError

# name -> (module, function, one-line help)
SUBCOMMANDS = {
    "generate": ("retro_jax.search.cli", "generate_main", "sample k traces per problem and grade them"),
    "search": ("retro_jax.search.cli", "search_main", "Retro-Search: revise traces at their thought switches"),
    "tree": ("retro_jax.search.tree_cli", "tree_main", "tree-CoT: MCTS over typed thoughts, one tree per problem"),
    "pairs": ("retro_jax.search.tree_cli", "pairs_main", "SFT records and DPO pairs mined from tree-CoT trees"),
    "sft": ("retro_jax.train.cli", "sft_main", "supervised fine-tuning on (revised) traces"),
    "dpo": ("retro_jax.train.cli", "dpo_main", "conservative DPO with shared-prefix masking and an SFT term"),
    "eval": ("retro_jax.eval.cli", "eval_main", "accuracy and response length on the math benchmarks"),
    "view": ("retro_jax.view.cli", "view_main", "an HTML report of a search or tree output, record by record"),
    "plan": ("retro_jax.plan.cli", "plan_main", "compile a config's programs for a TPU topology: memory, FLOPs, roofline"),
    "demo": ("retro_jax.demo_cli", "main", "the self-improvement loop end to end on the bundled tiny reasoner"),
    "build-tiny-reasoner": ("retro_jax.tasks.build", "main", "rebuild the bundled tiny reasoner from scratch"),
}


def usage() -> str:
  width = max(map(len, SUBCOMMANDS))
  lines = ["usage: retro-jax <command> [flags]   (retro-jax <command> --help for its flags; --dry-run: parse and",
           "       print the resolved command, load nothing)", "", "commands:"]
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
    return EXIT_USER_ERROR
  module_name, function, _ = SUBCOMMANDS[name]
  if "--dry-run" in rest:
    from retro_jax import dry_run  # pylint: disable=import-outside-toplevel

    return dry_run.main(name, [arg for arg in rest if arg != "--dry-run"])
  if not {"-h", "--help"} & set(rest):
    distributed.initialize_or_exit(f"retro-jax {name}")  # before anything touches a device
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name is None or not module_name.startswith(e.name):
      raise
    print(f"retro-jax {name}: this capability is not built yet ({module_name} is missing).", file=sys.stderr)
    return EXIT_USER_ERROR
  try:
    return int(getattr(module, function)(rest) or 0)
  except UserError as error:
    print(f"retro-jax {name}: {error}", file=sys.stderr)
    return EXIT_USER_ERROR


if __name__ == "__main__":
  sys.exit(main())
