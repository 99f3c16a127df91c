"""Movement between tiers: write-through, write-back demotion (suffixes first), promotion, move,
prefetch, clear; and TTL placement: the chosen tier, expiry one tier down, in exact order."""

from __future__ import annotations

import time

import numpy as np
import pytest

from infercache.kv.placement import LOCATIONS, AccessLog, compute_ttl, normalize_location, select_backend
from tests.kv.engine.conftest import kv_for

BIG = {"layers": 4, "hidden": 64}  # 4 tokens x fp16 = 4 KiB payload: 2 pool blocks per record


def request(first: int) -> list[int]:
    return list(range(first, first + 16))  # four chunks of 4 tokens


def test_write_through_writes_every_tier(make_engine, redis_server) -> None:
    engine = make_engine(disk=True, remote_url=redis_server.url)
    engine.store(request(0), kv_for(16))
    engine.flush()
    keys = engine.db.keys(request(0))
    assert all(engine.pool.contains(k) for k in keys)
    assert all(engine._tiers["disk"].path_of(k).exists() for k in keys)
    assert all(redis_server.client().exists(f"ickv:{{{k}}}:d") for k in keys)


def test_write_back_demotes_hot_evictions_to_disk_suffixes_first(make_engine) -> None:
    engine = make_engine(disk=True, local_cpu_size="48K", write_policy="write_back")  # room for 6 records
    a, b = request(0), request(100)
    engine.store(a, kv_for(16, **BIG))
    engine.flush()
    assert engine.locate(a) == ["hot"] * 4 and not list(engine._tiers["disk"].keys())
    engine.store(b, kv_for(16, **BIG, seed=1))  # needs two more slots: a's last two chunks go down
    engine.flush()
    assert engine.locate(a) == ["hot", "hot", "disk", "disk"]
    assert engine.locate(b) == ["hot"] * 4
    assert engine.stats().tiers["hot"].evictions == 2
    mask, out = engine.retrieve(a)  # served from both tiers, the disk chunks promoted (b's suffix goes down)
    assert bool(mask.all()) and np.array_equal(out, kv_for(16, **BIG))
    assert engine.locate(a) == ["hot"] * 4
    assert engine.locate(b) == ["hot", "hot", "disk", "disk"]


def test_write_back_chain_hot_to_disk_to_remote(make_engine, redis_server) -> None:
    one = kv_for(4, **BIG).nbytes + 200
    engine = make_engine(disk=True, remote_url=redis_server.url, local_cpu_size="16K", local_disk_size=2 * one,
                         write_policy="write_back")  # fmt: skip
    for i in range(6):
        engine.store([i] * 4, kv_for(4, **BIG, seed=i))
        engine.flush()
    where = [engine.locate([i] * 4) for i in range(6)]
    assert where == [["remote"], ["remote"], ["disk"], ["disk"], ["hot"], ["hot"]]
    _, out = engine.retrieve([0] * 4)
    assert np.array_equal(out, kv_for(4, **BIG, seed=0))


def test_move_copy_prefetch_and_clear(make_engine) -> None:
    engine = make_engine(disk=True)
    tokens = request(0)
    engine.store(tokens, kv_for(16))
    engine.flush()
    assert engine.move(tokens, "gpu", "disk") == 16  # alias of hot; the chunks are already on disk
    assert engine.locate(tokens) == ["disk"] * 4 and not engine.pool.keys()
    assert engine.move(tokens, "disk", "hot", copy=True) == 16
    assert engine.locate(tokens) == ["hot"] * 4 and len(engine._tiers["disk"].keys()) == 4
    engine.clear("hot")
    assert engine.prefetch(tokens).result(timeout=60) == 16
    assert engine.locate(tokens) == ["hot"] * 4
    assert engine.clear("disk") == 4 and engine.lookup(tokens) == 16
    engine.store(request(50), kv_for(16))
    engine.flush()
    assert engine.clear() == 12  # hot (both requests: 8) and disk (the second: 4); LMCache's /clear forgot disk
    assert engine.lookup(tokens) == 0 and not list(engine._tiers["disk"].dir.glob("*.kvc"))


def test_compute_ttl_and_select_backend_follow_the_seed() -> None:
    md = {"perplexity": 15, "time_variance": 0.05}
    assert compute_ttl(md) == pytest.approx(3600 * 1.08 * 0.95)
    assert 3650 < compute_ttl(md) < 3750 and select_backend(md) == "gpu"
    assert compute_ttl({**md, "access_count": 3}) == pytest.approx(3600 * 1.08 * 0.95 * (1 + 0.25 * np.log(4)))
    assert compute_ttl({"perplexity": 15, "time_variance": 1.0}) == 30  # clamped to min_ttl
    assert compute_ttl({"access_count": 1e30}, max_ttl=1000) == 1000
    assert compute_ttl({"access_count": 10**400}, max_ttl=1000) == 1000  # past float range: no OverflowError
    with pytest.raises(ValueError, match="negative"):
        compute_ttl({"access_count": -(10**400)})
    assert select_backend({"perplexity": 30, "time_variance": 0.1}) == "disk"
    assert select_backend({"perplexity": 10, "time_variance": 0.9}) == "disk"
    assert select_backend({"perplexity": 10, "last_access": time.time() - 7200}) == "disk"
    assert select_backend({"perplexity": 80}) == "remote"
    assert [normalize_location(x) for x in ("gpu", "cpu", "hot", "disk", "remote")] == ["hot"] * 3 + ["disk", "remote"]
    assert LOCATIONS == ("hot", "disk", "remote")
    with pytest.raises(ValueError, match="perplexity"):
        compute_ttl({"perplexity": "high"})
    with pytest.raises(ValueError, match="unknown location"):
        normalize_location("tape")


