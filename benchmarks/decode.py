"""Decode benchmark: our engine against transformers' `generate` (torch), plus the memory-bandwidth limit and a
Retro-Search-shaped prefix-reuse workload. Writes one JSON file; it is not a test.

Both sides run the same config (random weights), batch, prompt length and number of new tokens, greedy, with
EOS off so every sample decodes exactly `--new-tokens` tokens. Ours runs through the public driver
(`Driver.generate`), prefix cache off, after an ahead-of-time warm-up; compile time is reported apart.

Figures per (model, batch):
- ttft_s: wall time of the same batch with max_new_tokens=1 (every prompt prefilled, first tokens on the host);
- tok_s: batch * new_tokens / wall time; decode_tok_s: batch * (new_tokens - 1) / (wall - ttft);
- bandwidth: bytes one decode step must read (all weights + the KV of every live token, at the mean context
  length) over the measured device copy bandwidth gives the fastest possible step; `fraction` is our decode
  speed over that limit.
The peer runs on CUDA when JAX does, else on the host CPU. On TPU that makes the two sides different hardware, so
there the JSON names each side's device and holds no speedup (`speedup_omitted` says why).
Retro-Search workload: a question plus one trace of `--trace-tokens` tokens, one rollout from each of 10 nested
prefixes (question + trace[:k/10]), R1 sampling, all in flight together; prefill tokens computed and wall time
with and without prefix reuse, and whether the outputs are identical.
Paged KV vs dense rows (`paged`), the same driver and model, greedy so outputs must match token for token:
- short: `--paged-slots` prompts of 1,000 tokens decoding 64: decode tok/s of both (the median of 3 runs);
- long: Retro-Search-shaped records with traces of 1k..`--paged-max-trace` tokens, a rollout of
  `--rollout-tokens` from each of 8 nested prefixes of every trace, all records in flight on `--paged-slots` slots
  with max_seq_len = the longest trace + rollout (one timed run each: the prefills of 32k traces take minutes on
  CPU): KV bytes dense rows reserve vs the most the paged pool held,
  then the same records on a paged pool of half that peak (requests wait or are preempted);
- parity on `--paged-parity-model` (default the 0.5B shape): n samples, a prefix-cache hit and an exhausted pool.
int8 KV (`int8`): an int8 paged pool against a bfloat16 one on that shape in bfloat16, greedy: samples whose tokens
all match, where the others first differ, the largest log-prob difference before that.

CPU (about 5 minutes on 2 cores):
  python benchmarks/decode.py --out runs/benchmarks/decode_cpu.json
GPU (bf16, batches 1..256, 2k-token trace):
  python benchmarks/decode.py --runs 0.5b:1,8,64,256 1.5b:1,8,64,256 --dtype bfloat16 --prompt-len 128 \
      --new-tokens 128 --retro-model 1.5b --trace-tokens 2048 --out runs/benchmarks/decode_gpu.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from importlib import metadata

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retro_jax.engine import Driver, GenerationRequest, Qwen2Engine, R1_SAMPLING
from retro_jax.engine.paging import pages_for
from retro_jax.engine.qwen2_engine import bucket
from retro_jax.jsonl import write_json
from retro_jax.models.config import SHAPES as PUBLISHED_SHAPES
from retro_jax.models.config import Qwen2Config
from retro_jax.models.kv_cache import bytes_per_token
from retro_jax.models.qwen2 import Qwen2ForCausalLM

# Qwen2.5 shapes (random weights); "tiny" is a test-sized model where overheads dominate.
SHAPES = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, tie_word_embeddings=False),
    "0.5b": PUBLISHED_SHAPES["qwen2.5-0.5b"],
    "1.5b": PUBLISHED_SHAPES["qwen2.5-1.5b"],
}


class _NullTokenizer:
  """Token-level benchmark: nothing is decoded to text except at finish."""

  def encode(self, text):
    return []

  def decode(self, ids):
    return ""


def _config(name: str, dtype: str) -> Qwen2Config:
  return Qwen2Config(**SHAPES[name], rope_theta=1e6, param_dtype=dtype, dtype=dtype)


def _our_model(config: Qwen2Config) -> Qwen2ForCausalLM:
  """Random weights initialised inside one jit (no host copy of a multi-GB model)."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Qwen2ForCausalLM(config, nnx.Rngs(0))))
  return nnx.merge(graphdef, jax.jit(lambda: nnx.state(Qwen2ForCausalLM(config, nnx.Rngs(0))))())


