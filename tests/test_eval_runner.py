"""The eval runner end to end against a scripted fake TextGenerator: every file, the numbers, kill and resume."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from retro_jax.engine.requests import Completion, GenerationResult
from retro_jax.eval import report, runner
from retro_jax.grading import GradeResult, extract_final_answer

PROMPT_OPEN, PROMPT_CLOSE = "<User>", "<Assistant><think>\n"

PROBLEMS = [{"id": "q0", "question": "half of one", "answer": "\\frac{1}{2}"},
            {"id": "q1", "question": "two plus two", "answer": "4"},
            {"id": "q2", "question": "a long one", "answer": "10"},
            {"id": "q3", "question": "three squared", "answer": "9"}]
# Sampled outcomes per question ("T" correct, "F" wrong, "L" cut by the token budget before any answer);
# the first letter is also the greedy outcome.
SCRIPT = {"q0": "TTTT", "q1": "TFTF", "q2": "FFFL", "q3": "FTFF"}
CORRECT_TEXT = {"q0": "0.5", "q1": "4", "q2": "10", "q3": "9"}  # q0's is only equivalent, not equal, to its gold


def response(question_id: str, outcome: str) -> tuple[str, str]:
  if outcome == "L":
    return "Let me start.\n\nWait, again.\n\nHmm, and again", "length"
  answer = CORRECT_TEXT[question_id] if outcome == "T" else "999"
  return f"Compute it.\n\nWait, check it.\n\nYes.\n</think>\nSo the answer is $\\boxed{{{answer}}}$.", "eos"


class FakeTokenizer:
  """Renders `<User>question<Assistant><think>\\n`; one token per character."""

  def render_prompt(self, question: str) -> str:
    return PROMPT_OPEN + question + PROMPT_CLOSE

  def encode(self, text: str) -> list[int]:
    return [ord(c) for c in text]


class FakeGenerator:
  """Answers each request from SCRIPT, in reverse queue order (results need not come back in order).

  `fail_after` raises after that many results, as a crash mid-run would; `delay_s` slows every result down.
  """

  def __init__(self, fail_after: int | None = None, delay_s: float = 0.0):
    self.fail_after = fail_after
    self.delay_s = delay_s
    self.requests = []

  def encode(self, text):
    return [ord(c) for c in text]

  def decode(self, tokens):
    return "".join(map(chr, tokens))

  def _result(self, request):
    prompt = self.decode(request.prompt_tokens)
    question = prompt[len(PROMPT_OPEN):-len(PROMPT_CLOSE)]
    question_id = next(p["id"] for p in PROBLEMS if question.startswith(p["question"]))
    outcomes = SCRIPT[question_id][:1] if request.sampling.temperature == 0 else SCRIPT[question_id]
    assert len(outcomes) == request.n
    samples = []
    for outcome in outcomes:
      text, finish = response(question_id, outcome)
      samples.append(Completion(tokens=tuple(self.encode(text)), text=text, finish_reason=finish))
    return GenerationResult(request=request, samples=tuple(samples))

  def stream(self, queue):
    pending = []
    while (request := queue.get()) is not None:
      pending.append(request)
    for count, request in enumerate(reversed(pending)):
      if self.fail_after is not None and count == self.fail_after:
        raise RuntimeError("simulated crash")
      self.requests.append(request)
      time.sleep(self.delay_s)
      yield self._result(request)

  def generate(self, requests):
    return [self._result(r) for r in requests]


def exact_grade_many(pairs):
  """A test double for the Grader: exact string match of the extracted answer (no math equivalence)."""
  results = []
  for gold, text in pairs:
    predicted = extract_final_answer(text)
    status = "no_answer" if predicted is None else "ok"
    results.append(GradeResult(predicted == gold or (gold, predicted) == ("\\frac{1}{2}", "0.5"), status, predicted))
  return results


def run_eval(output_dir, generator=None, grade_many=exact_grade_many, **overrides):
  settings = {"name": "fake", "k": 4, "max_new_tokens": 64, "progress": False, **overrides}
  config = runner.EvalConfig(output_dir=str(output_dir), **settings)
  return runner.evaluate(generator or FakeGenerator(), FakeTokenizer(), {"toy": PROBLEMS}, config,
                         grade_many=grade_many)


def sample_rows(output_dir):
  return runner.read_samples(runner.sample_path(str(output_dir), "toy"))


def comparable(summary):
  return {k: v for k, v in summary.items() if k not in ("wall_time_s", "config")}  # config names the output dir


def test_end_to_end_with_the_real_grader_writes_every_file(tmp_path, capsys):
  summary = run_eval(tmp_path, grade_many=None)  # retro_jax.grading.Grader: worker processes, math-verify
  for name in ("samples/toy.jsonl", "run_config.json", "summary.json", "results.md", "accuracy_vs_length.png",
               "length_histogram.png"):
    assert os.path.getsize(tmp_path / name) > 0, name
  for name in ("accuracy_vs_length.png", "length_histogram.png"):
    assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  rows = sample_rows(tmp_path)
  assert len(rows) == 4 * (1 + 4)
  first = next(r for r in rows if (r["question_id"], r["mode"], r["sample_index"]) == ("q0", "sampled", 0))
  assert first["extracted_answer"] == "0.5" and first["correct"] and first["gold"] == "\\frac{1}{2}"
  assert first["thought_switches"] == 1 and first["finish_reason"] == "eos"
  assert first["length"] == len(first["response"])
  assert set(first) >= {"question_id", "sample_index", "response", "extracted_answer", "correct", "length",
                        "finish_reason", "mode"}
  entry = summary["benchmarks"]["toy"]
  assert entry["greedy"]["accuracy"] == pytest.approx(2 / 4)  # T, T, F, F
  assert entry["sampled"]["accuracy"] == pytest.approx((4 + 2 + 0 + 1) / 16)
  assert entry["sampled"]["truncation_rate"] == pytest.approx(1 / 16)
  assert entry["sampled"]["pass_at_k"]["4"] == pytest.approx(3 / 4)
  assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
  table = (tmp_path / "results.md").read_text()
  assert "| toy | 4 | 50.0 | 43.8 ± " in table
  assert table in capsys.readouterr().out


def test_requests_carry_the_protocol_settings(tmp_path):
  generator = FakeGenerator()
  run_eval(tmp_path, generator)
  by_mode = {r.request_id[1]: r for r in generator.requests if r.request_id[0] == "q1"}
  assert by_mode["greedy"].sampling.temperature == 0 and by_mode["greedy"].n == 1
  assert (by_mode["sampled"].sampling.temperature, by_mode["sampled"].sampling.top_p) == (0.6, 0.95)
  assert by_mode["sampled"].n == 4 and by_mode["sampled"].max_new_tokens == 64
  assert by_mode["greedy"].seed == by_mode["sampled"].seed == runner.request_seed(0, "toy", "q1")
  prompt = "".join(map(chr, by_mode["greedy"].prompt_tokens))
  assert prompt == PROMPT_OPEN + "two plus two" + PROMPT_CLOSE  # custom benchmark: the bare question


def test_a_crash_mid_run_resumes_without_writing_anything_twice(tmp_path):
  reference = run_eval(tmp_path / "reference")
  with pytest.raises(RuntimeError, match="simulated crash"):
    run_eval(tmp_path / "run", FakeGenerator(fail_after=3))
  assert len(sample_rows(tmp_path / "run")) == 4 + 1 + 4  # q3 sampled, q3 greedy, q2 sampled (reverse order)
  resumed = FakeGenerator()
  summary = run_eval(tmp_path / "run", resumed)
  assert len(resumed.requests) == 8 - 3  # finished units were not asked for again
  rows = sample_rows(tmp_path / "run")
  keys = [(r["question_id"], r["mode"], r["sample_index"]) for r in rows]
  assert len(keys) == len(set(keys)) == 20
  assert comparable(summary) == comparable(reference)
  again = FakeGenerator()
  run_eval(tmp_path / "run", again)  # everything finished: nothing to generate, nothing appended
  assert again.requests == [] and len(sample_rows(tmp_path / "run")) == 20


def test_a_unit_cut_mid_write_is_redone_and_only_its_missing_samples_written(tmp_path):
  reference = run_eval(tmp_path / "reference")
  rows = sample_rows(tmp_path / "reference")
  cut = [r for r in rows if r["question_id"] == "q3" and r["mode"] == "sampled"]
  output = tmp_path / "cut"
  os.makedirs(output / "samples")
  with open(runner.sample_path(str(output), "toy"), "w", encoding="utf-8") as f:  # killed inside q3's write
    f.writelines(json.dumps(r) + "\n" for r in rows if r not in cut)
    f.writelines(json.dumps(r) + "\n" for r in cut[:2])
    f.write(json.dumps(cut[2])[:25])
  generator = FakeGenerator()
  summary = run_eval(output, generator)
  assert [r.request_id for r in generator.requests] == [("q3", "sampled")]
  keys = [(r["question_id"], r["mode"], r["sample_index"]) for r in sample_rows(output)]
  assert len(keys) == len(set(keys)) == 20
  assert comparable(summary) == comparable(reference)
  with open(runner.sample_path(str(output), "toy"), encoding="utf-8") as f:
    assert all(json.loads(line) for line in f)  # the cut line is gone


def test_resuming_with_other_settings_is_refused(tmp_path):
  run_eval(tmp_path)
  with pytest.raises(runner.EvalError, match="other settings"):
    run_eval(tmp_path, k=8)


def test_greedy_only_run(tmp_path):
  summary = run_eval(tmp_path, modes=("greedy",))
  assert set(summary["benchmarks"]["toy"]) == {"display_name", "in_average", "greedy"}
  table = (tmp_path / "results.md").read_text()
  assert "pass@1" not in table and "Greedy acc" in table


_KILL_SCRIPT = textwrap.dedent("""
    import sys
    from tests import test_eval_runner as t
    t.run_eval(sys.argv[1], t.FakeGenerator(delay_s=0.5))
