"""Training data: JSONL records -> rendered, tokenized examples with assistant-only loss masks -> packed rows.

One record's path: a JSONL line (`read_training_records`, which selects search output by status) -> prompt and completion text rendered with the model's own
chat template (`Tokenizer.render_example`, the same prompt the engine continues when it samples) -> token ids
of each part, tokenized *separately* so the completion starts on a token boundary exactly as generation sees
it (`tokenize_sft` / `tokenize_dpo`) -> a row of `seq_len` positions (`build_packed_row` / `build_pair_row`).

Conventions of a row (all numpy int32, shape [seq_len]):
- `inputs[p]` is the token at position p and `targets[p]` the token that follows it in the same example, so an
  example of n tokens fills n - 1 positions and never predicts across a packing boundary;
- `loss_mask[p]` is 1 where `targets[p]` is an assistant (completion) token: the prompt, the chat template
  and padding never count;
- `segment_ids` numbers the packed examples 1, 2, ... (0 = padding) and `positions` restart at 0 in each.

Bad input never crashes a run: unreadable lines and records with a missing field are counted and skipped,
search records of an unselected status are dropped and counted by status, and examples longer than a row are
dropped or truncated by an explicit policy, with a count and a warning.
"""
from __future__ import annotations

import bisect
import collections
import dataclasses
import logging
from typing import Iterable, Sequence

import numpy as np

from retro_jax import jsonl
from retro_jax.tokenization import Tokenizer, parse_completion
from retro_jax.user_errors import UserError, check_choice

log = logging.getLogger(__name__)
TRUNCATION_POLICIES = ("drop", "truncate")
# Retro-Search statuses whose `revised_trace` is a correct trace: SFT's default selection (data.statuses).
CORRECT_STATUSES = ("revised", "unchanged")


class DataError(UserError):
  """Input that leaves nothing to train on (rather than a silent zero-step run)."""


@dataclasses.dataclass
class ReadStats:
  """What `read_training_records` kept and dropped, and why, with the line numbers of the first few problems."""

  lines: int = 0
  records: int = 0
  bad_json: int = 0
  missing_field: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  dropped_status: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # status -> count
  unclosed_thinking: int = 0
  examples_of_problems: list[str] = dataclasses.field(default_factory=list)

  @property
  def skipped(self) -> int:
    """Lines that are not usable records (bad JSON, a missing field)."""
    return self.bad_json + sum(self.missing_field.values())

  @property
  def dropped(self) -> int:
    """Usable records left out on purpose (their status, an unclosed thinking)."""
    return sum(self.dropped_status.values()) + self.unclosed_thinking

  def as_dict(self) -> dict:
    return {"lines": self.lines, "records": self.records, "bad_lines": self.skipped,
            "missing_field": dict(self.missing_field), "dropped_by_status": dict(self.dropped_status),
            "dropped_unclosed_thinking": self.unclosed_thinking}


def parse_statuses(text: str) -> tuple[str, ...]:
  """`data.statuses` ("revised,unchanged") as a tuple; () keeps every status."""
  return tuple(part.strip() for part in text.split(",") if part.strip())


def read_training_records(path: str, fields: Sequence[str], *, limit: int = 0, statuses: Sequence[str] = (),
                          closed_field: str | None = None) -> tuple[list[dict], ReadStats]:
  """Records of a JSONL file that carry every field in `fields` as a non-empty string, selected for training.

  A line that is not a JSON object, or lacks a field (absent, null, empty or not a string), is counted and
  skipped. A record with a `status` (Retro-Search output) is kept only when it is one of `statuses` (when given):
  "skipped_incorrect" records hold a wrong trace and "error" ones none. When `closed_field` is set, a record whose
  trace there never closes its thinking (`</think>`, a cut generation) is dropped: the model would learn to stop
  mid-thought. Everything left out is counted by reason and logged, never fatal.
  """
  stats, records = ReadStats(), []
  for line in jsonl.read_lines(path):
    stats.lines += 1
    if line.error is not None:
      stats.bad_json += 1
      _note(stats, line.error)
      continue
    record = line.data
    if statuses and "status" in record and record["status"] not in statuses:
      stats.dropped_status[str(record["status"])] += 1
      continue
    missing = [k for k in fields if not isinstance(record.get(k), str) or not record[k]]
    if missing:
      stats.missing_field[missing[0]] += 1
      _note(stats, f"line {line.index + 1}: missing or empty field {missing[0]!r}")
      continue
    if closed_field and not parse_completion(record[closed_field]).closed:
      stats.unclosed_thinking += 1
      _note(stats, f"line {line.index + 1}: {closed_field!r} never closes its thinking")
      continue
    records.append(record)
    if limit and len(records) >= limit:
      break
  stats.records = len(records)
  if stats.skipped or stats.dropped:
    log.warning("%s: kept %d of %d lines; skipped %d bad lines (%d not JSON objects, missing fields %s); dropped "
                "by status %s (keeping %s), %d with unclosed thinking; first problems: %s", path, stats.records,
                stats.lines, stats.skipped, stats.bad_json, dict(stats.missing_field), dict(stats.dropped_status),
                ",".join(statuses) or "all", stats.unclosed_thinking, "; ".join(stats.examples_of_problems))
  return records, stats


