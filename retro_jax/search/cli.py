"""`retro-jax search` and `retro-jax generate`: an ml_collections config, flag overrides, then the runner.

Configuration: the defaults below, or a config file (`--config path/to/file.py`, whose `get_config()` returns a
ConfigDict of the same shape; start it from `default_search_config()`), then `--config.key=value` overrides
(`--config.search.mode=partial`), then the shortcuts `--input --output --model --limit --seed`.

Every setting is checked before the model loads (paths, choices, the sequence limit against the model's
positions); a mistake is a `UserError`, one line and exit status 2 (see `retro_jax.cli`). The prompt options
(`chat_template`, `system_prompt`, `prompt_template`) are the same keys as in `eval` and `sft`.

The model server and the prompt renderer are imported only when a command runs, so that the search library
and its tests never need a model.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Sequence

from absl import flags
import ml_collections

from retro_jax import config_cli, user_errors
from retro_jax.engine.requests import TextGenerator
from retro_jax.grading import Grader
from retro_jax.search import generate, runner, shards
from retro_jax.search.retro_search import SearchConfig
from retro_jax.tokenization import PROMPT_OPTIONS
from retro_jax.user_errors import UserError

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
  config.progress = True  # progress bars (records, and the engine's samples)
  config.update(PROMPT_OPTIONS)  # chat_template, system_prompt, prompt_template (tokenization.py)
  # max_seq_len: prompt + generated tokens per sequence; 0 = the model's positions (max_position_embeddings).
  # tensor: chips per engine replica, replicas_per_host: replicas per process (0: automatic, see
  # sharding.serving_mesh); max_concurrent_decodes is the process's total over its replicas, 0: as many decode
  # slots as the KV budget holds at max_seq_len (at most 64), where the budget is kv_memory_bytes when > 0, else
  # kv_memory_fraction of the device memory left after the weights (engine/kv_budget.py). kv_page_size: positions
  # per page of the paged KV pool the budget becomes (0: one dense max_seq_len row per slot; engine/paging.py);
  # kv_dtype "int8": that pool in int8 with a scale per position and KV head ("": the compute dtype).
  config.engine = ml_collections.ConfigDict({"max_concurrent_decodes": 0, "max_seq_len": 0, "dtype": "float32",
                                             "tensor": 0, "replicas_per_host": 0, "kv_memory_fraction": 0.5,
                                             "kv_memory_bytes": 0, "kv_page_size": 16,
                                             "kv_dtype": ""})
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
  """The run's config from `argv` (arguments only, without the program name); raises UserError on bad flags."""
  shortcuts = {name: (name, flags.DEFINE_integer if name in ("limit", "seed") else flags.DEFINE_string, text)
               for name, text in _SHORTCUT_HELP.items()}
  return config_cli.parse_config(argv, prog=prog, default=default, shortcuts=shortcuts)[0]


def _usage(prog: str, default: ml_collections.ConfigDict) -> str:
  shortcuts = "\n".join(f"  --{name:<7} {text}" for name, text in _SHORTCUT_HELP.items())
  return (f"usage: {prog} [--config FILE.py] [--config.KEY=VALUE ...] [flags]\n\n{shortcuts}\n\n"
          f"config (FILE.py's get_config() returns one like it; --config.KEY=VALUE overrides a key):\n{default}")


def _command(argv: Sequence[str], default: ml_collections.ConfigDict, prog: str,
             check: Callable[[ml_collections.ConfigDict], object], run: Callable[..., dict],
             finished: Callable[[ml_collections.ConfigDict], shards.Finished],
             merge_key: Callable[[dict], runner.RecordId], summarize: Callable[[str, list[dict]], dict]) -> int:
  if "-h" in argv or "--help" in argv:
    print(_usage(prog, default))
    return 0
  config = parse_config(argv, default, prog)
  missing = [f"--{name}" for name in ("input", "output", "model") if not config[name]]
  if missing:
    raise UserError(f"{', '.join(missing)} not given", "pass them as flags or set them in the config")
  if not config.input.startswith("hf:"):
    user_errors.check_input_file(config.input)
  user_errors.check_output_file(config.output)
  user_errors.check_model_dir(config.model)
  check(config)
  # Each process of a multi-process job runs its share into its own shard; process 0 merges (search/shards.py).
  shard = shards.Shard.for_this_process(config.output, config.summary_path)
  ids = shards.unique_ids(runner.open_input(config.input, config.hf_split, config.hf_subset)[0], config.fields.id,
                          config.limit)
  try:
    shards.run_job(shard, ids, finished(config), lambda share: run(config, *_load_model(config), shard=share),
                   merge_key, summarize)
  except (shards.OutputBusy, shards.IncompleteShards) as error:
    raise UserError(str(error)) from None
  return 0


def _load_model(config: ml_collections.ConfigDict) -> tuple[TextGenerator, Callable[[str], str]]:
  """The engine (its sequence limit checked against the model's positions, on this process's serving mesh) and
  the prompt renderer."""
  from retro_jax.engine import serving  # pylint: disable=import-outside-toplevel
  from retro_jax.tokenization import load_tokenizer_for  # pylint: disable=import-outside-toplevel
  render_prompt = load_tokenizer_for(config.model, config).render_prompt  # checks the prompt options
  max_seq_len = serving.resolve_max_seq_len(config.model, config.engine.max_seq_len)
  generator = serving.load_text_generator(config.model, max_concurrent_decodes=config.engine.max_concurrent_decodes,
                                          max_seq_len=max_seq_len, dtype=config.engine.dtype,
                                          mesh=serving.serving_mesh_for(config.model, config.engine),
                                          progress=config.progress,
                                          kv_memory_fraction=config.engine.kv_memory_fraction,
                                          kv_memory_bytes=config.engine.kv_memory_bytes,
                                          kv_page_size=config.engine.kv_page_size,
                                          kv_dtype=config.engine.kv_dtype)
  return generator, render_prompt


