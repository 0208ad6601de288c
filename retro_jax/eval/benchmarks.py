"""The benchmark registry: where each evaluation set lives and how its fields map onto `{id, question, answer}`.

The seven math benchmarks of the field (retro_jax/search/README.md, section 6) live on the HF hub, so each spec names
its dataset id, config and split for online use through `datasets`. The hub is not reachable everywhere (CI,
TPU VMs behind a firewall), so every benchmark also loads from a local JSONL file. A local file may be an export
of the hub dataset (`load_dataset(...).to_json(path)`, the hub's own field names) or already hold the canonical
`{id, question, answer}` fields: a record is read with the spec's field names first and the canonical ones next.

Gold answers are strings, the form the grader compares (Math-Verify parses both sides). Where a benchmark stores
its gold in another shape (GSM8K's worked solution ending in `#### 42`, OlympiadBench's list of final answers),
the spec's `answer_transform` turns it into that string.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

from retro_jax import jsonl
from retro_jax.tokenization import R1_PROMPT_TEMPLATE  # the field's prompt for R1-style models on maths
from retro_jax.user_errors import UserError


class BenchmarkError(UserError):
  """A benchmark cannot be loaded (unknown name, missing file or field, hub unreachable)."""


@dataclasses.dataclass(frozen=True)
class Problem:
  """One evaluation question with its gold answer, as every benchmark is normalised to."""

  id: str
  question: str
  answer: str


def plain_answer(value: Any) -> str:
  return str(value).strip()


def gsm8k_answer(value: Any) -> str:
  """The number after the `####` that ends GSM8K's worked solutions; a value without one (a local file that
  already holds bare answers) is kept whole."""
  text = str(value)
  return (text.rsplit("####", 1)[1] if "####" in text else text).strip()


def joined_answer(value: Any) -> str:
  """OlympiadBench stores a list of final answers (several for multi-part questions); we grade them as one
  comma-separated tuple, which is how a model writes them in a single `\\boxed{}`."""
  if isinstance(value, (list, tuple)):
    return ", ".join(str(v).strip() for v in value)
  return str(value).strip()


@dataclasses.dataclass(frozen=True)
class BenchmarkSpec:
  """Where a benchmark lives and how its records map onto `Problem`.

  `hf_path` is None for benchmarks that only exist as local files (the tiny task, custom JSONL).
  `prompt_template` is the user turn, `{question}` replaced by the question (plain substitution, not
  `str.format`: the template holds LaTeX braces); the tiny reasoner was trained on bare questions.
  `local_path` is the default local file; a path given at load time overrides it. `in_average` marks the seven
  field benchmarks whose mean is the headline number of a report. `id_field` None numbers the records in file
  order (GSM8K has no ids), which is stable because neither the hub split nor a local file is reordered.
  """

  name: str
  display_name: str
  hf_path: str | None = None
  hf_config: str | None = None
  split: str = "test"
  question_field: str = "question"
  answer_field: str = "answer"
  id_field: str | None = "id"
  answer_transform: Callable[[Any], str] = plain_answer
  local_path: str | None = None
  in_average: bool = False
  prompt_template: str = "{question}"

  def problem(self, record: Mapping[str, Any], index: int) -> Problem:
    """Maps one raw record; the canonical field names are the fallback for normalised local files."""
    question = _field(record, self.question_field, "question", self.name, index)
    answer = _field(record, self.answer_field, "answer", self.name, index)
    if self.id_field is not None and self.id_field in record:
      problem_id = record[self.id_field]
    else:
      problem_id = record.get("id", f"{self.name}-{index:05d}")
    return Problem(id=str(problem_id), question=str(question), answer=self.answer_transform(answer))


def _field(record: Mapping[str, Any], name: str, canonical: str, benchmark: str, index: int) -> Any:
  for key in (name, canonical):
    if key in record and record[key] is not None:
      return record[key]
  raise BenchmarkError(f"{benchmark}: record {index} has no {name!r} field (keys: {sorted(record)})")


_REGISTRY: dict[str, BenchmarkSpec] = {}


def register(spec: BenchmarkSpec) -> BenchmarkSpec:
  """Adds a benchmark to the registry (names are unique: results and reports are keyed by them)."""
  if spec.name in _REGISTRY:
    raise BenchmarkError(f"benchmark {spec.name!r} is already registered")
  _REGISTRY[spec.name] = spec
  return spec


def _field_benchmark(name: str, display_name: str, hf_path: str, **fields) -> BenchmarkSpec:
  """One of the seven benchmarks of the field's protocol: in the average, prompted with R1's directive."""
  return BenchmarkSpec(name, display_name, hf_path, in_average=True, prompt_template=R1_PROMPT_TEMPLATE, **fields)


for _spec in (
    _field_benchmark("aime24", "AIME24", "HuggingFaceH4/aime_2024", split="train", question_field="problem"),
    _field_benchmark("aime25", "AIME25", "math-ai/aime25", split="test", question_field="problem"),
    _field_benchmark("amc23", "AMC23", "math-ai/amc23", split="test"),
    _field_benchmark("math500", "MATH500", "HuggingFaceH4/MATH-500", split="test", question_field="problem",
                     id_field="unique_id"),
    _field_benchmark("gsm8k", "GSM8K", "openai/gsm8k", hf_config="main", split="test", id_field=None,
                     answer_transform=gsm8k_answer),
    # OE_TO_maths_en_COMP: open-ended, text-only, English, competition maths (675 problems).
    _field_benchmark("olympiadbench", "OlympiadBench", "Hothan/OlympiadBench", hf_config="OE_TO_maths_en_COMP",
                     split="train", answer_field="final_answer", answer_transform=joined_answer),
    _field_benchmark("gaokao2023en", "GaoKao2023-En", "MARIO-Math-Reasoning/Gaokao2023-Math-En", split="train"),
    # The tiny reasoner's held-out arithmetic (retro_jax/tasks writes `eval.jsonl`); local only, bare questions.
    BenchmarkSpec("tiny_arith", "TinyArith"),
):
  register(_spec)

# The seven benchmarks of the field's protocol, in the order reports list them.
FIELD_BENCHMARKS: tuple[str, ...] = tuple(name for name, spec in _REGISTRY.items() if spec.in_average)


def get_spec(name: str) -> BenchmarkSpec:
  try:
    return _REGISTRY[name]
  except KeyError:
    raise BenchmarkError(f"unknown benchmark {name!r}; registered: {', '.join(_REGISTRY)}; any other "
                         "name needs a JSONL path (name=path)") from None


def custom_spec(name: str, path: str, *, question_field: str = "question", answer_field: str = "answer",
                id_field: str | None = "id") -> BenchmarkSpec:
  """A spec for any JSONL file of questions and gold answers (not registered: the caller decides)."""
  return BenchmarkSpec(name, name, question_field=question_field, answer_field=answer_field, id_field=id_field,
                       local_path=path)


def _local_records(path: str) -> Iterable[tuple[int, Mapping[str, Any] | None, str | None]]:
  """(line index, record or None, error) of a local benchmark file."""
  if not os.path.isfile(path):
    raise BenchmarkError(f"no such benchmark file: {path}", "check the path in --benchmarks NAME=PATH or --data_dir")
  return ((line.index, line.data if line.error is None else None, line.error) for line in jsonl.read_lines(path))


def load_hf_records(spec: BenchmarkSpec) -> Iterable[Mapping[str, Any]]:
  """The spec's split from the HF hub (or the local `datasets` cache)."""
  if spec.hf_path is None:
    raise BenchmarkError(f"{spec.name} has no HF dataset; give it a local JSONL path ({spec.name}=PATH)")
  try:
    import datasets  # optional dependency: the `[hf]` extra
  except ImportError:
    raise BenchmarkError(f"{spec.name} needs the `datasets` package to load {spec.hf_path} from the hub "
                         "(pip install 'retro_jax[hf]'), or a local JSONL file: "
                         f"--benchmarks {spec.name}=PATH or --data_dir DIR holding {spec.name}.jsonl") from None
  try:
    return datasets.load_dataset(spec.hf_path, spec.hf_config, split=spec.split)
  except Exception as e:  # offline, gated, renamed: all end the same way for the user
    raise BenchmarkError(f"{spec.name}: could not load {spec.hf_path} ({spec.hf_config or 'default'}, "
                         f"{spec.split}) through `datasets`: {type(e).__name__}: {e}. Offline, pass a local "
                         f"JSONL file: --benchmarks {spec.name}=PATH or --data_dir DIR") from e


