"""Parsing a big scan in forked worker processes while this process writes the catalog.

Why processes: parsing (a dozen syscalls and two JSON files per entry) is most of a first
index and holds the GIL. Workers are forked, so they inherit the work list (no pickling of
inputs) and return plain rows as one `marshal` blob per chunk (several times cheaper than
pickling them). They never touch SQLite (a connection must not cross a fork): the indexer
stays the only writer, with the same batches, re-checks and counters as the serial path.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Iterator

from infercache.errors import InfercacheError
from infercache.kernels import entry_rows
from infercache.kernels.entry_rows import CacheDirInfo, Item

logger = logging.getLogger(__name__)

#: Entries per worker task: big enough to amortise the round trip, small enough to balance.
CHUNK = 125
#: Most parsing workers worth having: beyond this the single catalog writer is the bottleneck.
MAX_WORKERS = 4


def default_workers() -> int:
    """Parsing processes worth starting here: the CPUs this process may use, capped."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_WORKERS))


#: The work list of the running parallel parse, inherited by the forked workers.
_FORK_STATE: tuple[str, list[tuple[str, os.stat_result | None]], CacheDirInfo, float] | None = None
#: One parallel parse at a time per process (_FORK_STATE is global).
_PARALLEL = threading.Lock()


def can_fork() -> bool:
    import multiprocessing

    return "fork" in multiprocessing.get_all_start_methods()


def _worker_init() -> None:
    """Ctrl-C is the parent's to handle: it stops the pool (workers would only add tracebacks)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _prepare_range(bounds: tuple[int, int]) -> bytes:
    """Worker: prepare todo[lo:hi] of the state inherited through fork."""
    import marshal

    assert _FORK_STATE is not None
    parent, todo, info, now = _FORK_STATE
    lo, hi = bounds
    return marshal.dumps([entry_rows.prepare(os.path.join(parent, name), st, info, now) for name, st in todo[lo:hi]])


def prepare_parallel(
    parent: str, todo: list[tuple[str, os.stat_result | None]], info: CacheDirInfo, now: float, workers: int
) -> Iterator[Item]:
    """Prepared items in `todo` order, parsed by `workers` forked processes.

    Falls back to parsing here when no worker can be started (a daemonic process, fork
    refused, another thread of this process already using workers).
    """
    import marshal
    import multiprocessing
    import warnings
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    global _FORK_STATE
    if not _PARALLEL.acquire(blocking=False):
        yield from (entry_rows.prepare(os.path.join(parent, name), st, info, now) for name, st in todo)
        return
    ranges = [(lo, min(lo + CHUNK, len(todo))) for lo in range(0, len(todo), CHUNK)]
    pool = None
    try:
        _FORK_STATE = (parent, todo, info, now)
        try:
            with warnings.catch_warnings():
                # Python 3.12+ warns about fork in a threaded process (a progress bar's thread):
                # the children only parse files and exit; they take no lock a thread could hold.
                warnings.simplefilter("ignore", DeprecationWarning)
                pool = ProcessPoolExecutor(
                    min(workers, len(ranges)), mp_context=multiprocessing.get_context("fork"), initializer=_worker_init
                )
                # With fork, every worker starts at the first submit: all of them see _FORK_STATE.
                blobs = pool.map(_prepare_range, ranges)
        except (OSError, AssertionError, RuntimeError) as exc:
            logger.debug("no parsing workers (%s): parsing in this process", exc)
            yield from (entry_rows.prepare(os.path.join(parent, name), st, info, now) for name, st in todo)
            return
        try:
            for blob in blobs:
                yield from marshal.loads(blob)
        except BrokenProcessPool as exc:
            raise InfercacheError(f"a parsing worker died ({exc}); nothing half-written, run index again") from exc
        pool.shutdown()
    finally:
        _FORK_STATE = None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)  # no-op after a clean shutdown
        _PARALLEL.release()