def _settings(make: Callable[[], object], section: str, choices: dict[str, tuple[str, ...]],
              config: ml_collections.ConfigDict) -> object:
  """Builds a settings dataclass from `config[section]`; its validation errors become UserErrors."""
  for key, allowed in choices.items():
    user_errors.check_choice(f"--config.{section}.{key}", config[section][key], allowed)
  try:
    return make()
  except (ValueError, TypeError) as error:
    raise UserError(f"--config.{section}: {error}", "fix that value (`--help` prints the defaults)") from None


def search_config(config: ml_collections.ConfigDict) -> SearchConfig:
  return _settings(lambda: SearchConfig(**config.search.to_dict(), seed=config.seed), "search",
                   {"mode": ("full", "partial"), "value_unit": ("steps", "tokens")}, config)


def generate_config(config: ml_collections.ConfigDict) -> generate.GenerateConfig:
  def make() -> generate.GenerateConfig:
    settings = generate.GenerateConfig(**config.generate.to_dict(), seed=config.seed)
    settings.sampling  # pylint: disable=pointless-statement  # SamplingParams checks the sampling values
    return settings
  return _settings(make, "generate", {}, config)


def _input(config: ml_collections.ConfigDict, shard: shards.Shard | None):
  """(rows, total, limit, output path, summary path) of the whole input, or of one shard's share of it."""
  rows, total = runner.open_input(config.input, config.hf_split, config.hf_subset)
  if shard is None or shard.count == 1:
    return rows, total, config.limit, config.output, config.summary_path or None
  return shards.own_rows(rows, shard, config.fields.id, config.limit), None, 0, shard.path, shard.summary_path


def run_search_from_config(config: ml_collections.ConfigDict, generator: TextGenerator,
                           render_prompt: Callable[[str], str], shard: shards.Shard | None = None) -> dict:
  """The search as configured, with a given model; returns the run summary. With a `shard` of a multi-process
  job, only that shard's share of the records, into the shard's file."""
  rows, total, limit, output, summary_path = _input(config, shard)
  with Grader(config.grading.num_workers, config.grading.timeout_s) as grader:
    return runner.run_search(
        rows, generator=generator, render_prompt=render_prompt, grader=grader, output_path=output,
        config=search_config(config), fields=runner.FieldMap(**config.fields.to_dict()), limit=limit,
        max_records_in_flight=config.max_records_in_flight, total=total, summary_path=summary_path,
        progress=config.progress)


def run_generate_from_config(config: ml_collections.ConfigDict, generator: TextGenerator,
                             render_prompt: Callable[[str], str], shard: shards.Shard | None = None) -> dict:
  """Trace generation as configured, with a given model; returns the pass-rate summary (`shard` as in search)."""
  rows, total, limit, output, summary_path = _input(config, shard)
  with Grader(config.grading.num_workers, config.grading.timeout_s) as grader:
    return generate.run_generate(
        rows, generator=generator, render_prompt=render_prompt, grader=grader, output_path=output,
        config=generate_config(config),
        fields=runner.FieldMap(**config.fields.to_dict()), limit=limit,
        max_problems_in_flight=config.max_problems_in_flight, total=total, summary_path=summary_path,
        progress=config.progress)


def _search_finished(config: ml_collections.ConfigDict) -> shards.Finished:
  del config
  return lambda record_id, written: record_id in written


def _generate_finished(config: ml_collections.ConfigDict) -> shards.Finished:
  """A problem is finished with all its samples written, or with its error record (the problem's own id)."""
  k = config.generate.num_samples
  return lambda problem_id, written: problem_id in written or all(
      generate.sample_id(problem_id, i) in written for i in range(k))


def _job_totals(parts: list[dict]) -> tuple[float, collections.Counter]:
  """(the slowest shard's wall time, the grading counts of all shards) from the shards' summaries."""
  grading: collections.Counter = collections.Counter()
  for part in parts:
    grading.update(part.get("grading", {}))
  return max((part["wall_time_s"] for part in parts), default=0.0), grading


def _summarize_search(output: str, parts: list[dict]) -> dict:
  """The search summary over a merged output: counts from the file, run counters added over the shards."""
  wall, grading = _job_totals(parts)
  summary = runner.summarize_search(output, runner._RunStats(), grading)  # pylint: disable=protected-access
  for key in ("duplicate_ids_skipped", "records_this_run"):
    summary[key] = sum(part.get(key, 0) for part in parts)
  summary["wall_time_s"] = wall
  return summary


def _summarize_generate(output: str, parts: list[dict]) -> dict:
  return generate.summarize_generate(output, *_job_totals(parts))


def search_main(argv: Sequence[str] = ()) -> int:
  """`retro-jax search ARGS`: `argv` holds the arguments after the subcommand. Returns the exit status."""
  return _command(argv, default_search_config(), "retro-jax search", search_config, run_search_from_config,
                  _search_finished, lambda record: record["id"], _summarize_search)


def generate_main(argv: Sequence[str] = ()) -> int:
  """`retro-jax generate ARGS`: `argv` holds the arguments after the subcommand. Returns the exit status."""
  return _command(argv, default_generate_config(), "retro-jax generate", generate_config,
                  run_generate_from_config, _generate_finished, lambda record: record.get("problem_id", record["id"]),
                  _summarize_generate)