def load_benchmark(spec: BenchmarkSpec | str, *, path: str | None = None, data_dir: str | None = None,
                   limit: int | None = None, bad_records: list[dict] | None = None) -> list[Problem]:
  """The problems of a benchmark, from the first source that exists: `path`, `<data_dir>/<name>.jsonl`,
  the spec's `local_path`, then the HF hub. `limit` keeps the first records (smoke runs).

  A bad record (a line that is not a JSON object, a missing field, an id seen before) raises BenchmarkError, or,
  when `bad_records` is given, is appended there as `{"benchmark", "record", "reason"}` and left out, so an
  evaluation runs on the good records and reports the bad ones.
  """
  spec = get_spec(spec) if isinstance(spec, str) else spec
  local = path or _in_dir(data_dir, spec.name) or spec.local_path
  records = _local_records(local) if local else ((i, r, None) for i, r in enumerate(load_hf_records(spec)))
  problems, seen = [], set()
  for count, (index, record, error) in enumerate(records):
    if limit is not None and count >= limit:
      break
    try:
      if error is not None:
        raise BenchmarkError(f"{spec.name}: {error}")
      problem = spec.problem(record, index)
      if problem.id in seen:
        raise BenchmarkError(f"{spec.name}: record {index} repeats question id {problem.id!r} (results are keyed "
                             "by id; the first is kept)")
    except BenchmarkError as bad:
      if bad_records is None:
        raise
      bad_records.append({"benchmark": spec.name, "record": index, "reason": str(bad)})
      continue
    seen.add(problem.id)
    problems.append(problem)
  return problems


