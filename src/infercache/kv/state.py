"""`PoolState`: the mapped views of one pool and the metadata operations on them.

Everything here runs under the pool's exclusive lock (pool.py takes it): slot bookkeeping
(free-slot stack, high-water mark), removing and evicting entries (with the policy's hooks),
making room for a new entry, reclaiming reservations of dead writers, and the per-process
read counters. repair.py and snapshot.py work on the same object; pool.py keeps the hot
path (put, get, find, reserve, publish) and the locking.
"""

from __future__ import annotations

import logging
import mmap
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from infercache.errors import BadInputError
from infercache.kv.allocator import MAX_BLOCKS, Allocator
from infercache.kv.codec import decode_key
from infercache.kv.index import KeyIndex
from infercache.kv.layout import (
    HDR_ALLOC_OFF, HDR_BLOCK_SIZE, HDR_BYTES_IN, HDR_BYTES_OUT, HDR_CLOCK, HDR_CREATED, HDR_EXPIRED, HDR_PUTS,
    HDR_REPAIRS, HDR_DATA_OFF, HDR_ENTRIES, HDR_EVICTIONS, HDR_FILE_SIZE,
    HDR_FREE_OFF, HDR_FREE_TOP, HDR_GHOST_CAP, HDR_GHOST_OFF, HDR_HITS, HDR_HWM, HDR_INDEX_CAP, HDR_INDEX_OFF,
    HDR_MAGIC, HDR_MISSES, HDR_N_BLOCKS, HDR_POLICY, HDR_TABLE_CAP, HDR_TABLE_OFF, HDR_TIER, HDR_VALUE_BYTES,
    HDR_VERSION, HEADER_BYTES, LAYOUT_VERSION, MAGIC, N_SLOTS, SLOT_BASE, SLOT_WORDS, ST_PUBLISHED, ST_WRITING, TIERS,
    F_HAS_PREFIX,
    compute_geometry,
)  # fmt: skip
from infercache.kv.policies import BY_ID, GhostRing, Queues, TableQueues, victims
from infercache.kv.procs import pid_alive
from infercache.kv.results import PoolStats
from infercache.kv.table import EntryTable

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)


