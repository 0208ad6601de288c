"""Tokenizer loading (HF `tokenizer.json` + `tokenizer_config.json`) and chat-template rendering.

Prompts are rendered with the checkpoint's own chat template, so DeepSeek-R1-Distill checkpoints get
`<｜begin▁of▁sentence｜><｜User｜>…<｜Assistant｜><think>\\n` and Qwen2.5 ones ChatML, exactly as they were trained.
Every prompt we render ends with the thinking opener (`<think>\\n`), whether or not the template adds it, so a
trace (the assistant text) always continues a prompt the same way in generation, search and training.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

from retro_jax.grading import extract_final_answer

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
THOUGHT_OPEN, THOUGHT_CLOSE = "<|begin_of_thought|>", "<|end_of_thought|>"  # OpenThoughts / Sky-T1 style

# Used only when tokenizer_config.json has no chat_template (the templates of the two published families).
R1_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}")
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEMPLATES = {"r1": R1_TEMPLATE, "chatml": CHATML_TEMPLATE}


class TokenizerError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class ParsedCompletion:
  thinking: str  # between the opener (or the start) and the closer
  solution: str  # after the closer; "" when the thinking never closed
  answer: str | None  # grading.extract_final_answer: last box of the solution, else of the whole text
  closed: bool  # whether the thinking closed (a truncated trace has not)


def parse_completion(text: str) -> ParsedCompletion:
  """Splits an assistant completion into thinking, solution and final boxed answer (either marker style)."""
  for opener, closer in ((THINK_OPEN, THINK_CLOSE), (THOUGHT_OPEN, THOUGHT_CLOSE)):
    if closer in text or opener in text:
      break
  body = text.split(opener, 1)[1] if opener in text else text
  if closer in body:
    thinking, solution = body.split(closer, 1)
    closed = True
  else:
    thinking, solution, closed = body, "", False
  return ParsedCompletion(thinking=thinking, solution=solution, answer=extract_final_answer(text),
                          closed=closed)


class Tokenizer:
  """Thin wrapper over an HF fast tokenizer with the few operations the pipeline needs."""

  def __init__(self, hf_tokenizer, *, template: str = "auto", eos_token_ids: Sequence[int] = ()):
    self.hf = hf_tokenizer
    if template != "auto":
      if template not in TEMPLATES:
        raise TokenizerError(f"unknown chat template style {template!r}; use 'auto', 'r1' or 'chatml'")
      self.hf.chat_template = TEMPLATES[template]
    elif not getattr(self.hf, "chat_template", None):
      vocab = self.hf.get_vocab()
      self.hf.chat_template = CHATML_TEMPLATE if "<|im_start|>" in vocab else R1_TEMPLATE
    ids = list(eos_token_ids)
    if self.hf.eos_token_id is not None and self.hf.eos_token_id not in ids:
      ids.append(self.hf.eos_token_id)
    if not ids:
      raise TokenizerError("tokenizer has no eos token and generation_config.json names none")
    self.eos_token_ids: tuple[int, ...] = tuple(ids)
    self.pad_token_id: int = self.hf.pad_token_id if self.hf.pad_token_id is not None else ids[0]
    self.eos_text: str = self.hf.convert_ids_to_tokens(ids[0])

  @property
  def vocab_size(self) -> int:
    return len(self.hf)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` with no special tokens added (rendered prompts already carry theirs)."""
    return self.hf.encode(text, add_special_tokens=False)

  def decode(self, ids: Sequence[int]) -> str:
    return self.hf.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

  def render_prompt(self, question: str, system: str | None = None) -> str:
    """The full prompt text, ending with the thinking opener, ready for the model's thinking."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not text.rstrip().endswith(THINK_OPEN):
      text += THINK_OPEN + "\n"
    return text

  def render_example(self, question: str, trace: str, system: str | None = None) -> tuple[str, str]:
    """(prompt, completion) for training: the completion is the trace after its opener, ended by eos."""
    return self.render_prompt(question, system), strip_think_open(trace) + self.eos_text


def strip_think_open(trace: str) -> str:
  """A trace without its leading `<think>\\n` (our prompts already end with it)."""
  stripped = trace.lstrip()
  if stripped.startswith(THINK_OPEN):
    return stripped[len(THINK_OPEN):].lstrip("\n")
  return trace


def load_tokenizer(model_dir: str, *, template: str = "auto") -> Tokenizer:
  """Loads `tokenizer.json` + `tokenizer_config.json` from a local HF directory (no hub access)."""
  from transformers import AutoTokenizer  # deferred: transformers import is slow and not needed by the model

  if not os.path.exists(os.path.join(model_dir, "tokenizer.json")):
    raise TokenizerError(f"no tokenizer.json in {model_dir!r}")
  hf = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
  eos_ids: list[int] = []
  generation_config = os.path.join(model_dir, "generation_config.json")
  if os.path.exists(generation_config):
    with open(generation_config, encoding="utf-8") as f:
      eos = json.load(f).get("eos_token_id")
    eos_ids = list(eos) if isinstance(eos, list) else ([eos] if eos is not None else [])
  return Tokenizer(hf, template=template, eos_token_ids=eos_ids)
