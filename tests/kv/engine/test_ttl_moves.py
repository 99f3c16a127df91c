"""TTLs survive moves where the data is: `Engine.move` (not copy) keeps what is left of a chunk's
TTL on the target tier, and disk chunks found at restart carry their remaining time down."""

from __future__ import annotations

import time

import numpy as np
import pytest

from infercache.kv.placement import compute_ttl
from tests.kv.engine.conftest import kv_for
from tests.kv.engine.test_movement import request


@pytest.mark.parametrize("policy", ["write_back", "write_through"])
def test_move_keeps_the_remaining_ttl_on_the_target_tier(make_engine, policy: str) -> None:
    """Simulated clock (`expire(now)`): a hot chunk with a TTL moved to disk expires there on time
    (write_through: disk already holds a copy without one; the move gives it the TTL)."""
    engine = make_engine(disk=True, write_policy=policy)
    md = {"perplexity": 15, "time_variance": 0.05}  # the hot tier, for compute_ttl(md) seconds
    ttl = compute_ttl(md)
    t0 = time.time()
    engine.store(request(0), kv_for(16), metadata=md)
    engine.store(request(100), kv_for(16))  # no TTL
    assert engine.move(request(0), "hot", "disk") == 16 and engine.move(request(100), "hot", "disk") == 16
    assert engine.locate(request(0)) == ["disk"] * 4 and engine.locate(request(100)) == ["disk"] * 4
    assert engine.expire(now=t0 + ttl - 10) == 0 and engine.locate(request(0)) == ["disk"] * 4
    assert engine.expire(now=t0 + ttl + 1) == 4  # the last tier: dropped, not kept for ever
    assert engine.lookup(request(0)) == 0 and engine.locate(request(100)) == ["disk"] * 4


def test_a_copy_leaves_the_ttl_where_it_was(make_engine) -> None:
    engine = make_engine(disk=True, write_policy="write_back")
    md = {"perplexity": 15, "time_variance": 0.05}
    ttl = compute_ttl(md)
    t0 = time.time()
    engine.store(request(0), kv_for(16), metadata=md)
    assert engine.move(request(0), "hot", "disk", copy=True) == 16
    assert engine.locate(request(0)) == ["hot"] * 4
    assert engine.expire(now=t0 + ttl - 10) == 0
    assert engine.expire(now=t0 + ttl + 1) == 4 and engine.locate(request(0)) == ["disk"] * 4


def test_disk_chunks_found_at_restart_move_down_with_their_remaining_ttl(make_engine, redis_server, tmp_path) -> None:
    md = {"perplexity": 30, "time_variance": 0.05}  # the disk tier, for compute_ttl(md) seconds
    ttl = compute_ttl(md)
    disk = str(tmp_path / "disk")
    first = make_engine(local_disk=disk, remote_url=redis_server.url, write_policy="write_back")
    t0 = time.time()
    first.store(request(0), kv_for(16), metadata=md)
    assert first.locate(request(0)) == ["disk"] * 4
    first.close()
    second = make_engine(local_disk=disk, remote_url=redis_server.url, write_policy="write_back")
    assert second.expire(now=t0 + ttl - 10) == 0
    assert second.expire(now=t0 + ttl + 1) == 4 and second.locate(request(0)) == ["remote"] * 4
    key = second.db.keys(request(0))[0]
    left = redis_server.client().ttl(f"ickv:{{{key}}}:d")
    assert 0 < left <= int(ttl) + 1, "the remaining TTL carried down (Redis drops it), not none"
    mask, out = second.retrieve(request(0))
    assert bool(mask.all()) and np.array_equal(out, kv_for(16))
