"""`PoolHandle`: one process's attachment to a pool: mapping, lock, locked sections, read counters.

`Pool` (pool.py) builds its operations on these sections:
- `_ex(fn, ...)` / `_mutating()`: the exclusive lock, the header's dirty word set while inside
  (a process that dies inside leaves it set; the next locker rebuilds derived state);
- `_sh(fn, ...)` / `_reading()`: the shared lock on a clean pool (readers of many processes
  copy out at once);
- after `fork` the child reopens its own lock handle (an inherited fd shares the parent's flock);
- each attachment takes a counter slot in the header for its hits, misses and bytes out, so
  reads under the shared lock never lose a count.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from infercache.errors import InfercacheError
from infercache.kv import procs, repair
from infercache.kv.layout import HDR_BYTES_OUT, HDR_DIRTY, HDR_HITS, HDR_MISSES
from infercache.kv.lock import EXCLUSIVE, SHARED, PoolLock
from infercache.kv.state import PoolState

log = logging.getLogger(__name__)
Self = TypeVar("Self", bound="PoolHandle")


def _noop() -> None:
    return None


class PoolHandle:
    """An attached pool (see module docstring); `Pool` adds the operations."""

    # ------------------------------------------------------------------ construction
    def __init__(self, name: str, path: Path, fd: int, data_dir: str | os.PathLike[str] | None) -> None:
        self.name = name
        self.path = path
        self._data_dir = data_dir
        self._fd = fd
        self._pid = os.getpid()
        self._st = st = PoolState(fd, path, name)
        self.block_size = st.block_size
        self.n_blocks = st.n_blocks
        self.capacity_entries = st.capacity
        self.policy = st.policy.name
        self.tier = st.tier
        self._on_insert = st.policy.on_insert
        self._on_access = st.policy.on_access
        self._mm, self._hq, self._table, self._index = st.mm, st.hq, st.table, st.index
        self._lock = PoolLock(fd)
        self._closed = False
        self._last_recovery: list[str] = []
        self._use_global_counters()

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Detach (the pool itself stays). Idempotent."""
        if self._closed:
            return
        if self._slot >= 0 and os.getpid() == self._pid:
            try:
                self._ex(self._release_slot_locked)
            except InfercacheError as exc:  # e.g. closed inside a view: the slot is reclaimed later
                log.debug("pool %s: counter slot not released (%s)", self.name, exc)
        self._closed = True
        self._st.release()
        try:
            os.close(self._fd)
        except OSError:
            pass

    def __enter__(self: Self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Pool({self.name!r}, tier={self.tier!r}, policy={self.policy!r}, path={str(self.path)!r})"

    # ------------------------------------------------------------------ locking
    def _check_open(self) -> None:
        if self._closed:
            raise InfercacheError(f"pool {self.name!r} is closed")
        if os.getpid() != self._pid:  # forked: the inherited fd shares the parent's flock
            fd = os.open(self.path, os.O_RDWR)
            self._fd = fd
            self._lock = PoolLock(fd)
            self._pid = os.getpid()
            self._use_global_counters()  # the parent's counter slot is not ours

    def _recover_locked(self) -> None:
        self._last_recovery = repair.recover(
            self._st, f"process {self._hq[HDR_DIRTY]} died (or failed) inside a pool update"
        )

    @contextmanager
    def _mutating(self) -> Iterator[None]:
        """Exclusive section that may change metadata; marks the header dirty while inside
        (an exception inside leaves it dirty on purpose: the next locker rebuilds)."""
        self._check_open()
        with self._lock.exclusive():
            hq = self._hq
            if hq[HDR_DIRTY]:
                self._recover_locked()
            hq[HDR_DIRTY] = self._pid
            yield
            hq[HDR_DIRTY] = 0

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """Shared section: many processes copy out at once; nothing in the mapping changes."""
        self._check_open()
        while True:
            with self._lock.shared():
                if not self._hq[HDR_DIRTY]:
                    yield
                    return
            self._ex(_noop)  # a dirty pool is recovered under the exclusive lock first

    def _ex(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` in an exclusive, dirty-marked section (the hot-path form of `_mutating`)."""
        if self._closed or procs.my_pid != self._pid:
            self._check_open()
        lock = self._lock
        lock.acquire(EXCLUSIVE)
        hq = self._hq
        try:
            if hq[HDR_DIRTY]:
                self._recover_locked()
            hq[HDR_DIRTY] = self._pid
            result = fn(*args)
        except BaseException:
            lock.release()
            raise
        hq[HDR_DIRTY] = 0
        lock.release()
        return result

    def _sh(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` under the shared lock (the hot-path form of `_reading`)."""
        self._enter_shared()
        try:
            return fn(*args)
        finally:
            self._lock.release()

    def _enter_shared(self) -> None:
        """Take the shared lock on a clean pool (a dirty one is recovered under the exclusive lock first)."""
        if self._closed or procs.my_pid != self._pid:
            self._check_open()
        lock = self._lock
        while True:
            lock.acquire(SHARED)
            if not self._hq[HDR_DIRTY]:
                return
            lock.release()
            self._ex(_noop)

    # ------------------------------------------------------------------ read counters
    def _use_global_counters(self) -> None:
        self._slot = -1
        self._slot_tried = False
        self._w_hits, self._w_misses, self._w_bytes_out = HDR_HITS, HDR_MISSES, HDR_BYTES_OUT

    def _claim_slot_locked(self) -> None:
        """Take a counter slot of our own, so reads may run under the shared lock."""
        self._slot_tried = True
        base = self._st.claim_counter_slot(self._pid)
        if base < 0:
            log.info("pool %s: all counter slots in use; reads take the exclusive lock", self.name)
            return
        self._slot = base
        self._w_hits, self._w_misses, self._w_bytes_out = base + 1, base + 2, base + 3

    def _release_slot_locked(self) -> None:
        if self._slot >= 0:
            self._st.release_counter_slot(self._slot, self._pid)
        self._use_global_counters()
        self._slot_tried = True

    def _shared_reads(self) -> bool:
        """True when this object may read under the shared lock (it has a counter slot)."""
        if procs.my_pid != self._pid or self._closed:
            self._check_open()
        if self._slot < 0 and not self._slot_tried:
            self._ex(self._claim_slot_locked)
        return self._slot >= 0