def _note(stats: ReadStats, message: str) -> None:
  if len(stats.examples_of_problems) < 3:
    stats.examples_of_problems.append(message)


@dataclasses.dataclass
class TokenizeStats:
  """How many examples fit a row as they are, were truncated, or were dropped (and why)."""

  examples: int = 0
  kept: int = 0
  truncated: int = 0
  dropped_too_long: int = 0
  dropped_prompt_too_long: int = 0
  longest: int = 0  # tokens of the longest example before any truncation

  def report(self, name: str, seq_len: int, truncation: str) -> None:
    over = self.truncated + self.dropped_too_long + self.dropped_prompt_too_long
    if over:
      log.warning(
          "%s: %d of %d examples (%.1f%%) exceed %d positions (longest: %d tokens): %d truncated, %d dropped "
          "(truncation=%r), %d dropped because the prompt alone fills the row", name, over, self.examples,
          100.0 * over / max(self.examples, 1), seq_len, self.longest, self.truncated, self.dropped_too_long,
          truncation, self.dropped_prompt_too_long)


@dataclasses.dataclass(frozen=True)
class SFTExample:
  tokens: np.ndarray  # [n] int32: prompt then completion
  loss_mask: np.ndarray  # [n] int32: 1 on completion tokens


@dataclasses.dataclass(frozen=True)
class DPOExample:
  prompt: np.ndarray  # [p] int32, shared by both responses
  chosen: np.ndarray  # [c] int32 completion tokens
  rejected: np.ndarray  # [r] int32 completion tokens


def _encode_all(tokenizer: Tokenizer, texts: list[str]) -> list[np.ndarray]:
  """Batched fast-tokenizer encode (no special tokens added: the rendered text carries its own)."""
  if not texts:
    return []
  ids = tokenizer.hf(texts, add_special_tokens=False)["input_ids"]
  return [np.asarray(x, np.int32) for x in ids]


def _fit(prompt_len: int, completion_len: int, seq_len: int, truncation: str,
         stats: TokenizeStats) -> int | None:
  """Completion tokens to keep so prompt + completion uses at most `seq_len` positions; None = drop.

  A row of `seq_len` positions holds seq_len + 1 tokens (the last one is only a target). Truncation keeps the
  prompt and cuts the completion's end (losing the answer and eos, which is why "drop" is the default).
  """
  total = prompt_len + completion_len
  stats.longest = max(stats.longest, total)
  if total <= seq_len + 1:
    return completion_len
  if prompt_len >= seq_len + 1:  # not even one completion token would be a target
    stats.dropped_prompt_too_long += 1
    return None
  if truncation == "drop":
    stats.dropped_too_long += 1
    return None
  stats.truncated += 1
  return seq_len + 1 - prompt_len


def _check_truncation(truncation: str) -> None:
  check_choice("--config.data.truncation", truncation, TRUNCATION_POLICIES)


def tokenize_sft(records: Sequence[dict], tokenizer: Tokenizer, *, question_field: str, trace_field: str,
                 seq_len: int, truncation: str = "drop", name: str = "sft") -> tuple[list[SFTExample], TokenizeStats]:
  """Renders (question, trace) with the tokenizer's prompt format and masks the loss to the completion."""
  _check_truncation(truncation)
  rendered = [tokenizer.render_example(r[question_field], r[trace_field]) for r in records]
  prompts = _encode_all(tokenizer, [p for p, _ in rendered])
  completions = _encode_all(tokenizer, [c for _, c in rendered])
  stats, examples = TokenizeStats(examples=len(records)), []
  for prompt, completion in zip(prompts, completions):
    keep = _fit(len(prompt), len(completion), seq_len, truncation, stats)
    if keep is None:
      continue
    tokens = np.concatenate([prompt, completion[:keep]])
    mask = np.concatenate([np.zeros(len(prompt), np.int32), np.ones(keep, np.int32)])
    examples.append(SFTExample(tokens=tokens, loss_mask=mask))
  stats.kept = len(examples)
  stats.report(name, seq_len, truncation)
  return examples, stats