class PoolState:
    """Views of a mapped pool file (validated on attach) and the locked operations on them."""

    def __init__(self, fd: int, path: Path, name: str) -> None:
        self.name = name
        size = os.fstat(fd).st_size
        if size < HEADER_BYTES:
            raise BadInputError(f"{path} is not an infercache pool (too small)")
        self.mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.mv = memoryview(self.mm)
        self.hq = self.mv[:HEADER_BYTES].cast("Q")
        self.hd = self.mv[:HEADER_BYTES].cast("d")
        hq = self.hq
        problem = None
        if hq[HDR_MAGIC] == MAGIC and hq[HDR_VERSION] != LAYOUT_VERSION:
            problem = (
                f"{path} is a pool of layout version {hq[HDR_VERSION]}; this infercache reads version "
                f"{LAYOUT_VERSION} only (version 2 added pin deadlines). Persist it with the infercache that made "
                f"it and `kv restore` the snapshot here, or delete and recreate the pool"
            )
        elif hq[HDR_MAGIC] != MAGIC or hq[HDR_FILE_SIZE] != size:
            problem = f"{path} is not an infercache pool of layout version {LAYOUT_VERSION}"
        elif reason := header_problem(hq, size):
            problem = f"{path}: damaged pool header ({reason})"
        if problem:
            self.release()
            raise BadInputError(problem)
        self.block_size = hq[HDR_BLOCK_SIZE]
        self.n_blocks = hq[HDR_N_BLOCKS]
        self.capacity = cap = hq[HDR_TABLE_CAP]
        self.policy = BY_ID[hq[HDR_POLICY]]
        self.tier = TIERS[hq[HDR_TIER]]
        mv = self.mv
        table_off = hq[HDR_TABLE_OFF]
        self.alloc = Allocator(mv[hq[HDR_ALLOC_OFF] : table_off], self.n_blocks)
        self.table = EntryTable(self.mm, mv, table_off, cap, hq[HDR_DATA_OFF], self.block_size)
        index_off = hq[HDR_INDEX_OFF]
        self.index = KeyIndex(mv[index_off : index_off + hq[HDR_INDEX_CAP] * 4].cast("i"), self.table)
        free_off = hq[HDR_FREE_OFF]
        self.free_stack = mv[free_off : free_off + cap * 4].cast("i")
        ghost_off = hq[HDR_GHOST_OFF]
        self.ghost = GhostRing(mv[ghost_off : ghost_off + hq[HDR_GHOST_CAP] * 8].cast("Q"), hq)

    def release(self) -> None:
        """Drop every view of the mapping, then unmap; a view still exported elsewhere (a numpy
        array a caller kept) only delays the unmap to garbage collection."""
        steps = []
        for attr in ("index", "alloc", "table", "ghost", "free_stack", "hq", "hd", "mv"):
            obj = getattr(self, attr, None)
            if obj is not None:
                steps.append(obj.release)
        steps.append(self.mm.close)
        for step in steps:
            try:
                step()
            except BufferError:
                log.debug("pool %s: mapping still exported; left to the garbage collector", self.name)

    # ------------------------------------------------------------ small helpers
    def tick(self) -> int:
        """Advance the pool's logical clock (recency and queue order)."""
        t = self.hq[HDR_CLOCK] + 1
        self.hq[HDR_CLOCK] = t
        return t

    def rows(self) -> "np.ndarray":
        """Every record ever used (up to the high-water mark), as a numpy view."""
        return self.table.rows(min(self.hq[HDR_HWM], self.capacity))

    def used_bytes(self) -> int:
        return (self.n_blocks - self.alloc.free_blocks) * self.block_size

    def published_keys(self, tag: int | None = None) -> list[str | bytes]:
        """Every published key (with prefix tag `tag`, when given), oldest insertion first."""
        import numpy as np

        table = self.table
        rows = self.rows()
        mask = table.states(rows) == ST_PUBLISHED
        if tag is not None:
            mask &= ((rows["flags"] & F_HAS_PREFIX) != 0) & (rows["prefix"] == np.uint64(tag))
        slots = np.flatnonzero(mask)
        slots = slots[np.argsort(rows["itick"][slots], kind="stable")]
        return [decode_key(table.key_of(e), table.flags(e)) for e in slots.tolist()]

    # ------------------------------------------------------------ entry slots
    def pop_slot(self) -> int:
        """A free entry slot (from the stack, else above the high-water mark), or -1."""
        hq = self.hq
        top = hq[HDR_FREE_TOP]
        if top:
            hq[HDR_FREE_TOP] = top - 1
            return self.free_stack[top - 1]
        hwm = hq[HDR_HWM]
        if hwm < self.capacity:
            hq[HDR_HWM] = hwm + 1
            return hwm
        return -1

    def slot_available(self) -> bool:
        return bool(self.hq[HDR_FREE_TOP]) or self.hq[HDR_HWM] < self.capacity

    def free_slots(self) -> int:
        return self.hq[HDR_FREE_TOP] + self.capacity - self.hq[HDR_HWM]

    def push_free(self, e: int) -> None:
        """Mark slot `e` free (a new generation) and push it on the free stack."""
        self.table.release_slot(e)
        top = self.hq[HDR_FREE_TOP]
        self.free_stack[top] = e
        self.hq[HDR_FREE_TOP] = top + 1

    def remove(self, e: int) -> None:
        """Unpublish a published entry and free its blocks and slot."""
        table = self.table
        hq = self.hq
        self.index.remove(table.hash(e), e)
        start, nb = table.extent(e)
        if nb:
            self.alloc.free(start, nb)
        hq[HDR_ENTRIES] -= 1
        hq[HDR_VALUE_BYTES] -= table.size(e)
        self.push_free(e)

    def drop_reservation(self, e: int) -> None:
        """Free an unpublished (WRITING) entry's blocks and slot."""
        start, nb = self.table.extent(e)
        if nb:
            self.alloc.free(start, nb)
        self.push_free(e)

    # ------------------------------------------------------------ eviction
    def evict(self, e: int) -> None:
        on_evict = self.policy.on_evict
        if on_evict is not None:
            on_evict(self, e)
        self.remove(e)
        self.hq[HDR_EVICTIONS] += 1

    def victims(self, queues: Queues | None = None) -> Iterator[int]:
        """Evictable entries in the policy's order (`queues`: where queue moves go; the table by default);
        entries whose pins are past their deadline are evictable (the pins go with them)."""
        return victims(self.policy, self, time.time(), queues or TableQueues(self))

    def clear_lapsed_pins(self) -> list[str]:
        """Zero the pins whose deadline has passed (a pinner that died, or forgot): every reader
        already treats them as none; `check` tidies the records (pin, unpin and put do it one by one)."""
        import numpy as np

        rows = self.rows()
        lapsed = np.flatnonzero(EntryTable.stale_pins(rows, time.time()))
        if not len(lapsed):
            return []
        rows["pins"][lapsed] = 0
        rows["pin_deadline"][lapsed] = 0.0
        note = f"cleared the pins of {len(lapsed)} entries whose pin deadline had passed"
        log.info("pool %s: %s", self.name, note)
        return [note]

    def make_room(self, nblocks: int) -> tuple[int, int]:
        """(slot, first block) for a new entry, evicting by policy as needed; (-1, -1) if impossible.

        Once the new entry fits, eviction goes on along the same victim order until 1/256 of
        the blocks and of the entry slots are free (a low watermark): ranking victims scans the
        entry table, and this spreads one scan over the next puts instead of one per put.
        Pools under 256 blocks or entries get no headroom (every put evicts just enough).
        """
        alloc = self.alloc
        for attempt in range(2):
            start = alloc.alloc(nblocks) if nblocks else 0
            if start >= 0 and self.slot_available():
                return self.pop_slot(), start
            order = self.victims()
            for victim in order:
                self.evict(victim)
                if start < 0:
                    start = alloc.alloc(nblocks)
                if start >= 0 and self.slot_available():
                    slot = self.pop_slot()
                    self._headroom(order)
                    return slot, start
            if start >= 0 and nblocks:
                alloc.free(start, nblocks)
            if attempt == 0 and not self.reclaim_orphans():
                break
        return -1, -1

    def _headroom(self, order: Iterator[int]) -> None:
        want_blocks = self.n_blocks >> 8
        want_slots = self.capacity >> 8
        for victim in order:
            if self.alloc.free_blocks >= want_blocks and self.free_slots() >= want_slots:
                return
            self.evict(victim)

    def reclaim_orphans(self) -> list[str]:
        """Free reservations whose writer process is gone (killed between reserve and publish)."""
        import numpy as np

        table = self.table
        notes = []
        for e in np.flatnonzero(table.states(self.rows()) == ST_WRITING).tolist():
            pid = table.writer(e)
            if not pid_alive(pid):
                key = table.key_of(e)
                self.drop_reservation(e)
                notes.append(f"reclaimed the unpublished entry {key!r} of dead writer pid {pid}")
        for note in notes:
            log.warning("pool %s: %s", self.name, note)
        return notes

    # ------------------------------------------------------------ read counters
    def claim_counter_slot(self, pid: int) -> int:
        """Header word of a free counter slot now owned by `pid` (one of a dead process is taken
        over, its counts folded into the totals), or -1 when all are in use."""
        hq = self.hq
        for i in range(N_SLOTS):
            base = SLOT_BASE + i * SLOT_WORDS
            owner = hq[base]
            if owner and pid_alive(owner):
                continue
            if owner:
                self._fold_counter_slot(base)
            hq[base] = pid
            return base
        return -1

    def release_counter_slot(self, base: int, pid: int) -> None:
        if self.hq[base] == pid:
            self._fold_counter_slot(base)

    def _fold_counter_slot(self, base: int) -> None:
        hq = self.hq
        hq[HDR_HITS] += hq[base + 1]
        hq[HDR_MISSES] += hq[base + 2]
        hq[HDR_BYTES_OUT] += hq[base + 3]
        for k in range(SLOT_WORDS):
            hq[base + k] = 0

    def stats(self, path: str) -> PoolStats:
        """The pool's sizes, use and counters (the caller holds a lock)."""
        hq = self.hq
        size = self.n_blocks * self.block_size
        used = self.used_bytes()
        hits, misses, bytes_out = self.read_counters()
        pinned, next_deadline = self.pin_summary(time.time())
        return PoolStats(
            name=self.name, tier=self.tier, path=path, policy=self.policy.name, size_bytes=size, used_bytes=used,
            free_bytes=size - used, utilization=used / size if size else 0.0, value_bytes=hq[HDR_VALUE_BYTES],
            entries=hq[HDR_ENTRIES], capacity_entries=self.capacity, block_size=self.block_size,
            blocks=self.n_blocks, free_blocks=self.alloc.free_blocks,
            largest_free_bytes=self.alloc.largest_free() * self.block_size, file_bytes=hq[HDR_FILE_SIZE], hits=hits,
            misses=misses, hit_rate=hits / (hits + misses) if hits + misses else 0.0, evictions=hq[HDR_EVICTIONS],
            expired=hq[HDR_EXPIRED], puts=hq[HDR_PUTS], bytes_in=hq[HDR_BYTES_IN], bytes_out=bytes_out,
            repairs=hq[HDR_REPAIRS], created=self.hd[HDR_CREATED], layout_version=hq[HDR_VERSION],
            pinned_entries=pinned, next_pin_deadline=next_deadline,
        )  # fmt: skip

    def pin_summary(self, now: float) -> tuple[int, float | None]:
        """(published entries a live pin protects, the soonest deadline among their timed pins)."""
        import numpy as np

        rows = self.rows()
        live = (EntryTable.states(rows) == ST_PUBLISHED) & ~EntryTable.unpinned(rows, now)
        deadlines = rows["pin_deadline"][live]
        timed = deadlines[deadlines > 0]
        return int(np.count_nonzero(live)), float(timed.min()) if len(timed) else None

    def read_counters(self) -> tuple[int, int, int]:
        """Totals of hits, misses and bytes out: the header's plus every slot's."""
        hq = self.hq
        hits, misses, out = hq[HDR_HITS], hq[HDR_MISSES], hq[HDR_BYTES_OUT]
        for i in range(N_SLOTS):
            base = SLOT_BASE + i * SLOT_WORDS
            hits += hq[base + 1]
            misses += hq[base + 2]
            out += hq[base + 3]
        return hits, misses, out


