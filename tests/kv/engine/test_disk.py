"""Disk tier: async bounded writes, restart recovery, partial files, checksums, disk full."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest

from infercache.kv.tiers.disk import SUFFIX, TMP_PREFIX
from tests.kv.engine.conftest import kv_for, needs_root_mount


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.endswith(SUFFIX))


def test_restart_finds_every_fully_written_chunk(make_engine, tmp_path) -> None:
    disk = tmp_path / "disk"
    tokens = list(range(12))
    kv = kv_for(12)
    first = make_engine(local_disk=str(disk))
    assert first.store(tokens, kv) == 12
    first.close()  # drains the async writes
    assert len(_files(disk)) == 3
    (disk / f"{TMP_PREFIX}999999999-{uuid.uuid4().hex}.part").write_bytes(b"half a chunk")  # a crashed writer
    truncated = _files(disk)[0]
    keep = truncated.read_bytes()
    truncated.write_bytes(keep[: len(keep) // 2])  # cut short by a crash
    second = make_engine(local_disk=str(disk))  # a new engine, a new (empty) hot pool
    assert not any(p.name.startswith(TMP_PREFIX) for p in disk.iterdir())
    assert len(_files(disk)) == 2 and not truncated.exists()
    truncated.write_bytes(keep)  # put it back whole: a third engine indexes all three
    third = make_engine(local_disk=str(disk))
    assert third.locate(tokens) == ["disk"] * 3
    mask, out = third.retrieve(tokens)
    assert bool(mask.all()) and np.array_equal(out, kv)
    assert third.locate(tokens) == ["hot"] * 3  # promoted


def test_corrupted_chunk_is_a_counted_miss_and_removed(make_engine, tmp_path) -> None:
    engine = make_engine(disk=True)
    tokens = list(range(8))
    engine.store(tokens, kv_for(8))
    engine.flush()
    engine.clear("hot")
    victim = engine._tiers["disk"].path_of(engine.db.keys(tokens)[1])
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    mask, out = engine.retrieve(tokens)
    assert mask.tolist() == [True] * 4 + [False] * 4 and out.shape[2] == 4
    assert not victim.exists()
    assert engine.stats().tiers["disk"].errors == 1
    assert engine.lookup(tokens) == 4


def test_store_returns_before_the_disk_write_and_reads_see_queued_chunks(make_engine) -> None:
    engine = make_engine(disk=True, disk_writers=1, disk_queue=2)
    kvs = [kv_for(4, seed=i) for i in range(6)]
    for i, kv in enumerate(kvs):  # more chunks than queue slots: store waits for a slot, never fails
        engine.store([i] * 4, kv)
    engine.clear("hot")
    for i, kv in enumerate(kvs):
        _, out = engine.retrieve([i] * 4)
        assert np.array_equal(out, kv)
    engine.flush()
    assert len(_files(Path(engine.config.local_disk))) == 6


def test_disk_cap_evicts_by_policy(make_engine) -> None:
    one = kv_for(4, layers=4, hidden=64).nbytes  # 4 KiB per chunk
    engine = make_engine(disk=True, local_disk_size=3 * (one + 200), write_policy="write_through")
    for i in range(5):
        engine.store([i] * 4, kv_for(4, layers=4, hidden=64, seed=i))
    engine.flush()
    engine.clear("hot")
    assert [engine.lookup([i] * 4) for i in range(5)] == [0, 0, 4, 4, 4]
    assert engine.stats().tiers["disk"].evictions == 2


def test_disk_full_leaves_no_partial_file_and_the_engine_goes_on(make_engine, tmp_path) -> None:
    """A real full filesystem: a 256 KiB tmpfs mounted for the test (needs root)."""
    needs_root_mount()
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        engine = make_engine(local_disk=str(mnt), local_disk_size="10M", disk_writers=1)  # writes in order
        big = kv_for(4, layers=16, hidden=512)  # 128 KiB per chunk: the second one no longer fits
        for i in range(3):
            engine.store([i] * 4, big)
        engine.flush()
        assert len(_files(mnt)) == 1
        assert not any(p.name.startswith(TMP_PREFIX) for p in mnt.iterdir())
        assert engine.stats().tiers["disk"].errors == 2
        engine.clear("hot")
        assert [engine.lookup([i] * 4) for i in range(3)] == [4, 0, 0]
        engine.store([9] * 4, kv_for(4))  # small chunks still go to disk
        engine.flush()
        assert len(_files(mnt)) == 2
        engine.close()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    assert os.path.isdir(mnt)


def test_two_engines_share_a_disk_directory(make_engine, tmp_path) -> None:
    a = make_engine(disk=True)
    b = make_engine(disk=True)  # indexed the (empty) directory before a wrote anything
    a.store(list(range(8)), kv_for(8))
    a.flush()
    assert b.locate(list(range(8))) == ["disk", "disk"]
    mask, out = b.retrieve(list(range(8)))
    assert bool(mask.all()) and np.array_equal(out, kv_for(8))
    a.store(list(range(100, 108)), kv_for(8))  # b has not looked these up: not in its index
    a.flush()
    a.clear("hot")
    assert b.clear("disk") == 4  # every chunk file of the model, not only those b indexed
    assert b.lookup(list(range(100, 108))) == 0 and b.locate(list(range(8))) == ["hot", "hot"]  # promoted above
    assert not _files(tmp_path / "disk")


CRASHER = """
import sys, numpy as np
from infercache.kv import Engine
e = Engine(chunk_size=4, pool_name=sys.argv[1], local_cpu_size="64M", local_disk=sys.argv[2], disk_writers=4)
rng = np.random.default_rng(3)
for i in range(10000):  # until killed
    e.store([i] * 4, rng.standard_normal((2, 16, 4, 2048)).astype("float16"))  # 512 KiB chunks
    if i == 8:
        e.flush()
        print("ready", flush=True)
