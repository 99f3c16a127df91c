"""`Pool`: a named, fixed-size KV store in one shared mapping that any process can attach to.

Why this design (see layout.py for the bytes, state.py for the metadata operations):
- every piece of state (counters, allocator, entry table, key index) is in the mapping, so a
  second process that attaches by name sees exactly what the first one wrote;
- one `flock` (lock.py) guards metadata; a put reserves blocks under the lock, copies large
  values *outside* it (other processes keep working), then publishes the entry under the
  lock: readers find only published entries, so they never see a half-written value;
- a process that dies inside a metadata update leaves the header's `dirty` word set; the
  next process to take the lock rebuilds all derived state (repair.py) from the entry
  table. A writer killed while copying leaves an unpublished reservation that `open`,
  `check` and a full pool reclaim once its pid is gone.
Here: the hot path (put, get, find, reserve, publish); lifecycle.py creates/opens/destroys.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from infercache.errors import BadInputError, InfercacheError
from infercache.fsutil import atomic_file
from infercache.kv import eviction, lifecycle, procs, readers, snapshot
from infercache.kv.codec import checksum, key_info, key_infos, prefix_hash, value_view
from infercache.kv.handle import PoolHandle
from infercache.kv.layout import (
    F_HAS_PREFIX, HDR_BYTES_IN, HDR_CLOCK, HDR_ENTRIES, HDR_EXPIRED, HDR_FREE_TOP, HDR_PUTS, HDR_VALUE_BYTES,
    ST_PUBLISHED, ST_WRITING,
)  # fmt: skip
from infercache.kv.procs import attached_pids
from infercache.kv.repair import CheckReport, check_and_repair
from infercache.kv.results import EntryInfo, EvictionPlan, EvictionResult, PoolError, PoolStats
from infercache.kv.table import footprint
from infercache.units import format_size, parse_duration

if TYPE_CHECKING:
    import numpy as np

__all__ = ["Pool", "CheckReport", "attached_pids"]
log = logging.getLogger(__name__)

# Values up to SMALL_COPY are copied inside the one exclusive section of a put (or get):
# two lock round trips cost ~20-40 us of Python, a quarter of a 4 MiB memcpy, while holding
# the lock for a <= 4 MiB copy (~0.1-0.5 ms) costs other processes little. Larger values are
# copied outside the lock (put) or under the shared lock (get), where concurrency pays.
SMALL_COPY = 4 << 20
_DONE, _FAILED = -2, -1  # put outcomes that need no copy outside the lock


class _Refusal(str):
    """A reader's `expect` refused the value (this message): raised as BadInputError outside the lock."""


