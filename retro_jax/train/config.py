"""Default SFT and DPO configs (ml_collections). Experiment files in configs/ start from these and override.

Every key a trainer reads is defined here with its default, so `--config.key=value` overrides are checked
against a known set (a typo is an error, not a silently ignored key).
"""
from __future__ import annotations

import ml_collections

from retro_jax.tokenization import PROMPT_OPTIONS
from retro_jax.train.data import CORRECT_STATUSES


def _model_defaults() -> ml_collections.ConfigDict:
  """Architecture for init="scratch" (ignored when loading pretrained weights). vocab_size 0 = the tokenizer's."""
  return ml_collections.ConfigDict({
      "vocab_size": 0, "hidden_size": 256, "intermediate_size": 768, "num_layers": 4, "num_heads": 8,
      "num_kv_heads": 2, "head_dim": 32, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
      "tie_word_embeddings": True, "max_position_embeddings": 4096})


def sft_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model_dir = ""  # HF directory: weights, config.json, tokenizer files (init="pretrained")
  c.tokenizer_dir = ""  # default: model_dir (init="scratch" needs one of the two)
  c.init = "pretrained"  # "pretrained" | "scratch" (random init of c.model, e.g. to build the tiny reasoner)
  c.model = _model_defaults()
  c.param_dtype = "float32"  # master weights and optimizer state
  c.compute_dtype = "bfloat16"  # matmul dtype; norms, softmax, logits and the loss stay float32
  c.update(PROMPT_OPTIONS)  # chat_template, system_prompt, prompt_template: as the traces were sampled

  c.data = ml_collections.ConfigDict()
  c.data.train_path = ""  # JSONL
  c.data.eval_path = ""  # JSONL; when empty, eval_fraction of the train records is held out
  c.data.eval_fraction = 0.0
  c.data.question_field = "question"
  c.data.trace_field = "trace"  # "revised_trace" for Retro-Search output records
  c.data.statuses = ",".join(CORRECT_STATUSES)  # records with a `status` (search output) are kept only with one of
  # these (the correct traces); "" keeps every status. Records without a `status` are always kept.
  c.data.seq_len = 2048  # positions per packed row (an example of n tokens fills n - 1)
  c.data.truncation = "drop"  # over-long examples: "drop" | "truncate" (cuts the completion's end)
  c.data.packing = True
  c.data.limit = 0  # read at most this many train records (0 = all)

  c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})  # -1: all remaining devices
  c.batch_size = 8  # global rows per optimizer step
  c.grad_accum_steps = 1  # micro-batches per optimizer step (each batch_size / grad_accum_steps rows)
  c.num_epochs = 1.0
  c.num_train_steps = 0  # > 0 overrides num_epochs
  c.remat = "none"  # "none" | "dots" | "full": per-layer rematerialisation for long sequences
  c.loss_chunk_size = 1024  # sequence positions per logits chunk in the loss

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1e-5
  c.optim.warmup_steps = 0  # > 0 overrides warmup_ratio
  c.optim.warmup_ratio = 0.03
  c.optim.decay = "cosine"  # "cosine" | "linear" | "constant"
  c.optim.min_lr_ratio = 0.0
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.max_grad_norm = 1.0  # 0 = no clipping

  c.seed = 0  # init (scratch), data order, held-out split
  c.workdir = ""  # checkpoints/, tensorboard/, export/ (required)
  c.checkpoint_every_steps = 500  # 0 = only on preemption (SIGTERM)
  c.keep_checkpoints = 2
  c.async_checkpointing = True
  c.log_every_steps = 10
  c.eval_every_steps = 0  # 0 = at the start and the end only
  c.eval_batch_size = 0  # rows; 0 = batch_size / grad_accum_steps
  c.eval_at_start = True
  c.export = True
  c.export_dir = ""  # default: <workdir>/export
  c.export_dtype = ""  # "" = the base checkpoint's dtype (float32 for init="scratch")
  c.peak_flops_per_device = 0.0  # for MFU; 0 = spec-sheet figure of the accelerator (none for CPUs)
  c.tensorboard = True
  return c


def pod_long_trace_sft_config(model_dir: str, train_path: str) -> ml_collections.ConfigDict:
  """A full fine-tune of an R1-scale model on Retro-Search output on a TPU pod: what the paper-setting configs in
  configs/ share. Rows of 16k bf16 positions with full remat (R1 traces run to ~16k tokens), over-long traces
  dropped, the `revised_trace` field, lr 1e-5 cosine over 3 epochs, a log line every step and a bf16 export.
  Each experiment file adds its mesh, batch, warmup, eval split and checkpoint cadence."""
  c = sft_config()
  c.model_dir = model_dir
  c.param_dtype, c.compute_dtype = "float32", "bfloat16"
  c.data.train_path = train_path
  c.data.trace_field = "revised_trace"
  c.data.seq_len = 16384
  c.data.truncation = "drop"
  c.num_epochs = 3.0
  c.remat = "full"
  c.loss_chunk_size = 2048
  c.optim.learning_rate = 1e-5
  c.optim.decay = "cosine"
  c.optim.weight_decay = 0.0
  c.optim.max_grad_norm = 1.0
  c.log_every_steps = 1
  c.eval_every_steps = 50
  c.export_dtype = "bfloat16"
  return c


def dpo_config() -> ml_collections.ConfigDict:
  c = sft_config()
  del c.data.trace_field, c.data.statuses
  c.data.chosen_field = "chosen"
  c.data.rejected_field = "rejected"
  c.optim.learning_rate = 5e-7
  c.optim.warmup_ratio = 0.1
  c.dpo = ml_collections.ConfigDict()
  c.dpo.beta = 0.1
  c.dpo.label_smoothing = 0.0  # ε of conservative DPO: the preference label is trusted with prob. 1 - ε
  c.dpo.mask_shared_prefix = False  # drop the tokens chosen and rejected share as a prefix (CoT-aware DPO)
  c.dpo.sft_weight = 0.0  # α of L_DPO + α·L_SFT (NLL of the chosen responses)
  return c
