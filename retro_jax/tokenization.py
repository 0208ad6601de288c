"""Tokenizer loading (HF `tokenizer.json` + `tokenizer_config.json`) and chat-template rendering.

Prompts are rendered with the checkpoint's own chat template, so DeepSeek-R1-Distill checkpoints get
`<｜begin▁of▁sentence｜><｜User｜>…<｜Assistant｜><think>\\n` and Qwen2.5 ones ChatML, exactly as they were trained.
Every prompt we render ends with the thinking opener (`<think>\\n`), whether or not the template adds it, so a
trace (the assistant text) always continues a prompt the same way in generation, search and training.

What a prompt holds besides the question is set in one place for every command (`generate`, `search`, `eval`,
`sft`): the config keys `chat_template`, `system_prompt` and `prompt_template` (`PROMPT_OPTIONS`), which
`load_tokenizer` turns into a `Tokenizer` whose `render_prompt` / `render_example` apply them. A model trained
on prompts of one format should be sampled and evaluated with the same one.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

from retro_jax.grading import extract_final_answer
from retro_jax.user_errors import UserError, check_choice

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
THOUGHT_OPEN, THOUGHT_CLOSE = "<|begin_of_thought|>", "<|end_of_thought|>"  # OpenThoughts / Sky-T1 style

# Used only when tokenizer_config.json has no chat_template (the templates of the two published families).
R1_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}")
QWEN_DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
CHATML_TEMPLATE = (  # Qwen2.5's: a conversation without a system turn gets Qwen's default one
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + QWEN_DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEMPLATES = {"r1": R1_TEMPLATE, "chatml": CHATML_TEMPLATE}

# The prompt options every command's config carries, with their defaults (see the module docstring).
PROMPT_OPTIONS = {
    "chat_template": "auto",  # "auto" (the tokenizer's own, else R1 or ChatML by its vocabulary) | "r1" | "chatml"
    "system_prompt": "",  # "": no system turn (the ChatML fallback then adds Qwen's default one)
    "prompt_template": "{question}",  # the user turn; {question} is replaced (plain text, LaTeX braces are safe)
}
R1_PROMPT_TEMPLATE = "{question}\nPlease reason step by step, and put your final answer within \\boxed{}."


class TokenizerError(UserError, ValueError):
  """A tokenizer or prompt format that cannot be used as given."""


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

  def __init__(self, hf_tokenizer, *, template: str = "auto", eos_token_ids: Sequence[int] = (),
               system_prompt: str = "", prompt_template: str = "{question}"):
    self.hf = hf_tokenizer
    check_choice("chat_template", template, ("auto", *TEMPLATES))
    if "{question}" not in prompt_template:
      raise TokenizerError(f"prompt_template {prompt_template!r} has no {{question}}",
                           "put {question} where the question goes, e.g. " + repr(R1_PROMPT_TEMPLATE))
    self.system_prompt, self.prompt_template = system_prompt, prompt_template
    if template != "auto":
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
    """The full prompt text, ending with the thinking opener, ready for the model's thinking: the question in
    `prompt_template`, after `system` (default: the tokenizer's `system_prompt`)."""
    system = self.system_prompt if system is None else system
    user_turn = self.prompt_template.replace("{question}", question)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_turn}]
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


def load_tokenizer(model_dir: str, *, template: str = "auto", system_prompt: str = "",
                   prompt_template: str = "{question}") -> Tokenizer:
  """Loads `tokenizer.json` + `tokenizer_config.json` from a local HF directory (no hub access); the prompt
  options are those of `PROMPT_OPTIONS`."""
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
  return Tokenizer(hf, template=template, eos_token_ids=eos_ids, system_prompt=system_prompt,
                   prompt_template=prompt_template)


def load_tokenizer_for(model_dir: str, config) -> Tokenizer:
  """The tokenizer of `model_dir` with the prompt options of a command's config (the keys of PROMPT_OPTIONS)."""
  return load_tokenizer(model_dir, template=config.chat_template, system_prompt=config.system_prompt,
                        prompt_template=config.prompt_template)
