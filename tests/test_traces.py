"""Trace segmentation on hand-written R1 and OpenThoughts traces: counts, lossless joins, keyword rules."""
import random

import pytest

from retro_jax.search import traces

R1_TRACE = (
    "<think>\n"
    "Okay, let's compute 2+3.\n\n"
    "It is 5.\n\n"
    "Wait, let me re-check: 2+3 = 5.\n\n"
    "Yes. But wait is only mid-step here, and so is Alternatively.\n\n"
    "Alternatively, count: 1, 2, 3, 4, 5.\n\n"
    "  Hmm... still 5.\n\n"
    "Hmmm, not a whole word.\n\n"
    "waiting is lowercase.\n\n"
    "Let me verify once more.\n"
    "</think>\n\n"
    "The answer is $\\boxed{5}$."
)

THOUGHT_TRACE = (
    "<|begin_of_thought|>\n\n"
    "So the sum is 5.\n\n"
    "However, the question may mean something else.\n\n"
    "No, it is 5.\n\n"
    "<|end_of_thought|>\n\n"
    "<|begin_of_solution|>\n\n\\boxed{5}\n\n<|end_of_solution|>"
)


def test_r1_trace_counts_and_boundaries():
  parsed = traces.parse_trace(R1_TRACE)
  assert parsed.head == "<think>\n"
  assert parsed.style == traces.THINK_STYLE
  assert len(parsed.steps) == 9
  assert parsed.steps[0] == "Okay, let's compute 2+3."
  assert parsed.steps[-1] == "Let me verify once more.\n"
  assert parsed.solution == "</think>\n\nThe answer is $\\boxed{5}$."
  # Wait (2), Alternatively (4), indented Hmm (5), Let me verify (8); not the mid-step keywords (3),
  # "Hmmm" (6, not a whole word) or "waiting" (7, lower case).
  assert traces.boundaries(parsed) == (2, 4, 5, 8)
  assert traces.count_thoughts(parsed) == 5
  assert traces.count_thought_switches(R1_TRACE) == 4


def test_r1_trace_joins_back_byte_for_byte():
  parsed = traces.parse_trace(R1_TRACE)
  assert parsed.text == R1_TRACE
  assert parsed.separators == ("\n\n",) * 8
  for boundary in range(1, len(parsed.steps)):
    assert parsed.head + parsed.thinking_prefix(boundary) + parsed.suffix(boundary) == R1_TRACE
    assert parsed.thinking_prefix(boundary).endswith("\n\n")
    assert parsed.suffix(boundary).startswith(parsed.steps[boundary])


def test_thinking_prefix_rejects_the_first_step_and_out_of_range():
  parsed = traces.parse_trace(R1_TRACE)
  with pytest.raises(ValueError):
    parsed.thinking_prefix(0)
  with pytest.raises(ValueError):
    parsed.thinking_prefix(len(parsed.steps))


def test_openthoughts_style():
  parsed = traces.parse_trace(THOUGHT_TRACE)
  assert parsed.style == traces.THOUGHT_STYLE
  assert parsed.head == "<|begin_of_thought|>\n\n"
  # The thinking ends with "\n\n" before the marker, so the last step is empty: still lossless.
  assert parsed.steps == ("So the sum is 5.", "However, the question may mean something else.", "No, it is 5.", "")
  assert traces.boundaries(parsed) == (1,)
  assert parsed.solution.startswith("<|end_of_thought|>")
  assert parsed.text == THOUGHT_TRACE


def test_trace_without_opening_marker():
  """R1 templates put "<think>\\n" in the prompt, so generated traces start straight with the thinking."""
  text = "First.\n\nWait, second.\n</think>\n\n\\boxed{1}"
  parsed = traces.parse_trace(text)
  assert parsed.head == ""
  assert parsed.steps == ("First.", "Wait, second.\n")
  assert traces.boundaries(parsed) == (1,)
  assert parsed.text == text


def test_mixed_style_closes_on_the_first_marker():
  text = "<|begin_of_thought|>\n\nA.\n\nB.\n</think>\n\n\\boxed{2} <|end_of_thought|>"
  parsed = traces.parse_trace(text)
  assert parsed.style == traces.THINK_STYLE
  assert parsed.steps == ("A.", "B.\n")
  assert parsed.text == text


def test_missing_close_marker():
  with pytest.raises(traces.TraceFormatError):
    traces.parse_trace("<think>\nNo end.\n\nWait, still none.")
  parsed = traces.parse_trace("<think>\nNo end.\n\nWait, still none.", require_close=False)
  assert parsed.solution == ""
  assert traces.count_thought_switches("No end.\n\nWait, still none.\n\nHmm.") == 2


def test_runs_of_newlines_give_empty_or_indented_steps_losslessly():
  thinking = "a\n\n\n\nb\n\n\nWait, c\n\n"
  parsed = traces.parse_trace(thinking + "</think>x")
  assert parsed.steps == ("a", "", "b", "\nWait, c", "")
  assert traces.boundaries(parsed) == (3,)
  assert parsed.thinking == thinking


def test_keyword_rules():
  assert traces.starts_thought("Wait, no.")
  assert traces.starts_thought("\n  But wait, no.")
  assert traces.starts_thought("Let me double-check this.")
  assert traces.starts_thought("Hmm")
  assert not traces.starts_thought("wait, no.")
  assert not traces.starts_thought("Waiting for it.")
  assert not traces.starts_thought("So. Wait, no.")
  assert not traces.starts_thought("Let me compute.")


def test_custom_keywords():
  text = "<think>\nA.\n\nWait, B.\n\nNow C.\n</think>"
  parsed = traces.parse_trace(text)
  assert traces.boundaries(parsed, keywords=("Now",)) == (2,)
  assert traces.boundaries(parsed, keywords=()) == ()
  assert traces.count_thought_switches(text, keywords=("Now", "Wait")) == 2


def test_random_texts_round_trip():
  pieces = ["\n", "\n\n", " ", "Wait", "Hmm,", "a", "b.", "<think>", "</think>", "<|end_of_thought|>", "\\boxed{1}"]
  rng = random.Random(0)
  for _ in range(500):
    text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
    parsed = traces.parse_trace(text, require_close=False)
    assert parsed.text == text
    assert len(parsed.separators) == len(parsed.steps) - 1
    assert all(traces.STEP_SEPARATOR not in step for step in parsed.steps)