class Pool(PoolHandle):
    """A shared-memory (tier cpu) or file-backed (tier disk) KV pool; see module docstring.

    Use `Pool.create` / `Pool.open`, then put/get; `close()` (or `with`) detaches without
    deleting: the pool lives until `Pool.destroy`. A Pool object may be shared by threads;
    after `fork` the child reopens its own lock handle automatically.
    """

    @classmethod
    def create(
        cls,
        name: str,
        size: str | int = "64M",
        tier: str = "cpu",
        path: str | os.PathLike[str] | None = None,
        policy: str = "lru",
        block_size: str | int = "4K",
        data_dir: str | os.PathLike[str] | None = None,
        prefault: bool | None = None,
    ) -> "Pool":
        """Create and register a pool of `size` bytes of data; BadInputError before anything is made.

        `prefault` (default: on for tier cpu, off for disk) faults every page in at create, so the
        first puts run at memory speed; it costs the time to zero the pool once."""
        spec = lifecycle.check_create(name, size, tier, path, policy, block_size, data_dir, prefault)
        pool = cls._build(spec, data_dir, "pool")
        log.info("created pool %s (%s, %s) at %s", name, format_size(spec.geometry.data_bytes), tier, spec.target)
        return pool

    @classmethod
    def _build(cls, spec: lifecycle.PoolSpec, data_dir: Any, verb: str,
               fill: Callable[["Pool"], None] | None = None, **record: Any) -> "Pool":  # fmt: skip
        return lifecycle.build_registered(
            spec, data_dir, verb, lambda fd, target: cls(spec.name, target, fd, data_dir), lambda p: p._mm,
            cls.close, fill, **record,
        )  # fmt: skip

    @classmethod
    def open(cls, name: str, data_dir: str | os.PathLike[str] | None = None, prefault: bool = False) -> "Pool":
        """Attach to a registered pool from any process; BadInputError if unknown or gone.

        `prefault`: map every page now (~0.25 s per GiB here) instead of one fault per 4 KiB page
        on first touch; worth it for a process that will write much of a large pool."""
        fd, path = lifecycle.open_registered(name, data_dir)
        try:
            pool = cls(name, path, fd, data_dir)
        except BaseException:
            os.close(fd)
            raise
        if prefault:
            lifecycle.prefault(pool._mm, fresh=False)
        with pool._mutating():
            pool._st.reclaim_orphans()
            pool._claim_slot_locked()
        return pool

    @classmethod
    def destroy(cls, name: str, data_dir: str | os.PathLike[str] | None = None) -> None:
        """Delete the backing file and the registration (processes still attached keep their mapping)."""
        lifecycle.destroy(name, data_dir)

    @classmethod
    def status(cls, name: str, data_dir: str | os.PathLike[str] | None = None) -> PoolStats:
        """Stats of a registered pool plus `attached`: the pids mapping it (this process not counted)."""
        with cls.open(name, data_dir) as pool:
            stats = pool.stats()
        return dataclasses.replace(stats, attached=tuple(attached_pids(stats.path)))

    @classmethod
    def list_pools(cls, data_dir: str | os.PathLike[str] | None = None) -> list[PoolStats | PoolError]:
        """Stats (with `attached`) of every registered pool whose file exists; a PoolError row for
        one that cannot be opened."""
        rows: list[PoolStats | PoolError] = []
        for name, record, path, exists in lifecycle.registered(data_dir):
            if not exists:
                log.warning("pool %s: backing file %s is gone (stale registry entry)", name, path)
                continue
            attached = tuple(attached_pids(path))
            try:
                pool = cls.open(name, data_dir)
            except InfercacheError as exc:
                rows.append(PoolError(name, record.get("tier"), str(path), str(exc)))
                continue
            with pool:
                rows.append(dataclasses.replace(pool.stats(), attached=attached))
        return rows

    # ------------------------------------------------------------------ put
    def put(
        self,
        key: str | bytes,
        value: Any,
        priority: int = 0,
        ttl: float | str | None = None,
        prefix: str | bytes | int | None = None,
    ) -> bool:
        """Store `value` under `key` (replacing it); False when it cannot fit even after eviction.

        Values larger than the whole pool raise BadInputError. Data is copied before the
        entry is published, so no reader ever sees part of it. The old value of the key is
        dropped as the new one is reserved (its pins carry over), so a put that returns False
        leaves the key absent. `ttl`: seconds or a duration ('90m'); `prefix`: a tag for
        `find_by_prefix` (e.g. the parent chunk's token-prefix hash).
        """
        kb, flags, h = key_info(key)
        src = value_view(value)
        size = src.nbytes
        nblocks, key_flag = footprint(size, len(kb), self.block_size)
        flags |= key_flag
        if nblocks > self.n_blocks:
            raise BadInputError(
                f"value of {size} bytes ({format_size(size)}) is larger than pool {self.name!r} "
                f"({self.n_blocks * self.block_size} bytes)"
            )
        expiry = 0.0
        if ttl is not None:
            seconds = parse_duration(ttl)
            if seconds <= 0:
                raise BadInputError(f"ttl must be positive, got {ttl!r}")
            expiry = time.time() + seconds
        if not isinstance(priority, int) or not -(1 << 63) <= priority < 1 << 63:
            raise BadInputError(f"priority must be a 64-bit int, got {priority!r}")
        tag = 0
        if prefix is not None:
            tag = prefix_hash(prefix)
            flags |= F_HAS_PREFIX
        check = checksum(h, size, src)
        e, stamp = self._ex(self._put_locked, kb, h, flags, size, nblocks, priority, expiry, tag, check, src)
        if e < 0:
            return e == _DONE
        try:
            data = self._table.data(e)  # outside the lock: the blocks are ours and invisible to readers
            try:
                data[:] = src
            finally:
                data.release()
        except BaseException:
            self._ex(self._abandon_locked, e, stamp)
            raise
        return self._ex(self._finish_put_locked, e, stamp, kb, h)

    def _put_locked(
        self, kb: bytes, h: int, flags: int, size: int, nblocks: int, priority: int, expiry: float,
        tag: int, check: int, src: memoryview,
    ) -> tuple[int, int]:  # fmt: skip
        """Reserve; small values are also copied and published here. (_DONE|_FAILED, 0) or (entry, stamp).

        A small value is reserved, copied and published in this one exclusive section, so no
        other writer can have published the key meanwhile (no second lookup) and the record
        skips the WRITING state (nobody outside this section can see it; a crash inside leaves
        the header dirty and the rebuild drops the unpublished slot).
        """
        inline = size <= SMALL_COPY
        e, indexed = self._reserve_locked(kb, h, flags, size, nblocks, priority, expiry, tag, check, inline)
        if e < 0:
            return _FAILED, 0
        table = self._table
        if not inline:
            return e, table.stamp(e)
        if size:
            off = table.value_offset(e)
            self._mm[off : off + size] = src  # data first ...
        hq = self._hq
        if not indexed:
            self._index.insert(h, e)
            hq[HDR_ENTRIES] += 1
        table.set_state(e, ST_PUBLISHED)  # ... published last
        hq[HDR_VALUE_BYTES] += size
        hq[HDR_PUTS] += 1
        hq[HDR_BYTES_IN] += size
        return _DONE, 0

    def _abandon_locked(self, e: int, stamp: int) -> None:
        if self._table.stamp(e) == stamp:
            self._st.drop_reservation(e)

    def _finish_put_locked(self, e: int, stamp: int, kb: bytes, h: int) -> bool:
        if self._table.stamp(e) != stamp:  # reclaimed meanwhile (should not happen)
            log.warning("pool %s: reservation for %r was reclaimed before publishing", self.name, kb)
            return False
        self._publish_locked(e, kb, h)
        return True

    def _reserve_locked(
        self, kb: bytes, h: int, flags: int, size: int, nblocks: int, priority: int, expiry: float,
        tag: int, check: int, inline: bool = False,
    ) -> tuple[int, bool]:  # fmt: skip
        """Write a new record for the key (dropping its old value): (slot, whether the key index
        already points at it), or (-1, False) when it cannot fit.

        The record is left WRITING (tagged with this pid) for a copy outside the lock; with
        `inline` the caller publishes it in the same section and it stays FREE until then.
        """
        table = self._table
        st = self._st
        hq = self._hq
        pins, pin_deadline = 0, 0.0
        e = start = -1
        indexed = False
        old = self._index.find(kb, h)
        if old >= 0:  # replaced: the old value goes now, its live pins (and their deadline) carry over
            pins, pin_deadline = table.pin_state(old)
            if inline and nblocks and table.nblocks(old) == nblocks:
                # Same block count, copied and published in this one section: the new value
                # takes over the old one's slot, blocks and index position (same key, same
                # hash). The old record is unpublished first; nobody can read the slot until
                # we publish, and a crash in between leaves the header dirty, so the rebuild
                # frees the slot and blocks and drops the index position.
                # (The entry count and the key bytes stay as they are: same key, one entry.)
                e, start, indexed = old, table.start(old), True
                table.release_slot(old)
                hq[HDR_VALUE_BYTES] -= table.size(old)
            else:
                st.remove(old)
        if self._on_insert is not None:
            flags |= self._on_insert(st, h)
        if indexed:
            pass
        elif hq[HDR_FREE_TOP] and (not nblocks or (start := st.alloc.alloc(nblocks)) >= 0):
            e = st.pop_slot()  # the common case of make_room, without the call
            start = max(start, 0)
        else:
            e, start = st.make_room(nblocks)
            if e < 0:
                return -1, False
        tick = hq[HDR_CLOCK] + 1
        hq[HDR_CLOCK] = tick
        now = time.time()
        table.write(e, h, start, nblocks, size, len(kb), check, now, now, expiry, 0, priority, pins,
                    flags if inline else self._pid << 32 | flags, tag, tick, tick, pin_deadline)  # fmt: skip
        if not indexed:
            table.write_key(e, kb, start, flags)
        if not inline:
            table.set_state(e, ST_WRITING)  # last: the record is complete
        return e, indexed

    def _publish_locked(self, e: int, kb: bytes, h: int) -> None:
        table = self._table
        other = self._index.find(kb, h)
        if other >= 0:  # another writer published the same key while we copied: last one wins
            if table.pin_state(other)[0] > table.pin_state(e)[0]:  # the most live pins win, with their deadline
                table.set_pins(e, *table.pin_state(other))
            self._st.remove(other)
        table.clear_writer(e)
        self._index.insert(h, e)
        table.set_state(e, ST_PUBLISHED)
        hq = self._hq
        size = table.size(e)
        hq[HDR_ENTRIES] += 1
        hq[HDR_VALUE_BYTES] += size
        hq[HDR_PUTS] += 1
        hq[HDR_BYTES_IN] += size

    # ------------------------------------------------------------------ get
    def _lookup_locked(self, kb: bytes, h: int, count: bool, shared: bool) -> int:
        """Published, unexpired entry for the key, or -1; with `count`, updates hit/miss and recency.

        Under the shared lock (`shared`) only this process's counter slot and the entry's
        recency words are written: concurrent readers may lose an access-count increment or
        tie on a tick, which only blurs LRU/LFU order, never the structure. An expired entry
        is a miss; it is removed here only under the exclusive lock (else by eviction).
        """
        e = self._index.find(kb, h)
        hq = self._hq
        if e < 0:
            if count:
                hq[self._w_misses] += 1
            return -1
        table = self._table
        expiry = table.expiry(e)
        now = time.time()
        if expiry and expiry <= now:
            if count:
                hq[self._w_misses] += 1
                if not shared and not table.live_pins(e, now):
                    self._st.remove(e)
                    hq[HDR_EXPIRED] += 1
            return -1
        if count:
            hq[self._w_hits] += 1
            hq[self._w_bytes_out] += table.size(e)
            tick = hq[HDR_CLOCK] + 1
            hq[HDR_CLOCK] = tick
            table.touch(e, tick, now)
            if self._on_access is not None:
                self._on_access(table, e)
        return e

    def _read(
        self, key: str | bytes, copy: Callable[[memoryview], Any], expect: Callable[[int], str | None] | None = None
    ) -> Any:
        """Look up (counting a hit/miss) and run `copy` on the value's bytes, in one locked section.

        Normally under the shared lock, so readers in many processes look up and copy at once
        (writers wait); without a counter slot, under the exclusive lock. `expect(size)` returns
        an error message to refuse the value (raised once the lock is released).
        """
        kb, _, h = key_info(key)
        if self._shared_reads():
            result = self._sh(self._read_locked, kb, h, copy, expect, True)
        else:
            result = self._ex(self._read_locked, kb, h, copy, expect, False)
        if isinstance(result, _Refusal):
            raise BadInputError(str(result))
        return result

    def _read_locked(
        self, kb: bytes, h: int, copy: Callable[[memoryview], Any], expect: Callable[[int], str | None] | None,
        shared: bool,
    ) -> Any:  # fmt: skip
        e = self._lookup_locked(kb, h, True, shared)
        if e < 0:
            return None
        if expect is not None:
            message = expect(self._table.size(e))
            if message:
                return _Refusal(message)
        data = self._table.data(e)
        try:
            return copy(data)
        finally:
            data.release()

    def get(self, key: str | bytes) -> bytes | None:
        """A copy of the value, or None (missing or expired: a miss)."""
        if self._slot < 0 or self._closed or procs.my_pid != self._pid:  # no counter slot yet, closed or forked
            return self._read(key, memoryview.tobytes)
        kb, _, h = key_info(key)
        self._enter_shared()  # _read's path inlined (the hot path of small gets)
        try:
            e = self._lookup_locked(kb, h, True, True)
            return None if e < 0 else self._table.value(e)
        finally:
            self._lock.release()

    def get_into(self, key: str | bytes, out: Any) -> int | None:
        """Copy the value into the writable buffer `out` (no allocation); its size, or None on a miss."""
        expect, copy = readers.into_buffer(out)
        return self._read(key, copy, expect)

    def get_array(self, key: str | bytes, dtype: Any, shape: Any = None) -> "np.ndarray | None":
        """The value as a new numpy array of `dtype` and `shape` (1-D when None), or None on a miss."""
        expect, copy = readers.into_array(dtype, shape)
        return self._read(key, copy, expect)

    @contextmanager
    def view(self, key: str | bytes) -> Iterator[memoryview | None]:
        """Zero-copy read-only view of the value (None on a miss), valid only inside the `with`.

        Lifetime rule: the view points into the shared mapping; while the block runs this
        process holds the pool's shared lock, so no process can change or evict the value
        (writers wait: keep the block short), and this thread may not call other methods of
        this Pool object (LockHeldError). The view is released when the block ends; copy
        what you need to keep.
        """
        kb, _, h = key_info(key)
        shared = self._shared_reads()
        failure: BaseException | None = None
        with self._reading() if shared else self._mutating():
            e = self._lookup_locked(kb, h, True, shared)
            data = ro = None
            if e >= 0:
                data = self._table.data(e)
                ro = data.toreadonly()
            try:
                yield ro
            except BaseException as exc:  # re-raised below, once the lock is released
                failure = exc
            finally:
                if ro is not None and data is not None:
                    ro.release()
                    data.release()
        if failure is not None:
            raise failure

    def contains(self, key: str | bytes) -> bool:
        """Present and unexpired (not counted as a hit or miss)."""
        kb, _, h = key_info(key)
        return self._sh(self._lookup_locked, kb, h, False, True) >= 0

    def contains_many(self, keys: Iterable[str | bytes]) -> list[bool]:
        """`contains` of each key (present and unexpired, nothing counted) in one shared-lock
        section: a 128k-token prompt's 512 chunk keys cost one lock round trip, not 512."""
        infos = key_infos(keys)
        return self._sh(self._contains_locked, infos) if infos else []

    def _contains_locked(self, infos: list[tuple[bytes, int, int]]) -> list[bool]:
        find, expiry, now = self._index.find, self._table.expiry, time.time()
        out = []
        for kb, _, h in infos:
            e = find(kb, h)
            if e < 0:
                out.append(False)
            else:
                x = expiry(e)
                out.append(not (x and x <= now))  # expired: a miss, as in _lookup_locked
        return out

    # ------------------------------------------------------------------ entries
    def delete(self, key: str | bytes) -> bool:
        """Remove the entry (pinned or not); False when absent."""
        kb, _, h = key_info(key)
        with self._mutating():
            e = self._index.find(kb, h)
            if e < 0:
                return False
            self._st.remove(e)
            return True

    def pin(self, key: str | bytes, timeout: float | str | None = None, renew: bool = False) -> bool:
        """Protect the entry from eviction (pins nest); False when absent.

        `timeout` (seconds or a duration, '5m'): the pin stops protecting the entry after it, even if
        the process that pinned it died (SIGKILL) and never unpins. The entry keeps one pin count and
        the latest deadline of its pins; once that passes, every pin of the entry is void (cleared
        when noticed). None: no deadline, the pin holds until unpinned (and so do the entry's timed
        pins while it does). `renew`: the caller pins again a key it already pinned: the deadline
        moves, the count does not (a pin that had expired is taken again)."""
        deadline = None
        if timeout is not None:
            seconds = parse_duration(timeout)
            if seconds <= 0:
                raise BadInputError(f"pin timeout must be positive, got {timeout!r}")
            deadline = time.time() + seconds
        kb, _, h = key_info(key)
        with self._mutating():
            e = self._index.find(kb, h)
            if e < 0:
                return False
            self._table.add_pin(e, deadline, time.time(), renew)
            return True

    def unpin(self, key: str | bytes) -> bool:
        """Undo one pin; False when absent (a pin past its deadline is already gone)."""
        kb, _, h = key_info(key)
        with self._mutating():
            e = self._index.find(kb, h)
            if e < 0:
                return False
            self._table.drop_pin(e, time.time())
            return True

    def info(self, key: str | bytes) -> EntryInfo | None:
        """Metadata of one entry (no hit counted), or None."""
        kb, _, h = key_info(key)
        with self._reading():
            e = self._index.find(kb, h)
            if e < 0:
                return None
            return self._table.info(e, self._st.policy.describe, time.time())

    def keys(self) -> list[str | bytes]:
        """Every published key, oldest insertion first."""
        return self._published_keys(None)

    def find_by_prefix(self, prefix: str | bytes | int) -> list[str | bytes]:
        """Keys put with this `prefix` tag (e.g. a token-prefix hash), oldest first."""
        return self._published_keys(prefix_hash(prefix))

    def _published_keys(self, tag: int | None) -> list[str | bytes]:
        with self._reading():
            return self._st.published_keys(tag)

    # ------------------------------------------------------------------ eviction
    def plan_eviction(
        self, percent: float | None = None, bytes: int | str | None = None, expired: bool = False
    ) -> EvictionPlan:
        """What `evict` would remove (in order, with exact bytes), changing nothing: a dry run."""
        mode, target = eviction.target(percent, bytes, expired)
        with self._reading():
            return eviction.plan(self._st, mode, percent, target)

    def execute_eviction(self, plan: EvictionPlan) -> EvictionResult:
        """Carry out a plan; entries that changed since it was made (replaced, pinned, gone) stay."""
        with self._mutating():
            return eviction.execute(self._st, plan)

    def evict(self, percent: float | None = None, bytes: int | str | None = None, expired: bool = False) -> int:
        """Evict by policy until `percent` of the bytes in use or `bytes` are freed, or every expired
        entry (`expired=True`); pinned entries stay. Returns the number of entries evicted.

        Percent is of what the pool holds, not of its size, so `--percent 25` on a lightly used
        pool trims a quarter of it instead of emptying it. Planned and executed in one section."""
        mode, target = eviction.target(percent, bytes, expired)
        with self._mutating():
            return eviction.execute(self._st, eviction.plan(self._st, mode, percent, target)).evicted

    # ------------------------------------------------------------------ stats, check
    def stats(self) -> PoolStats:
        """Sizes, use and counters (the keys `kv status --format json` promises, and more)."""
        with self._reading():
            return self._st.stats(str(self.path))

    def check(self, repair: bool = False) -> CheckReport:
        """Verify every invariant; with `repair`, rebuild derived state from the entry table.

        Routine crash recovery (reclaiming unpublished entries of dead writers, rebuilding after
        a process died inside an update) happens first and is reported in `recovered`.
        """
        self._last_recovery = []
        with self._mutating():
            return check_and_repair(self._st, repair, self._last_recovery)

    # ------------------------------------------------------------------ persist / restore
    def persist(self, path: str | os.PathLike[str]) -> int:
        """Stream a snapshot to `path` (temp file + rename); returns the bytes written.

        Taken under the shared lock: a consistent image, readers go on, writers wait until the
        data has streamed out (about the time to write the used bytes to disk).
        """
        target = snapshot.check_target(path)
        with self._reading(), atomic_file(target, mode=0o600) as handle:
            written = snapshot.write(self._st, handle)
        log.info("persisted pool %s: %d bytes to %s", self.name, written, target)
        return written

    @classmethod
    def restore(
        cls,
        path: str | os.PathLike[str],
        name: str | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        tier: str = "cpu",
        pool_path: str | os.PathLike[str] | None = None,
        prefault: bool | None = None,
    ) -> "Pool":
        """Create and register a pool from a snapshot; nothing is created unless all of it verifies."""
        source = snapshot.check_source(path)
        with open(source, "rb") as handle:
            header, records, policy, geometry = snapshot.read_verified(handle)
            spec = lifecycle.check_restore(name or header.name, tier, pool_path, data_dir, policy, geometry, prefault)

            def fill(pool: "Pool") -> None:
                with pool._mutating():
                    snapshot.load(pool._st, handle, header, records)

            pool = cls._build(spec, data_dir, "restoring", fill, restored_from=str(source))
        log.info("restored pool %s from %s: %d entries", spec.name, source, len(records))
        return pool
