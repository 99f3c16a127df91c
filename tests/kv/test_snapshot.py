"""persist / restore: a binary snapshot round-trips values and metadata; damaged snapshots
are refused before any pool exists."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import numpy as np
import pytest

from infercache.errors import BadInputError
from infercache.kv import Pool
from infercache.kv import snapshot as snap


def _sample(make_pool):
    pool = make_pool(size="8M", policy="priority")
    rng = np.random.default_rng(3)
    values = {f"k{i}": rng.integers(0, 256, size=int(rng.integers(0, 300_000)), dtype=np.uint8).tobytes()
              for i in range(12)}  # fmt: skip
    values["empty"] = b""
    for i, (key, value) in enumerate(values.items()):
        assert pool.put(key, value, priority=i, prefix="p1" if i % 2 else None, ttl=3600 if i == 3 else None)
    pool.pin("k5")
    pool.get("k1")
    pool.get("missing")
    return pool, values


@pytest.fixture()
def snaps(tmp_path: Path) -> Path:
    """A directory of its own for snapshot files (tmp_path also holds the data dir)."""
    path = tmp_path / "snaps"
    path.mkdir()
    return path


def _shm_names() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir()}


def test_roundtrip_values_metadata_and_registration(make_pool, snaps: Path) -> None:
    pool, values = _sample(make_pool)
    before = {key: pool.info(key) for key in values}
    stats = pool.stats()
    target = snaps / "pool.kvsnap"
    written = pool.persist(target)
    assert written == target.stat().st_size
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in snaps.iterdir()] == ["pool.kvsnap"], "no temp file left"
    # only the data plus small records: not the 8 MiB pool, not hex
    assert sum(map(len, values.values())) < written < sum(map(len, values.values())) + 13 * 300 + 1024
    name = pool.name
    pool.close()
    Pool.destroy(name)

    restored = Pool.restore(target)
    try:
        assert restored.name == name and restored.policy == "priority"
        assert name in {row["name"] for row in Pool.list_pools()}, "restore registers the pool"
        for key, value in values.items():
            assert restored.info(key) == before[key]
            assert restored.get(key) == value
        assert restored.find_by_prefix("p1") == [k for i, k in enumerate(values) if i % 2]
        new = restored.stats()
        for field in ("entries", "used_bytes", "size_bytes", "block_size", "evictions", "puts", "bytes_in"):
            assert new[field] == stats[field], field
        assert new["hits"] == stats["hits"] + len(values) and new["misses"] == stats["misses"]
        assert restored.check().ok
        # the pin survived: evicting everything keeps k5
        restored.evict(percent=100)
        assert restored.keys() == ["k5"]
    finally:
        restored.close()


def test_restore_under_another_name_and_name_clash(make_pool, snaps: Path) -> None:
    pool, values = _sample(make_pool)
    target = snaps / "s.kvsnap"
    pool.persist(target)
    with pytest.raises(BadInputError, match="already used"):
        Pool.restore(target)
    copy = Pool.restore(target, name=pool.name + "-copy")
    try:
        assert copy.get("k2") == values["k2"]
        copy.put("only-in-copy", b"1")
        assert not pool.contains("only-in-copy"), "the copy is a separate pool"
    finally:
        copy.close()
        Pool.destroy(pool.name + "-copy")


def test_restore_to_disk_tier(make_pool, snaps: Path) -> None:
    pool, values = _sample(make_pool)
    target = snaps / "s.kvsnap"
    pool.persist(target)
    restored = Pool.restore(target, name="t-disk-restore", tier="disk", pool_path=snaps / "restored.bin")
    try:
        assert restored.tier == "disk" and restored.get("k4") == values["k4"]
    finally:
        restored.close()
        Pool.destroy("t-disk-restore")


def test_persist_of_an_empty_pool(make_pool, snaps: Path) -> None:
    pool = make_pool(size="1M", policy="s3fifo")
    target = snaps / "empty.kvsnap"
    pool.persist(target)
    restored = Pool.restore(target, name=pool.name + "-2")
    try:
        assert restored.stats()["entries"] == 0 and restored.policy == "s3fifo"
    finally:
        restored.close()
        Pool.destroy(pool.name + "-2")


def _damaged_variants(data: bytes, keys: list[str]) -> dict[str, bytes]:
    header_end = snap.PREAMBLE.size + snap.HEADER.size + snap.CRC.size
    records_end = header_end + len(keys) * snap.RECORD.size + sum(len(k) for k in keys) + snap.CRC.size

    def flip(pos: int) -> bytes:
        raw = bytearray(data)
        raw[pos] ^= 0x5A
        return bytes(raw)

    return {
        "magic": flip(0),
        "header": flip(snap.PREAMBLE.size + 3),
        "record": flip(header_end + snap.RECORD.size + 10),
        "data-start": flip(records_end + 5),
        "data-middle": flip((records_end + len(data)) // 2),
        "data-end": flip(len(data) - snap.TRAILER.size - snap.CRC.size - 1),
        "trailer": flip(len(data) - 3),
        "truncated-half": data[: len(data) // 2],
        "truncated-one-byte": data[:-1],
        "extended": data + b"\0",
        "empty": b"",
        "garbage": b"not a snapshot at all" * 100,
    }


def test_damaged_snapshots_are_refused_and_nothing_is_created(make_pool, snaps: Path) -> None:
    pool, values = _sample(make_pool)
    good = snaps / "good.kvsnap"
    pool.persist(good)
    data = good.read_bytes()
    registered_before = {row["name"] for row in Pool.list_pools()}
    for label, raw in _damaged_variants(data, list(values)).items():
        bad = snaps / f"{label}.kvsnap"
        bad.write_bytes(raw)
        with pytest.raises(BadInputError):
            Pool.restore(bad, name=f"t-bad-{label}")
        assert not any(f"t-bad-{label}" in n for n in _shm_names()), f"{label}: something left in /dev/shm"
        assert {row["name"] for row in Pool.list_pools()} == registered_before, label
    with pytest.raises(BadInputError, match="does not exist"):
        Pool.restore(snaps / "missing.kvsnap")
    # the good one still restores
    ok = Pool.restore(good, name="t-good-restore")
    ok.close()
    Pool.destroy("t-good-restore")


def test_persist_bad_target(make_pool, snaps: Path) -> None:
    pool = make_pool(size="1M")
    with pytest.raises(BadInputError, match="directory"):
        pool.persist(snaps)
    with pytest.raises(BadInputError, match="does not exist"):
        pool.persist(snaps / "no" / "such" / "dir" / "x.kvsnap")


def test_persist_replaces_atomically(make_pool, snaps: Path) -> None:
    pool = make_pool(size="1M")
    target = snaps / "s.kvsnap"
    pool.put("a", b"1")
    pool.persist(target)
    first = target.read_bytes()
    pool.put("b", b"2")
    pool.persist(target)
    assert target.read_bytes() != first
    assert sorted(p.name for p in snaps.iterdir()) == ["s.kvsnap"]


def test_expired_entries_stay_expired_after_restore(make_pool, snaps: Path) -> None:
    pool = make_pool(size="1M")
    pool.put("short", b"x", ttl=0.05)
    pool.put("long", b"y", ttl=3600)
    target = snaps / "s.kvsnap"
    pool.persist(target)
    time.sleep(0.1)  # let the 50 ms TTL pass (not a timing assertion)
    restored = Pool.restore(target, name=pool.name + "-t")
    try:
        assert restored.get("short") is None and restored.get("long") == b"y"
    finally:
        restored.close()
        Pool.destroy(pool.name + "-t")
    assert os.path.exists(target)
