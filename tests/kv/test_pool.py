"""Pool basics in one process (plus simple attach-from-another-process checks): values, keys,
views, prefixes, registry, permissions and bad input."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from infercache.errors import BadInputError, InfercacheError
from infercache.kv import Pool

REPO = Path(__file__).resolve().parents[2]


def _py(code: str) -> str:
    """Run `code` in a fresh interpreter (same env: same data dir) and return its stdout."""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=os.environ.copy())  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_put_get_roundtrip_bytes_and_kinds(make_pool) -> None:
    pool = make_pool(size="4M")
    payloads = {
        "empty": b"",
        "one": b"x",
        "block": b"b" * 4096,
        "odd": bytes(range(256)) * 37,
        b"\x00raw-key": b"bytes key",
    }
    for key, value in payloads.items():
        assert pool.put(key, value)
    assert pool.put("bytearray", bytearray(b"abc"))
    assert pool.put("memoryview", memoryview(b"0123456789")[2:7])
    for key, value in payloads.items():
        assert pool.get(key) == value
    assert pool.get("bytearray") == b"abc"
    assert pool.get("memoryview") == b"23456"
    assert pool.get("absent") is None
    assert pool.contains("one") and not pool.contains("absent")
    assert set(pool.keys()) == {"empty", "one", "block", "odd", b"\x00raw-key", "bytearray", "memoryview"}
    stats = pool.stats()
    assert stats["entries"] == 7 and stats["misses"] == 1 and stats["hits"] == 7
    assert stats["bytes_in"] == sum(map(len, payloads.values())) + 3 + 5
    assert stats["bytes_out"] == stats["bytes_in"]


def test_replace_and_delete(make_pool) -> None:
    pool = make_pool(size="1M")
    assert pool.put("k", b"first" * 1000)
    used = pool.stats()["used_bytes"]
    assert pool.put("k", b"second")
    assert pool.get("k") == b"second"
    assert pool.stats()["entries"] == 1 and pool.stats()["used_bytes"] < used
    assert pool.delete("k") and not pool.delete("k")
    assert pool.get("k") is None
    assert pool.stats()["used_bytes"] == 0 and pool.stats()["entries"] == 0


def test_numpy_values_and_get_array(make_pool) -> None:
    pool = make_pool(size="8M")
    kv = np.random.default_rng(1).standard_normal((2, 4, 16, 64)).astype(np.float16)
    assert pool.put("kv", kv)
    back = pool.get_array("kv", np.float16, kv.shape)
    assert back.dtype == np.float16 and back.shape == kv.shape and np.array_equal(back, kv)
    back[0, 0, 0, 0] = 42  # a copy: the pool is untouched
    assert np.array_equal(pool.get_array("kv", "float16", kv.shape), kv)
    strided = np.arange(100, dtype=np.int64)[::3]  # not contiguous: copied first
    assert pool.put("strided", strided)
    assert np.array_equal(pool.get_array("strided", np.int64), strided)
    with pytest.raises(BadInputError, match="shape"):
        pool.get_array("kv", np.float16, (3, 3))
    assert pool.get_array("absent", np.float32, (1,)) is None
    out = np.empty(kv.nbytes, dtype=np.uint8)
    assert pool.get_into("kv", out) == kv.nbytes
    assert out.tobytes() == kv.tobytes()


def test_large_values_copied_outside_the_lock_roundtrip(make_pool) -> None:
    pool = make_pool(size="64M")
    big = np.random.default_rng(2).integers(0, 255, size=(20 << 20), dtype=np.uint8)
    assert pool.put("big", big)
    assert pool.get("big") == big.tobytes()
    with pool.view("big") as view:
        assert view.readonly and len(view) == big.nbytes
        assert np.array_equal(np.frombuffer(view, dtype=np.uint8), big)
    assert pool.check().ok


def test_view_lifetime_and_reentry(make_pool) -> None:
    pool = make_pool(size="1M")
    pool.put("k", b"hello world")
    with pool.view("k") as view:
        assert bytes(view) == b"hello world"
        with pytest.raises(InfercacheError, match="view"):
            pool.get("k")  # same thread, lock held: a clear error, never a deadlock
        kept = view
    with pytest.raises(ValueError):
        bytes(kept)  # released when the block ended
    with pool.view("absent") as view:
        assert view is None
    assert pool.get("k") == b"hello world"
    second = Pool.open(pool.name)  # another handle on the same pool, same thread
    try:
        with pool.view("k") as view:
            with pytest.raises(InfercacheError, match="view"):
                second.put("k", b"would deadlock on the other handle's flock")
        assert second.put("k", b"fine now")
    finally:
        second.close()


def test_prefix_tags(make_pool) -> None:
    pool = make_pool(size="1M")
    parent = "a3f9" * 8
    for i in range(3):
        assert pool.put(f"chunk{i}", b"c" * 10, prefix=parent)
    assert pool.put("other", b"o", prefix="different")
    assert pool.put("int-tagged", b"i", prefix=12345)
    assert pool.put("untagged", b"u")
    assert pool.find_by_prefix(parent) == ["chunk0", "chunk1", "chunk2"]
    assert pool.find_by_prefix(12345) == ["int-tagged"]
    assert pool.find_by_prefix("12345") == []  # str and int tags are distinct
    assert pool.find_by_prefix("nothing") == []
    pool.delete("chunk1")
    assert pool.find_by_prefix(parent) == ["chunk0", "chunk2"]


def test_pool_file_and_registry_are_private_and_outlive_the_creator(make_pool, data_dir: Path) -> None:
    pool = make_pool(size="1M")
    assert str(pool.path).startswith("/dev/shm/")
    assert stat.S_IMODE(os.stat(pool.path).st_mode) == 0o600
    registry = data_dir / "kv-pools.json"
    assert stat.S_IMODE(registry.stat().st_mode) == 0o600
    assert json.loads(registry.read_text())["pools"][pool.name]["path"] == str(pool.path)
    # a separate process creates, writes and exits; the pool stays
    name = pool.name + "-child"
    _py(
        "from infercache.kv import Pool\n"
        f"p = Pool.create({name!r}, size='1M')\n"
        "assert p.put('from-child', b'child data', priority=3)\n"
        "p.close()\n"
    )
    other = Pool.open(name)
    try:
        assert other.get("from-child") == b"child data"
        assert other.info("from-child")["priority"] == 3
    finally:
        other.close()
        Pool.destroy(name)
    assert name not in json.loads(registry.read_text())["pools"]


def test_two_processes_see_each_others_writes(make_pool) -> None:
    pool = make_pool(size="4M", policy="lfu")
    pool.put("parent", b"p" * 5000)
    out = _py(
        "import json\nfrom infercache.kv import Pool\n"
        f"p = Pool.open({pool.name!r})\n"
        "got = p.get('parent')\n"
        "assert p.put('child', b'c' * 7000)\n"
        "print(json.dumps({'len': len(got), 'stats': p.stats().to_json()}))\n"
        "p.close()\n"
    )
    result = json.loads(out)
    assert result["len"] == 5000
    assert result["stats"]["policy"] == "lfu"
    assert pool.get("child") == b"c" * 7000
    stats = pool.stats()
    assert stats["hits"] == 2 and stats["entries"] == 2  # counters live in the pool


def test_forked_child_uses_its_own_lock(make_pool) -> None:
    pool = make_pool(size="1M")
    pool.put("before", b"1")
    pid = os.fork()
    if pid == 0:  # child: must not share the parent's flock handle
        try:
            ok = pool.put("from-fork", b"2") and pool.get("before") == b"1"
            os._exit(0 if ok else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert pool.get("from-fork") == b"2"


def test_list_pools_and_stale_entries(make_pool, data_dir: Path) -> None:
    a = make_pool(size="1M")
    b = make_pool(size="2M", policy="fifo")
    a.put("x", b"123")
    rows = {row["name"]: row for row in Pool.list_pools()}
    assert set(rows) == {a.name, b.name}
    assert rows[a.name]["entries"] == 1 and rows[b.name]["policy"] == "fifo"
    assert os.getpid() in rows[a.name]["attached"]
    for key in ("name", "tier", "size_bytes", "used_bytes", "free_bytes", "utilization", "entries", "policy",
                "hits", "misses", "evictions", "bytes_in", "bytes_out", "path", "block_size", "capacity_entries"):
        assert key in rows[a.name]
    # the backing file vanishes behind our back (e.g. a reboot cleared /dev/shm)
    b.close()
    os.unlink(b.path)
    assert [row["name"] for row in Pool.list_pools()] == [a.name]
    with pytest.raises(BadInputError, match="gone"):
        Pool.open(b.name)
    # the name is free again for a new pool
    again = make_pool(name=b.name, size="1M")
    assert again.stats()["entries"] == 0


def test_destroy_refuses_foreign_file(data_dir: Path, tmp_path: Path) -> None:
    from infercache.kv import registry

    foreign = tmp_path / "precious.bin"
    foreign.write_bytes(b"not a pool" * 10)
    with registry.locked(data_dir) as reg_file:  # a registry entry pointing at someone else's file
        registry.save(reg_file, {**registry.load(data_dir), "fake": {"path": str(foreign), "tier": "disk"}})
    with pytest.raises(InfercacheError, match="not an infercache pool"):
        Pool.destroy("fake")
    assert foreign.read_bytes() == b"not a pool" * 10
    with pytest.raises(BadInputError):
        Pool.open("fake")


def test_disk_tier(make_pool, tmp_path: Path) -> None:
    backing = tmp_path / "pool.bin"
    pool = make_pool(size="2M", tier="disk", path=backing)
    assert pool.tier == "disk" and pool.path == backing
    assert stat.S_IMODE(backing.stat().st_mode) == 0o600
    pool.put("k", b"on disk")
    pool.close()
    again = Pool.open(pool.name)
    assert again.get("k") == b"on disk"
    again.close()


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"size": "12Q"}, "12Q"),
        ({"size": "lots"}, "lots"),
        ({"size": 0}, "size"),
        ({"size": "8M", "policy": "random-walk"}, "random-walk"),
        ({"size": "8M", "tier": "tape"}, "tape"),
        ({"size": "8M", "block_size": "3K"}, "block size"),
        ({"size": "8M", "block_size": "huge"}, "huge"),
        ({"size": "8M", "tier": "disk"}, "path"),
        ({"size": "8M", "path": "/tmp/x"}, "tier disk"),
        ({"size": "1K", "block_size": "4K"}, "one block"),
    ],
)
def test_create_bad_input(data_dir: Path, kwargs: dict, needle: str) -> None:
    with pytest.raises(BadInputError, match=needle):
        Pool.create("t-bad-input", **kwargs)
    assert Pool.list_pools() == []
    assert not any("t-bad-input" in p.name for p in Path("/dev/shm").iterdir())


@pytest.mark.parametrize("name", ["", "../escape", "a/b", ".hidden", "x" * 200, "sp ace"])
def test_bad_names(data_dir: Path, name: str) -> None:
    with pytest.raises(BadInputError, match="name"):
        Pool.create(name, size="1M")


def test_size_larger_than_dev_shm_free_space(data_dir: Path) -> None:
    st = os.statvfs("/dev/shm")
    free = st.f_bavail * st.f_frsize
    with pytest.raises(BadInputError) as info:
        Pool.create("t-too-big", size=free + (1 << 30))
    message = str(info.value)
    assert "/dev/shm" in message and re.search(r"\d{6,} bytes", message)  # the numbers, not just words
    assert not any("t-too-big" in p.name for p in Path("/dev/shm").iterdir())
    assert Pool.list_pools() == []


def test_name_used_is_refused_and_existing_pool_untouched(make_pool) -> None:
    pool = make_pool(size="1M")
    pool.put("keep", b"me")
    with pytest.raises(BadInputError, match="already"):
        Pool.create(pool.name, size="2M")
    assert pool.stats()["size_bytes"] == 1 << 20 and pool.get("keep") == b"me"


def test_gpu_tier_does_not_exist(data_dir: Path) -> None:
    """Only cpu and disk tiers exist (a gpu tier could not be tested here or in CI)."""
    with pytest.raises(BadInputError, match=r"unknown tier 'gpu' \(expected one of: cpu, disk\)"):
        Pool.create("t-gpu", size="1M", tier="gpu")
    assert Pool.list_pools() == []


def test_bad_keys_values_and_options(make_pool) -> None:
    pool = make_pool(size="64K", block_size="1K")
    with pytest.raises(BadInputError, match="1024"):
        pool.put("k" * 1025, b"x")
    with pytest.raises(BadInputError):
        pool.put("", b"x")
    with pytest.raises(BadInputError):
        pool.put(42, b"x")  # type: ignore[arg-type]
    with pytest.raises(BadInputError):
        pool.put("k", object())
    with pytest.raises(BadInputError, match="larger than pool"):
        pool.put("k", bytes(65 * 1024))
    with pytest.raises(BadInputError, match="ttl"):
        pool.put("k", b"x", ttl=0)
    with pytest.raises(BadInputError):
        pool.put("k", b"x", ttl="soon")
    assert pool.put("k", b"x", ttl="2h")
    assert 7000 < pool.info("k")["expires"] - pool.info("k")["created"] <= 7200
    assert pool.stats()["entries"] == 1
    with pytest.raises(BadInputError, match="unknown pool"):
        Pool.open("t-never-made")


def test_closed_pool_refuses_calls(make_pool) -> None:
    pool = make_pool(size="1M")
    pool.close()
    pool.close()  # idempotent
    with pytest.raises(InfercacheError, match="closed"):
        pool.get("k")


def test_table_capacity_limits_entries_and_evicts(make_pool) -> None:
    pool = make_pool(size="64K", block_size="64")  # 1024 blocks -> 1024 entries
    cap = pool.stats()["capacity_entries"]
    for i in range(cap + 50):
        assert pool.put(f"k{i}", b"")  # zero-size values take a slot and no blocks
    assert pool.stats()["entries"] == cap
    assert pool.stats()["evictions"] == 50
    assert pool.check().ok


def test_half_built_pool_files_of_dead_builders_are_swept(make_pool) -> None:
    """A create/restore killed before its final rename leaves .infercache-tmp-<pid>-*; the next build removes it."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = Path("/dev/shm") / f".infercache-tmp-{dead_pid}-feedface"
    alive = Path("/dev/shm") / f".infercache-tmp-{os.getpid()}-cafebabe"
    stale.write_bytes(b"half a pool")
    alive.write_bytes(b"someone is building this")
    try:
        make_pool(size="1M")
        assert not stale.exists()
        assert alive.exists(), "a live builder's file is left alone"
    finally:
        for path in (stale, alive):
            path.unlink(missing_ok=True)


