"""The synthetic arithmetic task: gold answers, splits, trace shape and failure-mode rates, tokenizer."""
import ast
import json
import operator
import re
import statistics

import pytest
import tokenizers
import transformers

from retro_jax.tasks import arithmetic, tokenizer, trace_writer

# The spec's default transition keywords (retro_jax/search/README.md, section 2), written out here on purpose: the
# traces must follow the spec, not whatever list the writer happens to use.
SPEC_KEYWORDS = ("Wait", "But wait", "Alternatively", "Hmm", "Hold on", "However", "Actually", "Let me check",
                 "Let me verify", "Let me double-check", "Another approach", "On second thought")
_KEYWORD_AT_START = re.compile(r"\s*(?:%s)(?!\w)" % "|".join(re.escape(k) for k in SPEC_KEYWORDS))
_BOXED = re.compile(r"\\boxed\{(-?\d+)\}")


def _evaluate(expression: str) -> int:
  """An evaluator independent of the generator: Python's own parser and precedence rules."""
  binary = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}

  def walk(node):
    if isinstance(node, ast.BinOp) and type(node.op) in binary:
      return binary[type(node.op)](walk(node.left), walk(node.right))
    if isinstance(node, ast.Constant) and type(node.value) is int:
      return node.value
    raise ValueError(f"unexpected node {ast.dump(node)}")

  return walk(ast.parse(expression, mode="eval").body)


def _question_expression(question: str) -> str:
  match = re.fullmatch(r"What is (.+)\?", question)
  assert match, question
  return match.group(1)


def _thinking_steps(text: str) -> list[str]:
  assert text.startswith("<think>\n") and text.count("</think>") == 1, text
  thinking = text[len("<think>\n"):text.index("\n</think>\n\n")]
  return thinking.split("\n\n")


@pytest.fixture(scope="module")
def problems() -> list[arithmetic.Problem]:
  train, _ = arithmetic.make_splits(seed=0, n_train=600, n_eval=0, levels=(1, 2, 3, 4, 5))
  return train


@pytest.fixture(scope="module")
def default_traces(problems) -> list[trace_writer.Trace]:
  return trace_writer.write_traces(problems, trace_writer.TraceConfig(), seed=0)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  return tokenizer.build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def test_answers_match_an_independent_evaluator(problems):
  for p in problems:
    expression = _question_expression(p.question)
    assert _evaluate(expression) == p.answer, p
    assert type(p.answer) is int and 0 <= p.answer <= arithmetic.MAX_VALUE
    # Every intermediate value stays small, checked on the prefixes of the chain independently too.
    for k in range(1, p.level + 1):
      assert 0 <= _evaluate(arithmetic.render_expression(p.start, p.ops[:k])) <= arithmetic.MAX_VALUE
    assert p.to_record() == {"id": p.id, "question": p.question, "answer": str(p.answer)}


def test_levels_are_the_number_of_operations(problems):
  counts = {level: 0 for level in range(1, 6)}
  for p in problems:
    assert len(re.findall(r" [-+*] ", p.question)) == p.level
    counts[p.level] += 1
  assert set(counts.values()) == {120}


def test_splits_are_deterministic_and_disjoint():
  train, held_out = arithmetic.make_splits(seed=3, n_train=400, n_eval=100)
  assert (train, held_out) == arithmetic.make_splits(seed=3, n_train=400, n_eval=100)
  assert len({p.question for p in train}) == 400 and len({p.question for p in held_out}) == 100
  assert not {p.question for p in train} & {p.question for p in held_out}
  assert not {p.id for p in train} & {p.id for p in held_out}
  # The held-out split does not depend on the amount of training data; another seed gives other problems.
  assert arithmetic.make_splits(seed=3, n_train=50, n_eval=100)[1] == held_out
  assert arithmetic.make_splits(seed=4, n_train=400, n_eval=100)[1] != held_out


