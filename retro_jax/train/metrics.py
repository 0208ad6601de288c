"""Training FLOPs, device peak FLOP/s (for MFU), and the metrics writer (console + TensorBoard event files)."""
from __future__ import annotations

import os
from typing import Mapping

import jax

from retro_jax.models.config import Qwen2Config

# Dense bf16 peak per chip / GPU from the vendors' spec sheets, by a substring of `device.device_kind`.
# Longest match wins ("TPU v5 lite" before "TPU v5").
PEAK_BF16_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,  # v5p reports itself as "TPU v5"
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "H100": 989e12,  # SXM; dense (no sparsity)
    "H200": 989e12,
    "A100": 312e12,
}


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
  """Spec-sheet dense bf16 FLOP/s of `device`, or None when unknown (CPUs: pass a measured figure instead)."""
  kind = (device or jax.devices()[0]).device_kind
  matches = [k for k in PEAK_BF16_FLOPS if k.lower() in kind.lower()]
  return PEAK_BF16_FLOPS[max(matches, key=len)] if matches else None


def training_flops_per_token(config: Qwen2Config, seq_len: int) -> float:
  """Model FLOPs of one trained token (forward + backward = 3 x forward), MaxText-style accounting.

  Forward per token: 2 FLOPs per weight of every matmul (q, k, v, o, gate, up, down and the lm head; the
  embedding lookup is free), plus causal attention over a `seq_len` row: QK^T and PV at 2 FLOPs per
  multiply-add over seq_len / 2 keys on average. Rematerialisation and masked-out work are not counted, so
  this is MFU, not hardware utilisation.
  """
  d, f, h = config.hidden_size, config.intermediate_size, config.head_dim
  n, k, layers = config.num_heads, config.num_kv_heads, config.num_layers
  matmul_weights = layers * (d * h * (2 * n + 2 * k) + 3 * d * f) + d * config.vocab_size
  attention = layers * 2 * 2 * n * h * (seq_len / 2)
  return 3.0 * (2.0 * matmul_weights + attention)


def mfu(tokens_per_second: float, flops_per_token: float, num_devices: int,
        peak_per_device: float | None) -> float | None:
  """Model FLOPs utilisation in [0, 1]; None without a peak figure."""
  if not peak_per_device:
    return None
  return tokens_per_second * flops_per_token / (num_devices * peak_per_device)


class MetricsWriter:
  """Scalars to the console (one line per log step) and to TensorBoard event files under `log_dir`.

  Only process 0 writes, so a multi-host job produces one set of event files.
  """

  def __init__(self, log_dir: str | None, prefix: str):
    self.prefix = prefix
    self.writer = None
    if log_dir and jax.process_index() == 0:
      from tensorboardX import SummaryWriter  # deferred: only runs that log need it
      os.makedirs(log_dir, exist_ok=True)
      self.writer = SummaryWriter(log_dir)

  def write(self, step: int, scalars: Mapping[str, float | None], split: str = "train") -> None:
    shown = {k: v for k, v in scalars.items() if v is not None}
    if jax.process_index() == 0:
      text = " ".join(f"{k}={_format(v)}" for k, v in shown.items())
      print(f"[{self.prefix}] {split} step {step}: {text}", flush=True)
    if self.writer is not None:
      for key, value in shown.items():
        self.writer.add_scalar(f"{split}/{key}", float(value), step)
      self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


def _format(value: float) -> str:
  if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 1):
    return f"{int(value)}"
  return f"{value:.4g}"