def test_long_keys_live_with_their_data(make_pool, tmp_path: Path) -> None:
    """Keys over 120 bytes (e.g. model@world@worker@sha256@dtype with a long model name) are kept
    at the start of the entry's blocks: lookups, eviction, prefixes, check and snapshots work."""
    pool = make_pool(size="64K", block_size="1K", policy="fifo")
    long_a = "meta-llama/" + "x" * 150 + "@1@0@" + "ab" * 32 + "@float16"
    long_b = "b" * 1024
    assert pool.put(long_a, b"A" * 1000, prefix="p")  # 1000 + 226 bytes: two blocks
    assert pool.put(long_b, b"B" * 3000)
    assert pool.put("short", b"S" * 10)
    assert pool.info(long_a)["blocks"] == 2
    assert pool.get(long_a) == b"A" * 1000 and pool.get(long_b) == b"B" * 3000
    assert pool.find_by_prefix("p") == [long_a]
    assert set(pool.keys()) == {long_a, long_b, "short"}
    assert pool.check().ok
    snapshot = tmp_path / "long.kvsnap"
    pool.persist(snapshot)
    restored = Pool.restore(snapshot, name=pool.name + "-r")
    try:
        assert restored.get(long_b) == b"B" * 3000 and restored.get(long_a) == b"A" * 1000
        assert restored.check().ok
    finally:
        restored.close()
        Pool.destroy(pool.name + "-r")
    assert pool.delete(long_a) and pool.get(long_a) is None
    assert pool.evict(percent=100) == 2
    assert pool.stats()["used_bytes"] == 0 and pool.check().ok


