"""Training data: JSONL reading with bad lines, assistant-only masks, truncation policy, packing, grain input."""
import json
import logging

import numpy as np
import pytest

from retro_jax.tokenization import load_tokenizer
from retro_jax.train import data, input_pipeline
from tests.hf_fixtures import save_char_tokenizer
from tests.train_helpers import arithmetic_records, write_jsonl


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("tok"))
  save_char_tokenizer(out)
  return load_tokenizer(out)


def test_read_training_records_counts_and_skips_bad_lines(tmp_path, caplog):
  good = arithmetic_records(3)
  path = write_jsonl(str(tmp_path / "in.jsonl"), good, extra_lines=(
      "not json", "[1, 2]", json.dumps({"question": "q"}), json.dumps({"question": "q", "trace": None}),
      json.dumps({"question": "q", "trace": ""}), "", "   "))
  with caplog.at_level(logging.WARNING):
    records, stats = data.read_training_records(path, ("question", "trace"))
  assert [r["id"] for r in records] == ["q0", "q1", "q2"]
  assert (stats.lines, stats.records, stats.bad_json, stats.skipped) == (8, 3, 2, 5)
  assert stats.missing_field == {"trace": 3}
  assert "kept 3 of 8 lines; skipped 5 bad lines" in caplog.text and "line 5: not a JSON object" in caplog.text
  # The trace field is configurable: Retro-Search output carries `revised_trace`.
  records, _ = data.read_training_records(path, ("question", "revised_trace"), limit=2)
  assert len(records) == 2


def test_search_output_is_selected_by_status_and_closed_thinking(tmp_path, caplog):
  base = arithmetic_records(6)
  statuses = ["revised", "unchanged", "skipped_incorrect", "error", "recovered", "revised"]
  records = [dict(r, status=status) for r, status in zip(base, statuses)]
  del records[3]["revised_trace"]  # an error record has no trace
  records[5]["revised_trace"] = "<think>\ncut by the token budget"  # never closes its thinking
  path = write_jsonl(str(tmp_path / "search.jsonl"), records + [{"question": "no status", "revised_trace":
                                                                 base[0]["trace"]}])
  with caplog.at_level(logging.WARNING):
    kept, stats = data.read_training_records(path, ("question", "revised_trace"), statuses=data.CORRECT_STATUSES,
                                             closed_field="revised_trace")
  assert [r.get("id") for r in kept] == ["q0", "q1", None]  # a record without a status is always kept
  assert stats.dropped_status == {"skipped_incorrect": 1, "error": 1, "recovered": 1}
  assert stats.unclosed_thinking == 1 and stats.skipped == 0
  assert stats.as_dict()["dropped_by_status"] == {"skipped_incorrect": 1, "error": 1, "recovered": 1}
  assert "dropped by status" in caplog.text and "1 with unclosed thinking" in caplog.text
  everything, _ = data.read_training_records(path, ("question", "revised_trace"), statuses=())
  assert len(everything) == 6  # no selection: only the error record (no trace) is left out


def test_loss_mask_covers_the_assistant_tokens_only(tokenizer):
  record = arithmetic_records(1)[0]
  [example], stats = data.tokenize_sft([record], tokenizer, question_field="question", trace_field="trace",
                                       seq_len=128)
  prompt, completion = tokenizer.render_example(record["question"], record["trace"])
  assert stats.kept == 1
  assert tokenizer.decode(example.tokens[example.loss_mask == 0]) == prompt
  assert tokenizer.decode(example.tokens[example.loss_mask == 1]) == completion
  assert completion.endswith(tokenizer.eos_text) and "<think>" not in completion  # the prompt opens thinking
  assert np.all(np.diff(example.loss_mask) >= 0)  # one prompt part, then one completion part


def test_truncation_policy_counts_and_never_crashes(tokenizer, caplog):
  records = arithmetic_records(4)
  records[1] = dict(records[1], trace="<think>\n" + "1+1=2\n" * 40 + "</think>")  # far too long
  records[2] = dict(records[2], question="9" * 200)  # the prompt alone fills the row
  kwargs = dict(question_field="question", trace_field="trace", seq_len=64)
  with caplog.at_level(logging.WARNING):
    kept, stats = data.tokenize_sft(records, tokenizer, truncation="drop", **kwargs)
  assert (stats.kept, stats.dropped_too_long, stats.dropped_prompt_too_long, stats.truncated) == (2, 1, 1, 0)
  assert "2 of 4 examples" in caplog.text
  kept, stats = data.tokenize_sft(records, tokenizer, truncation="truncate", **kwargs)
  assert (stats.kept, stats.truncated, stats.dropped_prompt_too_long) == (3, 1, 1)
  long = kept[1]
  assert len(long.tokens) == 65 and long.loss_mask[0] == 0 and long.loss_mask[-1] == 1  # 64 positions
  with pytest.raises(ValueError, match="truncation"):
    data.tokenize_sft(records, tokenizer, truncation="wrap", **kwargs)


