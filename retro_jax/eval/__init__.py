"""Evaluation: the benchmark registry, the resumable runner, the field's metrics, and reports with plots.

The demo and notebooks call this API; `retro-jax eval` (cli.py) is a thin layer over it:

  problems = {"tiny_arith": load_benchmark("tiny_arith", path="out/task/eval.jsonl")}
  summary = evaluate(generator, tokenizer, problems, EvalConfig(output_dir="out/eval/base", name="base"))
  print(compare([base_summary, sft_summary], ["base", "sft"], output_dir="out/eval"))
"""
from retro_jax.eval.benchmarks import (FIELD_BENCHMARKS, BenchmarkError, BenchmarkSpec, Problem, custom_spec,
                                       get_spec, load_benchmark, register)
from retro_jax.eval.metrics import pass_at_k
from retro_jax.eval.report import compare, load_summary, markdown_table
from retro_jax.eval.runner import EvalConfig, EvalError, evaluate

__all__ = [
    "FIELD_BENCHMARKS", "BenchmarkError", "BenchmarkSpec", "EvalConfig", "EvalError", "Problem", "compare",
    "custom_spec", "evaluate", "get_spec", "load_benchmark", "load_summary", "markdown_table", "pass_at_k",
    "register",
]