def _hf_model(config: Qwen2Config, device: str):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  hf_config = transformers.Qwen2Config(
      vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
      num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
      num_key_value_heads=config.num_kv_heads, tie_word_embeddings=config.tie_word_embeddings,
      rope_theta=config.rope_theta, max_position_embeddings=32768)
  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[config.dtype]
  model = transformers.Qwen2ForCausalLM(hf_config).to(device=device, dtype=torch_dtype).eval()
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = 0
  return model


def _median_time(fn, repeats: int) -> float:
  return _interleaved({"fn": fn}, repeats)["fn"]


def _interleaved(fns: dict, repeats: int, settle_s: float = 0.3) -> dict[str, float]:
  """Median wall time of each function, run in turns so load from other processes hits all of them alike.

  Each run starts `settle_s` after the previous one ended: idle OpenMP / Eigen worker threads spin for a
  while after a call (torch's measurably slowed the next XLA call on a 2-core box).
  """
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      time.sleep(settle_s)
      tic = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - tic)
  return {name: statistics.median(t) for name, t in times.items()}


def copy_bandwidth(mib: int) -> dict:
  """Copy bandwidth in bytes/s (read + write of a `mib` MiB float32 array, best of 5).

  Measured with a jitted elementwise op on the device and, on CPU, with NumPy's copy too: XLA:CPU runs large
  elementwise ops on one thread, which understates what the memory system delivers. The larger figure is the
  limit (the conservative choice for our fraction of it).
  """
  x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
  bump = jax.jit(lambda a: a + 1.0)
  bump(x).block_until_ready()
  out = dict(jax_elementwise=2 * x.nbytes / min(_median_time(lambda: bump(x).block_until_ready(), 1)
                                                for _ in range(5)))
  if jax.default_backend() == "cpu":
    src, dst = np.ones(x.shape, np.float32), np.ones(x.shape, np.float32)  # touched pages, not calloc zeros
    out["numpy_copy"] = 2 * src.nbytes / min(_median_time(lambda: np.copyto(dst, src), 1) for _ in range(5))
  out["limit"] = max(out.values())
  return out


def _engine_options(args) -> dict:
  return dict(decode_steps=args.decode_steps, max_prefill_batch=args.max_prefill_batch,
              max_prefill_tokens=args.max_prefill_tokens, kv_page_size=args.kv_page_size)


def _pow2(n: int) -> int:
  return 1 << (n - 1).bit_length()


def _bandwidth(config: Qwen2Config, batch: int, context: float, measured_tok_s: float, bw: float) -> dict:
  step_bytes = (config.num_params * jnp.dtype(config.jnp_param_dtype).itemsize
                + batch * context * bytes_per_token(config))
  limit_tok_s = batch / (step_bytes / bw)
  return dict(bytes_per_step=step_bytes, limit_tok_s=limit_tok_s, fraction=measured_tok_s / limit_tok_s)


def bench_decode(name: str, batches: list[int], args, bw: float, hf_device: str) -> list[dict]:
  config = _config(name, args.dtype)
  model = _our_model(config)
  hf = _hf_model(config, hf_device) if args.hf else None
  return [_bench_batch(name, config, model, hf, batch, args, bw, hf_device) for batch in batches]


