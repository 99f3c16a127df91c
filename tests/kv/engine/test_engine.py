"""Engine verbs on the hot tier: round trips, dtypes and kinds, bad input, config sources, stats."""

from __future__ import annotations

import numpy as np
import pytest

from infercache.errors import BadInputError
from infercache.kv import Engine, EngineConfig
from tests.helpers import require_module
from tests.kv.engine.conftest import kv_for


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_numpy_round_trip_keeps_dtype(make_engine, dtype: str) -> None:
    engine = make_engine()
    tokens = np.arange(10)
    kv = kv_for(10, dtype=dtype)
    assert engine.store(tokens, kv) == 8  # two full chunks; the partial one is not saved
    assert engine.lookup(tokens) == 8
    mask, out = engine.retrieve(tokens)
    assert isinstance(mask, np.ndarray) and mask.dtype == bool
    assert mask.tolist() == [True] * 8 + [False] * 2
    assert out.dtype == np.dtype(dtype) and out.shape == (2, 2, 8, 8)
    assert np.array_equal(out, kv[:, :, :8])


@pytest.mark.parametrize("name", ["float16", "bfloat16", "float32", "float8_e4m3fn", "float8_e5m2"])
def test_torch_round_trip_keeps_kind_and_dtype(make_engine, name: str) -> None:
    torch = require_module("torch")
    if not hasattr(torch, name):
        pytest.skip(f"this torch has no {name}")
    dtype = getattr(torch, name)
    engine = make_engine()
    tokens = torch.arange(8)
    kv = torch.randn(2, 3, 8, 5).to(dtype)
    assert engine.store(tokens, kv) == 8
    mask, out = engine.retrieve(tokens)
    assert isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and bool(mask.all())
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and tuple(out.shape) == (2, 3, 8, 5)
    assert torch.equal(out.view(torch.uint8), kv.view(torch.uint8))


def test_save_unfull_chunk_stores_the_tail(make_engine) -> None:
    engine = make_engine(save_unfull_chunk=True)
    kv = kv_for(10)
    assert engine.store(list(range(10)), kv) == 10
    assert engine.lookup(list(range(10))) == 10
    mask, out = engine.retrieve(list(range(10)))
    assert bool(mask.all()) and np.array_equal(out, kv)
    assert engine.lookup(list(range(9))) == 8  # a different tail: only the full chunks match


def test_lookup_and_retrieve_stop_at_the_first_missing_chunk(make_engine) -> None:
    engine = make_engine()
    tokens = list(range(16))
    kv = kv_for(16)
    engine.store(tokens, kv)
    keys = engine.db.keys(tokens)
    engine.pool.delete(keys[1])
    assert engine.lookup(tokens) == 4
    assert engine.locate(tokens) == ["hot"]
    mask, out = engine.retrieve(tokens)
    assert mask.tolist() == [True] * 4 + [False] * 12
    assert np.array_equal(out, kv[:, :, :4])
    assert engine.lookup([999] * 16) == 0
    mask, out = engine.retrieve([999] * 16)
    assert not mask.any() and out.shape[2] == 0


def test_lookup_fills_hot_gaps_from_lower_tiers_in_chunk_order(make_engine) -> None:
    """The hot tier answers for every chunk at once (`contains_many`); a chunk hot lacks comes
    from disk, and the walk still stops at the first chunk that no tier has."""
    engine = make_engine(disk=True, write_policy="write_through")
    tokens = list(range(20))
    engine.store(tokens, kv_for(20))
    engine.flush()
    keys = engine.db.keys(tokens)
    engine.pool.delete(keys[1])
    engine.pool.delete(keys[3])
    assert engine.locate(tokens) == ["hot", "disk", "hot", "disk", "hot"]
    assert engine.lookup(tokens) == 20
    engine._tiers["disk"].delete(keys[3])
    assert engine.locate(tokens) == ["hot", "disk", "hot"]
    assert engine.lookup(tokens) == 12
    engine.pool.delete(keys[0])
    engine._tiers["disk"].delete(keys[0])
    assert engine.locate(tokens) == [] and engine.lookup(tokens) == 0


