"""Runtime hit tracking for Triton's kernel cache: which kernels are used, which never are.

Enable it with ``TRITON_CACHE_MANAGER=infercache.kernels.tracking:TrackingCacheManager``
or :func:`install`. Triton then looks every kernel up through
:class:`TrackingCacheManager` (a ``FileCacheManager``: same files, same atomic
writes), which counts, per cache entry key: hits (``get_group`` found the entry),
misses (it did not and a compile followed), the last access, and, through
``knobs.compilation.listener`` (Triton >= 3.4), the compile time.

Why buffered: a vLLM worker looks kernels up thousands of times; one SQLite commit
per hit would cost more than the lookup. Counts go into a per-process dict (one
lock, no I/O) and a daemon thread adds them to the catalog's ``usage`` table in one
transaction every :data:`FLUSH_INTERVAL_S`, and once more at exit (``atexit`` and
multiprocessing's finalizers, which also run in forked workers that leave by
``os._exit``). Each flush *adds* deltas (``hits = hits + n``), so any number of
processes can flush concurrently without losing counts; the catalog's busy timeout
makes them queue on its write lock instead of failing. ``usage`` is keyed by entry
key with no reference to ``entries``: a kernel compiled after the last ``index``
keeps its counts until an ``index`` picks the entry up.

Tracking never breaks the program: if the catalog cannot be opened or written, the
kernel still loads, one warning is logged, and the counts stay in memory to be
retried at the next flush.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from typing import Any, Callable, Dict, Optional

from triton.runtime.cache import FileCacheManager

from infercache.kernels.catalog import Catalog, catalog_path
from infercache.kernels.triton_entry import key_for_hash

logger = logging.getLogger(__name__)

#: Seconds between background flushes of the buffered counts.
FLUSH_INTERVAL_S = 1.0
#: How long one flush waits for the catalog's write lock before trying again later (ms).
FLUSH_BUSY_TIMEOUT_MS = 10_000
#: The value for ``TRITON_CACHE_MANAGER``.
MANAGER_PATH = "infercache.kernels.tracking:TrackingCacheManager"


class _Buffer:
    """Per-process counts, flushed in batches to the catalog.

    ``pending[key] = [hits, misses, last_access, compile_time_s]``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._pending: Dict[str, list] = {}
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._catalog: Optional[Catalog] = None
        self._catalog_path: Optional[str] = None
        self._warned = False
        self._exit_hooks_pid: Optional[int] = None

    # --- hot path -----------------------------------------------------------------------
    def add(self, key: str, hits: int = 0, misses: int = 0, compile_time_s: Optional[float] = None) -> None:
        now = time.time()
        with self._lock:
            self._merge_locked(key, hits, misses, now, compile_time_s)
        if self._thread is None:
            self._start()

    # --- background ---------------------------------------------------------------------
    def _start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._stop.clear()
            thread = threading.Thread(target=self._run, name="infercache-hit-tracker", daemon=True)
            self._thread = thread
            if self._exit_hooks_pid != os.getpid():
                self._exit_hooks_pid = os.getpid()
                atexit.register(self.close)
                # Forked multiprocessing workers leave through os._exit: atexit never runs there,
                # multiprocessing's own exit function (and its finalizers) does.
                from multiprocessing import util

                util.Finalize(None, self.close, exitpriority=100)
        thread.start()

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_INTERVAL_S):
            self.flush()

    def pending(self) -> Dict[str, tuple]:
        """A copy of the counts not flushed yet."""
        with self._lock:
            return {k: tuple(v) for k, v in self._pending.items()}

    def flush(self) -> bool:
        """Add the buffered counts to the catalog in one transaction; False if they are still pending."""
        with self._flush_lock:
            with self._lock:
                batch, self._pending = self._pending, {}
            if not batch:
                return True
            try:
                catalog = self._open()
                catalog.record_usage_batch((k, v[0], v[1], v[2], v[3]) for k, v in batch.items())
            except Exception as exc:  # noqa: BLE001 - tracking must never break the user's program
                self._merge_back(batch)
                self._drop_catalog()
                if not self._warned:
                    self._warned = True
                    logger.warning(
                        "infercache: cannot record kernel cache hits in %s (%s); kernels still load, "
                        "counts are kept in memory and retried", self._catalog_path or catalog_path(), exc)
                return False
            return True

    def close(self) -> None:
        """Stop the thread and flush what is left (at exit)."""
        self._stop.set()
        self.flush()

    def _merge_back(self, batch: Dict[str, list]) -> None:
        with self._lock:
            for key, (hits, misses, last, compile_time) in batch.items():
                self._merge_locked(key, hits, misses, last, compile_time)

    def _merge_locked(self, key: str, hits: int, misses: int, last: float, compile_time: Optional[float]) -> None:
        """Add counts to a pending row: hits and misses add up, the later access and compile time win."""
        row = self._pending.get(key)
        if row is None:
            self._pending[key] = [hits, misses, last, compile_time]
            return
        row[0] += hits
        row[1] += misses
        if compile_time is not None and (row[3] is None or last >= row[2]):
            row[3] = compile_time
        row[2] = max(row[2], last)

    def _open(self) -> Catalog:
        path = str(catalog_path())
        if self._catalog is not None and self._catalog_path == path:
            return self._catalog
        self._drop_catalog()
        self._catalog_path = path
        if not os.path.exists(path):
            logger.info("infercache: creating the catalog %s for kernel hit counts", path)
        catalog = Catalog(path, busy_timeout_ms=FLUSH_BUSY_TIMEOUT_MS)
        self._catalog = catalog
        return catalog

    def _drop_catalog(self) -> None:
        if self._catalog is not None:
            try:
                self._catalog.close()
            except Exception:  # noqa: BLE001
                pass
            self._catalog = None

    def _after_fork(self) -> None:
        """In a forked child: the parent's counts and connection are the parent's, not ours."""
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._pending = {}
        self._thread = None
        self._stop = threading.Event()
        self._catalog = None  # never close the parent's SQLite connection from the child


