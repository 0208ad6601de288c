"""The search of one record against a scripted engine: accepted boundaries and final traces known by hand.

The trace below has six thinking steps and thought switches at steps 2 ("Wait") and 4 ("Alternatively").
Tokens are characters (tests/fakes.py), so token counts are string lengths.
"""
import hashlib

import pytest

from tests.fakes import ExactGrader, ScriptedGenerator, render, synthetic_records
from retro_jax.search import traces
from retro_jax.search.retro_search import (RecordSearch, SearchConfig, SearchContext, SearchRecord, derive_seed,
                                           keyword_first_token_ids)

QUESTION = "What is 2 + 3?"
STEPS = ["Let x = 2.", "So x + 3 = 5.", "Wait, check x + 3.", "It is 5.", "Alternatively, count up.", "Yes, 5.\n"]
SOLUTION = "</think>\n\nThe answer is \\boxed{5}."
TRACE = "<think>\n" + "\n\n".join(STEPS) + SOLUTION


def prompt_at(boundary, steps=STEPS):
  return render(QUESTION) + "".join(step + "\n\n" for step in steps[:boundary])


def kept(boundary, steps=STEPS):
  return "<think>\n" + "".join(step + "\n\n" for step in steps[:boundary])


def rollout(*steps, answer="5"):
  return "\n\n".join(steps) + f"\n</think>\n\n\\boxed{{{answer}}}"


SHORT_RIGHT = rollout("So it is 5.")
SHORT_WRONG = rollout("So it is 6.", answer="6")


def search(script, trace=TRACE, answer="5", record_id="r", **options):
  generator = ScriptedGenerator(script)
  grader = ExactGrader()
  context = SearchContext.create(SearchConfig(**options), generator.encode, grader.grade_many)
  record = SearchRecord(record_id, QUESTION, answer, traces.parse_trace(trace), render(QUESTION))
  record_search = RecordSearch(context, record, grader.grade(answer, trace))
  while (request := record_search.next_request()) is not None:
    generator.requests.append(request)
    record_search.on_result(generator.complete(request))
  return record_search.outputs()[0], generator.requests


def test_full_mode_accepts_a_shorter_correct_rollout():
  output, requests = search({prompt_at(2): [SHORT_RIGHT]})
  assert output["status"] == "revised"
  assert output["accepted_boundaries"] == [2]
  assert output["revised_trace"] == kept(2) + SHORT_RIGHT
  assert (output["steps_before"], output["steps_after"]) == (6, 3)
  assert (output["thoughts_before"], output["thoughts_after"]) == (3, 1)
  assert output["tokens_after"] == len(output["revised_trace"])
  # The new suffix has no thought switch, so boundary 4 of the old trace is never tried.
  assert output["boundaries_tried"] == 1 and output["num_rollouts"] == 1
  assert output["tokens_generated"] == len(SHORT_RIGHT)
  assert [ScriptedGenerator({}).decode(r.prompt_tokens) for r in requests] == [prompt_at(2)]


def test_full_mode_moves_on_after_a_rejected_boundary():
  output, requests = search({prompt_at(2): [SHORT_WRONG], prompt_at(4): [SHORT_RIGHT]})
  assert output["status"] == "revised"
  assert output["accepted_boundaries"] == [4]
  assert output["revised_trace"] == kept(4) + SHORT_RIGHT
  assert output["boundaries_tried"] == 2 and len(requests) == 2


def test_full_mode_reads_boundaries_from_the_revised_suffix():
  first = rollout("So x + 3 = 5 again.", "Hmm, recheck.", "Fine.")  # 2 + 3 = 5 steps, a new switch at step 3
  revised_steps = STEPS[:2] + ["So x + 3 = 5 again."]
  output, _ = search({prompt_at(2): [first], prompt_at(3, revised_steps): [SHORT_RIGHT]})
  assert output["accepted_boundaries"] == [2, 3]
  assert output["revised_trace"] == kept(3, revised_steps) + SHORT_RIGHT
  assert output["steps_after"] == 4


