"""`retro-jax demo --method treecot`: tree-CoT data end to end on the bundled tiny reasoner, on a laptop CPU.

The paper's pipeline (arXiv 2503.01461), in miniature, through the real code paths:
1. tree:   grow an MCTS tree of typed thoughts per training problem (configs/tiny_reasoner_tree.py);
2. pairs:  SFT records from the long correct paths, DPO pairs from the short ones (thought-length balance);
3. sft:    fine-tune the tiny reasoner on the balanced SFT records;
4. dpo:    from that SFT model, conservative DPO (label smoothing, shared-prefix masking, joint SFT term
           alpha = 1) and, as the control, plain DPO on the same pairs (no smoothing, no mask, no SFT term);
5. eval:   base, SFT, cDPO and plain DPO on held-out problems: accuracy, mean length, no-answer rate (the
           columns of the paper's ablation table), greedy and sampled.

Stages resume like `retro-jax demo`'s: a finished stage's files are kept, and a run with other settings refuses
the output folder (`demo_config.json`).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import time

from retro_jax import demo, jsonl
from retro_jax.user_errors import check_model_dir

NAMES = ("base", "sft", "cdpo", "dpo")
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@dataclasses.dataclass(frozen=True)
class TreeDemoConfig:
  """Field names shared with `demo.DemoConfig` let the demo's problem writer and evaluation serve both."""

  output: str
  model_dir: str = demo.DEFAULT_MODEL
  seed: int = 0
  num_train_problems: int = 96  # problems to grow trees for
  num_eval_problems: int = 100
  eval_k: int = 2
  max_new_tokens: int = 320
  max_concurrent_decodes: int = 32
  sft_epochs: float = 2.0
  sft_learning_rate: float = 1e-4
  dpo_epochs: float = 3.0
  dpo_learning_rate: float = 1e-4  # a strong push (10x configs/tiny_reasoner_dpo.py), as in the paper's ablation
  dpo_beta: float = 0.1
  cdpo_label_smoothing: float = 0.1

  @classmethod
  def quick(cls, output: str, **overrides) -> TreeDemoConfig:
    """A smoke run of every stage (CI)."""
    return cls(output=output, **{**dict(num_train_problems=24, num_eval_problems=24, eval_k=1, sft_epochs=1.0,
                                        dpo_epochs=1.0, max_concurrent_decodes=16), **overrides})


def _log(message: str) -> None:
  print(f"[demo treecot] {message}", flush=True)


