"""`retro-jax eval`: evaluate a model on the benchmarks, or put finished runs side by side.

  retro-jax eval --model DIR --benchmarks aime24,math500 --k 4 --output DIR
  retro-jax eval --model DIR --benchmarks all --data_dir benchmarks_jsonl/   # offline: <name>.jsonl files
  retro-jax eval --model DIR --benchmarks tiny_arith=out/task/eval.jsonl,mine=my.jsonl --modes greedy
  retro-jax eval --config my_eval.py --config.eval.max_new_tokens=8192 --config.engine.dtype=bfloat16
  retro-jax eval --compare base/summary.json sft/summary.json --names base,sft --output cmp/

Configuration as in `retro-jax search`: the defaults below, or a config file (`--config path.py`, whose
`get_config()` returns a ConfigDict of the same shape; start it from `default_eval_config()`), then
`--config.key=value` overrides, then the shortcut flags (`--model --benchmarks --k --output ...`).
The model server is imported only when a model is evaluated, so `--compare` and the tests never load JAX.
Bad records of a benchmark file are left out and listed (stderr and summary.json's `bad_records`); the good ones
are evaluated. Mistakes in the command itself are one line and exit status 2 (`retro_jax.user_errors`).
"""
from __future__ import annotations

import os
import sys
from typing import Any, Sequence

from absl import flags
import ml_collections

from retro_jax import config_cli, user_errors
from retro_jax.eval import benchmarks, report, runner
from retro_jax.tokenization import PROMPT_OPTIONS
from retro_jax.user_errors import UserError

PROG = "retro-jax eval"

# shortcut flag -> (config key path, flag definer, help)
_SHORTCUTS = {
    "model": ("model", flags.DEFINE_string, "model directory (HF format)"),
    "name": ("name", flags.DEFINE_string, "the run's name in tables and plots (default: the model directory's)"),
    "benchmarks": ("benchmarks", flags.DEFINE_string, "comma list: names, `all`, or name=path.jsonl"),
    "data_dir": ("data_dir", flags.DEFINE_string, "directory of local <benchmark>.jsonl files"),
    "output": ("output", flags.DEFINE_string, "output directory (resumed if it holds a run)"),
    "limit": ("limit", flags.DEFINE_integer, "first N problems of each benchmark only"),
    "seed": ("seed", flags.DEFINE_integer, "run seed"),
    "k": ("eval.k", flags.DEFINE_integer, "samples per question for pass@1 and pass@k"),
    "modes": ("eval.modes", flags.DEFINE_string, "greedy,sampled | greedy | sampled"),
    "max_new_tokens": ("eval.max_new_tokens", flags.DEFINE_integer, "token budget per response"),
}


def default_eval_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = ""
  config.name = ""
  config.benchmarks = "all"  # the seven benchmarks of the field
  config.data_dir = ""  # <data_dir>/<name>.jsonl replaces the HF hub for that benchmark when present
  config.output = "eval_output"
  config.limit = 0  # 0: all problems
  config.seed = 0
  config.progress = True
  config.update(PROMPT_OPTIONS)  # chat_template, system_prompt, prompt_template (tokenization.py) ...
  config.prompt_template = ""  # ... except that "" here means each benchmark's own (R1's directive for maths)
  config.fields = ml_collections.ConfigDict({"id": "id", "question": "question", "answer": "answer"})  # custom
  config.eval = ml_collections.ConfigDict({
      "modes": "greedy,sampled",
      "k": 4,
      "temperature": 0.6,  # R1-distill's recommended sampling
      "top_p": 0.95,
      "max_new_tokens": 32768,
  })
  # max_seq_len 0: the longest prompt plus the budget, at most the model's positions (longer budgets are cut);
  # tensor / replicas_per_host: chips per replica / replicas (0: automatic); kv_page_size: positions per page of
  # the paged KV pool (0: a dense max_seq_len row per slot)
  config.engine = ml_collections.ConfigDict({"max_concurrent_decodes": 64, "max_seq_len": 0, "dtype": "float32",
                                             "tensor": 0, "replicas_per_host": 0, "kv_page_size": 16})
  config.grading = ml_collections.ConfigDict({"num_workers": 2, "timeout_s": 5.0})
  return config


