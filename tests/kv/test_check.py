"""check / repair: deliberately damaged derived state is found and rebuilt from the entry
table; processes killed inside an update or between reserve and publish leave a pool that
the next user recovers.

The damage is done by writing into the real mapping (what a bug or a crash would leave);
the crashes are real SIGKILLs of separate processes at chosen points inside a put.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from infercache.kv import Pool
from infercache.kv.codec import key_hash as _key_hash
from infercache.kv.layout import E_SIZE, ENTRY_WORDS, HDR_DIRTY, HDR_ENTRIES, HDR_FREE_TOP
from tests.kv.corrupt import corrupt_allocator

REPO = Path(__file__).resolve().parents[2]


def _filled(make_pool, n: int = 20, size: str = "1M"):
    pool = make_pool(size=size, block_size="4K")
    values = {f"k{i}": bytes([i]) * (1000 + 3000 * i) for i in range(n)}
    for key, value in values.items():
        assert pool.put(key, value)
    pool.delete("k3")  # a hole, so the free lists have more than one extent
    pool.delete("k7")
    del values["k3"], values["k7"]
    assert pool.check().ok
    return pool, values


def _assert_intact(pool, values: dict) -> None:
    assert set(pool.keys()) == set(values)
    for key, value in values.items():
        assert pool.get(key) == value, key


def _repair_cycle(pool, values: dict, needle: str) -> None:
    report = pool.check()
    assert not report.ok and any(needle in p for p in report.problems), report.problems
    fixed = pool.check(repair=True)
    assert fixed.ok and fixed.repaired and fixed.problems
    assert pool.check().ok
    _assert_intact(pool, values)
    assert pool.stats()["repairs"] == 1


def test_check_passes_on_a_healthy_pool(make_pool) -> None:
    pool, values = _filled(make_pool)
    report = pool.check()
    assert report.ok and report.problems == () and report.repaired == ()
    _assert_intact(pool, values)


def test_leaked_free_extent_and_bad_counter(make_pool) -> None:
    pool, values = _filled(make_pool)
    corrupt_allocator(pool)
    report = pool.check()
    assert any("leaked" in p for p in report.problems)
    assert any("free counter" in p for p in report.problems)
    _repair_cycle(pool, values, "free")
    assert pool.put("after", b"x" * 100_000)


def test_free_extent_overlapping_an_entry(make_pool) -> None:
    pool, values = _filled(make_pool)
    e = pool._index.find(b"k5", _key_hash(b"k5"))
    start = pool._table.start(e)
    with pool._lock.exclusive():
        pool._st.alloc.free(start, 1)  # the allocator now believes k5's first block is free
    _repair_cycle(pool, values, "overlaps")


def test_broken_key_index(make_pool) -> None:
    import numpy as np

    pool, values = _filled(make_pool)
    slots = np.frombuffer(pool._index._slots, dtype=np.int32)
    victim = int(np.flatnonzero(slots)[0])
    slots[victim] = 0  # one key is no longer reachable
    del slots
    _repair_cycle(pool, values, "index")


def test_wrong_counters_and_free_slot_stack(make_pool) -> None:
    pool, values = _filled(make_pool)
    pool._hq[HDR_ENTRIES] += 5
    pool._hq[HDR_FREE_TOP] = 0  # the two deleted slots are lost from the stack
    report = pool.check()
    assert any("entry counter" in p for p in report.problems)
    assert any("free-slot stack" in p for p in report.problems)
    _repair_cycle(pool, values, "counter")


def test_damaged_record_is_dropped_by_repair(make_pool) -> None:
    pool, values = _filled(make_pool)
    e = pool._index.find(b"k9", _key_hash(b"k9"))
    pool._table.q[e * ENTRY_WORDS + E_SIZE] += 1  # size no longer matches the checksum
    report = pool.check()
    assert not report.ok and any("checksum" in p for p in report.problems)
    fixed = pool.check(repair=True)
    assert fixed.ok and any("k9" in p or "checksum" in p for p in fixed.repaired + fixed.problems)
    del values["k9"]
    _assert_intact(pool, values)


def test_dirty_header_triggers_rebuild_on_next_use(make_pool) -> None:
    """A process that died inside an update leaves `dirty` set: the next locker rebuilds."""
    pool, values = _filled(make_pool)
    corrupt_allocator(pool)
    pool._hq[HDR_DIRTY] = 999_999_999  # as if that pid died mid-update
    other = Pool.open(pool.name)  # attaching recovers
    try:
        assert other._hq[HDR_DIRTY] == 0
        assert other.check().ok
        _assert_intact(other, values)
    finally:
        other.close()


_CRASH_SCRIPT = r"""
import os, signal, sys
from infercache.kv import Pool
from infercache.kv import pool as poolmod
from infercache.kv.allocator import Allocator
from infercache.kv.index import KeyIndex
from infercache.kv.table import EntryTable

name, where = sys.argv[1], sys.argv[2]
p = Pool.open(name)
assert p.put("survivor", b"s" * 5000)

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if where == "publish":  # inside the locked section, blocks allocated, entry reserved
    KeyIndex.insert = die  # class-level: these objects have __slots__ (this process only)
    p.put("victim", b"v" * 10_000)
elif where == "alloc":  # inside the allocator, lists half updated
    def half(self, s, n):  # the extent was taken off its list; the remainder never goes back
        self._h[0] -= 1
        die()
    Allocator._insert = half
    p.put("victim", b"v" * 10_000)
elif where == "copy":  # outside the lock, copying a large value into its reserved blocks
    EntryTable.data = die  # class-level, as above
    assert 5 << 20 > poolmod.SMALL_COPY
    p.put("victim", b"v" * (5 << 20))
print("not killed")
"""


@pytest.mark.parametrize("where", ["publish", "alloc", "copy"])
def test_sigkill_inside_a_put_leaves_a_recoverable_pool(make_pool, tmp_path: Path, where: str) -> None:
    pool, values = _filled(make_pool, 10, size="16M")
    script = tmp_path / "crash.py"
    script.write_text(_CRASH_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), pool.name, where], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=os.environ.copy())  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    values["survivor"] = b"s" * 5000
    report = pool.check()
    assert report.ok, report.problems
    assert report.recovered, "the crash left something to recover"
    assert not pool.contains("victim")
    _assert_intact(pool, values)
    used = pool.stats()["used_bytes"]
    assert used == sum(-(-len(v) // 4096) * 4096 for v in values.values()), "no blocks leaked"
    assert pool.put("victim", b"again")
    assert pool.get("victim") == b"again"


def test_damaged_header_geometry_is_refused_on_open(make_pool) -> None:
    from infercache.errors import BadInputError
    from infercache.kv.layout import HDR_TABLE_OFF

    pool = make_pool(size="1M")
    pool._hq[HDR_TABLE_OFF] += 4096
    try:
        with pytest.raises(BadInputError, match="damaged pool header"):
            Pool.open(pool.name)
    finally:
        pool._hq[HDR_TABLE_OFF] -= 4096
    Pool.open(pool.name).close()
