"""Paged decode attention (models/paged_attention.py) and the page write (models/kv_cache.write_pages).

- `gather_attention`, the pure-JAX reference, against a float64 NumPy loop written here (keys built page by page
  from the table by hand): a permuted page table, GQA, lengths 0 (output exactly 0), 1, mid-page, page-aligned
  and a full table.
- The GPU Pallas kernel through the Pallas interpreter on CPU against `gather_attention` on the same inputs, with
  one k-split and with several.
- `write_pages` against NumPy: values land at (layer, :, page, offset); a "no page" entry (== num_pages) drops.
- `paged_update_and_attend` on an 8-device CPU mesh (data=4 x tensor=2, SERVE_RULES, under jit) against the same
  step without a mesh: each data shard's slots hold LOCAL page ids of that shard's quarter of the pool, the
  single-device reference the global ids. Both are also checked against NumPy (pools written only at active
  slots' positions, output = the float64 reference on the written pool).
- The TPU kernel, AOT only (libtpu, v5e:2x2, tensor=4, one KV head per chip): the step compiles, lowers to
  Mosaic (`tpu_custom_call`), and the donated pools come back aliased; and at a pool too big for VMEM, that a
  step does not copy a whole layer of the pool (it did, 2 layer slices of temp, while the kernel was handed
  pool[layer]; the pool is now [k, layers, pages, ...], read as [k, layers x pages, ...] with offset ids).
  Kernel constraints found here: head_dim must be a multiple of 128 (64 fails to lower: "last two dimensions of
  your block shape are divisible by 8 and 128"), and it does not lower under float32 'highest' matmul precision
  (Mosaic: "Bad rhs type" for its f32 x bf16 q.k matmul), so the lowering runs at the default precision.
- int8 pages: quantize / dequantize within half a step; the gather path on int8 pages equals float attention over
  the dequantized pages, the GPU kernel (interpret mode) takes the same scales, and the error against the float
  pages is a quantization step's.
Tiny shapes: the whole file runs in ~20 s on 2 cores.
"""
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding

from retro_jax import sharding
from retro_jax.models.kv_cache import PAGED_CACHE_AXES, dequantize, quantize, write_pages
from retro_jax.models.paged_attention import gather_attention, gpu_kernel_attention, paged_update_and_attend

B, N, K, H, PAGE, PER_SLOT = 5, 4, 2, 16, 8, 4  # slots, heads, KV heads (GQA x2), head dim, page size, pages/slot
TOTAL_PAGES = 24
LENGTHS = [0, 1, 13, PER_SLOT * PAGE, PAGE]  # empty, one token, mid-page, full table, page-aligned


def reference(q, k_pages, v_pages, table, lengths):
  """float64 decode attention, slot by slot and head by head: keys = the slot's pages in table order."""
  q, k_pages, v_pages = (np.asarray(a, np.float64) for a in (q, k_pages, v_pages))
  b, n, h = q.shape
  kv_heads, _, page_size, _ = k_pages.shape
  out = np.zeros((b, n, h))
  for s in range(b):
    length = int(lengths[s])
    if length == 0:
      continue
    for head in range(n):
      kv = head // (n // kv_heads)  # query heads grouped consecutively per KV head (repeat_kv)
      keys = np.concatenate([k_pages[kv, p] for p in table[s]])[:length]
      values = np.concatenate([v_pages[kv, p] for p in table[s]])[:length]
      scores = keys @ q[s, head] / np.sqrt(h)
      weights = np.exp(scores - scores.max())
      out[s, head] = (weights / weights.sum()) @ values
  return out


def inputs(seed=0):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((B, N, H)).astype(np.float32)
  k_pages = rng.standard_normal((K, TOTAL_PAGES, PAGE, H)).astype(np.float32)
  v_pages = rng.standard_normal((K, TOTAL_PAGES, PAGE, H)).astype(np.float32)
  table = rng.permutation(TOTAL_PAGES)[:B * PER_SLOT].reshape(B, PER_SLOT).astype(np.int32)
  return q, k_pages, v_pages, table, np.asarray(LENGTHS, np.int32)