def _split_compare(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """(summary files after `--compare`, the other arguments): absl flags take one value per flag."""
  files, rest = [], []
  taking = False
  for arg in argv:
    if arg == "--compare" or arg.startswith("--compare="):
      taking = True
      files += [arg.split("=", 1)[1]] if "=" in arg else []
    elif taking and not arg.startswith("--"):
      files.append(arg)
    else:
      taking = False
      rest.append(arg)
  return files, rest


def parse_config(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, str | None]:
  """The run's config from `argv` (without the program name), and the `--names` of a comparison."""
  def define_names(values: flags.FlagValues) -> None:
    flags.DEFINE_string("names", None, "comma-separated run names for --compare", flag_values=values)

  config, values = config_cli.parse_config(argv, prog=PROG, default=default_eval_config(), shortcuts=_SHORTCUTS,
                                           define_extra=define_names)
  return config, values.names


def eval_config(config: ml_collections.ConfigDict) -> runner.EvalConfig:
  return runner.EvalConfig(
      output_dir=config.output, name=config.name or os.path.basename(os.path.normpath(config.model)),
      model=os.path.abspath(config.model), modes=tuple(m.strip() for m in config.eval.modes.split(",") if m.strip()),
      k=config.eval.k, temperature=config.eval.temperature, top_p=config.eval.top_p,
      max_new_tokens=config.eval.max_new_tokens, seed=config.seed, prompt_template=config.prompt_template or None,
      grading_workers=config.grading.num_workers, grading_timeout_s=config.grading.timeout_s,
      progress=config.progress)


def load_records(config: ml_collections.ConfigDict,
                 bad_records: list[dict] | None = None) -> dict[str, list[benchmarks.Problem]]:
  """Each selected benchmark's problems; bad records go to `bad_records` when given (see `load_benchmark`)."""
  selected = benchmarks.resolve(config.benchmarks, question_field=config.fields.question,
                                answer_field=config.fields.answer, id_field=config.fields.id or None)
  return {spec.name: benchmarks.load_benchmark(spec, path=path, data_dir=config.data_dir or None,
                                               limit=config.limit or None, bad_records=bad_records)
          for spec, path in selected}


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Checks the settings and loads the benchmarks (first, so a mistake fails before the model loads), then the
  tokenizer and the model, and evaluates the good records; returns the summary."""
  try:
    settings = eval_config(config)
  except ValueError as error:
    raise UserError(f"--config.eval: {error}", "fix that value (`--help` prints the defaults)") from None
  bad: list[dict] = []
  records = load_records(config, bad)
  user_errors.check_model_dir(config.model)
  for record in bad:
    print(f"{PROG}: left out {record['reason']}", file=sys.stderr)
  if not any(records.values()):
    raise UserError("no usable record in the selected benchmarks", "check the files given to --benchmarks")
  import jax  # pylint: disable=import-outside-toplevel
  from retro_jax.engine import serving  # pylint: disable=import-outside-toplevel
  from retro_jax.tokenization import load_tokenizer  # pylint: disable=import-outside-toplevel
  if jax.process_count() > 1:  # every process would evaluate everything into the same output
    raise UserError("eval runs on one process (one host)", "start it without the RETRO_JAX_* group variables")
  # The benchmarks' own templates are applied by the runner, so the tokenizer renders the user turn as given.
  tokenizer = load_tokenizer(config.model, template=config.chat_template, system_prompt=config.system_prompt)
  limit = serving.resolve_max_seq_len(config.model, config.engine.max_seq_len)
  max_seq_len = config.engine.max_seq_len or min(
      limit, runner.longest_prompt(tokenizer, records, settings) + settings.max_new_tokens)
  generator = serving.load_text_generator(config.model, max_concurrent_decodes=config.engine.max_concurrent_decodes,
                                          max_seq_len=max_seq_len, dtype=config.engine.dtype,
                                          mesh=serving.serving_mesh_for(config.model, config.engine),
                                          kv_page_size=config.engine.kv_page_size,
                                          progress=False)  # the eval bar shows samples/s and accuracy instead
  summary = runner.evaluate(generator, tokenizer, records, settings, bad_records=bad)
  if summary["bad_records"] or summary["budget_clamped"]:
    print(f"{PROG}: {len(summary['bad_records'])} records left out, {summary['budget_clamped']} responses with "
          f"their budget cut to max_seq_len={max_seq_len} (see summary.json)", file=sys.stderr)
  return summary


def _usage() -> str:
  shortcuts = "\n".join(f"  --{name:<15} {text}" for name, (_, _, text) in _SHORTCUTS.items())
  return (f"usage: {PROG} [--config FILE.py] [--config.KEY=VALUE ...] [flags]\n"
          f"       {PROG} --compare A/summary.json B/summary.json ... [--names a,b] [--output DIR]\n\n"
          f"{shortcuts}\n\nconfig (FILE.py's get_config() returns one like it; --config.KEY=VALUE overrides a "
          f"key):\n{default_eval_config()}")


def eval_main(argv: Sequence[str] = ()) -> int:
  """`retro-jax eval ARGS`: `argv` holds the arguments after the subcommand. Returns the exit status."""
  if "-h" in argv or "--help" in argv:
    print(_usage())
    return 0
  compare_files, rest = _split_compare(argv)
  config, names = parse_config(rest)
  if compare_files:
    for path in compare_files:
      user_errors.check_input_file(path, "--compare")
    try:
      summaries = [report.load_summary(path) for path in compare_files]
    except ValueError as error:  # not JSON, or not a summary
      raise UserError(str(error), "pass the summary.json files of `retro-jax eval` runs") from None
    given = any(a.split("=", 1)[0] in ("--output", "--config.output") for a in rest)
    print(report.compare(summaries, names.split(",") if names else None, config.output if given else None))
    return 0
  if not config.model:
    raise UserError("--model is not given", "pass --model DIR, or --compare SUMMARY.json ...")
  run(config)
  return 0
