"""Every eviction policy's exact victim order on small scripted workloads; TTL; pins.

Pools here have 16 blocks of 1 KiB and every value is exactly one block, so the pool holds
16 values and each new put past that evicts exactly one entry: the tests name it.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from infercache.errors import BadInputError
from infercache.kv import POLICIES

BLOCK = 1024


def _fill(pool, n: int = 16, **kwargs) -> None:
    for i in range(n):
        assert pool.put(f"k{i}", bytes([i]) * BLOCK, **kwargs)


def _evicted(pool, key: str, **kwargs) -> set:
    """Keys that disappear when `key` is put."""
    before = set(pool.keys())
    assert pool.put(key, b"n" * BLOCK, **kwargs)
    after = set(pool.keys())
    assert key in after
    return before - after


def _small(make_pool, policy: str):
    pool = make_pool(size="16K", block_size="1K", policy=policy)
    assert pool.stats()["blocks"] == 16
    return pool


def test_policies_listed_with_descriptions() -> None:
    assert {"lru", "lfu", "fifo", "priority", "ttl", "s3fifo"} <= set(POLICIES)
    assert all(isinstance(text, str) and text for text in POLICIES.values())


def test_lru_evicts_least_recently_used(make_pool) -> None:
    pool = _small(make_pool, "lru")
    _fill(pool)
    pool.get("k0")
    pool.get("k1")
    assert _evicted(pool, "n0") == {"k2"}
    assert _evicted(pool, "n1") == {"k3"}
    pool.get("k4")
    assert _evicted(pool, "n2") == {"k5"}
    assert pool.stats()["evictions"] == 3
    assert pool.get("k0") == bytes([0]) * BLOCK


def test_lfu_evicts_least_frequently_read(make_pool) -> None:
    pool = _small(make_pool, "lfu")
    _fill(pool)
    for i in range(15):  # k0..k14 read (k0 three times), k15 never
        for _ in range(3 if i == 0 else 1):
            pool.get(f"k{i}")
    assert _evicted(pool, "n0") == {"k15"}
    # the newcomer has count 0: it is the next victim (classic LFU), ties broken by recency
    assert _evicted(pool, "n1") == {"n0"}
    pool.get("n1")
    pool.get("n1")
    assert _evicted(pool, "n2") == {"k1"}  # count 1, least recently read among count 1


def test_fifo_ignores_reads(make_pool) -> None:
    pool = _small(make_pool, "fifo")
    _fill(pool)
    for _ in range(5):
        pool.get("k0")
    assert _evicted(pool, "n0") == {"k0"}
    assert _evicted(pool, "n1") == {"k1"}


def test_fifo_replacing_a_key_reinserts_it(make_pool) -> None:
    pool = _small(make_pool, "fifo")
    _fill(pool)
    assert pool.put("k0", b"z" * BLOCK)  # replaced: now the newest
    assert _evicted(pool, "n0") == {"k1"}
    assert pool.get("k0") == b"z" * BLOCK


def test_priority_evicts_lowest_priority_then_lru(make_pool) -> None:
    pool = _small(make_pool, "priority")
    for i in range(16):
        assert pool.put(f"k{i}", b"v" * BLOCK, priority=(i % 4) + 1)
    # priority 1: k0, k4, k8, k12; read k0 so k4 is the least recently used of them
    pool.get("k0")
    assert _evicted(pool, "n0", priority=5) == {"k4"}
    assert _evicted(pool, "n1", priority=5) == {"k8"}
    assert _evicted(pool, "n2", priority=5) == {"k12"}
    assert _evicted(pool, "n3", priority=5) == {"k0"}
    assert _evicted(pool, "n4", priority=5) == {"k1"}  # now the priority-2 entries


def test_ttl_policy_expired_first_then_soonest_expiry_then_no_ttl(make_pool) -> None:
    pool = _small(make_pool, "ttl")
    ttls = {0: 3000, 1: None, 2: 1000, 3: 2000, 4: 0.05}
    for i in range(16):
        assert pool.put(f"k{i}", b"v" * BLOCK, ttl=ttls.get(i, 9000 + i))
    time.sleep(0.15)  # k4's 50 ms TTL passes (not a timing assertion)
    assert not pool.contains("k4")
    assert _evicted(pool, "n0") == {"k4"}  # expired first
    assert _evicted(pool, "n1") == {"k2"}  # then soonest expiry
    assert _evicted(pool, "n2") == {"k3"}
    assert _evicted(pool, "n3") == {"k0"}
    for i in range(5, 16):
        assert _evicted(pool, f"m{i}") == {f"k{i}"}
    # only entries without TTL are left: least recently used first
    assert _evicted(pool, "last") == {"k1"}


def test_s3fifo_small_queue_promotion_ghost_and_main(make_pool) -> None:
    pool = _small(make_pool, "s3fifo")
    _fill(pool)
    pool.get("k0")  # read while in the small (probation) queue
    assert _evicted(pool, "n0") == {"k1"}, "k0 was read: it moves to main, k1 (never read) goes"
    assert pool.info("k0")["queue"] == "main"
    assert pool.info("k2")["queue"] == "small"
    assert _evicted(pool, "n1") == {"k2"}
    # k1 left the small queue into the ghost queue: coming back, it is admitted to main
    assert _evicted(pool, "k1") == {"k3"}
    assert pool.info("k1")["queue"] == "main"
    assert pool.info("n1")["queue"] == "small"
    # evict(bytes=1) takes exactly one entry; while the small queue holds >= 10% of the
    # blocks, its oldest entry goes
    order = []
    for _ in range(12):
        before = set(pool.keys())
        assert pool.evict(bytes=1) == 1
        order += sorted(before - set(pool.keys()))
    assert order == [f"k{i}" for i in range(4, 16)]
    assert set(pool.keys()) == {"k0", "k1", "n0", "n1"}
    pool.get("k0")
    pool.get("n1")
    sequence = []
    for _ in range(4):
        before = set(pool.keys())
        assert pool.evict(bytes=1) == 1
        sequence.append(before - set(pool.keys()))
    # small queue at 2 blocks (>= 1.6): its tail n0 goes; then it is below 10%, so main:
    # k0 was read (another round), k1 was not; then k0; last n1 (promoted, then alone)
    assert sequence == [{"n0"}, {"k1"}, {"k0"}, {"n1"}]


def test_expired_entries_are_misses_and_evicted_first_by_every_policy(make_pool) -> None:
    for policy in POLICIES:
        pool = _small(make_pool, policy)
        _fill(pool, 15)
        assert pool.put("short", b"s" * BLOCK, ttl=0.05)
        time.sleep(0.1)  # let the TTL pass (not a timing assertion)
        before = pool.stats()["misses"]
        assert pool.get("short") is None, policy
        assert pool.stats()["misses"] == before + 1
        assert not pool.contains("short")
        assert pool.put("other", b"o" * BLOCK, ttl=0.05)
        time.sleep(0.1)
        assert _evicted(pool, "n0") == {"other"}, policy


def test_evict_expired_only_takes_expired_unpinned(make_pool) -> None:
    pool = make_pool(size="64K", block_size="1K", policy="lru")
    for i in range(3):
        assert pool.put(f"short{i}", b"a" * 100, ttl=0.05)
        assert pool.put(f"long{i}", b"b" * 100, ttl=3600)
        assert pool.put(f"none{i}", b"c" * 100)
    assert pool.pin("short0")
    time.sleep(0.15)  # let the 50 ms TTLs pass (not a timing assertion)
    assert pool.evict(expired=True) == 2
    assert set(pool.keys()) == {f"{k}{i}" for k in ("long", "none") for i in range(3)} | {"short0"}


def test_pinned_entries_are_never_evicted(make_pool) -> None:
    pool = _small(make_pool, "lru")
    _fill(pool)
    assert pool.pin("k0") and pool.pin("k1") and pool.pin("k1")
    assert not pool.pin("missing")
    for i in range(40):
        assert pool.put(f"n{i}", b"x" * BLOCK)
    assert {"k0", "k1"} <= set(pool.keys())
    assert pool.unpin("k1")  # still pinned once
    assert pool.evict(percent=100) == 14
    assert set(pool.keys()) == {"k0", "k1"}
    assert pool.unpin("k1") and pool.unpin("k0")
    assert pool.evict(percent=100) == 2
    assert pool.keys() == []


def test_full_of_pinned_put_returns_false_without_deadlock(make_pool) -> None:
    pool = _small(make_pool, "lru")
    _fill(pool)
    for i in range(16):
        pool.pin(f"k{i}")
    assert pool.put("new", b"x" * BLOCK) is False
    assert pool.put("new", b"x" * 10) is False
    assert not pool.contains("new")
    assert pool.check().ok
    pool.unpin("k3")
    assert pool.put("new", b"x" * BLOCK) is True
    assert not pool.contains("k3")


def test_value_larger_than_pool_is_a_clear_error(make_pool) -> None:
    pool = _small(make_pool, "lru")
    with pytest.raises(BadInputError, match="larger than pool"):
        pool.put("huge", bytes(17 * BLOCK))
    # as large as the whole pool: fits after evicting everything
    _fill(pool)
    assert pool.put("whole", np.zeros(16 * BLOCK, dtype=np.uint8))
    assert pool.keys() == ["whole"]


def test_auto_evict_many_times_no_deadlock(make_pool) -> None:
    """The old tool deadlocked the first time the pool filled: fill it many times over."""
    pool = make_pool(size="256K", block_size="4K", policy="lru")
    rng = np.random.default_rng(0)
    for i in range(400):
        size = int(rng.integers(1, 40_000))
        assert pool.put(f"k{i}", bytes([i % 256]) * size)
    stats = pool.stats()
    assert stats["evictions"] > 300
    assert stats["used_bytes"] <= stats["size_bytes"]
    assert pool.check().ok
    assert pool.get("k399") == bytes([399 % 256]) * len(pool.get("k399"))


def test_evict_percent_and_bytes(make_pool) -> None:
    pool = make_pool(size="64K", block_size="1K", policy="fifo")
    _fill(pool, 40)
    assert pool.evict(bytes=3 * BLOCK) == 3
    assert pool.keys()[0] == "k3"
    assert pool.evict(percent=10) == 4  # 10% of the 37 KiB in use = 3.7 KiB -> 4 one-block entries
    assert pool.keys()[0] == "k7"
    with pytest.raises(BadInputError):
        pool.evict()
    with pytest.raises(BadInputError):
        pool.evict(percent=0)
    with pytest.raises(BadInputError):
        pool.evict(percent=10, expired=True)


def test_lazy_order_matches_a_full_sort_with_ties() -> None:
    from infercache.kv.policies import lazy_order

    rng = np.random.default_rng(5)
    for n in (0, 1, 10, 64, 65, 500, 3000):
        primary = rng.integers(0, 7, size=n)  # many ties on the primary key
        secondary = rng.permutation(n)
        positions = np.arange(n) * 3 + 1
        expected = positions[np.lexsort((secondary, primary))].tolist()
        assert list(lazy_order(positions, (secondary, primary))) == expected, n


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo", "priority", "ttl"])
def test_large_pool_order_is_exact(make_pool, policy: str) -> None:
    """300 entries (more than one partial-sort round): victims come in exactly the policy order."""
    pool = make_pool(size="300K", block_size="1K", policy=policy)
    rng = np.random.default_rng(11)
    order = rng.permutation(300)
    for i in order:  # insertion order is the permutation
        assert pool.put(f"k{i}", b"v" * BLOCK, priority=int(i % 5), ttl=1000 + int(i) if i % 3 else None)
    for i in rng.permutation(300)[:150]:  # reads in another order, some keys twice
        pool.get(f"k{i}")
        if i % 4 == 0:
            pool.get(f"k{i}")
    info = {k: pool.info(k) for k in pool.keys()}
    ticks = {k: info[k]["access_tick"] for k in info}
    inserted = {k: n for n, k in enumerate(pool.keys())}  # keys() is oldest insertion first
    expected_key = {
        "lru": lambda k: (ticks[k],),
        "lfu": lambda k: (info[k]["access_count"], ticks[k]),
        "fifo": lambda k: (inserted[k],),
        "priority": lambda k: (info[k]["priority"], ticks[k]),
        "ttl": lambda k: (info[k]["expires"] or float("inf"), ticks[k]),
    }[policy]
    expected = sorted(info, key=expected_key)
    evicted = []
    for _ in range(120):
        before = set(pool.keys())
        assert pool.evict(bytes=1) == 1
        evicted += list(before - set(pool.keys()))
    assert evicted == expected[:120]


def test_large_s3fifo_matches_a_reference_model(make_pool) -> None:
    """300 one-block entries, 100 of them read once: eviction follows S3-FIFO step by step."""
    pool = make_pool(size="300K", block_size="1K", policy="s3fifo")
    rng = np.random.default_rng(12)
    inserted = [f"k{i}" for i in rng.permutation(300)]
    for key in inserted:
        assert pool.put(key, b"v" * BLOCK)
    read = {inserted[i] for i in rng.permutation(300)[:100]}
    for key in read:
        pool.get(key)
    small, main, evicted = list(inserted), [], []
    while len(evicted) < 250:  # the reference: one-block entries, threshold 10% of 300 blocks
        if small and (len(small) >= 30 or not main):
            key = small.pop(0)
            if key in read:
                read.discard(key)
                main.append(key)
            else:
                evicted.append(key)
        else:
            evicted.append(main.pop(0))
    got = []
    for _ in range(250):
        before = set(pool.keys())
        assert pool.evict(bytes=1) == 1
        got += list(before - set(pool.keys()))
    assert got == evicted


def _s3_workload(pool) -> None:
    _fill(pool, 12)
    for i in (0, 1, 2, 5, 5, 7):  # read on probation: these move to main when ranked
        pool.get(f"k{i}")


def test_s3fifo_plan_changes_nothing_and_executes_like_evict(make_pool) -> None:
    """A dry run ranks S3-FIFO victims with its queue moves kept aside; executing the plan later
    ends exactly where a direct evict ends."""
    planned, direct = _small(make_pool, "s3fifo"), _small(make_pool, "s3fifo")
    for pool in (planned, direct):
        _s3_workload(pool)
    queues = {k: (planned.info(k)["queue"], planned.info(k)["freq"]) for k in planned.keys()}
    plan = planned.plan_eviction(bytes=6 * BLOCK)
    assert len(plan.victims) == 6 and plan.bytes_freed == 6 * BLOCK and plan.moves
    assert {k: (planned.info(k)["queue"], planned.info(k)["freq"]) for k in planned.keys()} == queues
    result = planned.execute_eviction(plan)
    assert (result.evicted, result.bytes_freed, result.skipped) == (6, 6 * BLOCK, 0)
    assert direct.evict(bytes=6 * BLOCK) == 6
    assert planned.keys() == direct.keys()
    assert [planned.info(k).to_json() | {"created": 0, "last_access": 0} for k in planned.keys()] == [
        direct.info(k).to_json() | {"created": 0, "last_access": 0} for k in direct.keys()
    ]
    assert {v.key for v in plan.victims}.isdisjoint(planned.keys())


def test_a_plan_skips_entries_changed_since(make_pool) -> None:
    pool = _small(make_pool, "fifo")
    _fill(pool, 8)
    plan = pool.plan_eviction(bytes=3 * BLOCK)
    assert [v.key for v in plan.victims] == ["k0", "k1", "k2"]
    assert pool.put("k0", b"new" * 100)  # replaced: not the entry the plan saw
    pool.pin("k1")  # pinned entries always stay
    result = pool.execute_eviction(plan)
    assert (result.evicted, result.skipped) == (1, 2)
    assert pool.get("k0") == b"new" * 100 and pool.contains("k1") and not pool.contains("k2")