def test_a_tie_keeps_the_current_trace():
  same_length = rollout("Then 1.", "Then 2.", "Then 3.", "Then 4.")  # 2 kept + 4 = 6 steps, as now
  output, _ = search({prompt_at(2): [same_length], prompt_at(4): [rollout("Then 1.", "Then 2.")]})
  assert output["status"] == "unchanged"
  assert output["revised_trace"] == TRACE
  assert output["accepted_boundaries"] == []
  assert output["boundaries_tried"] == 2


def test_ties_between_candidates_go_to_the_shortest():
  candidates = [SHORT_WRONG, rollout("So, written out at some length, it is five."), rollout("So 5."),
                rollout("Two.", "Steps.")]
  output, requests = search({prompt_at(2): candidates}, rollouts_per_boundary=4)
  assert requests[0].n == 4
  assert output["revised_trace"] == kept(2) + rollout("So 5.")
  assert output["num_rollouts"] == 4
  assert output["tokens_generated"] == sum(map(len, candidates))


def test_keep_rollouts_writes_every_rollout_with_its_grade():
  long_right = rollout("Then 1.", "Then 2.", "Then 3.", "Then 4.", "Then 5.")  # correct, but 2 + 5 steps cannot beat 6
  candidates = [SHORT_WRONG, long_right, SHORT_RIGHT, "So it never closes"]
  output, _ = search({prompt_at(2): candidates}, rollouts_per_boundary=4, keep_rollouts=True)
  assert output["revised_trace"] == kept(2) + SHORT_RIGHT
  log = [(r["boundary"], r["text"], r["tokens"], r["correct"], r["could_win"], r["accepted"])
         for r in output["rollouts"]]
  assert log == [(2, SHORT_WRONG, len(SHORT_WRONG), False, True, False),
                 (2, long_right, len(long_right), True, False, False),  # graded only for the log
                 (2, SHORT_RIGHT, len(SHORT_RIGHT), True, True, True),
                 (2, "So it never closes", 18, False, False, False)]
  assert "rollouts" not in search({prompt_at(2): candidates}, rollouts_per_boundary=4)[0]  # off by default


@pytest.mark.parametrize("unit,winner", [("steps", 0), ("tokens", 1)])
def test_value_unit_decides_between_fewer_steps_and_fewer_tokens(unit, winner):
  one_long_step = rollout("So, after a long and careful computation of every term, the total is five.")
  two_short_steps = rollout("So 5.", "Done.")
  candidates = [one_long_step, two_short_steps]
  output, _ = search({prompt_at(2): candidates}, rollouts_per_boundary=2, value_unit=unit)
  assert output["revised_trace"] == kept(2) + candidates[winner]


def test_gamma_one_makes_all_correct_traces_tie():
  output, _ = search({prompt_at(2): [SHORT_RIGHT], prompt_at(4): [SHORT_RIGHT]}, gamma=1.0)
  assert output["status"] == "unchanged"
  assert output["boundaries_tried"] == 2


def test_incorrect_original_is_skipped_without_rollouts():
  output, requests = search({}, answer="7")
  assert output["status"] == "skipped_incorrect"
  assert output["correct_before"] is False and output["correct_after"] is False
  assert output["revised_trace"] == TRACE
  assert requests == []


def test_revise_incorrect_recovers_with_a_longer_rollout_then_bounds_lengths():
  wrong_trace = TRACE.replace("\\boxed{5}", "\\boxed{6}")
  long_right = rollout("Then one.", "Then two.", "Hmm, three.", "Four.", "Five.")  # 2 + 5 = 7 steps > 6
  after_recovery = STEPS[:2] + ["Then one.", "Then two."]
  output, requests = search({prompt_at(2): [long_right], prompt_at(4, after_recovery): [SHORT_WRONG]},
                            trace=wrong_trace, revise_incorrect=True, max_rollout_tokens=5000,
                            solution_allowance_tokens=7)
  assert output["status"] == "recovered"
  assert output["accepted_boundaries"] == [2]
  assert output["revised_trace"] == kept(2) + long_right
  assert output["correct_before"] is False and output["correct_after"] is True
  # While the current trace is wrong any correct rollout wins, so the first rollout is not length-bounded.
  assert requests[0].max_new_tokens == 5000
  assert requests[1].max_new_tokens == len(long_right) - len("Then one.\n\nThen two.\n\n") + 7