_BUFFER = _Buffer()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_BUFFER._after_fork)


def flush() -> bool:
    """Write the counts buffered in this process to the catalog now (tests, before `stats`)."""
    return _BUFFER.flush()


def pending() -> Dict[str, tuple]:
    """Counts buffered in this process, not yet in the catalog: ``{key: (hits, misses, last, secs)}``."""
    return _BUFFER.pending()


class TrackingCacheManager(FileCacheManager):
    """Triton's ``FileCacheManager`` that also counts hits and misses per entry key.

    Triton creates one per compile: ``Cls(key)``, ``Cls(key, override=True)``,
    ``Cls(key, dump=True)``; only the first kind (the real cache) is counted.
    """

    def __init__(self, key: str, override: bool = False, dump: bool = False) -> None:
        super().__init__(key, override=override, dump=dump)
        self._tracked = not (override or dump)
        self._missed: Optional[float] = None  # perf_counter() of the lookup that found nothing
        if self._tracked:
            _ensure_listener()

    def get_group(self, filename: str) -> Optional[Dict[str, str]]:
        group = super().get_group(filename)
        if self._tracked:
            if group is not None:
                _BUFFER.add(self.key, hits=1)
            else:
                self._missed = time.perf_counter()
        return group

    def put_group(self, filename: str, group: Dict[str, str]) -> str:
        path = super().put_group(filename, group)
        if self._tracked and self._missed is not None:
            # The lookup found nothing and a compile followed: that is a miss. Its duration is
            # the compile time unless Triton's listener (called right after) reports its own.
            elapsed = time.perf_counter() - self._missed
            self._missed = None
            _BUFFER.add(self.key, misses=1, compile_time_s=elapsed)
        return path


class _CompileTimeListener:
    """Records compile times, then calls the listener that was there before (never displaces it)."""

    def __init__(self, previous: Optional[Callable[..., Any]]) -> None:
        self.previous = previous

    def __call__(self, *, src: Any, metadata: dict, metadata_group: dict, times: Any, cache_hit: bool) -> None:
        if not cache_hit:
            try:
                micros = times.ir_initialization + sum(d for _, d in times.lowering_stages) + times.store_results
                key = key_for_hash(metadata["hash"])
                _BUFFER.add(key, compile_time_s=micros / 1e6)
            except Exception as exc:  # noqa: BLE001 - a Triton that reports differently
                logger.debug("infercache: no compile time from the listener: %s", exc)
        if self.previous is not None:
            self.previous(src=src, metadata=metadata, metadata_group=metadata_group, times=times,
                          cache_hit=cache_hit)


def _knobs() -> Any:
    import triton

    return getattr(triton, "knobs", None)


def _ensure_listener() -> None:
    """Chain our compile-time listener in front of whatever is set (Triton >= 3.4)."""
    try:
        knobs = _knobs()
        compilation = getattr(knobs, "compilation", None)
        if compilation is None or not hasattr(compilation, "listener"):
            return
        current = compilation.listener
        if not isinstance(current, _CompileTimeListener):
            compilation.listener = _CompileTimeListener(current)
    except Exception as exc:  # noqa: BLE001
        logger.debug("infercache: cannot install the compile-time listener: %s", exc)


def install() -> None:
    """Make Triton use :class:`TrackingCacheManager` in this process (and its children).

    Sets ``triton.knobs.cache.manager_class`` where it exists (3.4+), else the
    ``TRITON_CACHE_MANAGER`` variable; chains the compile-time listener.
    """
    knobs = _knobs()
    cache = getattr(knobs, "cache", None)
    if cache is not None and hasattr(type(cache), "manager_class"):
        cache.manager_class = TrackingCacheManager
    # Spawned workers (vLLM's) re-import Triton: the variable carries the choice to them.
    os.environ["TRITON_CACHE_MANAGER"] = MANAGER_PATH
    _ensure_listener()


def uninstall() -> None:
    """Undo :func:`install` (flushing what was counted)."""
    knobs = _knobs()
    cache = getattr(knobs, "cache", None)
    if cache is not None and hasattr(type(cache), "manager_class"):
        del cache.manager_class  # back to the environment's (or Triton's default) choice
    if os.environ.get("TRITON_CACHE_MANAGER") == MANAGER_PATH:
        del os.environ["TRITON_CACHE_MANAGER"]
    compilation = getattr(knobs, "compilation", None)
    if compilation is not None and isinstance(getattr(compilation, "listener", None), _CompileTimeListener):
        compilation.listener = compilation.listener.previous
    _BUFFER.flush()
