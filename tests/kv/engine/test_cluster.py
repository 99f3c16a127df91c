"""Remote tier on a real 3-master + 3-replica Redis Cluster, through a master failover."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.kv.engine.conftest import free_port, kv_for

pytestmark = pytest.mark.slow


def test_cluster_round_trip_and_failover(make_engine, redis_cluster) -> None:
    engine = make_engine(remote_url=redis_cluster.url)
    remote = engine._tiers["remote"]
    tokens = list(range(64))  # 16 chunks: keys spread over the three masters
    kv = kv_for(64)
    assert engine.store(tokens, kv) == 64
    engine.clear("hot")
    assert engine.locate(tokens) == ["remote"] * 16
    mask, out = engine.retrieve(tokens)
    assert bool(mask.all()) and np.array_equal(out, kv)
    assert engine.stats().tiers["remote"].errors == 0

    victim = redis_cluster.masters()[0]
    victim.kill()
    deadline = time.monotonic() + 90
    rounds = 0
    while True:  # keep working through the failover: no exception reaches the caller
        rounds += 1
        request = [5000 + rounds] * 8
        assert engine.store(request, kv_for(8, seed=rounds)) == 8
        mask, _ = engine.retrieve(request)
        assert bool(mask.all())
        engine.lookup(tokens)
        try:
            redis_cluster.wait_ok(timeout=0.5)
            break
        except RuntimeError:
            assert time.monotonic() < deadline, "no failover within 90 s"
    while not remote.available():  # the tier's backoff after errors during the outage
        assert time.monotonic() < deadline
        time.sleep(0.05)
    fresh = list(range(9000, 9064))
    for _ in range(50):  # the client may need a few calls to learn the new topology
        engine.store(fresh, kv_for(64, seed=3))
        engine.clear("hot")
        if engine.lookup(fresh) == 64:
            break
        time.sleep(0.2)
    assert engine.locate(fresh) == ["remote"] * 16  # the remote tier is used again after the failover
    mask, out = engine.retrieve(fresh)
    assert bool(mask.all()) and np.array_equal(out, kv_for(64, seed=3))


def test_cluster_unreachable_at_start(make_engine) -> None:
    engine = make_engine(remote_url=f"redis-cluster://127.0.0.1:{free_port()}")
    assert engine.store(list(range(8)), kv_for(8)) == 8
    assert engine.lookup(list(range(8))) == 8
    assert engine.stats().tiers["remote"].errors >= 1