def test_write_task_files(tmp_path):
  paths = trace_writer.write_task_files(tmp_path / "task", seed=0, n_train=30, n_eval=10)
  read = {name: [json.loads(line) for line in open(path, encoding="utf-8")] for name, path in paths.items()}
  assert len(read["train"]) == 30 and len(read["eval"]) == 10 and len(read["train_traces"]) == 30
  for record in read["train"] + read["eval"]:
    assert set(record) == {"id", "question", "answer"}
    assert str(_evaluate(_question_expression(record["question"]))) == record["answer"]
  for record, problem in zip(read["train_traces"], read["train"]):
    assert {k: record[k] for k in problem} == problem
    assert record["meta"]["is_correct"] == (_BOXED.findall(record["trace"])[-1] == record["answer"])
  no_traces = trace_writer.write_task_files(tmp_path / "plain", seed=0, n_train=5, n_eval=5, trace_config=None)
  assert set(no_traces) == {"train", "eval"}


def test_traces_are_well_formed(problems, default_traces):
  for p, t in zip(problems, default_traces):
    steps = _thinking_steps(t.text)
    assert len(steps) == t.num_steps
    assert all(s and s == s.strip() and "\n" not in s for s in steps), t.text
    solution = t.text.split("\n</think>\n\n")[1]
    assert _BOXED.findall(solution) == [str(t.final_answer)]
    assert steps[-1] == f"So the answer is {t.final_answer}."
    assert t.is_correct == (t.final_answer == p.answer)
    assert t.is_correct or (t.underthinking and t.alt_wrong)
    # A keyword opens a step exactly when the writer switched thoughts, and never elsewhere.
    switches = [i for i, s in enumerate(steps) if _KEYWORD_AT_START.match(s)]
    assert len(switches) == t.num_switches == t.num_reverifications + t.underthinking
    assert 0 not in switches
    # Main-line and re-verification steps are right (slips only happen in the alternative line).
    for s in steps:
      match = re.fullmatch(r"(?:Compute |.*: )?(\d+ [-+*] \d+) = (\d+)\.", s)
      if match:
        assert _evaluate(match.group(1)) == int(match.group(2)), s


def test_switches_follow_the_shapes_retro_search_needs(problems, default_traces):
  """At an over-thinking boundary the derivation is complete (so the conclusion is the natural
  non-switching continuation); at an under-thinking boundary the main line was correct and unfinished."""
  for p, t in zip(problems, default_traces):
    steps = _thinking_steps(t.text)
    switches = [i for i, s in enumerate(steps) if _KEYWORD_AT_START.match(s)]
    verify = [i for i in switches if steps[i].startswith(trace_writer.VERIFY_OPENERS)]
    if verify:
      before = steps[verify[0] - 1]
      assert before.endswith(f" = {p.answer}.") or before == f"That gives {p.answer}.", t.text
    else:
      assert steps[-2].endswith(f" = {t.final_answer}.") or steps[-2] == f"That gives {t.final_answer}."
    if t.underthinking:
      assert steps[t.switch_after].startswith(trace_writer.ALTERNATIVE_OPENERS)
      assert 1 <= t.switch_after < p.level
      assert all(steps[i].startswith("Compute ") for i in range(t.switch_after))


def test_failure_mode_rates_follow_the_config(problems):
  config = trace_writer.TraceConfig(overthink_rate=0.4, reverify_again_prob=0.5, max_reverifications=3,
                                    underthink_rate=0.35, alt_wrong_rate=0.6)
  traces = trace_writer.write_traces(problems, config, seed=1)

  def rate(flags):
    flags = list(flags)
    return sum(flags) / len(flags)

  multi_op = [t for p, t in zip(problems, traces) if p.level >= 2]
  assert rate(t.underthinking for t in multi_op) == pytest.approx(0.35, abs=0.07)
  assert rate(t.alt_wrong for t in multi_op if t.underthinking) == pytest.approx(0.6, abs=0.12)
  correct = [t for t in traces if t.is_correct]
  assert rate(t.overthinking for t in correct) == pytest.approx(0.4, abs=0.07)
  overthought = [t.num_reverifications for t in correct if t.overthinking]
  assert max(overthought) == 3 and rate(n >= 2 for n in overthought) == pytest.approx(0.5, abs=0.12)
  assert all(not t.overthinking for t in traces if not t.is_correct)
  assert not any(t.underthinking for p, t in zip(problems, traces) if p.level == 1)
  # The rates switch the modes off and on completely.
  clean = trace_writer.write_traces(problems, trace_writer.TraceConfig(overthink_rate=0, underthink_rate=0), 0)
  assert all(t.is_correct and t.num_switches == 0 for t in clean)
  always = trace_writer.TraceConfig(overthink_rate=1, underthink_rate=1, alt_wrong_rate=0)
  multi_op_problems = [p for p in problems if p.level >= 2]
  assert all(t.overthinking and t.underthinking for t in trace_writer.write_traces(multi_op_problems, always, 0))


