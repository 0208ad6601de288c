"""`retro-jax search` and `retro-jax generate`: an ml_collections config, flag overrides, then the runner.

Configuration: the defaults below, or a config file (`--config path/to/file.py`, whose `get_config()` returns a
ConfigDict of the same shape; start it from `default_search_config()`), then `--config.key=value` overrides
(`--config.search.mode=partial`), then the shortcuts `--input --output --model --limit --seed`.

The model server and the prompt renderer are imported only when a command runs, so that the search library
and its tests never need a model.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Callable, Sequence

from absl import flags
import ml_collections

from retro_jax import config_cli
from retro_jax.engine.requests import TextGenerator
from retro_jax.grading import Grader
from retro_jax.search import generate, runner
from retro_jax.search.retro_search import SearchConfig

_SHORTCUT_HELP = {
    "input": "input JSONL, or hf:<dataset name>",
    "output": "output JSONL (resumed when it exists)",
    "model": "model directory",
    "limit": "only the first N input records",
    "seed": "run seed",
}


def _common_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.input = ""  # a JSONL path, or "hf:<dataset name>"
  config.output = ""  # JSONL, appended to and resumed from
  config.model = ""  # model directory of the generating / revising model
  config.limit = 0  # only the first `limit` input records; 0: all
  config.seed = 0
  config.summary_path = ""  # "": <output without suffix>.summary.json
  config.hf_split = "train"
  config.hf_subset = ""
  config.progress = True
  # max_concurrent_decodes 0: as many decode slots as the KV budget holds at max_seq_len (at most 64); the budget
  # is kv_memory_bytes when > 0, else kv_memory_fraction of the device memory left after the weights
  config.engine = ml_collections.ConfigDict({"max_concurrent_decodes": 0, "max_seq_len": 32768, "dtype": "float32",
                                             "kv_memory_fraction": 0.5, "kv_memory_bytes": 0})
  config.grading = ml_collections.ConfigDict({"num_workers": 2, "timeout_s": 5.0})
  return config


def default_search_config() -> ml_collections.ConfigDict:
  config = _common_config()
  config.fields = ml_collections.ConfigDict(dataclasses.asdict(runner.FieldMap()))
  config.max_records_in_flight = 256  # each has one request out: keep it >= the engine's decode slots
  search = dataclasses.asdict(SearchConfig())
  del search["seed"]  # the top-level seed
  config.search = ml_collections.ConfigDict(search)
  return config


def default_generate_config() -> ml_collections.ConfigDict:
  config = _common_config()
  fields = dataclasses.asdict(runner.FieldMap())
  del fields["trace"]
  config.fields = ml_collections.ConfigDict(fields)
  config.max_problems_in_flight = 256  # keep it >= the engine's decode slots
  sampling = dataclasses.asdict(generate.GenerateConfig())
  del sampling["seed"]
  config.generate = ml_collections.ConfigDict(sampling)
  return config


def parse_config(argv: Sequence[str], default: ml_collections.ConfigDict, prog: str) -> ml_collections.ConfigDict:
  """The run's config from `argv` (arguments only, without the program name); raises flags.Error on bad flags."""
  shortcuts = {name: (name, flags.DEFINE_integer if name in ("limit", "seed") else flags.DEFINE_string, text)
               for name, text in _SHORTCUT_HELP.items()}
  return config_cli.parse_config(argv, prog=prog, default=default, shortcuts=shortcuts)[0]


def _usage(prog: str, default: ml_collections.ConfigDict) -> str:
  shortcuts = "\n".join(f"  --{name:<7} {text}" for name, text in _SHORTCUT_HELP.items())
  return (f"usage: {prog} [--config FILE.py] [--config.KEY=VALUE ...] [flags]\n\n{shortcuts}\n\n"
          f"config (FILE.py's get_config() returns one like it; --config.KEY=VALUE overrides a key):\n{default}")


