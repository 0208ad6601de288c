"""The engine's KV budget: slots sized from it, explicit slots checked against it with one clear line, and the
CLI's exit 2. Byte counts are hand-computed for the tiny config (2 layers x 2 KV heads x 16 dims x 4 B x K,V)."""
import pytest
from flax import nnx

from retro_jax import sharding
from retro_jax.engine import kv_budget
from retro_jax.engine.qwen2_engine import Qwen2Engine
from retro_jax.models.kv_cache import bytes_per_token
from retro_jax.models.qwen2 import Qwen2ForCausalLM
from tests.test_engine import CONFIG

POSITION_BYTES = 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 KV heads, head_dim 16, float32


@pytest.fixture(scope="module")
def model():
  return Qwen2ForCausalLM(CONFIG, nnx.Rngs(0))


def test_bytes_per_token_by_hand():
  assert bytes_per_token(CONFIG) == POSITION_BYTES == 512


def test_auto_slots_are_what_the_budget_holds(model):
  engine = Qwen2Engine(model, max_concurrent_decodes=0, max_seq_len=64, kv_memory_bytes=100_000, kv_page_size=0)
  assert engine.max_concurrent_decodes == 100_000 // (64 * POSITION_BYTES) == 3
  state = engine.init_decode_state()
  assert state.cache.keys.nbytes + state.cache.values.nbytes == 3 * 64 * POSITION_BYTES <= 100_000


def test_a_paged_pool_is_the_budget_in_pages(model):
  # 100,000 B hold 12 pages of 16 positions (8 KB each); auto slots assume a quarter of max_seq_len (16) per slot
  engine = Qwen2Engine(model, max_concurrent_decodes=0, max_seq_len=64, kv_memory_bytes=100_000, kv_page_size=16)
  assert engine.pages_per_shard == 100_000 // (16 * POSITION_BYTES) == 12
  assert engine.max_concurrent_decodes == 12 * 16 // (64 // 4) == 12
  state = engine.init_decode_state()
  assert state.cache.keys.nbytes + state.cache.values.nbytes == 12 * 16 * POSITION_BYTES <= 100_000
  # never more pages than dense rows would hold: 2 slots x 4 pages
  small = Qwen2Engine(model, max_concurrent_decodes=2, max_seq_len=64, kv_memory_bytes=100_000, kv_page_size=16)
  assert small.pages_per_shard == 8
  assert small.kv_budget.describe(2, 64, 16).startswith("KV cache: a pool of 8 pages x 16 tokens = 65.5 KB per device")


def test_slots_over_the_budget_fail_with_what_to_lower(model):
  with pytest.raises(kv_budget.KVBudgetError) as error:
    Qwen2Engine(model, max_concurrent_decodes=64, max_seq_len=2048, kv_memory_bytes=10**6, kv_page_size=0)
  message = str(error.value)
  assert message.startswith("64 slots x 2,048 tokens need 67.1 MB of KV per device; the budget is 1.0 MB")
  assert "lower engine.max_concurrent_decodes or engine.max_seq_len, or raise the budget" in message
  # a paged pool takes any number of slots, but must hold one sequence of max_seq_len
  Qwen2Engine(model, max_concurrent_decodes=64, max_seq_len=1024, kv_memory_bytes=10**6)
  with pytest.raises(kv_budget.KVBudgetError, match="^one sequence of 4,096 tokens needs 2.1 MB of KV per device; "
                     "the budget is 1.0 MB .*: lower engine.max_seq_len, or raise the budget"):
    Qwen2Engine(model, max_concurrent_decodes=64, max_seq_len=4096, kv_memory_bytes=10**6)


def test_budget_is_per_device_on_a_mesh(model):
  """Slots split over data (4) and KV heads over tensor (2): each device holds a quarter of the slots and half of
  every position."""
  mesh = sharding.make_mesh(data=4, tensor=2)
  engine = Qwen2Engine(model, max_concurrent_decodes=0, max_seq_len=64, mesh=mesh, kv_memory_bytes=3 * 64 * 256,
                       kv_page_size=0)
  assert engine.max_concurrent_decodes == 12  # 3 slots per data shard, at 256 B per position per device


def test_fraction_of_free_device_memory():
  mesh = sharding.make_mesh(data=1)
  budget = kv_budget.kv_budget(CONFIG, 10**6, mesh, sharding.SERVE_RULES, kv_memory_fraction=0.25)
  free, how = kv_budget.free_device_memory(mesh.devices.flat[0], 10**6)
  assert abs(budget.budget_bytes - 0.25 * free) < 0.01 * free and "host memory available" in how  # MemAvailable moves
  with pytest.raises(kv_budget.KVBudgetError, match="kv_memory_fraction must be in"):
    kv_budget.kv_budget(CONFIG, 0, mesh, sharding.SERVE_RULES, kv_memory_fraction=1.5)


def test_generate_cli_exits_2_with_one_line(tmp_path, capsys):
  from retro_jax.cli import main  # pylint: disable=import-outside-toplevel
  from retro_jax.demo import DEFAULT_MODEL  # the bundled tiny reasoner  # pylint: disable=import-outside-toplevel
  problems = tmp_path / "in.jsonl"
  problems.write_text('{"question": "1+1", "answer": "2"}\n')
  code = main(["generate", "--input", str(problems), "--output", str(tmp_path / "out.jsonl"), "--model", DEFAULT_MODEL,
               "--config.engine.max_concurrent_decodes=64", "--config.engine.kv_memory_bytes=1000000",
               "--config.engine.kv_page_size=0"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1, err
  # 512: the model's positions, what engine.max_seq_len 0 means
  assert err[0].startswith("retro-jax generate: 64 slots x 512 tokens need") and "raise the budget" in err[0]
  assert not (tmp_path / "out.jsonl").exists()