def tokenize_dpo(records: Sequence[dict], tokenizer: Tokenizer, *, question_field: str, chosen_field: str,
                 rejected_field: str, seq_len: int, truncation: str = "drop", name: str = "dpo") -> tuple[list[DPOExample], TokenizeStats]:
  """Pairs sharing one rendered prompt; a pair is dropped or truncated when either side does not fit."""
  _check_truncation(truncation)
  prompt_texts, chosen_texts, rejected_texts = [], [], []
  for r in records:
    prompt, chosen = tokenizer.render_example(r[question_field], r[chosen_field])
    prompt_texts.append(prompt)
    chosen_texts.append(chosen)
    rejected_texts.append(tokenizer.render_example(r[question_field], r[rejected_field])[1])
  prompts = _encode_all(tokenizer, prompt_texts)
  chosen_ids = _encode_all(tokenizer, chosen_texts)
  rejected_ids = _encode_all(tokenizer, rejected_texts)
  stats, examples = TokenizeStats(examples=len(records)), []
  for prompt, chosen, rejected in zip(prompts, chosen_ids, rejected_ids):
    longer = max(len(chosen), len(rejected))
    keep = _fit(len(prompt), longer, seq_len, truncation, stats)
    if keep is None:
      continue
    examples.append(DPOExample(prompt=prompt, chosen=chosen[:keep], rejected=rejected[:keep]))
  stats.kept = len(examples)
  stats.report(name, seq_len, truncation)
  return examples, stats


def pack_plan(lengths: Sequence[int], seq_len: int, packing: bool = True) -> list[list[int]]:
  """Groups example indices into rows of at most `seq_len` positions (best-fit decreasing).

  `lengths` are positions used (tokens - 1). Best-fit decreasing wastes the least padding of the simple
  heuristics, and is deterministic, so every host derives the same rows. It groups similar lengths, which is
  harmless because rows are shuffled each epoch. The packing is fixed for the run (rows, not examples, are
  reshuffled per epoch), which keeps the data iterator's state a single index, exactly resumable.
  """
  if not packing:
    return [[i] for i in range(len(lengths))]
  order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
  rows: list[list[int]] = []
  free: list[tuple[int, int]] = []  # (remaining positions, row index), sorted
  for i in order:
    at = bisect.bisect_left(free, (lengths[i], -1))
    if at == len(free):
      rows.append([i])
      bisect.insort(free, (seq_len - lengths[i], len(rows) - 1))
    else:
      remaining, row = free.pop(at)
      rows[row].append(i)
      bisect.insort(free, (remaining - lengths[i], row))
  return rows


def build_packed_row(examples: Sequence[SFTExample], seq_len: int) -> dict[str, np.ndarray]:
  """Concatenates examples into one row of `seq_len` positions (see the module docstring for the layout)."""
  row = {k: np.zeros(seq_len, np.int32) for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions")}
  at = 0
  for segment, example in enumerate(examples, start=1):
    n = len(example.tokens) - 1
    if at + n > seq_len:
      raise ValueError(f"examples of {at + n} positions do not fit a row of {seq_len}")
    row["inputs"][at:at + n] = example.tokens[:-1]
    row["targets"][at:at + n] = example.tokens[1:]
    row["loss_mask"][at:at + n] = example.loss_mask[1:]
    row["segment_ids"][at:at + n] = segment
    row["positions"][at:at + n] = np.arange(n)
    at += n
  return row


def build_pair_row(example: DPOExample, seq_len: int) -> dict[str, np.ndarray]:
  """One DPO pair as [2, seq_len] arrays: index 0 is prompt + chosen, index 1 is prompt + rejected.

  Pairs are not packed: each side stays aligned at the same positions, which is what lets the loss find the
  prefix the two responses share by comparing tokens column by column.
  """
  sides = [SFTExample(tokens=np.concatenate([example.prompt, completion]),
                      loss_mask=np.concatenate([np.zeros(len(example.prompt), np.int32),
                                                np.ones(len(completion), np.int32)]))
           for completion in (example.chosen, example.rejected)]
  rows = [build_packed_row([side], seq_len) for side in sides]
  return {k: np.stack([rows[0][k], rows[1][k]]) for k in rows[0]}


def example_lengths(examples: Iterable[SFTExample]) -> list[int]:
  """Positions each example fills in a row (tokens - 1)."""
  return [len(e.tokens) - 1 for e in examples]


def split_holdout(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
  """(train, held-out) by a seeded permutation; the held-out part is at least one record when fraction > 0."""
  if fraction <= 0 or len(records) < 2:
    return records, []
  order = np.random.default_rng(seed).permutation(len(records))
  n_eval = min(len(records) - 1, max(1, int(round(fraction * len(records)))))
  held = set(order[:n_eval].tolist())
  return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])
