"""Answer extraction and Math-Verify equivalence in worker processes, including answers that hang sympy."""
import os
import time

import pytest

from retro_jax.grading import Grader, GradeResult, boxed_contents, extract_final_answer


def test_boxed_contents_nest_and_escape():
  text = r"\boxed{\frac{1}{2}} and \fbox{x^{2}} and \boxed {\{1, 2\}} and \boxed{\boxed{3}} and \boxed{cut"
  assert boxed_contents(text) == [r"\frac{1}{2}", "x^{2}", r"\{1, 2\}", r"\boxed{3}"]
  assert boxed_contents(r"\boxed 5 and \boxedx{1}") == []


def test_final_answer_prefers_the_solution_and_falls_back():
  assert extract_final_answer(r"<think>\boxed{1}</think> so \boxed{2} then \fbox{3}") == "3"
  assert extract_final_answer(r"\boxed{1}<|end_of_thought|> \boxed{ 4 }") == "4"
  # Nothing boxed after the thinking: the last box anywhere (a response that boxed inside its thinking).
  assert extract_final_answer(r"<think>\boxed{1} \boxed{7}</think> the answer is seven") == "7"
  assert extract_final_answer(r"<think>truncated \boxed{8}") == "8"
  assert extract_final_answer("no box here") is None


@pytest.fixture(scope="module")
def grader():
  with Grader(num_workers=2, timeout_s=2.0) as grader:
    yield grader


EQUIVALENT = [
    ("1/2", r"\boxed{\frac{1}{2}}"),
    (r"\frac{1}{2}", r"\boxed{0.5}"),
    (r"\frac34", r"\boxed{\dfrac{3}{4}}"),
    ("3.14", r"\boxed{3.140}"),
    ("[1, 3)", r"\boxed{[1,3)}"),
    (r"(-\infty, 2]", r"\boxed{(-\infty,2]}"),
    ("(1, 2, 3)", r"\boxed{(1,2,3)}"),
    (r"\frac{\sqrt{2}}{2}", r"\boxed{\sqrt{2}/2}"),
    ("10", r"\boxed{10\text{ cm}}"),
    (r"2\sqrt{3}", r"\boxed{\sqrt{12}}"),
    (r"The solution gives $\boxed{12}$.", r"</think> \boxed{12}"),  # a gold that is a boxed solution
]

DIFFERENT = [
    ("5", r"\boxed{6}"),
    ("(1, 3]", r"\boxed{(1,3)}"),
    ("(1, 2, 3)", r"\boxed{(3,2,1)}"),
    (r"\pi", r"\boxed{3.14159}"),
    ("10", r"\boxed{10\text{ cm}^2 + 1}"),
]


def test_equivalent_answers(grader):
  results = grader.grade_many(EQUIVALENT)
  assert [r.correct for r in results] == [True] * len(EQUIVALENT), results
  assert {r.status for r in results} == {"ok"}


def test_wrong_answers(grader):
  results = grader.grade_many(DIFFERENT)
  assert [r.correct for r in results] == [False] * len(DIFFERENT), results
  assert {r.status for r in results} == {"ok"}


def test_no_answer_and_parse_error_are_incorrect_and_counted(grader):
  before = dict(grader.counts)
  results = grader.grade_many([("5", "I think it is five."), ("5", r"\boxed{}")])
  assert results[0] == GradeResult(False, "no_answer", None)
  assert results[1] == GradeResult(False, "parse_error", "")
  assert grader.counts["no_answer"] == before.get("no_answer", 0) + 1
  assert grader.counts["parse_error"] == before.get("parse_error", 0) + 1


def test_hanging_answer_times_out_and_the_pool_recovers(grader):
  pathological = r"\boxed{9^{9^{9^{9}}}}"  # sympy evaluates the power tower forever
  started = time.monotonic()
  results = grader.grade_many([("5", pathological), ("5", r"\boxed{5}"), ("5", pathological)])
  assert time.monotonic() - started < 30
  assert [(r.correct, r.status) for r in results] == [(False, "timeout"), (True, "ok"), (False, "timeout")]
  assert grader.counts["timeout"] >= 2
  assert grader.grade("7", r"\boxed{7}").correct  # the killed workers were replaced


def test_model_output_is_never_evaluated(grader, tmp_path):
  marker = tmp_path / "pwned"
  response = r"\boxed{__import__('os').system('touch " + str(marker) + "')}"
  assert not grader.grade("0", response).correct
  assert not os.path.exists(marker)


def test_workers_start_lazily():
  with Grader() as idle:
    assert idle.grade("1", "no answer").status == "no_answer"
    assert not idle._workers  # pylint: disable=protected-access  # nothing to check: no process started