def test_read_counters_of_a_killed_reader_still_count(make_pool) -> None:
    """Readers count in per-process slots of the header (they share the lock); a reader that
    dies keeps its counts in its slot, and the next process to need a slot folds them in."""
    pool = make_pool(size="1M")
    pool.put("k", b"v" * 100)
    killed = subprocess.run(
        [sys.executable, "-c",
         "import os, signal\nfrom infercache.kv import Pool\n"
         f"p = Pool.open({pool.name!r})\n"
         "for _ in range(5): assert p.get('k') == b'v' * 100\n"
         "assert p.get('absent') is None\n"
         "os.kill(os.getpid(), signal.SIGKILL)\n"],
        cwd=REPO, env=os.environ.copy(), timeout=120, capture_output=True, text=True,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    stats = pool.stats()
    assert stats["hits"] == 5 and stats["misses"] == 1 and stats["bytes_out"] == 500
    for _ in range(3):  # new processes reuse slots; no count is lost or doubled
        _py(f"from infercache.kv import Pool\np = Pool.open({pool.name!r})\nassert p.get('k')\np.close()\n")
    pool.get("k")
    stats = pool.stats()
    assert stats["hits"] == 9 and stats["misses"] == 1 and stats["bytes_out"] == 900


def test_threads_share_one_pool_object(make_pool) -> None:
    """flock belongs to the open file, so threads are serialised by the Pool's own thread lock."""
    import threading

    pool = make_pool(size="2M", block_size="1K", policy="lru")
    errors: list[BaseException] = []

    def work(tid: int) -> None:
        try:
            for i in range(300):
                key = f"t{tid}-{i % 40}"
                value = bytes([tid]) * (100 + (i % 7) * 900)
                assert pool.put(key, value)
                got = pool.get(key)
                assert got is None or got[:1] == bytes([tid]), "another thread's bytes"
                with pool.view(f"t{(tid + 1) % 4}-{i % 40}") as view:
                    assert view is None or len(set(bytes(view))) == 1
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors[0]
    assert pool.check().ok
    assert pool.stats()["entries"] > 0


@pytest.mark.parametrize("policy", ["lru", "s3fifo"])
def test_replacements_of_every_size_keep_the_pool_consistent(make_pool, policy: str) -> None:
    """Replacing a value reuses its slot and blocks when the block count is unchanged (the small-put
    fast path) and reallocates otherwise; against a dict model, with pins, long keys (stored with
    the data) and empty values, every value reads back, pins carry over and check stays clean."""
    import random

    pool = make_pool(size="256K", block_size="1K", policy=policy)
    rng = random.Random(4)
    keys = [f"k{i}" for i in range(20)] + ["L" * 200 + str(i) for i in range(4)] + [b"raw\x00", "e"]
    model: dict[object, bytes] = {}
    assert pool.put("k0", b"a" * 900) and pool.pin("k0")
    before = pool.info("k0")
    assert pool.put("k0", b"b" * 1000)  # same block count: taken over in place
    after = pool.info("k0")
    assert after["pins"] == 1 and after["blocks"] == before["blocks"] == 1
    assert after["insert_tick"] > before["insert_tick"] and pool.get("k0") == b"b" * 1000
    assert pool.put("k0", b"c" * 2500) and pool.info("k0")["pins"] == 1 and pool.get("k0") == b"c" * 2500
    model["k0"] = b"c" * 2500
    for step in range(400):
        key = rng.choice(keys)
        size = rng.choice([0, 1, 200, 1000, 1024, 1500, 3000])
        value = bytes([step % 251]) * size
        assert pool.put(key, value)
        model[key] = value
        if step % 97 == 0:
            assert pool.delete(key)
            del model[key]
    for key, value in model.items():
        assert pool.get(key) == value
    stats = pool.stats()
    assert stats["entries"] == len(model) and stats["value_bytes"] == sum(map(len, model.values()))
    report = pool.check()
    assert report.ok and not report.problems and not report.recovered


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_cpu_pools_are_prefaulted_at_create_disk_pools_stay_sparse(make_pool, tmp_path: Path) -> None:
    """Prefault makes the kernel allocate every page at create (so the first puts take no page
    faults); without it a fresh tmpfs file holds only the pages the format wrote."""
    warm = make_pool(size="8M")
    assert _allocated(warm.path) >= os.stat(warm.path).st_size
    cold = make_pool(size="8M", prefault=False)
    assert _allocated(cold.path) < os.stat(cold.path).st_size // 2
    disk = make_pool(size="8M", tier="disk", path=tmp_path / "sparse.pool")
    assert _allocated(disk.path) < os.stat(disk.path).st_size // 2
    for pool in (warm, cold, disk):
        assert pool.put("k", b"v" * 5000) and pool.get("k") == b"v" * 5000
        assert pool.check().ok


@pytest.mark.parametrize("fresh", [True, False])
def test_prefault_by_touching_pages_keeps_every_byte(tmp_path: Path, fresh: bool) -> None:
    """The fallback for kernels without MADV_POPULATE_*: one write (fresh file) or one read (live
    pool) per page. Bytes never change, and every page is backed afterwards."""
    import mmap

    from infercache.kv import lifecycle

    path = Path("/dev/shm") / f"t-prefault-{uuid.uuid4().hex[:10]}"
    size = 64 * mmap.PAGESIZE
    content = os.urandom(3 * mmap.PAGESIZE + 17)
    try:
        with open(path, "wb") as handle:
            handle.write(content)
            handle.truncate(size)
        assert _allocated(path) < size
        with open(path, "r+b") as handle, mmap.mmap(handle.fileno(), size) as mm:
            assert lifecycle.prefault(mm, fresh=fresh, method="touch") == "touch"
        assert path.read_bytes() == content + bytes(size - len(content))
        assert _allocated(path) >= size
    finally:
        path.unlink(missing_ok=True)


def test_open_with_prefault_sees_the_same_pool(make_pool) -> None:
    pool = make_pool(size="4M")
    assert pool.put("k", b"x" * 70_000)
    with Pool.open(pool.name, prefault=True) as other:
        assert other.get("k") == b"x" * 70_000
        assert other.put("k2", b"y" * 9000)
    assert pool.get("k2") == b"y" * 9000 and pool.check().ok


def test_contains_many_agrees_with_contains_key_by_key(make_pool) -> None:
    """One locked section for many keys, with `contains`'s meaning: deleted, absent and expired
    keys (pinned or not) are absent; order and duplicates kept; no hit or miss counted."""
    import time

    pool = make_pool(size="64K", block_size="1K")
    long_key = "m" * 300  # kept with its data: looked up through the mapping, not the table
    for key in ("a", "b", "deleted", "short", "pinned-short", long_key):
        assert pool.put(key, b"v" * 10, ttl=0.05 if "short" in key else None)
    assert pool.put(b"raw", b"bytes key")
    assert pool.put("long-ttl", b"x", ttl=3600)
    assert pool.pin("pinned-short")
    assert pool.delete("deleted")
    time.sleep(0.15)  # the 50 ms TTLs pass (not a timing assertion)
    keys = ["a", "absent", "b", "deleted", "short", "pinned-short", long_key, b"raw", "raw", "long-ttl", "a"]
    before = pool.stats()
    got = pool.contains_many(keys)
    # (a str key and a bytes key of the same bytes are one key, as for put and get)
    assert got == [True, False, True, False, False, False, True, True, True, True, True]
    assert got == [pool.contains(k) for k in keys]
    after = pool.stats()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])
    assert pool.contains_many([]) == [] and pool.contains_many(iter(["b"])) == [True]
    assert pool.info("short") is not None  # still there (only eviction removes it), yet absent
    with pytest.raises(BadInputError):
        pool.contains_many(["a", ""])
    with pytest.raises(BadInputError, match="1024"):
        pool.contains_many(["k" * 1025])
    with pytest.raises(BadInputError):
        pool.contains_many(["a", 42])  # type: ignore[list-item]


def test_contains_many_sees_another_process_and_random_histories(make_pool) -> None:
    """A writer in another process; then random puts/deletes/replacements: always `contains` key by key."""
    import random

    pool = make_pool(size="256K", block_size="1K", policy="lru")
    _py(f"from infercache.kv import Pool\np = Pool.open({pool.name!r})\nfor i in range(0, 40, 2): p.put(f'k{{i}}', b'x')\n")
    assert pool.contains_many([f"k{i}" for i in range(40)]) == [i % 2 == 0 for i in range(40)]
    rng = random.Random(7)
    universe = [f"r{i}" for i in range(300)]
    for _ in range(600):
        key = rng.choice(universe)
        if rng.random() < 0.7:
            pool.put(key, b"z" * rng.choice((1, 900, 3000)))  # a full pool evicts
        else:
            pool.delete(key)
    sample = rng.sample(universe, 200) + ["k0", "k1"]
    assert pool.contains_many(sample) == [pool.contains(k) for k in sample]
    assert any(pool.contains_many(sample)) and not all(pool.contains_many(sample))
