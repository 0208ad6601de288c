"""Supervised fine-tuning on (question, trace) records: next-token NLL on the assistant tokens only.

`run_sft(config)` is the whole job (what `retro-jax sft` runs): read and tokenize the JSONL, pack rows, train
on the mesh with checkpoints and resume, evaluate on the held-out split, export an HF directory. The loss is
the mean over every assistant token of the step's batch (all micro-batches and devices together), so long and
short traces weigh per token, as in the Retro-Search and distillation papers' SFT.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from retro_jax.train import data, losses, trainer

log = logging.getLogger(__name__)


def sft_logprobs(model, rows: dict, config: ml_collections.ConfigDict) -> jax.Array:
  """Per-position log p(target) [b, t] of packed rows (inputs, targets, segment_ids, positions [b, t])."""
  hidden = losses.hidden_states(model, rows["inputs"], rows["positions"], rows["segment_ids"], config.remat)
  return losses.token_logprobs(model, hidden, rows["targets"], config.loss_chunk_size)


def _sums(model, rows: dict, config) -> dict[str, jax.Array]:
  nll, count = losses.masked_nll_sum(sft_logprobs(model, rows, config), rows["loss_mask"])
  return {"nll": nll, "loss_tokens": count, "tokens": jnp.sum(rows["segment_ids"] != 0).astype(jnp.float32)}


def _summarize(sums: dict[str, float]) -> dict[str, float]:
  return {"loss": sums["nll"] / max(sums["loss_tokens"], 1.0), "loss_tokens": sums["loss_tokens"],
          "tokens": sums["tokens"]}


def load_examples(s: trainer.Setup) -> tuple[list[data.SFTExample], list[data.SFTExample], dict[str, Any]]:
  """(train examples, held-out examples, data statistics) from config.data; the statistics (also in the run
  summary) say how many records were dropped and why."""
  c = s.config.data
  fields = (c.question_field, c.trace_field)
  select = dict(statuses=data.parse_statuses(c.statuses), closed_field=c.trace_field)
  records, read_stats = data.read_training_records(c.train_path, fields, limit=c.limit, **select)
  if c.eval_path:
    eval_records, eval_read = data.read_training_records(c.eval_path, fields, **select)
  else:
    records, eval_records = data.split_holdout(records, c.eval_fraction, s.config.seed)
    eval_read = None
  kwargs = dict(question_field=c.question_field, trace_field=c.trace_field, seq_len=c.seq_len,
                truncation=c.truncation)
  train, tok_stats = data.tokenize_sft(records, s.tokenizer, name="sft train", **kwargs)
  held_out, _ = data.tokenize_sft(eval_records, s.tokenizer, name="sft eval", **kwargs)
  if not train:
    raise data.DataError(
        f"no usable training examples in {c.train_path!r} ({read_stats.lines} lines: {read_stats.skipped} bad, "
        f"dropped by status {dict(read_stats.dropped_status)}, {read_stats.unclosed_thinking} with unclosed "
        f"thinking, {tok_stats.examples - tok_stats.kept} over seq_len={c.seq_len})",
        f"check --config.data.trace_field={c.trace_field!r}, --config.data.statuses={c.statuses!r} and the file")
  stats = {**read_stats.as_dict(), "train_examples": len(train), "eval_examples": len(held_out),
           "truncated": tok_stats.truncated,
           "dropped_too_long": tok_stats.dropped_too_long + tok_stats.dropped_prompt_too_long,
           "eval_bad_lines": eval_read.skipped if eval_read else 0}
  return train, held_out, stats


def build_task(s: trainer.Setup, train: list[data.SFTExample], held_out: list[data.SFTExample],
               stats: dict[str, int]) -> trainer.Task:
  seq_len, config = s.config.data.seq_len, s.config
  train_plan = data.pack_plan(data.example_lengths(train), seq_len, s.config.data.packing)
  eval_plan = data.pack_plan(data.example_lengths(held_out), seq_len, s.config.data.packing)

  def row_maker(examples, plan) -> Callable[[int], dict]:
    return lambda i: data.build_packed_row([examples[j] for j in plan[i]], seq_len)

  def loss(model, micro, totals):
    sums = _sums(model, micro, config)
    return sums["nll"] / jnp.maximum(totals["loss_tokens"], 1.0), sums

  stats = dict(stats, train_rows=len(train_plan), eval_rows=len(eval_plan))
  log.info("sft data: %s", stats)
  return trainer.Task(
      name="sft", num_rows=len(train_plan), make_row=row_maker(train, train_plan), num_eval_rows=len(eval_plan),
      make_eval_row=row_maker(held_out, eval_plan),
      totals=lambda batch: {"loss_tokens": jnp.sum(batch["loss_mask"]).astype(jnp.float32)},
      loss=loss, eval_sums=lambda model, batch: _sums(model, batch, config), summarize=_summarize,
      data_stats=stats)


def run_sft(config: ml_collections.ConfigDict,
            on_step: Callable[[int, dict | None], None] | None = None) -> dict[str, Any]:
  """Runs (or resumes) an SFT job; returns the summary of `trainer.fit` (eval loss, throughput, export dir)."""
  s = trainer.setup(config)
  train, held_out, stats = load_examples(s)
  return trainer.fit(s, build_task(s, train, held_out, stats), on_step)