def test_traces_are_deterministic_per_record(problems):
  config = trace_writer.TraceConfig()
  whole = trace_writer.write_traces(problems[:50], config, seed=5)
  assert whole[10:] == trace_writer.write_traces(problems[10:50], config, seed=5)


def test_tokenizer_round_trips_and_loads_with_the_chat_template(problems, default_traces, tokenizer_dir):
  raw = tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
  hf = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
  assert raw.get_vocab_size() == len(hf) < 512
  assert (hf.bos_token, hf.eos_token, hf.pad_token) == tokenizer.SPECIAL_TOKENS
  assert len({hf.bos_token_id, hf.eos_token_id, hf.pad_token_id}) == 3
  for token in tokenizer.SPECIAL_TOKENS + tokenizer.CHAT_TOKENS:
    assert len(raw.encode(token).ids) == 1, token
  for p, t in zip(problems[::3], default_traces[::3]):
    prompt = hf.apply_chat_template([{"role": "user", "content": p.question}], tokenize=False,
                                    add_generation_prompt=True)
    assert prompt == f"<｜begin▁of▁sentence｜><｜User｜>{p.question}<｜Assistant｜><think>\n"
    assert prompt == tokenizer.render_prompt(p.question)
    full = prompt + t.text[len(trace_writer.THINK_OPEN):]
    for text in (prompt, t.text, full, p.question):
      ids = hf(text)["input_ids"]
      assert ids == raw.encode(text).ids
      assert hf.decode(ids) == text and raw.decode(ids, skip_special_tokens=False) == text
    # Digits are single tokens, and the think tags survive skipping special tokens (as in R1-distill).
    assert all(len(re.findall(r"\d", tok)) <= 1 for tok in raw.encode(full).tokens)
    assert hf.decode(hf(t.text)["input_ids"], skip_special_tokens=True) == t.text
  assert raw.encode("2024").tokens == ["2", "0", "2", "4"]
  # Text outside the task still round-trips (byte-level).
  odd = "Ünïcode\t  tabs\r\n\n\n{x}^2 ≥ 0 😀"
  assert hf.decode(hf(odd)["input_ids"]) == odd


def test_tokenizer_build_is_deterministic(tokenizer_dir, tmp_path):
  again = tokenizer.build_tokenizer(tmp_path)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert (again / name).read_bytes() == (tokenizer_dir / name).read_bytes()


def test_banning_keywords_leaves_the_ordinary_continuations(tokenizer_dir):
  """Retro-Search bans every token that starts a keyword (with or without a leading space) at the first
  position; the first tokens of non-switching steps must survive the ban, or a rollout could not conclude."""
  raw = tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
  banned = {raw.encode(prefix + k).ids[0] for k in SPEC_KEYWORDS for prefix in ("", " ")}
  for step in ("Compute 3 + 4 = 7.", "That gives 35 - 6.", "So the answer is 29.", "7 * 5 = 35."):
    assert raw.encode("= 7.\n\n" + step).ids[4] not in banned, step  # after "=", "Ġ", "7", ".ĊĊ"


def test_sequence_lengths_fit_a_tiny_model(tokenizer_dir):
  raw = tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
  train, _ = arithmetic.make_splits(seed=0, n_train=1000, n_eval=0)
  traces = trace_writer.write_traces(train, trace_writer.TraceConfig(), seed=0)
  lengths = sorted(len(raw.encode(tokenizer.render_prompt(p.question) + t.text[len(trace_writer.THINK_OPEN):]).ids)
                   for p, t in zip(train, traces))
  assert statistics.mean(lengths) < 128
  assert lengths[int(0.95 * len(lengths))] <= 192
  assert lengths[-1] <= 256


def test_traces_parse_with_the_search_segmentation(problems, default_traces):
  """The project's own segmentation sees exactly the switches the writer put in, and splits losslessly."""
  from retro_jax.search import traces as segmentation

  for trace in default_traces:
    parsed = segmentation.parse_trace(trace.text)
    assert parsed.text == trace.text
    assert len(segmentation.boundaries(parsed)) == trace.num_switches
    assert len(parsed.steps) == trace.num_steps
