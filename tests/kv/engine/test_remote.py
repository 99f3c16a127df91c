"""Remote tier on a real redis-server: pipelined records, TTL, zstd, space accounting, outages."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.kv.engine.conftest import kv_for


def test_round_trip_through_redis_and_promotion(make_engine, redis_server) -> None:
    engine = make_engine(remote_url=redis_server.url)
    assert engine.locations == ("hot", "remote")
    tokens = list(range(12))
    kv = kv_for(12)
    assert engine.store(tokens, kv) == 12  # write_through: hot and Redis
    client = redis_server.client()
    keys = engine.db.keys(tokens)
    assert all(client.exists(f"ickv:{{{k}}}:d", f"ickv:{{{k}}}:m") == 2 for k in keys)
    assert client.strlen(f"ickv:{{{keys[0]}}}:m") == 64 + len(keys[0])
    engine.clear("hot")
    assert engine.locate(tokens) == ["remote"] * 3
    mask, out = engine.retrieve(tokens)
    assert bool(mask.all()) and np.array_equal(out, kv)
    assert engine.locate(tokens) == ["hot"] * 3  # promoted
    stats = engine.stats().tiers
    assert (stats["remote"].hits, stats["hot"].misses) == (3, 3)


def test_unix_socket_and_zstd(make_engine, redis_server) -> None:
    engine = make_engine(remote_url=f"unix://{redis_server.unix}", remote_serde="zstd")
    kv = np.zeros((2, 2, 8, 64), dtype="float16")  # compressible
    engine.store(list(range(8)), kv)
    key = engine.db.keys(list(range(8)))[0]
    assert redis_server.client().strlen(f"ickv:{{{key}}}:d") < kv[:, :, :4].nbytes // 4
    engine.clear("hot")
    mask, out = engine.retrieve(list(range(8)))
    assert bool(mask.all()) and np.array_equal(out, kv)


def test_remote_size_evicts_this_engines_oldest_keys(make_engine, redis_server) -> None:
    chunk = kv_for(4, layers=4, hidden=64).nbytes
    engine = make_engine(remote_url=redis_server.url, remote_size=3 * (chunk + 64))
    for i in range(5):
        engine.store([i] * 4, kv_for(4, layers=4, hidden=64, seed=i))
    client = redis_server.client()
    present = [client.exists(f"ickv:{{{engine.db.keys([i] * 4)[0]}}}:d") for i in range(5)]
    assert present == [0, 0, 1, 1, 1]
    assert engine.stats().tiers["remote"].evictions == 2
    assert engine.stats().tiers["remote"].bytes <= 3 * (chunk + 64)


def test_corrupted_remote_record_is_a_counted_miss_and_removed(make_engine, redis_server) -> None:
    engine = make_engine(remote_url=redis_server.url)
    engine.store(list(range(8)), kv_for(8))
    engine.clear("hot")
    key = engine.db.keys(list(range(8)))[1]
    client = redis_server.client()
    data = bytearray(client.get(f"ickv:{{{key}}}:d"))
    data[10] ^= 0xFF
    client.set(f"ickv:{{{key}}}:d", bytes(data))
    mask, _ = engine.retrieve(list(range(8)))
    assert mask.sum() == 4
    assert client.exists(f"ickv:{{{key}}}:d") == 0
    assert engine.stats().tiers["remote"].errors == 1


def test_redis_going_away_never_breaks_the_caller(make_engine, redis_server) -> None:
    engine = make_engine(remote_url=redis_server.url)
    kv = kv_for(8)
    engine.store(list(range(8)), kv)
    redis_server.kill()
    for i in range(20):  # a workload while Redis is down: served locally, errors counted
        assert engine.store([100 + i] * 8, kv) == 8
        mask, out = engine.retrieve([100 + i] * 8)
        assert bool(mask.all()) and np.array_equal(out, kv)
        assert engine.lookup(list(range(8))) == 8
    errors = engine.stats().tiers["remote"].errors
    assert errors >= 1
    engine.clear("hot")
    assert engine.lookup(list(range(8))) == 0  # only Redis had it, and Redis is gone
    redis_server.start()  # same port, empty (no persistence)
    remote = engine._tiers["remote"]
    deadline = time.monotonic() + 60
    while not remote.available():  # the backoff since the last failure
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert engine.store([7] * 8, kv) == 8
    client = redis_server.client()
    assert client.exists(f"ickv:{{{engine.db.keys([7] * 8)[0]}}}:d") == 1  # the remote tier is used again
    engine.clear("hot")
    mask, _ = engine.retrieve([7] * 8)
    assert bool(mask.all()) and engine.stats().tiers["remote"].hits == 2


def test_redis_down_at_start_is_not_an_error(make_engine) -> None:
    from tests.kv.engine.conftest import free_port

    engine = make_engine(remote_url=f"redis://127.0.0.1:{free_port()}/0")
    assert engine.store(list(range(4)), kv_for(4)) == 4
    assert engine.retrieve(list(range(4)))[0].all()
    assert engine.stats().tiers["remote"].errors == 1  # then backing off: no retry storm


def test_rediss_verifies_certificates_by_default() -> None:
    from infercache.kv.tiers.remote import make_client

    client = make_client("rediss://127.0.0.1:6390/0")
    import ssl

    connection = client.connection_pool.make_connection()  # not connected: nothing listens there
    assert connection.cert_reqs == ssl.CERT_REQUIRED
    client.close()
    with pytest.raises(ValueError, match="HOST:PORT"):
        make_client("redis-cluster://nohostport")


def test_clear_remote_removes_only_this_models_keys(make_engine, redis_server) -> None:
    ours = make_engine(remote_url=redis_server.url, model_name="m[1]*")
    other = make_engine(remote_url=redis_server.url, model_name="other")
    ours.store(list(range(8)), kv_for(8))
    other.store(list(range(8)), kv_for(8))
    restarted = make_engine(remote_url=redis_server.url, model_name="m[1]*")  # knows nothing it put itself
    assert restarted.clear("remote") == 2
    client = redis_server.client()
    assert [client.exists(f"ickv:{{{k}}}:d") for k in ours.db.keys(list(range(8)))] == [0, 0]
    assert [client.exists(f"ickv:{{{k}}}:d") for k in other.db.keys(list(range(8)))] == [1, 1]


def _remote_keys_of(client, engine, requests) -> list[int]:
    return [client.exists(f"ickv:{{{engine.db.keys(r)[0]}}}:d") for r in requests]


def test_remote_size_holds_across_a_restart(make_engine, redis_server) -> None:
    """A restarted engine books what its model put before (sizes and expiries from the header
    records) as older than anything it puts itself; another model's keys are not its own."""
    chunk = kv_for(4, layers=4, hidden=64).nbytes + 64
    cap = 4 * chunk
    requests = [[i] * 4 for i in range(6)]
    first = make_engine(remote_url=redis_server.url, remote_size=cap, model_name="restart")
    other = make_engine(remote_url=redis_server.url, model_name="other")
    for i in range(3):
        first.store(requests[i], kv_for(4, layers=4, hidden=64, seed=i))
    assert other.store(requests[0], kv_for(4, layers=4, hidden=64)) == 4
    ttl_request = [9] * 4
    first.store(ttl_request, kv_for(4, layers=4, hidden=64), metadata={"perplexity": 1000.0})  # to Redis, with a TTL
    first.close()
    second = make_engine(remote_url=redis_server.url, remote_size=cap, model_name="restart")
    remote = second._tiers["remote"]
    assert remote.adopted.wait(30)
    client = redis_server.client()
    ours = remote.keys(second.db.key_prefix)
    assert set(ours) == {second.db.keys(r)[0] for r in requests[:3] + [ttl_request]}
    assert second.stats().tiers["remote"].bytes == 4 * chunk
    ttl_key = second.db.keys(ttl_request)[0]
    assert remote.book.entries[ttl_key].expires == pytest.approx(time.time() + client.ttl(f"ickv:{{{ttl_key}}}:d"), abs=2)
    for i in range(3, 6):
        assert second.store(requests[i], kv_for(4, layers=4, hidden=64, seed=i)) == 4
    present = _remote_keys_of(client, second, requests + [ttl_request])
    assert present[3:6] == [1, 1, 1], "what this run put is newer than what the earlier run left"
    assert sum(present[:3]) + present[6] == 1 and second.stats().tiers["remote"].evictions == 3
    held = sum(client.strlen(f"ickv:{{{k}}}:d") + 64 for k in remote.keys(second.db.key_prefix))
    assert held == cap == second.stats().tiers["remote"].bytes
    assert _remote_keys_of(client, other, requests[:1]) == [1]  # not ours to evict


