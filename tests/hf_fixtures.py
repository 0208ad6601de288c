"""Tiny random transformers Qwen2 models and tokenizers saved to disk: the independent reference of the tests."""
from __future__ import annotations

import os

import numpy as np


def save_tiny_qwen2(out_dir: str, *, vocab_size: int = 96, hidden_size: int = 64, intermediate_size: int = 128,
                    num_layers: int = 2, num_heads: int = 8, num_kv_heads: int = 2, rope_theta: float = 1e4,
                    tie_word_embeddings: bool = False, rope_scaling: dict | None = None, seed: int = 0,
                    max_shard_size: str | None = None, dtype: str = "float32", **extra):
  """Builds a random `transformers.Qwen2ForCausalLM`, saves it with save_pretrained (safetensors), returns it."""
  import torch
  import transformers

  # transformers 5 takes RoPE settings as `rope_parameters` (and writes the 5.x config.json dialect).
  rope_parameters = {"rope_type": "default", **(rope_scaling or {}), "rope_theta": rope_theta}
  config = transformers.Qwen2Config(
      vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
      num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
      rope_parameters=rope_parameters, tie_word_embeddings=tie_word_embeddings, max_position_embeddings=512,
      bos_token_id=0, eos_token_id=1, **extra)
  torch.manual_seed(seed)
  model = transformers.Qwen2ForCausalLM(config).eval()
  with torch.no_grad():  # random biases too, so a dropped bias cannot hide behind zero init
    for layer in model.model.layers:
      for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
        proj.bias.normal_(0, 0.1)
      for norm in (layer.input_layernorm, layer.post_attention_layernorm):
        norm.weight.normal_(1.0, 0.1)
  if dtype == "bfloat16":
    model = model.to(torch.bfloat16)
  kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
  model.save_pretrained(out_dir, **kwargs)
  return model


def torch_logits(model, tokens: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
  import torch

  with torch.no_grad():
    kwargs = {}
    if attention_mask is not None:
      kwargs["attention_mask"] = torch.tensor(attention_mask)
      kwargs["position_ids"] = torch.tensor(np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None))
    return model(torch.tensor(tokens), **kwargs).logits.float().numpy()


def save_char_tokenizer(out_dir: str, extra_chars: str = "") -> None:
  """A character-level HF tokenizer with R1-distill special tokens and chat template (for engine/CLI tests)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  from retro_jax.tokenization import R1_TEMPLATE

  specials = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]
  chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n.,:;!?()[]{}\\/+-*=^_'\"<>|"
                     + extra_chars))
  vocab = {t: i for i, t in enumerate(specials + chars)}
  tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="?"))
  tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
  tokenizer.decoder = decoders.Fuse()
  tokenizer.add_special_tokens(specials)
  fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=specials[0], eos_token=specials[1],
                                 pad_token=specials[1])
  fast.chat_template = R1_TEMPLATE
  fast.save_pretrained(out_dir)
  assert os.path.exists(os.path.join(out_dir, "tokenizer.json"))