def _bench_batch(name: str, config: Qwen2Config, model, hf, batch: int, args, bw: float, hf_device: str) -> dict:
  """One (model, batch) row; a function so its engine and decode state are freed before the next batch."""
  rng = np.random.default_rng(batch)
  prompts = [tuple(rng.integers(0, config.vocab_size, args.prompt_len).tolist()) for _ in range(batch)]
  engine = Qwen2Engine(model, max_concurrent_decodes=batch,
                       max_seq_len=args.max_seq_len or _pow2(args.prompt_len + args.new_tokens),
                       eos_token_ids=(), **_engine_options(args))
  driver = Driver(engine, _NullTokenizer(), prefix_cache_bytes=0, progress=False)
  tic = time.perf_counter()
  driver.warmup(prefill_lengths=[bucket(args.prompt_len, engine.prefill_buckets[0], engine.max_seq_len)])
  compile_s = time.perf_counter() - tic
  requests = lambda n: [GenerationRequest(prompt_tokens=p, max_new_tokens=n) for p in prompts]
  runs = {"ttft": lambda: driver.generate(requests(1)),
          "full": lambda: driver.generate(requests(args.new_tokens))}
  if hf is not None:
    runs.update(_hf_runs(hf, prompts, args.new_tokens, hf_device))
    torch_threads = None if hf_device == "cuda" else _pick_torch_threads(hf, prompts, args.torch_threads,
                                                                         hf_device)
  for key in ("ttft", "hf_ttft"):  # untimed: allocation, torch's first calls
    runs.get(key, lambda: None)()
  times = _interleaved(runs, args.repeats)
  context = args.prompt_len + args.new_tokens / 2
  ours = _figures(times["ttft"], times["full"], batch, args.new_tokens)
  ours["compile_s"] = compile_s
  row = dict(model=name, batch=batch, dtype=args.dtype, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
             ours=ours, bandwidth=_bandwidth(config, batch, context, ours["decode_tok_s"], bw))
  if hf is not None:
    row["transformers"] = _figures(times["hf_ttft"], times["hf_full"], batch, args.new_tokens)
    row["transformers"].update(torch_threads=torch_threads, device=hf_device)
    ours["device"] = jax.default_backend()
    if {"cuda": "gpu"}.get(hf_device, hf_device) == jax.default_backend():
      row["speedup_tok_s"] = ours["tok_s"] / row["transformers"]["tok_s"]
      row["speedup_ttft"] = row["transformers"]["ttft_s"] / ours["ttft_s"]
    else:
      row["speedup_omitted"] = f"JAX runs on {jax.default_backend()}, transformers on the host {hf_device}"
  print(json.dumps(row), flush=True)
  return row


def _figures(ttft: float, full: float, batch: int, new_tokens: int) -> dict:
  return dict(ttft_s=ttft, wall_s=full, tok_s=batch * new_tokens / full,
              decode_tok_s=batch * (new_tokens - 1) / max(full - ttft, 1e-9))


def _hf_runs(hf, prompts, new_tokens: int, device: str) -> dict:
  import torch  # pylint: disable=import-outside-toplevel

  ids = torch.tensor(prompts, device=device)
  mask = torch.ones_like(ids)

  def run(n):
    with torch.inference_mode():
      hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    if device == "cuda":
      torch.cuda.synchronize()

  return {"hf_ttft": lambda: run(1), "hf_full": lambda: run(new_tokens)}


def _pick_torch_threads(hf, prompts, choice: str, device: str) -> int:
  """Torch's intra-op threads: `choice` as given, or for "auto" the faster of 1 and all cores on a short run.

  On a shared 2-core box torch's OpenMP threads spin at barriers and collapse (100x measured) when another
  process holds a core; one thread does not, so "auto" keeps the comparison fair to transformers.
  """
  import torch  # pylint: disable=import-outside-toplevel

  if choice != "auto":
    torch.set_num_threads(int(choice))
    return int(choice)
  candidates = sorted({1, os.cpu_count()})
  short = _hf_runs(hf, prompts[:8], 4, device)["hf_full"]
  timings = {}
  for threads in candidates:
    torch.set_num_threads(threads)
    short()
    timings[threads] = _median_time(short, 1)
  best = min(timings, key=timings.get)
  torch.set_num_threads(best)
  return best