def test_access_log_counts_fills_in_metadata_and_forgets_the_oldest() -> None:
    log = AccessLog(cap=2)
    assert log.annotate("a", {"perplexity": 15}) == (1, {"perplexity": 15, "access_count": 0})
    count, meta = log.annotate("a", {"access_count": 9})
    assert count == 2 and meta["access_count"] == 9 and meta["last_access"] <= time.time()  # given values win
    log.note("b")
    log.note("c")  # over the cap: "a" (least recent) is forgotten
    assert log.note("a") == (0, None) and log.note("c")[0] == 1


def test_store_with_metadata_goes_to_the_selected_tier(make_engine, redis_server) -> None:
    engine = make_engine(disk=True, remote_url=redis_server.url, write_policy="write_back")
    engine.store(request(0), kv_for(16), metadata={"perplexity": 15, "time_variance": 0.05})
    engine.store(request(100), kv_for(16), metadata={"perplexity": 30, "time_variance": 0.05})
    engine.store(request(200), kv_for(16), metadata={"perplexity": 90, "time_variance": 0.05})
    assert [engine.locate(request(i))[0] for i in (0, 100, 200)] == ["hot", "disk", "remote"]
    key = engine.db.keys(request(200))[0]
    assert 3000 < redis_server.client().ttl(f"ickv:{{{key}}}:d") <= int(compute_ttl({"perplexity": 90, "time_variance": 0.05})) + 1
    from infercache.kv.tiers.hot import _grace

    first = compute_ttl({"perplexity": 15, "time_variance": 0.05})
    info = engine.pool.info(engine.db.keys(request(0))[0])
    assert info["expires"] - info["created"] == pytest.approx(first + _grace(first), abs=1)
    # the engine counts accesses per prefix: the next store of the same prompt gets a longer TTL
    engine.store(request(0), kv_for(16), metadata={"perplexity": 15, "time_variance": 0.05})
    second = 3600 * 1.08 * 0.95 * (1 + 0.25 * np.log(2))
    info = engine.pool.info(engine.db.keys(request(0))[0])
    assert info["expires"] - info["created"] == pytest.approx(second + _grace(second), abs=1)


def test_ttl_expiry_moves_one_tier_down_in_order(make_engine, redis_server) -> None:
    engine = make_engine(disk=True, remote_url=redis_server.url, write_policy="write_back")
    md = {"perplexity": 15, "time_variance": 0.05}
    ttl = compute_ttl(md)
    t0 = time.time()
    engine.store(request(0), kv_for(16), metadata=md)
    engine.store(request(100), kv_for(16))  # no metadata: no TTL, stays hot
    assert engine.locate(request(0)) == ["hot"] * 4
    assert engine.expire(now=t0 + ttl - 10) == 0
    assert engine.expire(now=t0 + ttl + 1) == 4
    assert engine.locate(request(0)) == ["disk"] * 4 and not any(engine.pool.contains(k) for k in engine.db.keys(request(0)))
    assert engine.expire(now=t0 + 2 * ttl + 2) == 4
    assert engine.locate(request(0)) == ["remote"] * 4
    key = engine.db.keys(request(0))[0]
    assert 0 < redis_server.client().ttl(f"ickv:{{{key}}}:d") <= int(ttl) + 1  # Redis drops it after its TTL
    assert engine.locate(request(100)) == ["hot"] * 4
    mask, out = engine.retrieve(request(0))
    assert bool(mask.all()) and np.array_equal(out, kv_for(16))


def test_an_expired_chunk_is_never_served_from_its_tier(make_engine) -> None:
    """Real time, a 0.4 s TTL: past it no process gets the chunk from hot; the sweeper moves it to
    disk (for another TTL), then drops it (no tier below)."""
    engine = make_engine(disk=True, base_ttl=0.4, min_ttl=0.1, write_policy="write_back")
    only_hot = make_engine(pool_name=engine.pool.name)
    md = {"perplexity": 15, "time_variance": 0.05}
    engine.store(request(0), kv_for(16), metadata=md)
    assert only_hot.retrieve(request(0))[0].all()
    deadline = time.monotonic() + 30
    while only_hot.retrieve(request(0))[0].any():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    assert not only_hot.retrieve(request(0))[0].any()  # past its TTL: never served from hot, to anyone
    while engine.stats().tiers["disk"].evictions < 4:  # the sweeper moves it down, then drops it from disk
        assert time.monotonic() < deadline
        time.sleep(0.05)
    stats = engine.stats().tiers
    assert (stats["hot"].evictions, stats["disk"].stores, stats["disk"].hits) == (4, 4, 0)
    assert engine.lookup(request(0)) == 0 and not only_hot.retrieve(request(0))[0].any()


def test_a_pinned_chunk_past_its_ttl_moves_down_with_its_ttl_once_unpinned(make_engine) -> None:
    """Simulated clock (`expire(now)`): a pin holds a chunk in its tier past its TTL; once unpinned
    it moves one tier down for the same TTL and is then dropped (not kept on disk for ever)."""
    engine = make_engine(disk=True, base_ttl=100, min_ttl=1, pin_timeout_s=1000)
    tokens = request(0)
    engine.store(tokens, kv_for(16), metadata={"perplexity": 15, "time_variance": 0.05})  # hot, TTL ~103 s
    assert engine.locate(tokens) == ["hot"] * 4 and engine.pin(tokens) == 16
    now = time.time()
    assert engine.expire(now + 200) == 0 and engine.locate(tokens) == ["hot"] * 4  # pinned: stays
    assert engine.unpin(tokens) == 16
    assert engine.expire(now + 1300) == 4 and engine.locate(tokens) == ["disk"] * 4
    assert engine.expire(now + 1500) == 4 and engine.lookup(tokens) == 0  # its TTL on disk ran out too