def test_accounting_for_earlier_chunks_waits_for_redis(make_engine, redis_server) -> None:
    """Redis down when the engine starts: the earlier chunks are booked after the first good round trip."""
    redis_server.kill()
    late = make_engine(remote_url=redis_server.url, model_name="late")
    remote = late._tiers["remote"]
    deadline = time.monotonic() + 30
    while remote._adopt_state == "running":  # the first try fails (nothing listens)
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert not remote.adopted.is_set()
    redis_server.start()
    peer = make_engine(remote_url=redis_server.url, model_name="late")  # same model, another instance
    assert peer.store(list(range(8)), kv_for(8)) == 8
    assert late.lookup(list(range(8))) == 8  # from Redis; the round trip starts the accounting
    assert remote.adopted.wait(30)
    assert late.stats().tiers["remote"].bytes == peer.stats().tiers["remote"].bytes > 0


def test_a_chunk_only_in_hot_after_chunks_only_in_redis_still_counts(make_engine, redis_server) -> None:
    """The walk over Redis must not stop at a later chunk that Redis lacks but a local tier has."""
    engine = make_engine(remote_url=redis_server.url, write_policy="write_back")  # stores go to hot only
    tokens = list(range(16))
    kv = kv_for(16)
    assert engine.store(tokens, kv) == 16
    assert engine.move(tokens[:12], "hot", "remote") == 12  # chunks 0-2 now only in Redis, chunk 3 only hot
    assert engine.locate(tokens) == ["remote"] * 3 + ["hot"]
    assert engine.lookup(tokens) == 16
    mask, out = engine.retrieve(tokens)
    assert bool(mask.all()) and np.array_equal(out, kv)
