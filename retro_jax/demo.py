"""`retro-jax demo`: Retro-Search self-improvement end to end on the bundled tiny reasoner, on a laptop CPU.

The five stages are the real code paths a TPU pod runs, in miniature:
1. generate: sample traces from the tiny reasoner on training problems and grade them;
2. search:   Retro-Search them with the same model (self-improvement, M-hat = M);
3. sft:      fine-tune the tiny reasoner on the revised traces, and, as the control, on the same correct
             traces unrevised (same steps, same seed: the only difference is the revision);
4. eval:     the base, control and revised-SFT models on held-out problems (greedy and k samples);
5. report:   the comparison table (accuracy, mean tokens, thought switches), markdown and PNG plots, and the
             search's trace-by-trace HTML report (`retro-jax view`) in search/report.html.

Every stage writes its files under `--output` and is skipped when its result is already there, so a killed
demo resumes where it stopped (generate, search and eval also resume inside a stage). The settings are kept in
`demo_config.json` there, and a run with other settings (another seed, `--quick`) refuses that folder rather than
report the earlier run's stages as its own.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time

from retro_jax.user_errors import UserError, check_model_dir

DEFAULT_MODEL = os.path.join(os.path.dirname(__file__), "assets", "tiny_reasoner")
NAMES = ("base", "control", "revised")  # control: SFT on unrevised traces; revised: SFT on Retro-Search output


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  output: str
  model_dir: str = DEFAULT_MODEL
  seed: int = 0
  num_train_problems: int = 1500  # problems the base model writes traces for
  num_eval_problems: int = 300  # held-out problems for the evaluation
  eval_k: int = 4  # samples per problem for pass@1 at temperature 0.6
  sft_epochs: float = 2.0
  sft_learning_rate: float = 1e-4  # gentle: a larger step also erodes the arithmetic (both arms lose accuracy)
  max_new_tokens: int = 320  # the longest tiny-reasoner trace is ~240 tokens
  max_concurrent_decodes: int = 64

  @classmethod
  def quick(cls, output: str, **overrides) -> DemoConfig:
    """A smoke run of every stage (CI): a few problems, one SFT epoch, greedy plus 2 samples."""
    return cls(output=output, **{**dict(num_train_problems=48, num_eval_problems=32, eval_k=2, sft_epochs=1.0,
                                        max_concurrent_decodes=16), **overrides})


def _log(message: str) -> None:
  print(f"[demo] {message}", flush=True)


def write_problems(config: DemoConfig) -> dict[str, str]:
  """Train and held-out problems from the demo seed (questions disjoint between the two)."""
  from retro_jax.tasks.arithmetic import make_splits, write_problems as write_problem_file

  paths = {"train": os.path.join(config.output, "task", "train.jsonl"),
           "eval": os.path.join(config.output, "task", "eval.jsonl")}
  if not all(os.path.exists(p) for p in paths.values()):
    # Offset from the build seed (0) so the demo's problems are not the tiny reasoner's own training draws.
    train, held_out = make_splits(1000 + config.seed, config.num_train_problems, config.num_eval_problems)
    write_problem_file(paths["train"], train)
    write_problem_file(paths["eval"], held_out)
  return paths


def generator_for(model_dir: str, config: DemoConfig):
  from retro_jax.engine.serving import load_text_generator

  return load_text_generator(model_dir, max_concurrent_decodes=config.max_concurrent_decodes,
                             max_seq_len=512, dtype="float32", progress=False)


def generate_traces(config: DemoConfig, problems_path: str, generator, tokenizer, grader) -> str:
  from retro_jax.search import generate, runner

  out = os.path.join(config.output, "generate", "traces.jsonl")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  rows, total = runner.open_input(problems_path, "train", "")
  generate.run_generate(rows, generator=generator, render_prompt=tokenizer.render_prompt, grader=grader,
                        output_path=out, total=total,
                        config=generate.GenerateConfig(num_samples=1, max_new_tokens=config.max_new_tokens,
                                                       seed=config.seed))
  return out


def retro_search(config: DemoConfig, traces_path: str, generator, tokenizer, grader) -> str:
  from retro_jax.search import runner
  from retro_jax.search.retro_search import SearchConfig

  out = os.path.join(config.output, "search", "revised.jsonl")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  rows, total = runner.open_input(traces_path, "train", "")
  runner.run_search(rows, generator=generator, render_prompt=tokenizer.render_prompt, grader=grader,
                    output_path=out, total=total,
                    config=SearchConfig(max_rollout_tokens=config.max_new_tokens, seed=config.seed))
  return out


def correct_originals(search_path: str) -> list[dict]:
  """The Retro-Search records of correct original traces (revised or left unchanged): what both SFT arms train on
  and what the search's effect is measured over. The selection is `sft`'s own (`data.read_training_records`)."""
  from retro_jax.train import data

  return data.read_training_records(search_path, ("question", "trace", "revised_trace"),
                                    statuses=data.CORRECT_STATUSES, closed_field="revised_trace")[0]


def write_trace_report(config: DemoConfig, search_path: str) -> str:
  """The search's HTML report (`retro-jax view`): what each revision cut and what it wrote instead."""
  from retro_jax.view.report import build_report

  path = os.path.join(config.output, "search", "report.html")
  build_report(search_path, path, title=f"Retro-Search on the tiny reasoner (demo seed {config.seed})")
  return path