def tiny_tree_config(seed: int):
  """configs/tiny_reasoner_tree.py's config (a config file, as `retro-jax tree --config` reads it)."""
  spec = importlib.util.spec_from_file_location("tiny_reasoner_tree", os.path.join(CONFIGS, "tiny_reasoner_tree.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.seed = seed
  return config


def grow_trees(config: TreeDemoConfig, problems_path: str, grader, tokenizer) -> str:
  from retro_jax.search import runner, tree_runner
  from retro_jax.search.tree_cli import tree_config

  out = os.path.join(config.output, "tree", "trees.jsonl")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  tree = tiny_tree_config(config.seed)
  rows, total = runner.open_input(problems_path)
  tree_runner.run_trees(rows, generator=demo.generator_for(config.model_dir, config),
                        render_prompt=tokenizer.render_prompt, grader=grader, output_path=out,
                        config=tree_config(tree), total=total, max_trees_in_flight=tree.max_trees_in_flight)
  return out


def mine_pairs(config: TreeDemoConfig, trees_path: str) -> dict:
  from retro_jax.search import pairs

  out = os.path.join(config.output, "pairs")
  summary = pairs.write_pairs(trees_path, out, pairs.PairsConfig(), pairs.token_length(config.model_dir))
  return {"summary": summary, "sft": os.path.join(out, "sft.jsonl"), "dpo": os.path.join(out, "dpo.jsonl")}


# Keys of tasks.build.local_cpu_sft_config (one device, float32, no periodic checkpoints) a DPO run takes over.
LOCAL_CPU_KEYS = ("compute_dtype", "mesh", "seed", "workdir", "checkpoint_every_steps", "async_checkpointing",
                  "log_every_steps", "eval_at_start", "export_dir", "tensorboard")


def preference_tuning(config: TreeDemoConfig, name: str, init_dir: str, data_path: str, num_pairs: int,
                      conservative: bool) -> str:
  """cDPO (the paper's joint objective) or plain DPO, from the SFT model, on the same pairs."""
  from retro_jax.tasks.build import local_cpu_sft_config
  from retro_jax.train.config import dpo_config
  from retro_jax.train.dpo import run_dpo

  workdir = os.path.join(config.output, "dpo", name)
  export_dir = os.path.join(workdir, "export")
  if not os.path.exists(os.path.join(export_dir, "model.safetensors")):
    local = local_cpu_sft_config(workdir=workdir, export_dir=export_dir, seed=config.seed, log_every_steps=5)
    c = dpo_config()
    for key in LOCAL_CPU_KEYS:
      c[key] = local[key]
    c.model_dir = init_dir
    c.data.train_path = data_path
    c.data.seq_len = 256
    c.batch_size = max(1, min(8, num_pairs // 4))
    c.num_epochs = config.dpo_epochs
    c.optim.update(learning_rate=config.dpo_learning_rate, warmup_steps=2, decay="cosine", weight_decay=0.0)
    c.dpo.beta = config.dpo_beta
    c.dpo.label_smoothing = config.cdpo_label_smoothing if conservative else 0.0
    c.dpo.mask_shared_prefix = conservative
    c.dpo.sft_weight = 1.0 if conservative else 0.0
    run_dpo(c)
  return export_dir


def headline(summary: dict) -> dict:
  entry = summary["benchmarks"]["tiny_arith"]
  return {mode: {k: entry[mode][k] for k in ("accuracy", "mean_length", "no_answer_rate")}
          for mode in ("greedy", "sampled") if mode in entry}


def write_report(config: TreeDemoConfig, data: dict, summaries: dict[str, dict], wall_s: float) -> dict:
  models = {name: headline(s) for name, s in summaries.items()}
  lines = ["# Tree-CoT on the tiny reasoner", "",
           f"seed {config.seed}; {config.num_train_problems} training problems, {config.num_eval_problems} held-out "
           f"problems, k={config.eval_k}; wall time {wall_s:.0f} s", "", "## Trees and pairs", ""]
  lines += [f"- {key}: {value:.4g}" if isinstance(value, float) else f"- {key}: {value}"
            for key, value in {**data["trees"], **data["pairs"]}.items() if key not in ("grading",)]
  lines += ["", "## Held-out evaluation", "", "| model | mode | accuracy | mean length | no-answer rate |",
            "|---|---|---|---|---|"]
  for name in NAMES:
    for mode, row in models[name].items():
      lines.append(f"| {name} | {mode} | {row['accuracy']:.3f} | {row['mean_length']:.1f} | "
                   f"{row['no_answer_rate']:.3f} |")
  report = "\n".join(lines) + "\n"
  with open(os.path.join(config.output, "report.md"), "w", encoding="utf-8") as f:
    f.write(report)
  result = {"config": dataclasses.asdict(config), **data, "models": models, "wall_time_s": wall_s}
  with open(os.path.join(config.output, "demo_summary.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  print(report)
  return result


def run_treecot_demo(config: TreeDemoConfig) -> dict:
  from retro_jax.grading import Grader
  from retro_jax.search import tree_runner
  from retro_jax.tokenization import load_tokenizer

  check_model_dir(config.model_dir)
  start = time.time()
  demo.claim_output(config)
  paths = demo.write_problems(config)
  tokenizer = load_tokenizer(config.model_dir)
  with Grader() as grader:
    _log("1/5 growing trees of typed thoughts with the tiny reasoner")
    trees = grow_trees(config, paths["train"], grader, tokenizer)
    _log("2/5 mining SFT records and DPO pairs (thought-length balance)")
    mined = mine_pairs(config, trees)
    counts = mined["summary"]
    if not counts["sft_records"] or not counts["dpo_pairs"]:
      raise RuntimeError(f"the trees gave nothing to train on: {counts}")
    _log(f"3/5 balanced SFT on {counts['sft_records']} long correct paths")
    models = {"base": config.model_dir, "sft": demo.fine_tune(config, "balanced", mined["sft"], counts["sft_records"])}
    _log(f"4/5 cDPO and plain DPO on {counts['dpo_pairs']} pairs")
    for name, conservative in (("cdpo", True), ("dpo", False)):
      models[name] = preference_tuning(config, name, models["sft"], mined["dpo"], counts["dpo_pairs"], conservative)
    problems = list(jsonl.read_jsonl(paths["eval"]))
    summaries = {}
    for name in NAMES:
      _log(f"5/5 evaluating {name} on {len(problems)} held-out problems")
      summaries[name] = demo.evaluate_model(config, name, models[name], problems, grader)
  data = {"trees": tree_runner.summarize_trees(trees), "pairs": counts}
  return write_report(config, data, summaries, time.time() - start)