def test_store_skips_chunks_already_cached(make_engine) -> None:
    engine = make_engine()
    kv = kv_for(8)
    engine.store(list(range(8)), kv)
    engine.store(list(range(8)), kv)
    assert engine.stats().tiers["hot"].stores == 2


@pytest.mark.parametrize(
    ("tokens", "kv", "message"),
    [
        (list(range(8)), kv_for(6), "kv has 6 tokens .* tokens has 8"),
        (list(range(8)), np.zeros((2, 8, 4), dtype="float16"), "shape \\[2, num_layers, num_tokens, hidden\\]"),
        (list(range(8)), np.zeros((3, 1, 8, 4), dtype="float16"), "got \\(3, 1, 8, 4\\)"),
        (list(range(8)), np.zeros((2, 1, 8, 4), dtype="int32"), "unsupported kv dtype int32"),
    ],
)
def test_bad_input_raises_value_error(make_engine, tokens, kv, message: str) -> None:
    engine = make_engine()
    with pytest.raises(ValueError, match=message):
        engine.store(tokens, kv)


def test_bad_config_and_locations(make_engine) -> None:
    with pytest.raises(ValueError, match="unsupported remote_url scheme"):
        EngineConfig(remote_url="memcached://127.0.0.1:11211")
    with pytest.raises(ValueError, match="cache_policy"):
        EngineConfig(cache_policy="random")
    with pytest.raises(ValueError, match="write_policy"):
        EngineConfig(write_policy="write_around")
    engine = make_engine()
    with pytest.raises(ValueError, match="unknown location"):
        engine.move(list(range(4)), "hot", "tape")
    with pytest.raises(ValueError, match="not configured"):
        engine.clear("remote")
    with pytest.raises(ValueError, match="unknown location"):
        engine.pin(list(range(4)), "nvme")


def test_config_from_kwargs_yaml_and_env(tmp_path) -> None:
    cfg = EngineConfig(chunk_size=128, local_cpu_size="5G", remote_url="redis://u:secret@127.0.0.1:1/0")
    assert cfg.local_cpu_size == 5 << 30
    assert "secret" not in str(cfg.to_json()) and cfg.to_json()["chunk_size"] == 128
    assert "secret" not in repr(cfg)
    query = EngineConfig(remote_url="redis://127.0.0.1:1/0?password=secret&db=0")  # redis-py's other spelling
    assert "secret" not in str(query.to_json()) and query.to_json()["remote_url"].endswith("password=***&db=0")
    path = tmp_path / "engine.yaml"
    path.write_text("chunk_size: 64\nmodel_name: llama\nlocal_disk_size: 2G\nsave_unfull_chunk: true\n")
    from_file = EngineConfig.from_file(path)
    assert (from_file.chunk_size, from_file.model_name, from_file.local_disk_size, from_file.save_unfull_chunk) == (
        64, "llama", 2 << 30, True)  # fmt: skip
    path.write_text("chunk_sizee: 64\n")
    with pytest.raises(ValueError, match="chunk_sizee"):
        EngineConfig.from_file(path)
    with pytest.raises(BadInputError, match="not a readable YAML file"):
        EngineConfig.from_file(tmp_path)  # a directory
    env = {"INFERCACHE_KV_CHUNK_SIZE": "32", "INFERCACHE_KV_WRITE_POLICY": "write_back",
           "INFERCACHE_KV_REMOTE_URL": "redis-cluster://127.0.0.1:7000,127.0.0.1:7001", "INFERCACHE_KV_TAGS": "lora1"}
    from_env = EngineConfig.from_env(env)
    assert (from_env.chunk_size, from_env.write_policy, from_env.tags) == (32, "write_back", ("lora1",))
    with pytest.raises(ValueError, match="chunk_size must be a number"):
        EngineConfig.from_env({"INFERCACHE_KV_CHUNK_SIZE": "many"})