""")


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_result(tmp_path):
  reference = run_eval(tmp_path / "reference")
  output = tmp_path / "killed"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
  process = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(output)], cwd=root, env=env)
  path = runner.sample_path(str(output), "toy")
  deadline = time.monotonic() + 60
  while time.monotonic() < deadline and len(runner.read_samples(path)) < 2:
    time.sleep(0.05)
  os.kill(process.pid, signal.SIGKILL)
  process.wait()
  written = len(runner.read_samples(path))
  assert 2 <= written < 20, "the kill must land mid-run"
  summary = run_eval(output)
  keys = [(r["question_id"], r["mode"], r["sample_index"]) for r in sample_rows(output)]
  assert len(keys) == len(set(keys)) == 20
  assert comparable(summary) == comparable(reference)


def test_compare_puts_runs_side_by_side(tmp_path):
  before = run_eval(tmp_path / "before")
  after = json.loads(json.dumps(before))
  after["name"] = "after"
  toy = after["benchmarks"]["toy"]
  toy["sampled"].update(accuracy=0.5625, mean_length=50.0, mean_thought_switches=0.5)
  toy["greedy"]["accuracy"] = 0.75
  after["lengths"]["toy"] = [50] * 16
  table = report.compare([before, after], output_dir=str(tmp_path / "cmp"))
  header = table.splitlines()[0]
  for column in ("pass@1 fake", "pass@1 after", "Δ pass@1 after", "Greedy acc fake", "Δ Greedy acc after", "Mean len after",
                 "Δ% Mean len after",
                 "Switches after", "Trunc. % after"):
    assert column in header
  toy_line = next(line for line in table.splitlines() if line.startswith("| toy |"))
  before_length = before["benchmarks"]["toy"]["sampled"]["mean_length"]
  cells = [c.strip() for c in toy_line.strip("|").split("|")]
  assert cells[1:4] == ["43.8", "56.2", "+12.5"]  # pass@1 before, after, change in points
  assert cells[4:7] == ["50.0", "75.0", "+25.0"]  # greedy
  assert cells[9] == f"{100 * (50.0 / before_length - 1):+.1f}%"
  for name in ("comparison.md", "comparison_accuracy_vs_length.png", "comparison_length_histogram.png"):
    assert os.path.getsize(tmp_path / "cmp" / name) > 0
