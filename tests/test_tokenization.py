"""Chat-template rendering (R1-distill and Qwen2.5 ChatML styles) and completion parsing."""
import pytest

from retro_jax import tokenization
from retro_jax.tokenization import load_tokenizer, parse_completion, strip_think_open
from retro_jax.user_errors import UserError
from tests.hf_fixtures import save_char_tokenizer


@pytest.fixture(scope="module")
def r1_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("r1_tok")
  save_char_tokenizer(str(out))
  return str(out)


def test_r1_style_prompt_ends_with_think_opener(r1_dir):
  tok = load_tokenizer(r1_dir)
  prompt = tok.render_prompt("What is 2+3?")
  assert prompt == "<｜begin▁of▁sentence｜><｜User｜>What is 2+3?<｜Assistant｜><think>\n"
  assert tok.decode(tok.encode(prompt)) == prompt
  assert tok.encode("<think>") == [tok.hf.convert_tokens_to_ids("<think>")]  # one special token, not 7 chars


def test_chatml_style_gets_the_think_opener_appended(r1_dir):
  tok = load_tokenizer(r1_dir, template="chatml")
  assert tok.render_prompt("hi", system="be brief") == (
      "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n")


def test_unknown_template_style_is_rejected(r1_dir):
  with pytest.raises(UserError, match="chat_template='llama' is not one of 'auto', 'r1', 'chatml'"):
    load_tokenizer(r1_dir, template="llama")
  with pytest.raises(UserError, match="has no {question}"):
    load_tokenizer(r1_dir, prompt_template="Solve it.")


def test_chatml_without_a_system_turn_gets_qwens_default_one(r1_dir):
  tok = load_tokenizer(r1_dir, template="chatml")
  assert tok.render_prompt("hi").startswith(
      "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
      "<|im_start|>user\nhi<|im_end|>")


def test_prompt_options_apply_to_every_rendered_prompt(r1_dir):
  tok = load_tokenizer(r1_dir, system_prompt="Be brief.", prompt_template=tokenization.R1_PROMPT_TEMPLATE)
  expected = ("<｜begin▁of▁sentence｜>Be brief.<｜User｜>2+3?\nPlease reason step by step, and put your final answer "
              "within \\boxed{}.<｜Assistant｜><think>\n")
  assert tok.render_prompt("2+3?") == expected
  assert tok.render_example("2+3?", "<think>\n5\n</think>")[0] == expected  # SFT renders the same prompt


def test_render_example_strips_opener_and_appends_eos(r1_dir):
  tok = load_tokenizer(r1_dir)
  prompt, completion = tok.render_example("q", "<think>\nstep\n</think>\n\\boxed{1}")
  assert prompt.endswith("<think>\n") and completion == "step\n</think>\n\\boxed{1}<｜end▁of▁sentence｜>"
  assert strip_think_open("no opener here") == "no opener here"


def test_eos_ids_come_from_generation_config(r1_dir, tmp_path):
  import json
  import shutil
  shutil.copytree(r1_dir, tmp_path / "m")
  (tmp_path / "m" / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 1]}))
  assert load_tokenizer(str(tmp_path / "m")).eos_token_ids == (5, 1)


def test_missing_tokenizer_is_a_clear_error(tmp_path):
  with pytest.raises(tokenization.TokenizerError, match="no tokenizer.json"):
    load_tokenizer(str(tmp_path))


@pytest.mark.parametrize("text,thinking,solution,answer,closed", [
    ("<think>\na\n\nb\n</think>\nSo \\boxed{\\frac{1}{2}}.", "\na\n\nb\n", "\nSo \\boxed{\\frac{1}{2}}.",
     "\\frac{1}{2}", True),
    ("a\n\n\\boxed{3}\n</think>\nThe answer is \\fbox{4}", "a\n\n\\boxed{3}\n", "\nThe answer is \\fbox{4}", "4", True),
    ("a \\boxed{7} b\n</think>\nno box here", "a \\boxed{7} b\n", "\nno box here", "7", True),  # fallback
    ("<|begin_of_thought|>x<|end_of_thought|>\\boxed{{1,2}}", "x", "\\boxed{{1,2}}", "{1,2}", True),
    ("truncated \\boxed{12", "truncated \\boxed{12", "", None, False),
])
def test_parse_completion(text, thinking, solution, answer, closed):
  parsed = parse_completion(text)
  assert (parsed.thinking, parsed.solution, parsed.answer, parsed.closed) == (thinking, solution, answer, closed)
