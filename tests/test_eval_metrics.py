"""Metric math on hand-made outcomes: pass@k against brute force, averages, truncation, lengths, switches."""
import fractions
import itertools
import math
import statistics

import pytest

from retro_jax.eval import metrics


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
  """The fraction of k-subsets of the n samples that hold at least one correct one (its definition)."""
  samples = [True] * c + [False] * (n - c)
  subsets = list(itertools.combinations(range(n), k))
  return sum(any(samples[i] for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_enumeration_over_subsets(n):
  for c in range(n + 1):
    for k in range(1, n + 1):
      assert metrics.pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_where_binomials_overflow_floats():
  n, c, k = 2000, 7, 500  # C(2000, 500) ~ 1e483 is far beyond float range
  exact = 1 - fractions.Fraction(math.comb(n - c, k), math.comb(n, k))
  assert metrics.pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-9)
  assert metrics.pass_at_k(n, 0, k) == 0.0
  assert metrics.pass_at_k(n, n - k + 1, k) == 1.0  # fewer than k wrong: every subset holds a correct one


def test_pass_at_1_is_the_fraction_correct():
  assert metrics.pass_at_k(10, 3, 1) == pytest.approx(0.3)


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_impossible_arguments(n, c, k):
  with pytest.raises(ValueError):
    metrics.pass_at_k(n, c, k)


def test_default_k_values():
  assert metrics.default_k_values(1) == [1]
  assert metrics.default_k_values(4) == [1, 2, 4]
  assert metrics.default_k_values(6) == [1, 2, 4, 6]


def row(question, index, correct, *, mode="sampled", length=10, finish="eos", answer="x", switches=0, status="ok"):
  return {"question_id": question, "mode": mode, "sample_index": index, "correct": correct, "length": length,
          "finish_reason": finish, "extracted_answer": answer, "thought_switches": switches, "grade_status": status}


# Three questions, four samples each: q0 always right, q1 half, q2 never (one sample truncated, one cut after its
# answer), so every quantity below is worked out by hand.
OUTCOMES = {"q0": [1, 1, 1, 1], "q1": [1, 0, 1, 0], "q2": [0, 0, 0, 0]}


def hand_made_rows():
  rows = []
  for q, outcomes in OUTCOMES.items():
    for i, correct in enumerate(outcomes):
      rows.append(row(q, i, bool(correct), length=10 * (i + 1), switches=i))
  rows[8] = row("q2", 0, False, length=100, finish="length", answer=None, switches=7)  # truncated
  rows[9] = row("q2", 1, False, length=100, finish="length", answer="3")  # budget hit after its answer
  rows[10] = row("q2", 2, False, length=30, finish="eos", answer=None, switches=2)  # no answer, not truncated
  return rows


def test_mode_metrics_on_hand_made_outcomes():
  result = metrics.mode_metrics(hand_made_rows())
  assert result["num_questions"] == 3 and result["num_samples"] == 12 and result["samples_per_question"] == 4
  assert result["accuracy"] == pytest.approx((1 + 0.5 + 0) / 3)
  per_index = [2 / 3, 1 / 3, 2 / 3, 1 / 3]  # accuracy of sample j over the three questions
  assert result["accuracy_std"] == pytest.approx(statistics.pstdev(per_index))
  assert statistics.fmean(per_index) == pytest.approx(result["accuracy"])
  assert set(result["pass_at_k"]) == {"1", "2", "4"}
  assert result["pass_at_k"]["1"] == pytest.approx(result["accuracy"])
  assert result["pass_at_k"]["2"] == pytest.approx((1 + (1 - 1 / 6) + 0) / 3)  # q1: 1 - C(2,2)/C(4,2)
  assert result["pass_at_k"]["4"] == pytest.approx(2 / 3)
  lengths = [10, 20, 30, 40, 10, 20, 30, 40, 100, 100, 30, 40]
  assert result["mean_length"] == pytest.approx(statistics.fmean(lengths))
  assert result["median_length"] == pytest.approx(statistics.median(lengths))
  assert result["truncation_rate"] == pytest.approx(1 / 12)
  assert result["no_answer_rate"] == pytest.approx(2 / 12)
  assert result["mean_thought_switches"] == pytest.approx((0 + 1 + 2 + 3) * 2 / 12 + (7 + 0 + 2 + 3) / 12)


def test_mode_metrics_with_one_sample_per_question_is_plain_accuracy():
  rows = [row("a", 0, True, mode="greedy"), row("b", 0, False, mode="greedy"), row("c", 0, True, mode="greedy")]
  result = metrics.mode_metrics(rows)
  assert result["accuracy"] == pytest.approx(2 / 3)
  assert result["accuracy_std"] == 0.0
  assert result["pass_at_k"] == {"1": pytest.approx(2 / 3)}


def test_explicit_k_values_above_the_samples_are_dropped():
  assert set(metrics.mode_metrics(hand_made_rows(), k_values=[1, 3, 8])["pass_at_k"]) == {"1", "3"}


def test_grading_failures_are_counted():
  rows = [row("a", 0, False, status="timeout"), row("b", 0, False, status="parse_error"), row("c", 0, True)]
  result = metrics.mode_metrics(rows)
  assert (result["grading_timeouts"], result["grading_parse_errors"]) == (1, 1)


def test_benchmark_metrics_splits_modes():
  rows = hand_made_rows() + [row("q0", 0, True, mode="greedy"), row("q1", 0, False, mode="greedy"),
                             row("q2", 0, False, mode="greedy")]
  result = metrics.benchmark_metrics(rows)
  assert set(result) == {"greedy", "sampled"}
  assert result["greedy"]["accuracy"] == pytest.approx(1 / 3)
  assert result["sampled"]["num_samples"] == 12


def test_average_is_a_macro_average_with_counts_summed():
  small = {"sampled": {"accuracy": 1.0, "num_questions": 2, "pass_at_k": {"1": 1.0, "2": 1.0}}}
  large = {"sampled": {"accuracy": 0.0, "num_questions": 100, "pass_at_k": {"1": 0.0}},
           "greedy": {"accuracy": 0.5}}
  average = metrics.average_metrics([small, large])
  assert average == {"sampled": {"accuracy": 0.5, "num_questions": 102, "pass_at_k": {"1": 0.5}}}


def test_empty_rows_are_refused():
  with pytest.raises(ValueError):
    metrics.mode_metrics([])
