"""Process-shared lock for a pool: `flock` on the backing file plus a per-object thread lock.

Why flock: the kernel drops it when a holder dies (SIGKILL included), so a crash never
wedges the pool, and it needs no extra file. `flock` belongs to the open file description,
so two threads sharing one Pool object would both "hold" it: a threading.Lock serialises
them. The lock is deliberately NOT re-entrant: a thread that already holds it gets a clear
error instead of the deadlock the old tool had (auto-evict re-acquiring the caller's lock);
internal code is split into `_locked` helpers that assume the lock is held.
"""

from __future__ import annotations

import fcntl
import os
import threading
from contextlib import contextmanager
from typing import Iterator

from infercache.errors import InfercacheError


class LockHeldError(InfercacheError):
    """This thread already holds the pool lock (e.g. a pool call inside `with pool.view(...)`)."""


class PoolLock:
    """Exclusive (writers, metadata) and shared (long copies out) sections over one fd."""

    # (device, inode) of every pool file whose lock a thread of this process holds -> thread id:
    # two Pool objects on one pool have separate flock handles that would block each other.
    _held: dict[tuple[int, int], int] = {}

    def __init__(self, fd: int) -> None:
        self.fd = fd
        st = os.fstat(fd)
        self._file = (st.st_dev, st.st_ino)
        self._thread_lock = threading.Lock()
        self._owner: int | None = None

    def _acquire(self, mode: int) -> None:
        me = threading.get_ident()
        if self._owner == me or PoolLock._held.get(self._file) == me:
            raise LockHeldError(
                "this thread already holds the pool lock (pool methods cannot be called inside "
                "`with pool.view(...)`, on any Pool object of that pool; leave the block first)"
            )
        self._thread_lock.acquire()
        try:
            fcntl.flock(self.fd, mode)
        except BaseException:
            self._thread_lock.release()
            raise
        self._owner = me
        PoolLock._held[self._file] = me

    def _release(self) -> None:
        self._owner = None
        PoolLock._held.pop(self._file, None)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        self._acquire(fcntl.LOCK_EX)
        try:
            yield
        finally:
            self._release()

    @contextmanager
    def shared(self) -> Iterator[None]:
        self._acquire(fcntl.LOCK_SH)
        try:
            yield
        finally:
            self._release()

    @property
    def held_by_me(self) -> bool:
        return self._owner == threading.get_ident()


# A forked child holds none of its parent's pool locks (Pool objects reopen their handle there).
os.register_at_fork(after_in_child=PoolLock._held.clear)
