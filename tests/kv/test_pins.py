"""Pins with a deadline: `Pool.pin(key, timeout=...)` keeps the deadline in the shared entry record,
so a pin whose owner never unpins (a crashed process) stops protecting the entry after it.

The short deadlines here are really waited out (a fraction of a second), not faked.
"""

from __future__ import annotations

import mmap
import struct
import time
import zlib
from pathlib import Path

import pytest

from infercache.errors import BadInputError
from infercache.kv import Pool
from infercache.kv import snapshot as snap
from infercache.kv.layout import HDR_VERSION
from tests.kv.corrupt import corrupt_allocator


def _wait_past(deadline: float) -> None:
    time.sleep(max(0.0, deadline - time.time()) + 0.05)


def _fill(pool, n: int, size: int = 4000) -> None:
    """Put `n` fresh values: a pool smaller than n * size has to evict."""
    for i in range(n):
        assert pool.put(f"fill-{i}", bytes([i % 251]) * size)


def test_timed_pin_records_the_latest_deadline_and_keeps_the_count(make_pool) -> None:
    pool = make_pool(size="256K", block_size="4K")
    assert pool.put("k", b"v" * 100)
    before = time.time()
    assert pool.pin("k", timeout=60)
    info = pool.info("k")
    assert info["pins"] == 1 and before + 60 <= info["pin_deadline"] <= time.time() + 60
    first = info["pin_deadline"]
    assert pool.pin("k", timeout="10m")  # a later deadline wins ...
    info = pool.info("k")
    assert info["pins"] == 2 and info["pin_deadline"] >= first + 540
    assert pool.pin("k", timeout=1)  # ... an earlier one does not move it back
    assert pool.info("k")["pins"] == 3 and pool.info("k")["pin_deadline"] == info["pin_deadline"]
    for left in (2, 1):
        assert pool.unpin("k") and pool.info("k")["pins"] == left
    assert pool.unpin("k")
    assert pool.info("k")["pins"] == 0 and pool.info("k")["pin_deadline"] is None
    assert pool.unpin("k") and pool.info("k")["pins"] == 0  # never below zero
    assert not pool.pin("absent", timeout=5) and not pool.unpin("absent")
    for bad in (0, -1, "soon"):
        with pytest.raises(BadInputError):
            pool.pin("k", timeout=bad)
    assert pool.info("k")["pins"] == 0


def test_untimed_pins_never_expire_and_outrank_timed_ones(make_pool) -> None:
    pool = make_pool(size="64K", block_size="4K", policy="fifo")
    assert pool.put("never", b"n" * 3000) and pool.put("mixed", b"m" * 3000)
    assert pool.pin("never")  # today's semantics: no deadline at all
    assert pool.pin("mixed", timeout=0.2) and pool.pin("mixed")  # one untimed pin: "never" for the entry
    assert pool.info("never")["pin_deadline"] is None and pool.info("mixed")["pin_deadline"] is None
    time.sleep(0.3)
    _fill(pool, 40)
    assert pool.get("never") == b"n" * 3000 and pool.get("mixed") == b"m" * 3000
    assert pool.info("never")["pins"] == 1 and pool.info("mixed")["pins"] == 2
    assert pool.evict(percent=100) >= 1 and set(pool.keys()) == {"never", "mixed"}


def test_expired_pins_stop_protecting_for_put_evict_and_plans(make_pool) -> None:
    pool = make_pool(size="64K", block_size="4K", policy="lru")
    for key in ("short", "long"):
        assert pool.put(key, key.encode() * 500)
    assert pool.pin("short", timeout=0.2) and pool.pin("long", timeout=600)
    assert pool.stats()["pinned_entries"] == 2
    assert [v.key for v in pool.plan_eviction(percent=100).victims] == []
    assert pool.evict(percent=100) == 0  # both pins are live
    _wait_past(pool.info("short")["pin_deadline"] or 0)
    info = pool.info("short")
    assert info["pins"] == 0 and info["pin_deadline"] is None  # reported as unpinned once past
    stats = pool.stats()
    assert stats["pinned_entries"] == 1 and stats["next_pin_deadline"] == pool.info("long")["pin_deadline"]
    assert [v.key for v in pool.plan_eviction(percent=100).victims] == ["short"]
    assert pool.evict(percent=100) == 1 and pool.keys() == ["long"]
    # a put into a full pool evicts it too
    assert pool.put("short2", b"s" * 100) and pool.pin("short2", timeout=0.2)
    _wait_past(pool.info("short2")["pin_deadline"] or 0)
    _fill(pool, 40)
    assert pool.get("short2") is None and pool.info("long")["pins"] == 1
    assert pool.check().ok


def test_check_clears_lapsed_pins_from_the_records(make_pool) -> None:
    pool = make_pool(size="64K", block_size="4K")
    for key in ("lapsed", "live"):
        assert pool.put(key, b"v") and pool.pin(key, timeout=0.2 if key == "lapsed" else 600)
    time.sleep(0.3)
    lapsed = lambda: pool._st.table.stale_pins(pool._st.rows(), time.time()).sum()  # noqa: E731
    assert lapsed() == 1  # the record still holds the dead pin; every reader ignores it
    report = pool.check()
    assert report.ok and any("pin deadline had passed" in note for note in report.recovered)
    assert lapsed() == 0 and pool.info("live")["pins"] == 1 and pool.check().recovered == ()


def test_expired_ttl_entry_with_an_expired_pin_goes_with_evict_expired(make_pool) -> None:
    pool = make_pool(size="64K", block_size="4K")
    assert pool.put("t", b"x" * 10, ttl=0.2) and pool.pin("t", timeout=0.2)
    assert pool.put("held", b"y" * 10, ttl=0.2) and pool.pin("held", timeout=600)
    time.sleep(0.3)
    assert pool.evict(expired=True) == 1
    assert pool.info("t") is None and pool.info("held")["pins"] == 1