"""


def test_a_writer_killed_mid_write_leaves_only_whole_chunks(make_engine, tmp_path, data_dir) -> None:
    import signal
    import sys

    disk = tmp_path / "crash"
    name = f"t-eng-{uuid.uuid4().hex[:10]}"
    proc = subprocess.Popen([sys.executable, "-c", CRASHER, name, str(disk)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ.copy())  # fmt: skip
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    proc.send_signal(signal.SIGKILL)  # somewhere in the middle of a store or a disk write
    proc.wait(timeout=30)
    engine = make_engine(local_disk=str(disk))  # its own hot pool: everything comes from disk
    from infercache.kv import Pool

    Pool.destroy(name, data_dir=data_dir)
    assert not [p for p in disk.iterdir() if p.name.startswith(TMP_PREFIX)]
    indexed = engine._tiers["disk"].keys()
    assert len(indexed) >= 9 and len(indexed) == len(_files(disk))
    n = 0
    while engine.lookup([n] * 4):
        n += 1
    assert n >= 9
    for i in range(n):  # every chunk the index kept passes its checksum
        mask, _ = engine.retrieve([i] * 4)
        assert bool(mask.all())
    assert engine.stats().tiers["disk"].errors == 0


def test_a_second_disk_tier_in_this_process_keeps_the_first_ones_temp_files(tmp_path) -> None:
    """Two engines of one process on one directory: the second's start-up sweep must not remove a
    temp file the first is writing (same pid), only stale ones (a dead process with our pid)."""
    from infercache.kv.tiers import disk as disk_module

    directory = tmp_path / "disk"
    directory.mkdir()
    writing = directory / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}.part"
    stale = directory / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}.part"
    writing.write_bytes(b"being written")
    stale.write_bytes(b"left by a dead process that had our pid")
    with disk_module._WRITING_LOCK:
        disk_module._WRITING.add(writing.name)  # as DiskTier._write registers it while writing
    try:
        tier = disk_module.DiskTier(directory, 1 << 20, "lru")
        tier.close()
    finally:
        with disk_module._WRITING_LOCK:
            disk_module._WRITING.discard(writing.name)
    assert writing.exists() and not stale.exists()


def test_a_chunk_with_a_key_over_1k_is_found_after_restart(tmp_path) -> None:
    from infercache.kv.tiers.base import ChunkHeader
    from infercache.kv.tiers.disk import DiskTier

    key = "m" * 1500 + "@1@0@" + "ab" * 16 + "@auto"
    payload = np.arange(2 * 2 * 4 * 8, dtype="<f2").reshape(2, 2, 4, 8)
    first = DiskTier(tmp_path, 1 << 20, "lru")
    assert first.put(key, ChunkHeader(1, 0, payload.shape, payload.nbytes), payload)
    first.close()
    second = DiskTier(tmp_path, 1 << 20, "lru")
    try:
        assert second.keys() == [key]
        ok, got = second.read(key, lambda head, buf: np.frombuffer(buf, dtype="<f2").reshape(head.shape).copy())
        assert ok and np.array_equal(got, payload)
    finally:
        second.close()