def test_revise_incorrect_without_a_correct_rollout_is_unchanged():
  wrong_trace = TRACE.replace("\\boxed{5}", "\\boxed{6}")
  output, _ = search({prompt_at(2): [SHORT_WRONG], prompt_at(4): [SHORT_WRONG]}, trace=wrong_trace,
                     revise_incorrect=True)
  assert output["status"] == "unchanged" and output["correct_after"] is False


def test_length_bound_is_the_current_suffix_plus_the_allowance():
  script = {prompt_at(2): [SHORT_WRONG], prompt_at(4): [SHORT_WRONG]}
  _, requests = search(script, solution_allowance_tokens=10)
  suffix_at = {b: len(TRACE) - len(kept(b)) for b in (2, 4)}
  assert [r.max_new_tokens for r in requests] == [suffix_at[2] + 10, suffix_at[4] + 10]
  _, requests = search(script, solution_allowance_tokens=10, max_rollout_tokens=40)
  assert [r.max_new_tokens for r in requests] == [40, min(40, suffix_at[4] + 10)]
  _, requests = search(script, length_bounded_rollouts=False, max_rollout_tokens=999)
  assert [r.max_new_tokens for r in requests] == [999, 999]


def test_length_bound_in_steps_is_an_approximation():
  """One step (fewer than the current three) but longer than the current suffix: cut when bounded."""
  verbose = rollout("So " + "very " * 30 + "clearly 5.")
  assert len(verbose) > len(TRACE) - len(kept(4))
  script = {prompt_at(2): [SHORT_WRONG], prompt_at(4): [verbose]}
  bounded, _ = search(script, solution_allowance_tokens=0)
  unbounded, _ = search(script, length_bounded_rollouts=False)
  assert bounded["status"] == "unchanged"
  assert unbounded["accepted_boundaries"] == [4]


def _long_or_short_rollout(prompt, index):
  """Correct rollouts of 1..8 steps and 60..480 tokens of thinking; the long ones are cut when bounded."""
  draw = hashlib.sha256(f"{prompt}/{index}".encode()).digest()
  steps = ["Then we add the next term carefully to the sum."] * (1 + draw[0] % 8)
  answer = prompt.split("the answer is ")[1].split("\n")[0]
  return rollout(*steps, answer=answer)


def test_length_bound_never_changes_the_winner_in_tokens():
  outputs = {}
  for bounded in (True, False):
    generator = ScriptedGenerator(_long_or_short_rollout)
    grader = ExactGrader()
    context = SearchContext.create(
        SearchConfig(value_unit="tokens", length_bounded_rollouts=bounded, rollouts_per_boundary=2,
                     solution_allowance_tokens=4), generator.encode, grader.grade_many)
    outputs[bounded] = []
    for data in synthetic_records(12):
      record = SearchRecord(data["id"], data["question"], data["answer"], traces.parse_trace(data["trace"]),
                            render(data["question"]))
      record_search = RecordSearch(context, record, grader.grade(data["answer"], data["trace"]))
      while (request := record_search.next_request()) is not None:
        record_search.on_result(generator.complete(request))
      outputs[bounded].append(record_search.outputs()[0])
  def without_generated(output):
    return {key: value for key, value in output.items() if key != "tokens_generated"}

  assert list(map(without_generated, outputs[True])) == list(map(without_generated, outputs[False]))
  assert any(o["status"] == "revised" for o in outputs[True])
  # The bound did cut rollouts (otherwise this test would show nothing).
  assert sum(o["tokens_generated"] for o in outputs[True]) < sum(o["tokens_generated"] for o in outputs[False])


def test_incomplete_rollouts_are_never_accepted():
  no_close = "So it is 5, \\boxed{5}"
  output, _ = search({prompt_at(2): [no_close], prompt_at(4): [SHORT_RIGHT]}, max_rollout_tokens=10,
                     length_bounded_rollouts=False)
  assert output["status"] == "unchanged"  # the first has no </think>, the second is cut at 10 tokens