def header_problem(hq: memoryview, file_size: int) -> str | None:
    """Why the header's geometry words cannot be trusted, or None (they are all derived from
    block size and block count, so recomputing them catches any damage)."""
    bs, n_blocks = hq[HDR_BLOCK_SIZE], hq[HDR_N_BLOCKS]
    if bs < 64 or bs & (bs - 1) or not 0 < n_blocks <= MAX_BLOCKS:
        return f"block size {bs}, {n_blocks} blocks"
    g = compute_geometry(n_blocks * bs, bs)
    expected = {
        "table capacity": (HDR_TABLE_CAP, g.table_cap), "index capacity": (HDR_INDEX_CAP, g.index_cap),
        "ghost capacity": (HDR_GHOST_CAP, g.ghost_cap), "allocator offset": (HDR_ALLOC_OFF, g.alloc_off),
        "table offset": (HDR_TABLE_OFF, g.table_off), "index offset": (HDR_INDEX_OFF, g.index_off),
        "free-slot offset": (HDR_FREE_OFF, g.free_off), "ghost offset": (HDR_GHOST_OFF, g.ghost_off),
        "data offset": (HDR_DATA_OFF, g.data_off), "file size": (HDR_FILE_SIZE, g.file_size),
    }  # fmt: skip
    for label, (word, value) in expected.items():
        if hq[word] != value:
            return f"{label} {hq[word]} != {value}"
    if g.file_size != file_size:
        return f"file is {file_size} bytes, geometry needs {g.file_size}"
    if hq[HDR_POLICY] not in BY_ID or hq[HDR_TIER] >= len(TIERS):
        return "unknown policy or tier"
    return None
