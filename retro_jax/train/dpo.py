"""CoT-aware DPO on (question, chosen, rejected) records, the variant of "Widening the Distillation Bottleneck".

Objective per step batch: mean over pairs of sigmoid DPO with β and label smoothing ε (losses.dpo_loss), with
optional masking of the response tokens chosen and rejected share as a prefix (pairs cut from one reasoning
tree branch after a common stretch of thought), plus α times the NLL of the chosen responses (mean per chosen
token, over the whole response: the shared prefix is still good reasoning to imitate).

Reference log-probs come from a **precompute pass**: before the first step, the frozen initial model scores
every train and held-out pair once (with the same masking), and the result is kept in host memory, fed to the
step as a row feature, and saved in every checkpoint (so a resumed run reuses the exact values and needs no
base weights). Against computing them on the fly this costs one forward per pair once instead of one per pair
per epoch, and no second copy of the weights on device.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from retro_jax import sharding
from retro_jax.train import data, input_pipeline, losses, trainer


def pair_logprobs(model, rows: dict, config: ml_collections.ConfigDict) -> jax.Array:
  """Token log-probs [b, 2, t] of pair rows [b, 2, t] (index 0 chosen, 1 rejected), in one forward."""
  b, _, t = rows["inputs"].shape
  flat = {k: rows[k].reshape(2 * b, t) for k in ("inputs", "targets", "segment_ids", "positions")}
  hidden = losses.hidden_states(model, flat["inputs"], flat["positions"], flat["segment_ids"], config.remat)
  return losses.token_logprobs(model, hidden, flat["targets"], config.loss_chunk_size).reshape(b, 2, t)


def response_masks(rows: dict, config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """The chosen and rejected token masks [..., t] the DPO term sums over (shared prefix dropped if asked)."""
  chosen, rejected = rows["loss_mask"][..., 0, :], rows["loss_mask"][..., 1, :]
  if config.dpo.mask_shared_prefix:
    chosen, rejected = losses.shared_prefix_mask(rows["targets"][..., 0, :], rows["targets"][..., 1, :],
                                                 chosen, rejected)
  return chosen, rejected


def _sums(model, rows: dict, config) -> dict[str, jax.Array]:
  logp = pair_logprobs(model, rows, config)
  chosen_mask, rejected_mask = response_masks(rows, config)
  per_pair, chosen_rewards, rejected_rewards = losses.dpo_loss(
      losses.sequence_logprobs(logp[:, 0], chosen_mask), losses.sequence_logprobs(logp[:, 1], rejected_mask),
      rows["reference_logps"][:, 0], rows["reference_logps"][:, 1], beta=config.dpo.beta,
      label_smoothing=config.dpo.label_smoothing)
  valid = (jnp.sum(rows["loss_mask"][:, 0], axis=-1) > 0).astype(jnp.float32)  # eval padding rows are empty
  sft_nll, chosen_tokens = losses.masked_nll_sum(logp[:, 0], rows["loss_mask"][:, 0])
  margins = chosen_rewards - rejected_rewards
  return {"dpo": jnp.sum(per_pair * valid), "pairs": jnp.sum(valid), "sft_nll": sft_nll,
          "chosen_tokens": chosen_tokens, "correct": jnp.sum((margins > 0) * valid),
          "margin": jnp.sum(margins * valid), "chosen_reward": jnp.sum(chosen_rewards * valid),
          "rejected_reward": jnp.sum(rejected_rewards * valid),
          "tokens": jnp.sum(rows["segment_ids"] != 0).astype(jnp.float32)}


def _totals(batch: dict) -> dict[str, jax.Array]:
  chosen = batch["loss_mask"][..., 0, :]
  return {"pairs": jnp.sum(jnp.sum(chosen, axis=-1) > 0).astype(jnp.float32),
          "chosen_tokens": jnp.sum(chosen).astype(jnp.float32)}


def _summarizer(sft_weight: float) -> Callable[[dict[str, float]], dict[str, float]]:
  def summarize(sums: dict[str, float]) -> dict[str, float]:
    pairs = max(sums["pairs"], 1.0)
    dpo_loss, sft_loss = sums["dpo"] / pairs, sums["sft_nll"] / max(sums["chosen_tokens"], 1.0)
    return {"loss": dpo_loss + sft_weight * sft_loss, "dpo_loss": dpo_loss, "sft_loss": sft_loss,
            "reward_accuracy": sums["correct"] / pairs, "reward_margin": sums["margin"] / pairs,
            "chosen_reward": sums["chosen_reward"] / pairs, "rejected_reward": sums["rejected_reward"] / pairs,
            "pairs": sums["pairs"], "tokens": sums["tokens"]}
  return summarize


def reference_logprobs(s: trainer.Setup, graphdef, params, num_rows: int,
                       make_row: Callable[[int], dict]) -> np.ndarray:
  """[num_rows, 2] masked sequence log-probs (chosen, rejected) under `params`, every row scored once."""
  config = s.config
  per_process = input_pipeline.process_batch_size(trainer.eval_batch_size(config), 1, s.mesh)
  example = {k: v[None] for k, v in make_row(0).items()}
  param_shardings = jax.tree.map(lambda x: x.sharding, params)

  def score(p, rows):
    with sharding.use_rules(s.mesh, sharding.TRAIN_RULES):
      logp = pair_logprobs(nnx.merge(graphdef, p), rows, config)
      chosen_mask, rejected_mask = response_masks(rows, config)
      return jnp.stack([losses.sequence_logprobs(logp[:, 0], chosen_mask),
                        losses.sequence_logprobs(logp[:, 1], rejected_mask)], axis=-1)

  score = jax.jit(score, in_shardings=(param_shardings, input_pipeline.batch_shardings(example, s.mesh, 0)))
  out = np.zeros((num_rows, 2), np.float32)
  count = jax.process_count()
  owners = [list(range(p, num_rows, count)) for p in range(count)]  # the rows each process feeds, in order
  for b, batch in enumerate(input_pipeline.eval_batches(num_rows, make_row, per_process)):
    scores = multihost_utils.process_allgather(score(params, input_pipeline.to_global(batch, s.mesh, 0)),
                                               tiled=True)
    for p in range(count):  # the global batch is the processes' local batches, in process order
      rows = owners[p][b * per_process:(b + 1) * per_process]
      out[rows] = scores[p * per_process:p * per_process + len(rows)]
  return out


def load_pairs(s: trainer.Setup) -> tuple[list[data.DPOExample], list[data.DPOExample], dict[str, int]]:
  c = s.config.data
  fields = (c.question_field, c.chosen_field, c.rejected_field)
  records, read_stats = data.read_training_records(c.train_path, fields, limit=c.limit)
  if c.eval_path:
    eval_records, _ = data.read_training_records(c.eval_path, fields)
  else:
    records, eval_records = data.split_holdout(records, c.eval_fraction, s.config.seed)
  kwargs = dict(question_field=c.question_field, chosen_field=c.chosen_field, rejected_field=c.rejected_field,
                seq_len=c.seq_len, truncation=c.truncation)
  train, tok_stats = data.tokenize_dpo(records, s.tokenizer, name="dpo train", **kwargs)
  held_out, _ = data.tokenize_dpo(eval_records, s.tokenizer, name="dpo eval", **kwargs)
  if not train:
    raise data.DataError(f"no usable DPO pairs in {c.train_path!r} (read {read_stats.records} records, skipped "
                         f"{read_stats.skipped} lines, {tok_stats.examples - tok_stats.kept} too long)")
  stats = {"lines": read_stats.lines, "bad_lines": read_stats.skipped, "train_rows": len(train),
           "eval_rows": len(held_out), "truncated": tok_stats.truncated,
           "dropped_too_long": tok_stats.dropped_too_long + tok_stats.dropped_prompt_too_long}
  return train, held_out, stats


def build_task(s: trainer.Setup, train: list[data.DPOExample], held_out: list[data.DPOExample],
               stats: dict[str, int]) -> trainer.Task:
  config, seq_len = s.config, s.config.data.seq_len
  reference: dict[str, np.ndarray] = {}

  def row_maker(pairs, split: str | None) -> Callable[[int], dict]:
    def make(i: int) -> dict:
      row = data.build_pair_row(pairs[i], seq_len)
      if split:
        row["reference_logps"] = reference[split][i]
      return row
    return make

  def prepare(setup, graphdef, params) -> dict[str, np.ndarray]:
    print(f"[dpo] scoring {len(train) + len(held_out)} pairs with the frozen reference model", flush=True)
    out = {"train": reference_logprobs(setup, graphdef, params, len(train), row_maker(train, None))}
    if held_out:
      out["eval"] = reference_logprobs(setup, graphdef, params, len(held_out), row_maker(held_out, None))
    return out

  template = {"train": np.zeros((len(train), 2), np.float32)}
  if held_out:
    template["eval"] = np.zeros((len(held_out), 2), np.float32)

  def loss(model, micro, totals):
    sums = _sums(model, micro, config)
    sft_term = config.dpo.sft_weight * sums["sft_nll"] / jnp.maximum(totals["chosen_tokens"], 1.0)
    return sums["dpo"] / jnp.maximum(totals["pairs"], 1.0) + sft_term, sums

  return trainer.Task(
      name="dpo", num_rows=len(train), make_row=row_maker(train, "train"), num_eval_rows=len(held_out),
      make_eval_row=row_maker(held_out, "eval"), totals=_totals, loss=loss,
      eval_sums=lambda model, batch: _sums(model, batch, config), summarize=_summarizer(config.dpo.sft_weight),
      data_stats=stats, prepare=prepare, set_extras=reference.update, extras_template=template)


def run_dpo(config: ml_collections.ConfigDict,
            on_step: Callable[[int, dict | None], None] | None = None) -> dict[str, Any]:
  """Runs (or resumes) a DPO job; the summary adds reward accuracy and margins to `trainer.fit`'s."""
  s = trainer.setup(config)
  train, held_out, stats = load_pairs(s)
  return trainer.fit(s, build_task(s, train, held_out, stats), on_step)
