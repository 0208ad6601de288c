"""The tiny reasoner's tokenizer: a small byte-level BPE with an R1-distill chat template.

Why this shape:
- **Byte-level BPE** (GPT-2/Qwen2 style) round-trips any text exactly, including the `\\n\\n` step
  separators, spaces and LaTeX, because every byte has a token; training merges on the task's own traces then
  makes each word of the small, regular vocabulary one token, so sequences stay short.
- **Digits are single tokens**: the pre-tokenizer regex is Qwen2's, which isolates every digit (`\\p{N}`),
  and no merge can cross a pre-token. Multi-digit numbers are then spelled the same way everywhere, which is
  what lets a tiny model learn the arithmetic.
- **R1-distill special tokens** as single tokens, so prompts render exactly like DeepSeek-R1-Distill's.
  As there, `<｜User｜>`, `<｜Assistant｜>`, `<think>` and `</think>` are added tokens that are *not* special:
  decoding with `skip_special_tokens=True` keeps them (the think tags are part of the trace text).
- About 400 tokens in all (256 bytes + ~140 merges + 7 added tokens): training stops when every word of the
  task is one token, so embeddings stay a small share of the model.

The saved directory (`tokenizer.json`, `tokenizer_config.json`) loads with
`transformers.AutoTokenizer.from_pretrained(dir)` offline.
"""
from __future__ import annotations

import json
import os
import pathlib
import random
import re
from typing import Iterable, Iterator

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from retro_jax.tasks import arithmetic, trace_writer

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)  # ids 0, 1, 2
CHAT_TOKENS = (USER_TOKEN, ASSISTANT_TOKEN, THINK_START, THINK_END)  # added, not special (as in R1-distill)

DEFAULT_VOCAB_SIZE = 512  # an upper bound: the task runs out of merges first, at about 400
_CHAT_TOKEN_SPLIT = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS + CHAT_TOKENS))

# Qwen2's pre-tokenizer pattern: letters with an optional leading non-letter, single digits, punctuation runs,
# newline runs, other white space.
_PRETOKENIZE_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                        r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# DeepSeek-R1-Distill's template, without tool calls: a system message goes right after BOS, earlier
# assistant turns lose their reasoning (everything up to `</think>`), and the generation prompt opens the
# thinking with `<think>\n` so the model always reasons.
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}")


def render_prompt(question: str) -> str:
  """The generation prompt for one question, as `CHAT_TEMPLATE` renders it (for corpora and length budgets)."""
  return f"{BOS_TOKEN}{USER_TOKEN}{question}{ASSISTANT_TOKEN}{trace_writer.THINK_OPEN}"


def training_corpus(seed: int = 0, num_problems: int = 3000) -> Iterator[str]:
  """Prompts and traces of every level and failure mode, so every phrase of the task gets its merges.

  Rates are set high (rather than to the defaults) so the rarer phrases are frequent enough to be merged
  into single tokens.
  """
  config = trace_writer.TraceConfig(overthink_rate=0.6, underthink_rate=0.6, alt_wrong_rate=0.5)
  rng = random.Random(f"tokenizer-corpus-{seed}")
  for i in range(num_problems):
    problem = arithmetic.sample_problem(rng, 1 + i % 5, f"corpus-{i}")
    text = render_prompt(problem.question) + trace_writer.write_trace(problem, config, rng).text
    # The chat tokens are whole tokens on encode; cut them out so no merges are spent on their pieces.
    yield from filter(None, _CHAT_TOKEN_SPLIT.split(text))


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> tokenizers.Tokenizer:
  """Trains byte-level BPE on `texts` and adds the chat tokens."""
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(_PRETOKENIZE_PATTERN), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size - len(CHAT_TOKENS), special_tokens=list(SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tokenizer.train_from_iterator(texts, trainer=trainer)
  tokenizer.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in CHAT_TOKENS])
  return tokenizer


def tokenizer_config() -> dict:
  """`tokenizer_config.json` for `PreTrainedTokenizerFast`; no BOS is added on encode (the template does)."""
  return {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": BOS_TOKEN,
      "eos_token": EOS_TOKEN,
      "pad_token": PAD_TOKEN,
      "add_bos_token": False,
      "add_eos_token": False,
      "clean_up_tokenization_spaces": False,
      "model_max_length": 1024,
      "chat_template": CHAT_TEMPLATE,
  }


def build_tokenizer(out_dir: str | os.PathLike, seed: int = 0,
                    vocab_size: int = DEFAULT_VOCAB_SIZE) -> pathlib.Path:
  """Trains the tokenizer on a deterministic task corpus and saves it in HF format; returns `out_dir`."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  tokenizer = train_tokenizer(training_corpus(seed), vocab_size)
  tokenizer.save(str(out / "tokenizer.json"))
  with open(out / "tokenizer_config.json", "w", encoding="utf-8") as f:
    json.dump(tokenizer_config(), f, ensure_ascii=False, indent=2)
  return out
