"""Victim order of the tiers' in-process book (tiers.base.Tracker): the incremental heap must give
exactly the order of the former full sort, on scripted workloads and on a full real disk tier."""

from __future__ import annotations

import random
import time
from typing import Any

import numpy as np
import pytest

from infercache.kv.tiers.base import HEADER_BYTES, ChunkHeader, Tracker
from infercache.kv.tiers.disk import DiskTier

POLICIES = ["lru", "fifo", "lfu", "s3fifo", "ttl"]


def sorted_order(book: Tracker, now: float) -> list[str]:
    """The former implementation: sort the whole book (stable, so ties keep insertion order)."""

    def order(item: tuple[str, Any]) -> tuple[float, ...]:
        e = item[1]
        expired = 0 if e.expires and e.expires <= now else 1
        if book.policy == "fifo":
            return (expired, e.itick)
        if book.policy in ("lfu", "s3fifo"):
            return (expired, min(e.count, 3) if book.policy == "s3fifo" else e.count, e.atick)
        if book.policy == "ttl":
            return (expired, e.expires or float("inf"), e.atick)
        return (expired, e.atick)

    return [k for k, e in sorted(book.entries.items(), key=order) if not e.pins]


@pytest.mark.parametrize("policy", POLICIES)
def test_heap_victims_match_the_full_sort_on_a_scripted_workload(policy: str) -> None:
    rng = random.Random(f"victims-{policy}")
    book = Tracker(policy)
    now = time.time()
    keys = [f"k{i}" for i in range(400)]
    for step in range(3000):
        op, key = rng.random(), rng.choice(keys)
        if op < 0.45:  # some adopted (oldest), some expired or expiring, some overwrites
            expires = rng.choice([0.0, 0.0, now - rng.random() * 100, now + rng.random() * 1000])
            book.add(key, rng.randint(1, 500), expires, oldest=rng.random() < 0.1)
        elif op < 0.8:
            book.touch(key)
        elif op < 0.9:
            book.remove(key)
        elif key in book.entries:
            book.entries[key].pins = 0 if book.entries[key].pins else 1
        if step % 97 == 0:  # partial takes (a put that needs a few victims), then the full order
            want = sorted_order(book, time.time())
            it = book.victims()
            assert [next(it, None) for _ in range(5)] == (want + [None] * 5)[:5]
            it.close()
            assert list(book.victims()) == want
            excess, skip = sum(book.entries[k].size for k in want[:7]), set(want[:1])
            expected, left = [], excess
            for k in want:
                if left <= 0:
                    break
                if k not in skip:
                    expected.append(k)
                    left -= book.entries[k].size
            assert book.pick(excess, skip) == expected
    assert len(book._heap) <= 2 * len(book.entries) + 65, "stale heap items are compacted away"


def test_victims_survive_removal_and_touches_while_iterating() -> None:
    """The hot tier demotes while it walks the order: reads touch and deletes remove victims."""
    book = Tracker("lru")
    for i in range(100):
        book.add(f"k{i}", 10)
    got = []
    for key in book.victims():
        book.touch(key)  # the demotion read
        book.remove(key)
        got.append(key)
        if len(got) == 10:
            break
    assert got == [f"k{i}" for i in range(10)]
    assert list(book.victims()) == [f"k{i}" for i in range(10, 100)], "untaken victims went back in order"


def test_a_full_disk_tier_with_many_chunks_evicts_in_lru_order(tmp_path) -> None:
    """3000 small chunks fill the tier; reads reorder some; 500 more puts evict exactly the
    least recently used, in order (seen through the write_back demotion hook)."""
    n, extra = 3000, 500
    head = ChunkHeader(dtype=2, kind=0, shape=(1, 1, 1, 4), nbytes=16)
    payload = np.arange(4, dtype=np.float32).reshape(1, 1, 1, 4)
    size = 16 + HEADER_BYTES + len(b"c00000")
    tier = DiskTier(tmp_path / "disk", size * n, "lru", writers=2)
    evicted: list[str] = []
    tier.evict_hook = lambda key, h, p: evicted.append(key)
    try:
        for i in range(n):
            assert tier.put(f"c{i:05d}", head, payload)
        tier.flush()
        read = [f"c{i:05d}" for i in random.Random(7).sample(range(300), 150)]
        for key in read:
            assert tier.read(key, lambda h, p: None)[0]
        for i in range(n, n + extra):
            assert tier.put(f"c{i:05d}", head, payload)
        tier.flush()
    finally:
        tier.close()
    unread = [f"c{i:05d}" for i in range(n) if f"c{i:05d}" not in set(read)]
    assert evicted == (unread + read)[:extra]
    assert tier.counters.evictions == extra and tier.bytes_used() == size * n