def _in_dir(data_dir: str | None, name: str) -> str | None:
  if not data_dir:
    return None
  candidate = os.path.join(data_dir, f"{name}.jsonl")
  return candidate if os.path.exists(candidate) else None


def resolve(selection: str | Sequence[str], *, question_field: str = "question", answer_field: str = "answer",
            id_field: str | None = "id") -> list[tuple[BenchmarkSpec, str | None]]:
  """Parses a benchmark selection, e.g. `"aime24,math500,tiny_arith=data/eval.jsonl,mine=my.jsonl"`.

  `name=path` gives a registered benchmark a local file, or makes a custom benchmark of an unknown name (read
  with the given field names). `all` stands for the seven field benchmarks. Returns (spec, path) pairs.
  """
  items = selection.split(",") if isinstance(selection, str) else list(selection)
  resolved: list[tuple[BenchmarkSpec, str | None]] = []
  for item in (i.strip() for i in items):
    if not item:
      continue
    name, _, path = item.partition("=")
    if name == "all":
      resolved.extend((get_spec(n), None) for n in FIELD_BENCHMARKS)
    elif name in _REGISTRY:
      resolved.append((_REGISTRY[name], path or None))
    elif path:
      resolved.append((custom_spec(name, path, question_field=question_field, answer_field=answer_field,
                                   id_field=id_field), path))
    else:
      get_spec(name)  # raises with the list of known names
  seen = [spec.name for spec, _ in resolved]
  if len(set(seen)) != len(seen):
    raise BenchmarkError(f"a benchmark is selected twice: {seen}")
  return resolved