def _example(n_prompt: int, n_completion: int, start: int) -> data.SFTExample:
  tokens = np.arange(start, start + n_prompt + n_completion, dtype=np.int32)
  return data.SFTExample(tokens=tokens, loss_mask=np.r_[np.zeros(n_prompt), np.ones(n_completion)].astype(np.int32))


def test_pack_plan_fills_rows_without_overflow_and_uses_every_example_once():
  lengths = [9, 3, 7, 1, 5, 5, 2, 8, 4, 6]
  plan = data.pack_plan(lengths, seq_len=10)
  assert sorted(i for row in plan for i in row) == list(range(len(lengths)))
  assert all(sum(lengths[i] for i in row) <= 10 for row in plan)
  assert len(plan) == 5  # 50 positions: best-fit decreasing finds the perfect packing into 5 rows of 10
  assert data.pack_plan(lengths, seq_len=10, packing=False) == [[i] for i in range(len(lengths))]


def test_packed_row_layout_targets_stay_within_their_segment():
  first, second = _example(2, 3, start=10), _example(1, 2, start=50)
  row = data.build_packed_row([first, second], seq_len=10)
  np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 1, 2, 2, 0, 0, 0, 0])
  np.testing.assert_array_equal(row["positions"], [0, 1, 2, 3, 0, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(row["inputs"][:6], [10, 11, 12, 13, 50, 51])
  np.testing.assert_array_equal(row["targets"][:6], [11, 12, 13, 14, 51, 52])  # 14, not 50: no crossing
  np.testing.assert_array_equal(row["loss_mask"], [0, 1, 1, 1, 1, 1, 0, 0, 0, 0])  # targets that are completion
  with pytest.raises(ValueError, match="do not fit"):
    data.build_packed_row([first, first, first], seq_len=10)


def test_dpo_pairs_share_the_prompt_and_align(tokenizer):
  record = {"question": "1+2?", "chosen": "<think>\n1+2=3\n</think> 3", "rejected": "<think>\n1+2=4\n</think> 4"}
  [pair], _ = data.tokenize_dpo([record], tokenizer, question_field="question", chosen_field="chosen",
                                rejected_field="rejected", seq_len=64)
  row = data.build_pair_row(pair, seq_len=64)
  assert row["inputs"].shape == (2, 64)
  n = len(pair.prompt)
  np.testing.assert_array_equal(row["inputs"][0, :n], row["inputs"][1, :n])
  assert row["loss_mask"][0].sum() == len(pair.chosen) and row["loss_mask"][1].sum() == len(pair.rejected)


def test_holdout_split_is_seeded_and_disjoint():
  records = arithmetic_records(20)
  train, held = data.split_holdout(records, 0.2, seed=1)
  assert len(held) == 4 and len(train) == 16
  assert {r["id"] for r in train}.isdisjoint(r["id"] for r in held)
  assert data.split_holdout(records, 0.2, seed=1)[1] == held


def test_grain_iterator_state_resumes_exactly_and_epochs_reshuffle():
  def make_row(i):
    return {"inputs": np.full(4, i, np.int32)}

  ds = input_pipeline.train_dataset(10, make_row, batch_per_process=4, grad_accum_steps=2, seed=3)
  it = iter(ds)
  first = [next(it)["inputs"] for _ in range(2)]
  assert first[0].shape == (2, 2, 4)  # [accum, rows per micro-batch, seq]
  state = it.get_state()
  expected = [next(it)["inputs"] for _ in range(5)]
  resumed = iter(ds)
  resumed.set_state(state)
  np.testing.assert_array_equal(np.stack([next(resumed)["inputs"] for _ in range(5)]), np.stack(expected))
  # 7 batches of 4 = 28 rows: every row appears in each of the first two epochs, in different orders.
  rows = np.concatenate([b[:, :, 0].ravel() for b in first + expected])
  assert sorted(rows[:10]) == sorted(rows[10:20]) == list(range(10))
  assert list(rows[:10]) != list(rows[10:20])


def test_eval_batches_cover_every_row_once_and_pad_with_empty_rows():
  def make_row(i):
    return {"inputs": np.full(3, i + 1, np.int32)}

  batches = list(input_pipeline.eval_batches(5, make_row, 2))
  flat = np.concatenate([b["inputs"][:, 0] for b in batches])
  np.testing.assert_array_equal(flat, [1, 2, 3, 4, 5, 0])
