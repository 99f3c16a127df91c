"""Process-shared lock for a pool: `flock` on the backing file plus a per-object thread lock.

Why flock: the kernel drops it when a holder dies (SIGKILL included), so a crash never
wedges the pool, and it needs no extra file. `flock` belongs to the open file description,
so two threads sharing one Pool object would both "hold" it: a threading.Lock serialises
them. The lock is deliberately NOT re-entrant: a thread that already holds it gets a clear
error instead of the deadlock the old tool had (auto-evict re-acquiring the caller's lock);
internal code is split into `_locked` helpers that assume the lock is held.

Spin, then sleep: pool sections last a few microseconds, while a process that sleeps in a
blocking `flock` needs a wake-up (tens of microseconds on a VM, more when its CPU idled):
with two processes doing 1 KiB puts, blocking at once made two processes together slower
than one (0.6x). A waiter first retries a non-blocking `flock` a bounded number of times,
yielding its CPU between tries (so a holder that shares the CPU gets to run and release),
and only then blocks: no busy-wait beyond ~SPIN_TRIES syscalls, no change for long holds.
"""

from __future__ import annotations

import fcntl
import os
import threading
from contextlib import contextmanager
from typing import Iterator

from infercache.errors import InfercacheError

SPIN_TRIES = 64  # non-blocking retries (each after a sched_yield) before a blocking flock

_flock = fcntl.flock
_LOCK_NB = fcntl.LOCK_NB
EXCLUSIVE, SHARED = fcntl.LOCK_EX, fcntl.LOCK_SH
_get_ident = threading.get_ident
_yield = os.sched_yield


class LockHeldError(InfercacheError):
    """This thread already holds the pool lock (e.g. a pool call inside `with pool.view(...)`)."""


class PoolLock:
    """Exclusive (writers, metadata) and shared (long copies out) sections over one fd."""

    # (device, inode) of every pool file whose lock a thread of this process holds -> thread id:
    # two Pool objects on one pool have separate flock handles that would block each other.
    _held: dict[tuple[int, int], int] = {}

    __slots__ = ("_file", "_owner", "_thread_lock", "fd")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        st = os.fstat(fd)
        self._file = (st.st_dev, st.st_ino)
        self._thread_lock = threading.Lock()
        self._owner: int | None = None

    def acquire(self, mode: int) -> None:
        """Take the lock in `mode` (EXCLUSIVE: may change metadata; SHARED: reads only, many
        processes at once); pair with `release`. The context managers below are the usual form."""
        me = _get_ident()
        held = PoolLock._held
        if self._owner == me or held.get(self._file) == me:
            raise LockHeldError(
                "this thread already holds the pool lock (pool methods cannot be called inside "
                "`with pool.view(...)`, on any Pool object of that pool; leave the block first)"
            )
        self._thread_lock.acquire()
        try:
            try:
                _flock(self.fd, mode | _LOCK_NB)
            except BlockingIOError:
                self._wait(mode)
        except BaseException:
            self._thread_lock.release()
            raise
        self._owner = me
        held[self._file] = me

    def _wait(self, mode: int) -> None:
        """Contended: spin on non-blocking tries (yielding the CPU), then block."""
        fd = self.fd
        nb = mode | _LOCK_NB
        for _ in range(SPIN_TRIES):
            _yield()
            try:
                _flock(fd, nb)
                return
            except BlockingIOError:
                pass
        _flock(fd, mode)

    def release(self) -> None:
        self._owner = None
        PoolLock._held.pop(self._file, None)
        try:
            _flock(self.fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """`with lock.exclusive():` a section that may change metadata."""
        self.acquire(EXCLUSIVE)
        try:
            yield
        finally:
            self.release()

    @contextmanager
    def shared(self) -> Iterator[None]:
        """`with lock.shared():` a read-only section (readers of many processes run at once)."""
        self.acquire(SHARED)
        try:
            yield
        finally:
            self.release()


# A forked child holds none of its parent's pool locks (Pool objects reopen their handle there).
os.register_at_fork(after_in_child=PoolLock._held.clear)