def test_requests_carry_the_ban_sampling_and_per_boundary_seeds():
  _, requests = search({prompt_at(2): [SHORT_WRONG], prompt_at(4): [SHORT_WRONG]}, seed=3)
  expected_ban = sorted({ord(k[0]) for k in traces.DEFAULT_KEYWORDS} | {ord(" ")})
  for request, boundary in zip(requests, (2, 4)):
    assert list(request.banned_first_token_ids) == expected_ban
    assert request.ban_first_k == 1
    assert (request.sampling.temperature, request.sampling.top_p) == (0.6, 0.95)
    assert request.seed == derive_seed(3, "r", boundary)
  assert len({r.seed for r in requests}) == 2
  assert derive_seed(3, "r", 2) != derive_seed(4, "r", 2) != derive_seed(3, "s", 2)


def test_banned_ids_cover_keywords_with_and_without_a_leading_space():
  vocabulary = {"Wait": 1, " Wait": 2, "Let": 3, " Let": 4, "me": 5, " me": 6, "check": 7, " check": 8}

  def encode(text):
    words = text.replace(" ", "\0 ").split("\0")
    return [vocabulary[word] for word in words if word]

  assert keyword_first_token_ids(("Wait", "Let me check"), encode) == (1, 2, 3, 4)


def test_prompt_limit_stops_the_search():
  output, requests = search({prompt_at(2): [SHORT_WRONG]}, max_prompt_tokens=len(prompt_at(2)))
  assert output["boundaries_tried"] == 1 and len(requests) == 1
  assert "max_prompt_tokens" in output["reason"]
  assert output["status"] == "unchanged"


def test_partial_mode_tries_one_seeded_random_boundary():
  script = {prompt_at(2): [SHORT_WRONG], prompt_at(4): [SHORT_WRONG]}
  tried = {}
  for i in range(24):
    output, requests = search(script, record_id=f"id{i}", mode="partial")
    assert output["boundaries_tried"] == 1
    tried[i] = ScriptedGenerator({}).decode(requests[0].prompt_tokens)
    again, _ = search(script, record_id=f"id{i}", mode="partial")
    assert again == output
  assert set(tried.values()) == {prompt_at(2), prompt_at(4)}


def test_partial_mode_tries_boundaries_left_to_right_and_redraws_after_acceptance():
  script = {prompt_at(2): [SHORT_WRONG], prompt_at(4): [SHORT_WRONG]}
  output, requests = search(script, mode="partial", num_partial_boundaries=5)
  assert [ScriptedGenerator({}).decode(r.prompt_tokens) for r in requests] == [prompt_at(2), prompt_at(4)]
  first = rollout("So x + 3 = 5 again.", "Hmm, recheck.", "Fine.")
  revised_steps = STEPS[:2] + ["So x + 3 = 5 again."]
  output, _ = search({prompt_at(2): [first], prompt_at(3, revised_steps): [SHORT_RIGHT]}, mode="partial",
                     num_partial_boundaries=2)
  assert output["accepted_boundaries"] == [2, 3]


def test_openthoughts_trace_keeps_its_head():
  trace = "<|begin_of_thought|>\n\n" + "\n\n".join(STEPS[:3]) + "\n\n<|end_of_thought|>\n\n\\boxed{5}"
  output, _ = search({prompt_at(2): [SHORT_RIGHT]}, trace=trace)
  assert output["revised_trace"] == "<|begin_of_thought|>\n\n" + "".join(s + "\n\n" for s in STEPS[:2]) + SHORT_RIGHT


def test_config_validation():
  with pytest.raises(ValueError):
    SearchConfig(mode="greedy")
  with pytest.raises(ValueError):
    SearchConfig(value_unit="chars")
  with pytest.raises(ValueError):
    SearchConfig(gamma=1.5)
  with pytest.raises(ValueError):
    SearchConfig(rollouts_per_boundary=0)