def _command(argv: Sequence[str], default: ml_collections.ConfigDict, prog: str,
             run: Callable[[ml_collections.ConfigDict, TextGenerator, Callable[[str], str]], dict]) -> int:
  if "-h" in argv or "--help" in argv:
    print(_usage(prog, default))
    return 0
  try:
    config = parse_config(argv, default, prog)
  except (flags.Error, AttributeError, KeyError) as error:  # config_flags reports unknown keys as AttributeError
    print(f"{prog}: {error}", file=sys.stderr)
    return 2
  missing = [f"--{name}" for name in ("input", "output", "model") if not config[name]]
  if missing:
    print(f"{prog}: {', '.join(missing)} required (as flags or in the config)", file=sys.stderr)
    return 2
  from retro_jax.engine.kv_budget import KVBudgetError  # pylint: disable=import-outside-toplevel
  try:
    loaded = _load_model(config)
  except KVBudgetError as error:
    print(f"{prog}: {error}", file=sys.stderr)
    return 2
  run(config, *loaded)
  return 0


def _load_model(config: ml_collections.ConfigDict) -> tuple[TextGenerator, Callable[[str], str]]:
  from retro_jax.engine.serving import load_text_generator  # pylint: disable=import-outside-toplevel
  from retro_jax.tokenization import load_tokenizer  # pylint: disable=import-outside-toplevel
  generator = load_text_generator(config.model, max_concurrent_decodes=config.engine.max_concurrent_decodes,
                                  max_seq_len=config.engine.max_seq_len, dtype=config.engine.dtype,
                                  kv_memory_fraction=config.engine.kv_memory_fraction,
                                  kv_memory_bytes=config.engine.kv_memory_bytes)
  return generator, load_tokenizer(config.model).render_prompt


def search_config(config: ml_collections.ConfigDict) -> SearchConfig:
  return SearchConfig(**config.search.to_dict(), seed=config.seed)


def run_search_from_config(config: ml_collections.ConfigDict, generator: TextGenerator,
                           render_prompt: Callable[[str], str]) -> dict:
  """The search as configured, with a given model; returns the run summary."""
  rows, total = runner.open_input(config.input, config.hf_split, config.hf_subset)
  with Grader(config.grading.num_workers, config.grading.timeout_s) as grader:
    return runner.run_search(
        rows, generator=generator, render_prompt=render_prompt, grader=grader, output_path=config.output,
        config=search_config(config), fields=runner.FieldMap(**config.fields.to_dict()), limit=config.limit,
        max_records_in_flight=config.max_records_in_flight, total=total,
        summary_path=config.summary_path or None, progress=config.progress)


def run_generate_from_config(config: ml_collections.ConfigDict, generator: TextGenerator,
                             render_prompt: Callable[[str], str]) -> dict:
  """Trace generation as configured, with a given model; returns the pass-rate summary."""
  rows, total = runner.open_input(config.input, config.hf_split, config.hf_subset)
  with Grader(config.grading.num_workers, config.grading.timeout_s) as grader:
    return generate.run_generate(
        rows, generator=generator, render_prompt=render_prompt, grader=grader, output_path=config.output,
        config=generate.GenerateConfig(**config.generate.to_dict(), seed=config.seed),
        fields=runner.FieldMap(**config.fields.to_dict()), limit=config.limit,
        max_problems_in_flight=config.max_problems_in_flight, total=total,
        summary_path=config.summary_path or None, progress=config.progress)


def search_main(argv: Sequence[str] = ()) -> int:
  """`retro-jax search ARGS`: `argv` holds the arguments after the subcommand. Returns the exit status."""
  return _command(argv, default_search_config(), "retro-jax search", run_search_from_config)


def generate_main(argv: Sequence[str] = ()) -> int:
  """`retro-jax generate ARGS`: `argv` holds the arguments after the subcommand. Returns the exit status."""
  return _command(argv, default_generate_config(), "retro-jax generate", run_generate_from_config)
