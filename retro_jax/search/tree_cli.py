"""`retro-jax tree` (MCTS trees of typed thoughts per problem) and `retro-jax pairs` (SFT records and DPO pairs from
the trees), configured like `search`: defaults or `--config FILE.py`, then `--config.key=value`, then shortcuts.

    retro-jax tree --config configs/tiny_reasoner_tree.py --input problems.jsonl --output trees.jsonl
    retro-jax pairs --input trees.jsonl --output pairs/     # pairs/sft.jsonl, pairs/dpo.jsonl, pairs/summary.json

The defaults are the paper's: its action tree, max_rollouts 32, thresholds [4, 8], tagged thoughts
(`<thinking>` ... `</thinking>`) with prefill phrases. `configs/tiny_reasoner_tree.py` maps the node types onto
the tiny reasoner's own step boundaries instead.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from absl import flags
import ml_collections

from retro_jax import config_cli, user_errors
from retro_jax.engine.requests import TextGenerator
from retro_jax.grading import Grader
from retro_jax.search import pairs, runner, shards, tree_runner
from retro_jax.search.cli import (_command, _common_config, _input, _job_totals, _load_model, _search_finished,
                                  _settings)  # pylint: disable=protected-access
from retro_jax.user_errors import UserError
from retro_jax.search.tree import PAPER_ACTION_TREE, PAPER_STYLES, ThoughtStyle, TreeConfig


def default_tree_config() -> ml_collections.ConfigDict:
  config = _common_config()
  fields = dataclasses.asdict(runner.FieldMap())
  del fields["trace"]
  config.fields = ml_collections.ConfigDict(fields)
  config.max_trees_in_flight = 256  # each has one request out: keep it >= the engine's decode slots
  config.second_model = ""  # model directory writing tree.second_model_types (same engine settings)
  config.tree = tree_section(PAPER_ACTION_TREE, PAPER_STYLES)
  return config


def tree_section(action_tree: dict, styles: dict[str, ThoughtStyle], **options) -> ml_collections.ConfigDict:
  """The `tree` part of a config: TreeConfig's options, the action tree and the thought styles
  (`fixed_text` "" means the model writes the node)."""
  section = {field.name: field.default for field in dataclasses.fields(TreeConfig)
             if field.name not in ("action_tree", "styles", "seed")}
  section.update(options)
  section["action_tree"] = {kind: dict(children) for kind, children in action_tree.items()}
  section["styles"] = {kind: {"open": s.open, "close": s.close, "prefills": s.prefills,
                              "fixed_text": s.fixed_text or ""}
                       for kind, s in styles.items()}
  return ml_collections.ConfigDict(section)


def tree_config(config: ml_collections.ConfigDict) -> TreeConfig:
  section = config.tree.to_dict()
  styles = {kind: ThoughtStyle(s["open"], s["close"], tuple(s["prefills"]), s["fixed_text"] or None)
            for kind, s in section.pop("styles").items()}
  return TreeConfig(styles=styles, seed=config.seed, **section)


def run_trees_from_config(config: ml_collections.ConfigDict, generator: TextGenerator,
                          render_prompt: Callable[[str], str], shard: shards.Shard | None = None) -> dict:
  """The trees as configured, with a given model; returns the run summary. With a `shard` of a multi-process
  job, only that shard's share of the problems, into the shard's file (search/shards.py)."""
  settings = tree_config(config)
  second = None
  if config.second_model:
    second_config = ml_collections.ConfigDict(config.to_dict())
    second_config.model = config.second_model
    second = _load_model(second_config)[0]
  rows, total, limit, output, summary_path = _input(config, shard)
  with Grader(config.grading.num_workers, config.grading.timeout_s) as grader:
    return tree_runner.run_trees(
        rows, generator=generator, render_prompt=render_prompt, grader=grader, output_path=output,
        config=settings, fields=runner.FieldMap(**config.fields.to_dict()), limit=limit,
        max_trees_in_flight=config.max_trees_in_flight, total=total, summary_path=summary_path,
        progress=config.progress, second_generator=second)


def _summarize_trees(output: str, parts: list[dict]) -> dict:
  """The tree summary over a merged output: counts from the file, run counters added over the shards."""
  wall, grading = _job_totals(parts)
  summary = tree_runner.summarize_trees(output)
  for key in ("duplicate_ids_skipped", "trees_this_run"):
    summary[key] = sum(part.get(key, 0) for part in parts)
  summary.update(wall_time_s=wall, grading=dict(grading))
  return summary


def check_tree_config(config: ml_collections.ConfigDict) -> TreeConfig:
  """The tree settings, refused in one line (before any model loads) when they cannot run."""
  settings = _settings(lambda: tree_config(config), "tree", {}, config)
  if settings.second_model_types and not config.second_model:
    raise UserError("tree.second_model_types names node types for a second model", "set --config.second_model")
  if config.second_model:
    user_errors.check_model_dir(config.second_model, "--config.second_model")
  return settings


def tree_main(argv: Sequence[str] = ()) -> int:
  """`retro-jax tree ARGS`: `argv` holds the arguments after the subcommand. Returns the exit status."""
  return _command(argv, default_tree_config(), "retro-jax tree", check_tree_config, run_trees_from_config,
                  _search_finished, lambda record: record["id"], _summarize_trees)


def default_pairs_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.input = ""  # trees JSONL written by `retro-jax tree`
  config.output = ""  # folder: sft.jsonl, dpo.jsonl, summary.json
  config.model = ""  # optional: lengths in this tokenizer's tokens; "" measures them in characters
  config.pairs = ml_collections.ConfigDict(dataclasses.asdict(pairs.PairsConfig()))
  return config


def parse_pairs_config(argv: Sequence[str]) -> ml_collections.ConfigDict:
  """`retro-jax pairs` flags -> its config (also what `--dry-run` resolves)."""
  shortcuts = {name: (name, flags.DEFINE_string, text) for name, text in (
      ("input", "trees JSONL"), ("output", "output folder"), ("model", "tokenizer for lengths (optional)"))}
  return config_cli.parse_config(argv, prog="retro-jax pairs", default=default_pairs_config(),
                                 shortcuts=shortcuts)[0]


def pairs_main(argv: Sequence[str] = ()) -> int:
  """`retro-jax pairs ARGS`: SFT records and DPO pairs from trees. Returns the exit status."""
  if "-h" in argv or "--help" in argv:
    print("usage: retro-jax pairs --input TREES.jsonl --output DIR [--model DIR] [--config.pairs.KEY=VALUE ...]"
          f"\n\n{default_pairs_config()}")
    return 0
  config = parse_pairs_config(argv)
  if not config.output:
    raise UserError("--output is not set", "pass --output DIR (sft.jsonl, dpo.jsonl and summary.json go there)")
  user_errors.check_input_file(config.input)
  if config.model:
    user_errors.check_model_dir(config.model)
  settings = _settings(lambda: pairs.PairsConfig(**config.pairs.to_dict()), "pairs", {}, config)
  length = pairs.token_length(config.model) if config.model else len
  summary = pairs.write_pairs(config.input, config.output, settings, length)
  print(runner.format_table("tree pairs", summary))
  return 0