def sft_datasets(config: DemoConfig, records: list[dict]) -> dict[str, str]:
  """The correct originals, once with their revised trace and once as written."""
  from retro_jax.jsonl import write_jsonl

  paths = {}
  for name, field in (("revised", "revised_trace"), ("control", "trace")):
    paths[name] = os.path.join(config.output, "sft", f"{name}.jsonl")
    write_jsonl(paths[name], ({"id": r["id"], "question": r["question"], "trace": r[field]} for r in records))
  return paths


def fine_tune(config: DemoConfig, name: str, data_path: str, num_examples: int) -> str:
  from retro_jax.tasks.build import local_cpu_sft_config
  from retro_jax.train.sft import run_sft

  workdir = os.path.join(config.output, "sft", name)
  export_dir = os.path.join(workdir, "export")
  if os.path.exists(os.path.join(export_dir, "model.safetensors")):
    return export_dir
  c = local_cpu_sft_config(workdir=workdir, export_dir=export_dir, seed=config.seed, log_every_steps=5)
  c.model_dir = config.model_dir
  c.data.train_path = data_path
  c.data.seq_len = 256
  c.batch_size = max(1, min(16, num_examples // 3))  # ~2 traces per 256-token row; small runs need >= 1 batch
  c.num_epochs = config.sft_epochs
  c.optim.update(learning_rate=config.sft_learning_rate, warmup_steps=2, decay="cosine", weight_decay=0.0)
  run_sft(c)
  return export_dir


def evaluate_model(config: DemoConfig, name: str, model_dir: str, problems: list[dict], grader) -> dict:
  from retro_jax.eval import EvalConfig, evaluate, load_summary
  from retro_jax.tokenization import load_tokenizer

  out = os.path.join(config.output, "eval", name)
  summary_path = os.path.join(out, "summary.json")
  if os.path.exists(summary_path):
    return load_summary(summary_path)
  eval_config = EvalConfig(output_dir=out, name=name, model=model_dir, modes=("greedy", "sampled"), k=config.eval_k,
                           max_new_tokens=config.max_new_tokens, seed=config.seed)
  return evaluate(generator_for(model_dir, config), load_tokenizer(model_dir), {"tiny_arith": problems},
                  eval_config, grade_many=grader.grade_many)


def search_effect(records: list[dict]) -> dict:
  """Length and correctness of the revised traces against their originals (`correct_originals`)."""
  if not records:
    return {"traces": 0}
  before = statistics.fmean(r["tokens_before"] for r in records)
  after = statistics.fmean(r["tokens_after"] for r in records)
  return {"traces": len(records), "revised": sum(r["status"] == "revised" for r in records),
          "tokens_before_mean": before, "tokens_after_mean": after, "length_reduction": 1 - after / before,
          "correct_after": statistics.fmean(bool(r["correct_after"]) for r in records)}


def headline(summary: dict) -> dict:
  entry = summary["benchmarks"]["tiny_arith"]
  return {mode: {k: entry[mode][k] for k in ("accuracy", "mean_length", "mean_thought_switches")}
          for mode in ("greedy", "sampled") if mode in entry}


def expected_result_checks(effect: dict, models: dict[str, dict]) -> dict[str, bool]:
  """Issue 7's targets, each checked on the numbers (sampled mode: the field's pass@1 protocol)."""
  base, control, revised = (models[n]["sampled"] for n in NAMES)
  return {
      "revised traces >= 25% shorter": effect.get("length_reduction", 0) >= 0.25,
      "revised traces all correct": effect.get("correct_after", 0) == 1.0,
      "revised-SFT >= 20% shorter than base": revised["mean_length"] <= 0.8 * base["mean_length"],
      "revised-SFT accuracy not lower than base": revised["accuracy"] >= base["accuracy"],
      "revised-SFT shorter than control": revised["mean_length"] < control["mean_length"],
  }


def write_report(config: DemoConfig, effect: dict, summaries: dict[str, dict], wall_s: float) -> dict:
  from retro_jax.eval import compare

  models = {name: headline(s) for name, s in summaries.items()}
  checks = expected_result_checks(effect, models)
  table = compare([summaries[n] for n in NAMES], list(NAMES), output_dir=config.output)
  lines = ["# Retro-Search self-improvement on the tiny reasoner", "",
           f"seed {config.seed}; {config.num_train_problems} training problems, {config.num_eval_problems} "
           f"held-out problems, k={config.eval_k}; wall time {wall_s:.0f} s", "",
           "## Retro-Search on the base model's correct traces", ""]
  if effect.get("traces"):
    lines += [f"- traces: {effect['traces']} correct, {effect['revised']} revised",
              f"- mean tokens: {effect['tokens_before_mean']:.1f} -> {effect['tokens_after_mean']:.1f} "
              f"({effect['length_reduction']:.1%} shorter)",
              f"- revised traces still correct: {effect['correct_after']:.1%}"]
  lines += ["", "## Held-out evaluation", "", table, "", "## Expected result (issue 7)", ""]
  lines += [f"- [{'x' if ok else ' '}] {name}" for name, ok in checks.items()]
  report = "\n".join(lines) + "\n"
  with open(os.path.join(config.output, "report.md"), "w", encoding="utf-8") as f:
    f.write(report)
  result = {"config": dataclasses.asdict(config), "search": effect, "models": models, "checks": checks,
            "wall_time_s": wall_s}
  with open(os.path.join(config.output, "demo_summary.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  print(report)
  return result


class SettingsMismatch(UserError):
  """The output folder holds stages of a demo run with other settings."""


def claim_output(config: DemoConfig) -> None:
  """Records the run's settings in `<output>/demo_config.json`, or checks them against the ones found there."""
  settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "output"}
  path = os.path.join(config.output, "demo_config.json")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
    changed = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
    if changed:
      described = ", ".join(f"{k}: {before!r} there, {now!r} now" for k, (before, now) in changed.items())
      raise SettingsMismatch(f"{config.output!r} holds a demo run with other settings ({described})",
                             "pass another --output, or delete that folder to start over")
    return
  os.makedirs(config.output, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(settings, f, indent=2)


def run_demo(config: DemoConfig) -> dict:
  from retro_jax.grading import Grader
  from retro_jax.jsonl import read_jsonl
  from retro_jax.tokenization import load_tokenizer

  check_model_dir(config.model_dir)
  start = time.time()
  claim_output(config)
  paths = write_problems(config)
  tokenizer = load_tokenizer(config.model_dir)
  with Grader() as grader:
    _log("1/5 sampling traces from the tiny reasoner")
    base_generator = generator_for(config.model_dir, config)
    traces = generate_traces(config, paths["train"], base_generator, tokenizer, grader)
    _log("2/5 Retro-Search (self-improvement: the tiny reasoner revises its own traces)")
    revised = retro_search(config, traces, base_generator, tokenizer, grader)
    del base_generator
    originals = correct_originals(revised)
    effect = search_effect(originals)
    if not effect["traces"]:
      raise UserError("the base model wrote no correct trace: nothing to revise",
                      "run the demo with the tiny reasoner (the default --model)")
    data = sft_datasets(config, originals)
    models = {"base": config.model_dir}
    for step, name in ((3, "revised"), (3, "control")):
      _log(f"{step}/5 SFT on the {'revised' if name == 'revised' else 'unrevised (control)'} traces")
      models[name] = fine_tune(config, name, data[name], len(originals))
    problems = list(read_jsonl(paths["eval"]))
    summaries = {}
    for name in NAMES:
      _log(f"4/5 evaluating {name} on {len(problems)} held-out problems")
      summaries[name] = evaluate_model(config, name, models[name], problems, grader)
  _log(f"5/5 report (traces: {write_trace_report(config, revised)})")
  return write_report(config, effect, summaries, time.time() - start)