def test_put_over_a_pinned_key_carries_live_pins_and_their_deadline_only(make_pool) -> None:
    pool = make_pool(size="256K", block_size="4K")
    assert pool.put("live", b"a" * 900) and pool.pin("live", timeout=600)
    deadline = pool.info("live")["pin_deadline"]
    for size in (900, 5000):  # in place (same blocks) and reallocated
        assert pool.put("live", b"b" * size)
        assert pool.info("live")["pins"] == 1 and pool.info("live")["pin_deadline"] == deadline
    assert pool.put("lapsed", b"c" * 900) and pool.pin("lapsed", timeout=0.2)
    time.sleep(0.3)
    assert pool.put("lapsed", b"d" * 900)
    assert pool.info("lapsed")["pins"] == 0 and pool.stats()["pinned_entries"] == 1


def test_renew_moves_the_deadline_without_adding_a_pin(make_pool) -> None:
    pool = make_pool(size="256K", block_size="4K")
    assert pool.put("k", b"v")
    assert pool.pin("k", timeout=0.2)
    time.sleep(0.3)  # lapsed: a renew takes the pin again
    assert pool.pin("k", timeout=60, renew=True)
    first = pool.info("k")
    assert first["pins"] == 1 and first["pin_deadline"] > time.time() + 50
    assert pool.pin("k", timeout=120, renew=True)
    assert pool.info("k")["pins"] == 1 and pool.info("k")["pin_deadline"] > first["pin_deadline"]
    assert pool.unpin("k") and pool.info("k")["pins"] == 0


def test_snapshot_check_and_repair_keep_pin_deadlines(make_pool, tmp_path: Path) -> None:
    pool = make_pool(size="256K", block_size="4K")
    for key in ("timed", "untimed", "free"):
        assert pool.put(key, key.encode() * 300)
    assert pool.pin("timed", timeout=600) and pool.pin("timed", timeout=300) and pool.pin("untimed")
    want = {k: (pool.info(k)["pins"], pool.info(k)["pin_deadline"]) for k in ("timed", "untimed", "free")}
    assert want["timed"][0] == 2 and want["timed"][1] and want["untimed"] == (1, None)
    assert pool.check().ok
    corrupt_allocator(pool)
    report = pool.check(repair=True)
    assert report.problems and report.ok
    assert {k: (pool.info(k)["pins"], pool.info(k)["pin_deadline"]) for k in want} == want
    path = tmp_path / "pins.kvsnap"
    pool.persist(path)
    restored = Pool.restore(path, name=pool.name + "-r")
    try:
        assert {k: (restored.info(k)["pins"], restored.info(k)["pin_deadline"]) for k in want} == want
        assert restored.check().ok
        assert restored.evict(percent=100) == 1 and sorted(restored.keys()) == ["timed", "untimed"]
    finally:
        restored.close()
        Pool.destroy(pool.name + "-r")


def _as_version_1(src: Path, dst: Path) -> None:
    """Rewrite a snapshot in the version 1 format (records without a pin deadline), as an
    infercache from before pin deadlines wrote it."""
    with open(src, "rb") as handle:
        header, record = snap.read_header(handle, src.stat().st_size)
        records = snap.read_records(handle, header, record)
        data = handle.read(header.data_bytes)
    v1 = snap.RECORDS[1]
    out = snap.PREAMBLE.pack(snap.MAGIC, 1, snap.HEADER.size) + header.pack()
    body = b"".join(
        v1.pack(len(r.key), r.size, r.created, r.atime, r.expiry, r.count, r.priority, r.pins, r.flags, r.prefix,
                r.itick, r.atick) + r.key
        for r in records
    )  # fmt: skip
    out += body + snap.CRC.pack(zlib.crc32(body)) + data + snap.CRC.pack(zlib.crc32(data))
    dst.write_bytes(out + snap.TRAILER.pack(snap.END_MAGIC, len(out)))


def test_version_1_snapshots_restore_with_untimed_pins(make_pool, tmp_path: Path) -> None:
    pool = make_pool(size="256K", block_size="4K")
    assert pool.put("a", b"A" * 5000) and pool.put("b", b"B" * 10) and pool.pin("b")
    pool.persist(tmp_path / "v2.kvsnap")
    _as_version_1(tmp_path / "v2.kvsnap", tmp_path / "v1.kvsnap")
    restored = Pool.restore(tmp_path / "v1.kvsnap", name=pool.name + "-v1")
    try:
        assert restored.get("a") == b"A" * 5000 and restored.info("b")["pins"] == 1
        assert restored.info("b")["pin_deadline"] is None and restored.check().ok
    finally:
        restored.close()
        Pool.destroy(pool.name + "-v1")


def test_a_pool_of_the_older_layout_is_refused_with_a_clear_error(make_pool) -> None:
    pool = make_pool(size="64K", block_size="4K")
    assert pool.put("k", b"v")
    path = Path(pool.stats()["path"])
    with open(path, "r+b") as handle, mmap.mmap(handle.fileno(), 4096) as mm:
        struct.pack_into("<Q", mm, HDR_VERSION * 8, 1)  # what an infercache from before pin deadlines made
    with pytest.raises(BadInputError, match=r"layout version 1; this infercache reads version 2 only"):
        Pool.open(pool.name)
    rows = [r for r in Pool.list_pools() if r["name"] == pool.name]
    assert len(rows) == 1 and "layout version 1" in rows[0]["error"]