@pytest.mark.parametrize("block", [512, 8, 16])  # the whole table at once; 1 and 2 pages per step of the loop
def test_gather_attention_matches_a_float64_reference(block):
  q, k_pages, v_pages, table, lengths = inputs()
  out = np.asarray(jax.jit(gather_attention, static_argnums=5)(q, k_pages, v_pages, table, lengths, block))
  np.testing.assert_allclose(out, reference(q, k_pages, v_pages, table, lengths), atol=1e-5, rtol=1e-5)
  assert (out[0] == 0).all()  # length 0: exactly zero, not a NaN or a mean of garbage
  # a page outside the table changes nothing (only the table's pages are read)
  unused = sorted(set(range(TOTAL_PAGES)) - set(table.ravel().tolist()))
  k2, v2 = k_pages.copy(), v_pages.copy()
  k2[:, unused], v2[:, unused] = 1e3, -1e3
  np.testing.assert_array_equal(np.asarray(jax.jit(gather_attention, static_argnums=5)(q, k2, v2, table, lengths,
                                                                                        block)), out)


@pytest.mark.parametrize("pages_per_compute_block", [8, 2])  # one k-split of 4 pages; two of 2 pages
def test_gpu_kernel_in_interpret_mode_matches_gather(pages_per_compute_block):
  q, k_pages, v_pages, table, lengths = inputs(1)
  kernel = jax.jit(lambda *a: gpu_kernel_attention(*a, pages_per_compute_block=pages_per_compute_block,
                                                   interpret=True))
  out = np.asarray(kernel(q, k_pages, v_pages, table, lengths))
  np.testing.assert_allclose(out, np.asarray(gather_attention(q, k_pages, v_pages, table, lengths)),
                             atol=1e-5, rtol=1e-5)
  assert (out[0] == 0).all()


def test_write_pages_writes_at_page_and_offset_and_drops_no_page():
  rng = np.random.default_rng(2)
  layers, kv_heads, pages, page_size, h = 3, 2, 6, 4, 8
  pool = rng.standard_normal((kv_heads, layers, pages, page_size, h)).astype(np.float32)
  new = rng.standard_normal((5, kv_heads, h)).astype(np.float32)
  where = np.array([1, pages, 3, 0, pages], np.int32)  # entries 1 and 4: "no page"
  offsets = np.array([2, 1, 3, 0, 3], np.int32)
  out = np.asarray(jax.jit(write_pages)(pool, jnp.int32(1), new, where, offsets))
  expected = pool.copy()
  for i in range(len(where)):
    if where[i] < pages:
      expected[:, 1, where[i], offsets[i]] = new[i]
  np.testing.assert_array_equal(out, expected)
  assert (out != pool).any(axis=(0, 4)).sum() == 3  # three (layer, page, offset) cells changed, all in layer 1


# ---- paged_update_and_attend on a mesh -----------------------------------------------------------------------------

SHARDS, LOCAL_PAGES, M_SLOTS, M_PAGE, M_PER_SLOT, M_LAYERS = 4, 8, 8, 4, 3, 2
STARTS = np.array([0, 5, 11, 4, 7, 3, 8, 2], np.int32)  # position written this step, per slot
ACTIVE = np.array([True, True, True, False, True, False, True, True])