def test_engine_api_shape(make_engine) -> None:
    engine = make_engine(model_name="llama", instance_id=None)
    assert engine.instance_id == "llama@1@0"
    assert engine.locations == ("hot",)
    engine.store(list(range(8)), kv_for(8))
    engine.retrieve(list(range(8)))
    stats = engine.stats().to_json()
    assert stats["instance_id"] == "llama@1@0" and stats["chunk_size"] == 4
    assert set(stats["tiers"]["hot"]) == {"hits", "misses", "stores", "bytes", "evictions", "errors"}
    assert stats["tiers"]["hot"]["hits"] == 2 and stats["tiers"]["hot"]["stores"] == 2
    assert stats["tiers"]["hot"]["bytes"] > 0
    assert engine.clear() == 2 and engine.lookup(list(range(8))) == 0
    engine.close()
    engine.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        engine.lookup([1])


def test_engine_from_keywords_and_context_manager(data_dir) -> None:
    from infercache.kv import Pool

    with Engine(chunk_size=4, pool_name="t-eng-ctx-1", local_cpu_size="1M", data_dir=str(data_dir)) as engine:
        assert engine.config.chunk_size == 4
        engine.store([1, 2, 3, 4], kv_for(4))
    Pool.destroy("t-eng-ctx-1", data_dir=data_dir)


def test_pins_protect_from_eviction_and_time_out(make_engine) -> None:
    import time

    engine = make_engine(local_cpu_size="64K", pin_timeout_s=30)
    tokens = list(range(8))
    engine.store(tokens, kv_for(8, layers=8, hidden=64))  # 2 chunks of 8 KiB each
    assert engine.pin(tokens) == 8
    assert all(engine.pool.info(k)["pins"] == 1 for k in engine.db.keys(tokens))
    for i in range(12):  # far more than the pool holds
        engine.store([1000 + 10 * i + j for j in range(4)], kv_for(4, layers=8, hidden=64, seed=i))
    assert engine.lookup(tokens) == 8
    assert engine.stats().tiers["hot"].evictions >= 9  # 5 records fit (3 blocks each), 2 of them pinned
    engine.expire(now=time.time() + 31)  # the pins time out
    assert all(engine.pool.info(k)["pins"] == 0 for k in engine.db.keys(tokens))
    assert engine.pin(tokens) == 8 and engine.unpin(tokens) == 8
    assert engine.unpin(tokens) == 0


def test_damaged_hot_record_is_a_counted_miss_and_removed(make_engine) -> None:
    engine = make_engine()
    tokens = list(range(8))
    engine.store(tokens, kv_for(8))
    key = engine.db.keys(tokens)[1]
    engine.pool.put(key, b"\0" * 300)  # a foreign or torn value under the chunk's key
    mask, out = engine.retrieve(tokens)
    assert mask.tolist() == [True] * 4 + [False] * 4 and out.shape[2] == 4
    assert not engine.pool.contains(key)
    assert engine.stats().tiers["hot"].errors == 1


def test_threads_share_one_engine(make_engine) -> None:
    """The controller serves requests from a thread pool: one engine, concurrent verbs."""
    from concurrent.futures import ThreadPoolExecutor

    engine = make_engine(disk=True)

    def work(t: int) -> bool:
        for i in range(15):
            tokens = [t * 1000 + i] * 8
            kv = kv_for(8, seed=t * 100 + i)
            engine.store(tokens, kv)
            mask, out = engine.retrieve(tokens)
            if not (mask.all() and np.array_equal(out, kv)):
                return False
            engine.lookup(tokens)
            engine.prefetch(tokens)
        return True

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(4)))
    assert engine.stats().tiers["hot"].errors == 0
