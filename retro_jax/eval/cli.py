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
"""
from __future__ import annotations

import os
import sys
from typing import Any, Sequence

from absl import flags
import ml_collections

from retro_jax import config_cli
from retro_jax.eval import benchmarks, report, runner

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
  config.fields = ml_collections.ConfigDict({"id": "id", "question": "question", "answer": "answer"})  # custom
  config.eval = ml_collections.ConfigDict({
      "modes": "greedy,sampled",
      "k": 4,
      "temperature": 0.6,  # R1-distill's recommended sampling
      "top_p": 0.95,
      "max_new_tokens": 32768,
      "prompt_template": "",  # user turn with {question}; "": each benchmark's own (R1's directive for maths)
      "chat_template": "auto",  # "auto" | "r1" | "chatml"
  })
  # max_seq_len 0: fit the prompts; tensor / replicas_per_host: chips per replica / replicas (0: automatic)
  config.engine = ml_collections.ConfigDict({"max_concurrent_decodes": 64, "max_seq_len": 0, "dtype": "float32",
                                             "tensor": 0, "replicas_per_host": 0})
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
      max_new_tokens=config.eval.max_new_tokens, seed=config.seed, prompt_template=config.eval.prompt_template or None,
      grading_workers=config.grading.num_workers, grading_timeout_s=config.grading.timeout_s,
      progress=config.progress)


def load_records(config: ml_collections.ConfigDict) -> dict[str, list[benchmarks.Problem]]:
  selected = benchmarks.resolve(config.benchmarks, question_field=config.fields.question,
                                answer_field=config.fields.answer, id_field=config.fields.id or None)
  return {spec.name: benchmarks.load_benchmark(spec, path=path, data_dir=config.data_dir or None,
                                               limit=config.limit or None)
          for spec, path in selected}


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Loads the benchmarks (first, so a missing file fails before the model loads), the tokenizer and the model,
  then evaluates; returns the summary."""
  records = load_records(config)
  settings = eval_config(config)
  import jax  # pylint: disable=import-outside-toplevel
  from retro_jax.engine.serving import load_text_generator, serving_mesh_for  # pylint: disable=import-outside-toplevel
  from retro_jax.tokenization import load_tokenizer  # pylint: disable=import-outside-toplevel
  if jax.process_count() > 1:  # every process would evaluate everything into the same output
    raise ValueError("eval runs on one process (one host); start it without RETRO_JAX_* group variables")
  tokenizer = load_tokenizer(config.model, template=config.eval.chat_template)
  max_seq_len = config.engine.max_seq_len or (
      runner.longest_prompt(tokenizer, records, settings) + settings.max_new_tokens)
  generator = load_text_generator(config.model, max_concurrent_decodes=config.engine.max_concurrent_decodes,
                                  max_seq_len=max_seq_len, dtype=config.engine.dtype,
                                  mesh=serving_mesh_for(config.model, config.engine),
                                  progress=False)  # the eval bar shows samples/s and accuracy instead
  return runner.evaluate(generator, tokenizer, records, settings)


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
  try:
    config, names = parse_config(rest)
  except (flags.Error, AttributeError, KeyError) as error:  # config_flags reports unknown keys as AttributeError
    print(f"{PROG}: {error}", file=sys.stderr)
    return 2
  try:
    if compare_files:
      summaries = [report.load_summary(path) for path in compare_files]
      given = any(a.split("=", 1)[0] in ("--output", "--config.output") for a in rest)
      print(report.compare(summaries, names.split(",") if names else None, config.output if given else None))
      return 0
    if not config.model:
      print(f"{PROG}: --model is required (as a flag or in the config), or --compare SUMMARY.json ...",
            file=sys.stderr)
      return 2
    run(config)
  except (benchmarks.BenchmarkError, runner.EvalError, OSError, ValueError) as error:
    print(f"{PROG}: {error}", file=sys.stderr)  # a user's mistake (a missing file, offline hub): no traceback
    return 2
  return 0