def mesh_step_inputs():
  """Slots 2s, 2s+1 live on data shard s and own pages [8s, 8s + 8) of the 32-page pool. Every slot holds the
  pages up to its write position (inactive ones too: a finished slot whose pages still exist), the rest of its
  table is "no page"."""
  rng = np.random.default_rng(3)
  local = np.full((M_SLOTS, M_PER_SLOT), LOCAL_PAGES, np.int32)
  globl = np.full((M_SLOTS, M_PER_SLOT), SHARDS * LOCAL_PAGES, np.int32)
  for shard in range(SHARDS):
    free = list(rng.permutation(LOCAL_PAGES))
    for slot in (2 * shard, 2 * shard + 1):
      for j in range(STARTS[slot] // M_PAGE + 1):
        local[slot, j] = free.pop()
        globl[slot, j] = local[slot, j] + shard * LOCAL_PAGES
  pool_shape = (K, M_LAYERS, SHARDS * LOCAL_PAGES, M_PAGE, H)
  q = rng.standard_normal((M_SLOTS, N, H)).astype(np.float32)
  k, v = (rng.standard_normal((M_SLOTS, K, H)).astype(np.float32) for _ in range(2))
  pool_k, pool_v = (rng.standard_normal(pool_shape).astype(np.float32) for _ in range(2))
  return q, k, v, pool_k, pool_v, local, globl


def test_paged_update_and_attend_on_a_mesh_matches_one_device():
  q, k, v, pool_k, pool_v, local, globl = mesh_step_inputs()
  layer = 1
  step = lambda *a: paged_update_and_attend(*a, implementation="gather")
  args = lambda table: (q, k, v, pool_k, pool_v, jnp.int32(layer), table, STARTS, ACTIVE)

  # NumPy: the pools written at active slots only; the output attends over [0, start] of the written pool
  want_k, want_v = pool_k.copy(), pool_v.copy()
  for slot in np.flatnonzero(ACTIVE):
    page, offset = globl[slot, STARTS[slot] // M_PAGE], STARTS[slot] % M_PAGE
    want_k[:, layer, page, offset], want_v[:, layer, page, offset] = k[slot], v[slot]
  lengths = np.where(ACTIVE, STARTS + 1, 0)
  readable = np.minimum(globl, SHARDS * LOCAL_PAGES - 1)
  want_out = reference(q, want_k[:, layer], want_v[:, layer], readable, lengths)

  one_out, one_k, one_v, _, _ = jax.jit(step)(*args(globl))
  np.testing.assert_array_equal(np.asarray(one_k), want_k)
  np.testing.assert_array_equal(np.asarray(one_v), want_v)
  np.testing.assert_allclose(np.asarray(one_out), want_out, atol=1e-5, rtol=1e-5)

  mesh = sharding.make_mesh(data=SHARDS, tensor=2)
  rules = sharding.SERVE_RULES
  put = lambda x, axes: jax.device_put(x, NamedSharding(mesh, rules.spec(axes)))
  axes = [("batch", "heads", None), ("batch", "kv_heads", None), ("batch", "kv_heads", None), PAGED_CACHE_AXES,
          PAGED_CACHE_AXES, (), ("batch", None), ("batch",), ("batch",)]
  placed = [put(x, a) for x, a in zip(args(local), axes)]
  with sharding.use_rules(mesh, rules):
    assert "shard_map" in str(jax.make_jaxpr(step)(*placed))  # the per-device path, not the one-device one
    mesh_out, mesh_k, mesh_v, _, _ = jax.jit(lambda *a: step(*a))(*placed)
  assert mesh_k.sharding.is_equivalent_to(NamedSharding(mesh, rules.spec(PAGED_CACHE_AXES)), mesh_k.ndim)
  np.testing.assert_array_equal(np.asarray(mesh_k), want_k)
  np.testing.assert_array_equal(np.asarray(mesh_v), want_v)
  np.testing.assert_allclose(np.asarray(mesh_out), np.asarray(one_out), atol=1e-5, rtol=1e-5)
  assert (np.asarray(mesh_out)[~ACTIVE] == 0).all()


# ---- TPU kernel, AOT ------------------------------------------------------------------------------------------------

def _tpu_step(pages: int, layers: int):
  """Lowers one paged step with the Pallas TPU kernel for v5e:2x2 (tensor=4: one KV head per chip), pools donated.
  Returns (lowered, pool bytes per device, keys and values together)."""
  from retro_jax.plan import chips  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh(1, 1, 4, devices=chips.devices("v5e:2x2"))
  rules = sharding.SERVE_RULES
  slots, heads, kv_heads, head_dim, page_size, per_slot = 8, 8, 4, 128, 16, 8
  sds = lambda shape, dtype, axes: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, rules.spec(axes)))
  pool = sds((kv_heads, layers, pages, page_size, head_dim), jnp.bfloat16, PAGED_CACHE_AXES)
  args = (sds((slots, heads, head_dim), jnp.bfloat16, ("batch", "heads", None)),
          sds((slots, kv_heads, head_dim), jnp.bfloat16, ("batch", "kv_heads", None)),
          sds((slots, kv_heads, head_dim), jnp.bfloat16, ("batch", "kv_heads", None)),
          pool, pool, sds((), jnp.int32, ()), sds((slots, per_slot), jnp.int32, ("batch", None)),
          sds((slots,), jnp.int32, ("batch",)), sds((slots,), jnp.bool_, ("batch",)))
  step = jax.jit(lambda *a: paged_update_and_attend(*a, implementation="pallas_tpu"), donate_argnums=(3, 4))
  # conftest's float32 'highest' matmul precision makes Mosaic reject the kernel's f32 x bf16 q.k matmul ("Bad rhs
  # type"); serving runs at the default precision
  with sharding.use_rules(mesh, rules), jax.default_matmul_precision("default"):
    lowered = step.lower(*args)
  return lowered, 2 * layers * (kv_heads // 4) * pages * page_size * head_dim * 2


def test_tpu_kernel_compiles_for_v5e_and_updates_the_pool_in_place():
  lowered, pool_bytes = _tpu_step(pages=256, layers=4)
  assert "stablehlo.custom_call @tpu_custom_call" in lowered.as_text()  # the Mosaic kernel, not the gather
  memory = lowered.compile().memory_analysis()
  assert memory.alias_size_in_bytes >= pool_bytes  # the donated pools come back in the same buffers
  # (no temp_size bound here: at this size a layer's copy sits in VMEM, where temp_size does not count it; the
  # next test checks it at a size that does not fit)


def test_tpu_step_does_not_copy_a_layer_of_the_pool():
  """The kernel takes pages as one operand [k, P, page, h]. Handed `pool[layer]` (layer traced, as in the scanned
  model) XLA materialised it with a dynamic-slice: every decode step read and wrote a whole layer of keys and of
  values (temp = 2 layer slices = half of both pools at 2 layers), which the paged kernel exists to avoid. The
  pool [k, L, P, page, h] reshapes for free to [k, L x P, ...] with the layer's ids offset by layer x P. While
  one layer fits v5e's VMEM a copy sits there and temp_size does not show it, hence a pool of 256 MiB per layer
  per chip here (AOT: nothing is allocated)."""
  lowered, pool_bytes = _tpu_step(pages=65536, layers=2)
  memory = lowered.compile().memory_analysis()
  assert memory.alias_size_in_bytes >= pool_bytes
  assert memory.temp_size_in_bytes < 0.05 * pool_bytes


def test_a_write_past_the_table_is_dropped_not_clamped():
  """Position 4 of a slot holding 2 pages of 2 lies past its table: nothing is written (clamping would overwrite
  position 2, a real token, as the dense rows' write_rows also refuses to)."""
  pool = jnp.zeros((1, 1, 4, 2, 8))
  q = k = v = jnp.ones((1, 1, 8))
  _, pool_k, *_ = paged_update_and_attend(q, k, v, pool, pool, jnp.int32(0), jnp.asarray([[0, 1]], jnp.int32),
                                         jnp.asarray([4], jnp.int32), jnp.asarray([True]), implementation="gather")
  assert not np.asarray(pool_k).any()


# ---- int8 pages -----------------------------------------------------------------------------------------------------

def test_int8_round_trip_is_within_half_a_step():
  x = np.random.default_rng(4).standard_normal((6, 3, 16)).astype(np.float32)
  x[2, 1] = 0  # an all-zero vector gets scale 1, not a division by zero
  q, scale = quantize(jnp.asarray(x))
  assert q.dtype == jnp.int8 and scale.shape == (6, 3)
  back = np.asarray(dequantize(q, scale, jnp.float32))
  assert (np.abs(back - x) <= np.asarray(scale)[..., None] / 2 + 1e-6).all()
  assert (back[2, 1] == 0).all() and np.abs(np.asarray(q)).max() == 127


def test_int8_pages_gather_and_gpu_kernel():
  """int8 pages with per-position scales: the gather path equals float attention over the dequantized pages, the GPU
  kernel (interpret mode) takes the same scales, and the error against the float pages is the quantization's."""
  q, k_pages, v_pages, table, lengths = inputs(5)
  (k8, ks), (v8, vs) = quantize(jnp.asarray(k_pages)), quantize(jnp.asarray(v_pages))
  int8 = np.asarray(gather_attention(q, k8, v8, table, lengths, k_scales=ks, v_scales=vs))
  on_dequantized = np.asarray(gather_attention(q, dequantize(k8, ks, jnp.float32), dequantize(v8, vs, jnp.float32),
                                               table, lengths))
  np.testing.assert_allclose(int8, on_dequantized, atol=1e-6)
  kernel = np.asarray(jax.jit(lambda *a: gpu_kernel_attention(*a, interpret=True, k_scales=ks, v_scales=vs))(
      q, k8, v8, table, lengths))
  np.testing.assert_allclose(kernel, int8, atol=1e-5, rtol=1e-5)
  error = np.abs(int8 - np.asarray(gather_attention(q, k_pages, v_pages, table, lengths))).max()
  assert 0 < error < 0.05  # lossy, and by about a quantization step (values ~N(0, 1), steps ~0.02)