def bench_retro_search(args) -> dict:
  """One record: rollouts from 10 nested prefixes of one trace, with and without prefix reuse."""
  config = _config(args.retro_model, args.dtype)
  model = _our_model(config)
  question, boundaries = 64, 10
  max_len = _pow2(question + args.trace_tokens + args.rollout_tokens)
  engine = Qwen2Engine(model, max_concurrent_decodes=args.retro_slots, max_seq_len=max_len, eos_token_ids=(),
                       **_engine_options(args))

  def workload(seed):
    rng = np.random.default_rng(seed)
    text = rng.integers(0, config.vocab_size, question + args.trace_tokens).tolist()
    cuts = [question + args.trace_tokens * k // boundaries for k in range(1, boundaries + 1)]
    return [GenerationRequest(prompt_tokens=tuple(text[:c]), max_new_tokens=args.rollout_tokens,
                              sampling=R1_SAMPLING, seed=k) for k, c in enumerate(cuts)]

  out = dict(model=args.retro_model, dtype=args.dtype, trace_tokens=args.trace_tokens, question_tokens=question,
             prefixes=boundaries, rollout_tokens=args.rollout_tokens, slots=args.retro_slots)
  outputs = {}
  for reuse in (False, True):
    driver = Driver(engine, _NullTokenizer(), prefix_cache_bytes=(2 << 30) if reuse else 0, progress=False)
    driver.generate(workload(seed=1))  # same shapes, other tokens: compiles what the measured run needs
    if driver.prefix_cache is not None:
      driver.prefix_cache.clear()
    requests = workload(seed=0)
    tic = time.perf_counter()
    results = driver.generate(requests)
    wall = time.perf_counter() - tic
    outputs[reuse] = [r.samples[0].tokens for r in results]
    key = "with_reuse" if reuse else "without_reuse"
    out[key] = dict(wall_s=wall, prompt_tokens=sum(len(r.prompt_tokens) for r in requests),
                    prompt_tokens_computed=sum(r.prompt_tokens_computed for r in results))
  out["prefill_reduction"] = (out["without_reuse"]["prompt_tokens_computed"]
                              / out["with_reuse"]["prompt_tokens_computed"])
  out["wall_speedup"] = out["without_reuse"]["wall_s"] / out["with_reuse"]["wall_s"]
  out["identical_outputs"] = outputs[False] == outputs[True]
  print(json.dumps(out), flush=True)
  return out


def _timed_run(engine: Qwen2Engine, requests, repeats: int, **driver_kw) -> tuple[list, dict]:
  """One driver over `engine`: the requests once to compile, then `repeats` timed runs (the prefix cache cleared
  before each); figures of the run with the median wall time."""
  driver = Driver(engine, _NullTokenizer(), progress=False, **driver_kw)
  driver.generate(requests)
  runs = []
  for _ in range(repeats):
    if driver.prefix_cache is not None:
      driver.prefix_cache.clear()
    before = dict(vars(driver.stats))
    tic = time.perf_counter()
    results = driver.generate(requests)
    wall = time.perf_counter() - tic
    stats = {k: v - before[k] if k != "peak_kv_pages" else v for k, v in vars(driver.stats).items()}
    stats.update(wall_s=wall, tok_s=stats["generated_tokens"] / wall,
                 decode_tok_s=stats["generated_tokens"] / max(stats["decode_seconds"], 1e-9))
    runs.append(stats)
  stats = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
  stats["wall_s_all"] = [r["wall_s"] for r in runs]
  return [[s.tokens for s in r.samples] for r in results], stats


def _paged_vs_dense(model, config, requests, slots: int, max_len: int, args, pool_fraction: float = 1.0,
                    repeats: int = 1, dense_run: tuple | None = None) -> dict:
  """The same requests through dense rows and a paged pool (of `pool_fraction` of the dense bytes); `dense_run`:
  the dense side's (outputs, figures) from an earlier call on the same requests. The dense side's run is kept in
  the result under "dense_run"."""
  dense_bytes = slots * max_len * bytes_per_token(config)
  page_bytes = args.kv_page_size * bytes_per_token(config)
  options = dict(_engine_options(args), max_concurrent_decodes=slots, max_seq_len=max_len, eos_token_ids=())
  dense_out, dense = dense_run or _timed_run(
      Qwen2Engine(model, **dict(options, kv_page_size=0), kv_memory_bytes=dense_bytes), requests, repeats)
  pool = int(pool_fraction * dense_bytes) // page_bytes * page_bytes
  paged_engine = Qwen2Engine(model, **options, kv_memory_bytes=pool)
  paged_out, paged = _timed_run(paged_engine, requests, repeats)
  pool_bytes = paged_engine.pages_per_shard * page_bytes
  return dict(dense=dict(dense, kv_bytes_reserved=dense_bytes),
              paged=dict(paged, kv_bytes_reserved=pool_bytes, kv_bytes_peak=paged["peak_kv_pages"] * page_bytes),
              identical_outputs=dense_out == paged_out,
              peak_kv_fraction_of_dense=paged["peak_kv_pages"] * page_bytes / dense_bytes,
              decode_tok_s_paged_over_dense=paged["decode_tok_s"] / dense["decode_tok_s"],
              dense_run=(dense_out, dense))


def _retro_records(config, traces: list[int], rollouts: int, rollout_tokens: int, question: int = 64, seed: int = 0):
  """Greedy rollouts from `rollouts` nested prefixes of one random trace per length in `traces`."""
  rng = np.random.default_rng(seed)
  requests = []
  for length in traces:
    text = rng.integers(0, config.vocab_size, question + length).tolist()
    requests += [GenerationRequest(prompt_tokens=tuple(text[:question + length * k // rollouts]),
                                   max_new_tokens=rollout_tokens, seed=k) for k in range(1, rollouts + 1)]
  return requests


def bench_paged(args) -> dict:
  config = _config(args.retro_model, args.dtype)
  model = _our_model(config)
  rng = np.random.default_rng(0)
  prompt_len, new_tokens = 1000, 64  # a 1k-token context, the short end of the traces below
  short = [GenerationRequest(prompt_tokens=tuple(rng.integers(0, config.vocab_size, prompt_len).tolist()),
                             max_new_tokens=new_tokens) for _ in range(args.paged_slots)]
  out = dict(model=args.retro_model, dtype=args.dtype, page_size=args.kv_page_size, slots=args.paged_slots)
  out["short"] = dict(prompt_len=prompt_len, new_tokens=new_tokens, **_paged_vs_dense(
      model, config, short, args.paged_slots, _pow2(prompt_len + new_tokens), args, repeats=3))
  del out["short"]["dense_run"]
  print(json.dumps({"paged_short": out["short"]}), flush=True)
  traces = [t for t in (1024, 2048, 4096, 8192, 16384, 32768) if t <= args.paged_max_trace]
  records = _retro_records(config, traces, rollouts=8, rollout_tokens=args.rollout_tokens)
  max_len = -(-(64 + traces[-1] + args.rollout_tokens) // 1024) * 1024
  out["long"] = dict(traces=traces, rollouts_per_trace=8, rollout_tokens=args.rollout_tokens, max_seq_len=max_len,
                     **_paged_vs_dense(model, config, records, args.paged_slots, max_len, args))
  dense_run = out["long"].pop("dense_run")
  print(json.dumps({"paged_long": out["long"]}), flush=True)
  # a pool of half what the paged run held at its peak (at least one max_seq_len sequence): the same records must
  # wait or be preempted, and still give the same tokens
  dense_bytes = args.paged_slots * max_len * bytes_per_token(config)
  fraction = max(out["long"]["peak_kv_fraction_of_dense"] / 2, 1 / args.paged_slots)
  tight = _paged_vs_dense(model, config, records, args.paged_slots, max_len, args, pool_fraction=fraction,
                          dense_run=dense_run)
  out["long_tight_pool"] = dict(pool_fraction_of_dense=fraction, pool_bytes=int(fraction * dense_bytes),
                                paged=tight["paged"], identical_outputs=tight["identical_outputs"],
                                wall_over_full_pool=tight["paged"]["wall_s"] / out["long"]["paged"]["wall_s"])
  print(json.dumps({"paged_long_tight_pool": out["long_tight_pool"]}), flush=True)
  if args.paged_parity_model:
    out["parity"] = paged_parity(args.paged_parity_model, args)
  return out


def int8_vs_bf16(name: str, args, prompts: int = 4, prompt_len: int = 200, new_tokens: int = 64) -> dict:
  """The int8 pool's error against a bfloat16 one (model in bfloat16, greedy): how many samples keep every token,
  where the others first differ, and the largest log-prob difference of the tokens before that (same contexts)."""
  config = _config(name, "bfloat16")
  model = _our_model(config)
  rng = np.random.default_rng(2)
  requests = [GenerationRequest(prompt_tokens=tuple(rng.integers(0, config.vocab_size, prompt_len).tolist()),
                                max_new_tokens=new_tokens) for _ in range(prompts)]
  options = dict(_engine_options(args), max_concurrent_decodes=prompts, max_seq_len=_pow2(prompt_len + new_tokens),
                 eos_token_ids=())
  runs = {}
  for kv_dtype in ("", "int8"):
    engine = Qwen2Engine(model, **options, kv_dtype=kv_dtype)
    runs[kv_dtype or "bfloat16"] = (engine.kv_budget.bytes_per_position,
                                    [r.samples[0] for r in Driver(engine, _NullTokenizer(), progress=False)
                                     .generate(requests)])
  (bf16_bytes, reference), (int8_bytes, quantized) = runs["bfloat16"], runs["int8"]
  first_difference, logprob_error = [], 0.0
  for a, b in zip(reference, quantized):
    same = next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y), len(a.tokens))
    first_difference.append(same)
    if same:
      logprob_error = max(logprob_error, float(np.abs(np.subtract(a.logprobs[:same], b.logprobs[:same])).max()))
  out = dict(model=name, prompts=prompts, prompt_len=prompt_len, new_tokens=new_tokens,
             kv_bytes_per_position=dict(bfloat16=bf16_bytes, int8=int8_bytes),
             identical_samples=sum(d == new_tokens for d in first_difference), first_difference=first_difference,
             max_abs_logprob_difference_up_to_it=logprob_error)
  print(json.dumps({"int8_vs_bfloat16": out}), flush=True)
  return out


def paged_parity(name: str, args) -> dict:
  """Greedy tokens of a paged pool vs dense rows on a bigger model: n samples, a prefix-cache hit, and a pool of 8
  pages for 4 slots whose samples need 3-4 each (waiting and preemption)."""
  config = _config(name, args.dtype)
  model = _our_model(config)
  rng = np.random.default_rng(1)
  shared = rng.integers(0, config.vocab_size, 150).tolist()
  requests = [GenerationRequest(prompt_tokens=tuple(shared), max_new_tokens=40, n=2),  # n samples
              GenerationRequest(prompt_tokens=tuple(shared + [7, 8, 9]), max_new_tokens=40),  # a prefix-cache hit
              GenerationRequest(prompt_tokens=tuple(rng.integers(0, config.vocab_size, 200).tolist()),
                                max_new_tokens=40)]
  page = args.kv_page_size
  max_len = 256
  options = dict(_engine_options(args), max_concurrent_decodes=4, max_seq_len=max_len, eos_token_ids=())
  dense = Driver(Qwen2Engine(model, **dict(options, kv_page_size=0)), _NullTokenizer(), progress=False)
  pool_pages = 8
  paged_engine = Qwen2Engine(model, **options, kv_memory_bytes=pool_pages * page * bytes_per_token(config))
  paged = Driver(paged_engine, _NullTokenizer(), progress=False)
  tokens = lambda driver: [[s.tokens for s in r.samples] for r in driver.generate(requests)]
  expected, got = tokens(dense), tokens(paged)
  out = dict(model=name, page_size=page, pool_pages=paged_engine.pages_per_shard,
             pages_needed_unshared=sum(r.n * pages_for(len(r.prompt_tokens) + 40, page) for r in requests),
             identical_outputs=expected == got, preemptions=paged.stats.preemptions,
             recomputed_tokens=paged.stats.recomputed_tokens, prompt_tokens_computed=paged.stats.prompt_tokens_computed,
             prompt_tokens=paged.stats.prompt_tokens, peak_kv_pages=paged.stats.peak_kv_pages)
  print(json.dumps({"paged_parity": out}), flush=True)
  return out


def _environment() -> dict:
  versions = {}
  for package in ("jax", "jaxlib", "flax", "numpy", "torch", "transformers"):
    try:
      versions[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      versions[package] = None
  device = jax.devices()[0]
  machine = dict(platform=platform.platform(), python=sys.version.split()[0], cpu_count=os.cpu_count(),
                 load_average=os.getloadavg(), backend=jax.default_backend(), device_kind=device.device_kind,
                 device_count=jax.device_count())
  return dict(machine=machine, versions=versions)


def main(argv=None) -> None:
  on_gpu = jax.default_backend() == "gpu"
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--runs", nargs="+", default=None,
                      help="MODEL:B1,B2 ... (models: %s)" % ", ".join(SHAPES))
  parser.add_argument("--dtype", default="bfloat16" if on_gpu else "float32")
  parser.add_argument("--prompt-len", type=int, default=128 if on_gpu else 32)
  parser.add_argument("--new-tokens", type=int, default=128 if on_gpu else 32)
  parser.add_argument("--max-seq-len", type=int, default=0,
                      help="cache positions per slot (0: prompt + new tokens, rounded up to a power of two; "
                      "search and generate reserve the model's positions)")
  parser.add_argument("--decode-steps", type=int, default=16)
  parser.add_argument("--max-prefill-batch", type=int, default=64 if on_gpu else 8)
  parser.add_argument("--max-prefill-tokens", type=int, default=16384 if on_gpu else 4096)
  parser.add_argument("--repeats", type=int, default=3 if on_gpu else 2)
  parser.add_argument("--no-hf", dest="hf", action="store_false", help="skip transformers' generate")
  parser.add_argument("--copy-mib", type=int, default=2048 if on_gpu else 256)
  parser.add_argument("--torch-threads", default="auto", help="torch CPU threads, or auto (see _pick_torch_threads)")
  parser.add_argument("--retro-model", default="1.5b" if on_gpu else "tiny")
  parser.add_argument("--trace-tokens", type=int, default=2048)
  parser.add_argument("--rollout-tokens", type=int, default=128 if on_gpu else 32)
  parser.add_argument("--retro-slots", type=int, default=16 if on_gpu else 8)
  parser.add_argument("--kv-page-size", type=int, default=64,
                      help="positions per KV page in these runs (the engine's default is 16); 0: dense rows for the "
                      "decode and retro runs")
  parser.add_argument("--paged-slots", type=int, default=64)
  parser.add_argument("--paged-max-trace", type=int, default=32768)
  parser.add_argument("--paged-parity-model", default="0.5b", help="'' skips the parity run")
  parser.add_argument("--only", nargs="+", choices=("decode", "retro", "paged", "int8"),
                      default=("decode", "retro", "paged", "int8"))
  parser.add_argument("--out", default=f"runs/benchmarks/decode_{jax.default_backend()}.json")
  args = parser.parse_args(argv)
  runs = args.runs or (["0.5b:1,8,64,256", "1.5b:1,8,64,256"] if on_gpu else ["tiny:1,8", "0.5b:8"])

  started = time.perf_counter()
  report = dict(**_environment(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                command=" ".join([os.path.basename(sys.argv[0])] + (argv or sys.argv[1:])), settings=vars(args))
  bandwidth = copy_bandwidth(args.copy_mib)
  report["copy_bandwidth_GBps"] = {k: v / 1e9 for k, v in bandwidth.items()}
  bw = bandwidth["limit"]
  report["decode"], report["targets"] = [], {}
  if "decode" in args.only:
    for run in runs:
      name, batches = run.split(":")
      report["decode"].extend(bench_decode(name, [int(b) for b in batches.split(",")], args, bw,
                                           "cuda" if on_gpu else "cpu"))
    report["targets"].update(
        cpu_batch8_speedup_ge_1_5={f"{r['model']}": r.get("speedup_tok_s") for r in report["decode"]
                                   if r["batch"] == 8 and jax.default_backend() == "cpu"},
        gpu_bandwidth_fraction_ge_0_6_at_batch_ge_64={f"{r['model']}:{r['batch']}": r["bandwidth"]["fraction"]
                                                      for r in report["decode"] if r["batch"] >= 64 and on_gpu})
  if "retro" in args.only:
    report["retro_search"] = bench_retro_search(args)
    report["targets"]["prefill_reduction_ge_3"] = report["retro_search"]["prefill_reduction"]
  if "paged" in args.only:
    paged = report["paged"] = bench_paged(args)
    report["targets"].update(
        paged_identical_outputs=all(paged[k]["identical_outputs"] for k in ("short", "long", "long_tight_pool")
                                    ) and paged.get("parity", {}).get("identical_outputs", True),
        paged_short_decode_tok_s_ratio_ge_0_9=paged["short"]["decode_tok_s_paged_over_dense"])
  if "int8" in args.only:
    report["int8_vs_bfloat16"] = int8_vs_bf16(args.paged_parity_model or "0.5b", args)
  report["total_s"] = time.perf_counter() - started
  write_json(args.out, report)
  print(f"wrote {args.out} in {report['total_s']:.0f} s")


if __name__ == "__main__":
  main()
