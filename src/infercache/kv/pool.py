"""`Pool`: a named, fixed-size KV store in one shared mapping that any process can attach to.

Why this design (see layout.py for the bytes):
- every piece of state (counters, allocator, entry table, key index) is in the mapping, so a
  second process that attaches by name sees exactly what the first one wrote;
- one `flock` (lock.py) guards metadata; a put reserves blocks under the lock, copies large
  values *outside* it (other processes keep working), then publishes the entry under the
  lock: readers find only published entries, so they never see a half-written value;
- a process that dies inside a metadata update leaves the header's `dirty` word set; the
  next process to take the lock rebuilds all derived state (allocator, index, free slots)
  from the entry table. A writer killed while copying leaves an unpublished reservation
  that `open`, `check` and a full pool reclaim once its pid is gone.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import math
import mmap
import os
import struct
import time
import uuid
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from infercache.errors import BadInputError, InfercacheError
from infercache.fsutil import atomic_file
from infercache.kv import registry
from infercache.kv.allocator import MAX_BLOCKS, Allocator
from infercache.kv.index import KeyIndex
from infercache.kv.layout import (
    E_ATICK, E_ATIME, E_CHECK, E_COUNT, E_CREATED, E_EXPIRY, E_FLAGS, E_HASH, E_ITICK, E_NBLOCKS, E_PINS,
    E_PREFIX, E_PRIORITY, E_SIZE, E_START, E_STATE, ENTRY_BYTES, ENTRY_WORDS, F_HAS_PREFIX, F_KEY_IN_DATA, F_KEY_STR,
    F_S3_FREQ_MASK, F_S3_FREQ_SHIFT, F_S3_MAIN, HDR_ALLOC_OFF, HDR_BLOCK_SIZE, HDR_BYTES_IN, HDR_BYTES_OUT,
    HDR_CLOCK, HDR_CREATED, HDR_DATA_OFF, HDR_DIRTY, HDR_ENTRIES, HDR_EVICTIONS, HDR_EXPIRED, HDR_FILE_SIZE,
    HDR_FREE_OFF, HDR_FREE_TOP, HDR_GHOST_CAP, HDR_GHOST_OFF, HDR_GHOST_POS, HDR_HITS, HDR_HWM, HDR_INDEX_CAP,
    HDR_INDEX_OFF, HDR_MAGIC, HDR_MISSES, HDR_N_BLOCKS, HDR_POLICY, HDR_PUTS, HDR_REPAIRS, HDR_TABLE_CAP,
    HDR_TABLE_OFF, HDR_TIER, HDR_VALUE_BYTES, HDR_VERSION, HEADER_BYTES, KEY_INLINE, KEY_MAX, KEY_OFFSET, LAYOUT_VERSION,
    MAGIC, N_SLOTS, NAME_MAX, NAME_OFFSET, SLOT_BASE, SLOT_WORDS, ST_FREE, ST_PUBLISHED, ST_WRITING, TIERS, Geometry, compute_geometry,
    entry_dtype,
)  # fmt: skip
from infercache.kv.lock import PoolLock
from infercache.kv.policies import FIELDS, POLICIES, POLICY_IDS, POLICY_NAMES, order, s3fifo_victims
from infercache.units import format_size, parse_duration, parse_size

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

# Values up to SMALL_COPY are copied inside the one exclusive section of a put (or get):
# two lock round trips cost ~20-40 us of Python, a quarter of a 4 MiB memcpy, while holding
# the lock for a <= 4 MiB copy (~0.1-0.5 ms) costs other processes little. Larger values are
# copied outside the lock (put) or under the shared lock (get), where concurrency pays.
SMALL_COPY = 4 << 20
SAMPLE = 256  # bytes at each end of a value covered by the entry checksum
_LOW32 = 0xFFFFFFFF
_DONE, _FAILED = -2, -1  # put outcomes that need no copy outside the lock
_CHECK_HEAD = struct.Struct("<QQ")
# Words E_HASH..E_ATICK of an entry record, written by one pack_into (a reservation writes all
# of them; one C call instead of 15 memoryview stores, a third of a small put's locked work).
_RECORD = struct.Struct("<QQQQQdddQqQQQQQ")
assert (E_HASH, E_START, E_NBLOCKS, E_SIZE, E_CHECK, E_CREATED, E_ATIME, E_EXPIRY, E_COUNT, E_PRIORITY, E_PINS,
        E_FLAGS, E_PREFIX, E_ITICK, E_ATICK) == tuple(range(1, 16))  # fmt: skip
_KEY_CACHE = 4096  # keys whose bytes and hash are remembered (see _key_info)
# This process's pid, kept current by an at-fork hook: hot paths compare it with the pid a
# Pool was opened in (to notice a fork) without a getpid syscall per call.
_my_pid = os.getpid()


def _after_fork() -> None:
    global _my_pid
    _my_pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork)


@dataclass(frozen=True)
class _Refusal:
    """A reader's `expect` refused the value: raised as BadInputError outside the lock."""

    message: str


@dataclass(frozen=True)
class CheckReport:
    """Result of `Pool.check`: `ok` is the verdict after any repair.

    `problems`: inconsistencies found; `repaired`: what a repair rebuilt (empty when none);
    `recovered`: routine crash recovery done on the way (reclaimed unpublished reservations
    of dead writers, a rebuild after a writer died inside an update): not problems.
    """

    ok: bool
    problems: tuple[str, ...]
    repaired: tuple[str, ...] = ()
    recovered: tuple[str, ...] = ()


def _key_hash(kb: bytes) -> int:
    """Deterministic across processes (never Python's salted hash())."""
    return int.from_bytes(hashlib.blake2b(kb, digest_size=8).digest(), "little")


def _key_bytes(key: str | bytes) -> tuple[bytes, int]:
    if isinstance(key, str):
        kb, flag = key.encode(), F_KEY_STR
    elif isinstance(key, (bytes, bytearray, memoryview)):
        kb, flag = bytes(key), 0
    else:
        raise BadInputError(f"key must be str or bytes, got {type(key).__name__}")
    if not kb:
        raise BadInputError("key must not be empty")
    if len(kb) > KEY_MAX:
        raise BadInputError(f"key is {len(kb)} bytes; at most {KEY_MAX} (hash longer keys first)")
    return kb, flag


@functools.lru_cache(maxsize=_KEY_CACHE)
def _cached_key_info(key: str | bytes) -> tuple[bytes, int, int]:
    kb, flag = _key_bytes(key)
    return kb, flag, _key_hash(kb)


def _key_info(key: Any) -> tuple[bytes, int, int]:
    """(key bytes, F_KEY_STR or 0, key hash). str and bytes keys go through a small LRU cache:
    encoding and blake2b cost ~1.5 us, a fifth of a small get, and callers repeat keys (put
    then get, readers in a loop). Bad keys raise every time (exceptions are not cached)."""
    cls = type(key)
    if cls is str or cls is bytes:
        return _cached_key_info(key)
    kb, flag = _key_bytes(key)
    return kb, flag, _key_hash(kb)


def _prefix_hash(prefix: Any) -> int:
    if isinstance(prefix, str):
        raw = b"s" + prefix.encode()
    elif isinstance(prefix, (bytes, bytearray, memoryview)):
        raw = b"b" + bytes(prefix)
    elif isinstance(prefix, int):
        raw = b"i" + prefix.to_bytes(16, "little", signed=True)
    else:
        raise BadInputError(f"prefix must be str, bytes or int, got {type(prefix).__name__}")
    return _key_hash(raw)


def _value_view(value: Any) -> memoryview:
    """A flat byte view of a bytes-like object, numpy array or CPU torch tensor (no copy if contiguous)."""
    if type(value) is bytes:  # the common small-value case: flat, contiguous, format "B"
        return memoryview(value)
    module = type(value).__module__
    if module.startswith("torch"):
        value = value.detach().cpu().numpy()
        module = "numpy"
    if module.startswith("numpy") and hasattr(value, "dtype"):
        import numpy as np

        arr = np.ascontiguousarray(value)
        return memoryview(arr.reshape(-1).view(np.uint8))
    try:
        view = memoryview(value)
    except TypeError:
        raise BadInputError(f"value must be bytes-like or a numpy array, got {type(value).__name__}") from None
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _checksum(key_hash: int, size: int, data: memoryview) -> int:
    """crc32 of key hash, size and the first/last SAMPLE bytes of the value.

    Trade-off: a full crc32 runs at ~1-3 GB/s and would halve put/get bandwidth for large
    values; the sample catches torn publication, wrong offsets and damaged records (what a
    crash or a bug produces) at a constant cost. Snapshots carry full checksums.
    """
    crc = zlib.crc32(_CHECK_HEAD.pack(key_hash, size))
    if size <= 2 * SAMPLE:
        return zlib.crc32(data, crc)
    crc = zlib.crc32(data[:SAMPLE], crc)
    return zlib.crc32(data[size - SAMPLE :], crc)


def _pid_alive(pid: int) -> bool:
    """True unless `pid` is gone or a zombie (a SIGKILLed child not yet reaped holds no lock)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            state = handle.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def _check_room(name: str, target: Path, geometry: Any, pools: dict[str, Any], verb: str) -> None:
    """Refuse, before anything is created, a used name, an existing backing file or too little space."""
    record = pools.get(name)
    if record and Path(record["path"]).exists():
        raise BadInputError(f"pool name {name!r} is already used (backing file {record['path']}); choose another name")
    if target.exists():
        raise BadInputError(f"{target} already exists; choose another name or path")
    avail = _free_space(target.parent)
    if geometry.file_size > avail:
        raise BadInputError(
            f"{verb} {name!r} needs {geometry.file_size} bytes ({format_size(geometry.file_size)}: "
            f"{format_size(geometry.data_bytes)} data + metadata) but {target.parent} has only "
            f"{avail} bytes ({format_size(avail)}) free"
        )


def _free_space(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _require_cuda_torch() -> None:
    try:
        import torch
    except ImportError:
        raise BadInputError("tier gpu needs PyTorch with CUDA: torch is not installed") from None
    if not torch.cuda.is_available():
        raise BadInputError("tier gpu needs a CUDA-capable torch: torch.cuda.is_available() is False")
    raise BadInputError("tier gpu is not supported by shared pools yet; use tier cpu (pinned host memory)")


def attached_pids(path: str | os.PathLike[str]) -> list[int]:
    """Processes that have the pool's file mapped, matched by device and inode in /proc/*/maps.

    By inode because a pool is formatted under a temporary name and linked into place, so
    maps may show the old name; other users' processes may be hidden from us.
    """
    try:
        st = os.stat(path)
    except OSError:
        return []
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    ino = str(st.st_ino)
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            with open(entry / "maps", "r", errors="replace") as handle:
                for line in handle:
                    fields = line.split(maxsplit=5)
                    if len(fields) >= 5 and fields[4] == ino and fields[3] == dev:
                        pids.append(int(entry.name))
                        break
        except OSError:
            continue
    return sorted(pids)


class Pool:
    """A shared-memory (tier cpu) or file-backed (tier disk) KV pool; see module docstring.

    Use `Pool.create` / `Pool.open`, then put/get; `close()` (or `with`) detaches without
    deleting: the pool lives until `Pool.destroy`. A Pool object may be shared by threads;
    after `fork` the child reopens its own lock handle automatically.
    """

    # ------------------------------------------------------------------ construction
    def __init__(self, name: str, path: Path, fd: int, data_dir: str | os.PathLike[str] | None) -> None:
        self.name = name
        self.path = path
        self._data_dir = data_dir
        self._fd = fd
        self._pid = os.getpid()
        size = os.fstat(fd).st_size
        if size < HEADER_BYTES:
            raise BadInputError(f"{path} is not an infercache pool (too small)")
        self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._mv = memoryview(self._mm)
        self._hq = self._mv[:HEADER_BYTES].cast("Q")
        self._hd = self._mv[:HEADER_BYTES].cast("d")
        hq = self._hq
        if hq[HDR_MAGIC] != MAGIC or hq[HDR_VERSION] != LAYOUT_VERSION or hq[HDR_FILE_SIZE] != size:
            self._release_views()
            raise BadInputError(f"{path} is not an infercache pool of layout version {LAYOUT_VERSION}")
        self.block_size = hq[HDR_BLOCK_SIZE]
        self.n_blocks = hq[HDR_N_BLOCKS]
        self.capacity_entries = hq[HDR_TABLE_CAP]
        problem = _header_problem(hq, size)
        if problem:
            self._release_views()
            raise BadInputError(f"{path}: damaged pool header ({problem})")
        self.policy = POLICY_NAMES.get(hq[HDR_POLICY], "lru")
        self.tier = TIERS[hq[HDR_TIER]] if hq[HDR_TIER] < len(TIERS) else "cpu"
        self._s3 = self.policy == "s3fifo"
        self._data_off = hq[HDR_DATA_OFF]
        self._table_off = hq[HDR_TABLE_OFF]
        mv = self._mv
        cap = self.capacity_entries
        self._alloc = Allocator(mv[hq[HDR_ALLOC_OFF] : self._table_off], self.n_blocks)
        table = mv[self._table_off : self._table_off + cap * ENTRY_BYTES]
        self._tq = table.cast("Q")
        self._td = table.cast("d")
        self._ts = table.cast("q")
        index_off = hq[HDR_INDEX_OFF]
        self._index = KeyIndex(mv[index_off : index_off + hq[HDR_INDEX_CAP] * 4].cast("i"), self._tq)
        self._islots = self._index._slots  # probed inline by _find (hot path)
        self._imask = self._index.capacity - 1
        free_off = hq[HDR_FREE_OFF]
        self._free = mv[free_off : free_off + cap * 4].cast("i")
        ghost_off = hq[HDR_GHOST_OFF]
        self._ghost_cap = hq[HDR_GHOST_CAP]
        self._ghost = mv[ghost_off : ghost_off + self._ghost_cap * 8].cast("Q")
        self._lock = PoolLock(fd)
        self._closed = False
        self._last_recovery: list[str] = []
        self._use_global_counters()

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
    ) -> "Pool":
        """Create and register a pool of `size` bytes of data; BadInputError before anything is made."""
        registry.validate_name(name)
        if policy not in POLICIES:
            raise BadInputError(f"unknown policy {policy!r} (expected one of: {', '.join(POLICIES)})")
        size_b = parse_size(size)
        bs = parse_size(block_size)
        if bs < 64 or bs & (bs - 1) or bs > 1 << 30:
            raise BadInputError(f"block size {block_size!r} must be a power of two between 64 B and 1 GiB")
        if size_b < bs:
            raise BadInputError(f"pool size {size!r} must be at least one block ({bs} bytes)")
        if size_b // bs > MAX_BLOCKS:
            raise BadInputError(f"pool size {size!r} has more than {MAX_BLOCKS} blocks; use a larger --block-size")
        if tier == "gpu":
            _require_cuda_torch()
        if tier not in TIERS:
            raise BadInputError(f"unknown tier {tier!r} (expected one of: cpu, disk, gpu)")
        if tier == "disk":
            if path is None:
                raise BadInputError("tier disk needs a path for the backing file")
            target = Path(path).expanduser().absolute()
            if not target.parent.is_dir():
                raise BadInputError(f"directory {target.parent} does not exist")
        else:
            if path is not None:
                raise BadInputError("a path is only used for tier disk (tier cpu lives in /dev/shm)")
            target = registry.shm_path(name, data_dir)
        geometry = compute_geometry(size_b, bs)
        with registry.locked(data_dir) as reg_file:
            pools = registry.load(data_dir)
            _check_room(name, target, geometry, pools, "pool")
            pool = cls._build(name, target, geometry, policy, tier, data_dir, None)
            pools[name] = {"path": str(target), "tier": tier, "created": time.time()}
            registry.save(reg_file, pools)
        log.info("created pool %s (%s, %s) at %s", name, format_size(geometry.data_bytes), tier, target)
        return pool

    @classmethod
    def _build(
        cls,
        name: str,
        target: Path,
        geometry: Geometry,
        policy: str,
        tier: str,
        data_dir: str | os.PathLike[str] | None,
        populate: Callable[["Pool"], None] | None,
    ) -> "Pool":
        """Format a new pool under a temporary name, fill it (`populate`), then link it into place."""
        _sweep_stale_temps(target.parent)
        tmp = target.parent / f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        pool = None
        try:
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, geometry.file_size)
            _format(fd, geometry, policy, tier, name)
            pool = cls(name, target, fd, data_dir)
            if populate is not None:
                populate(pool)
            if tier == "disk":
                pool._mm.flush()
            try:
                os.link(tmp, target)  # never clobbers: fails if the name appeared meanwhile
            except FileExistsError:
                raise BadInputError(f"{target} already exists; choose another name or path") from None
            os.unlink(tmp)
        except BaseException:
            if pool is not None:
                pool.close()
            else:
                os.close(fd)
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return pool

    @classmethod
    def open(cls, name: str, data_dir: str | os.PathLike[str] | None = None) -> "Pool":
        """Attach to a registered pool from any process; BadInputError if unknown or gone."""
        record = registry.lookup(data_dir, name)
        if record is None:
            raise BadInputError(f"unknown pool {name!r} (see `infercache kv list`)")
        path = Path(record["path"])
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise BadInputError(
                f"pool {name!r}: backing file {path} is gone (stale registry entry; `infercache kv delete {name}`)"
            ) from None
        try:
            pool = cls(name, path, fd, data_dir)
        except BaseException:
            os.close(fd)
            raise
        pool._attach_recovery()
        return pool

    @classmethod
    def destroy(cls, name: str, data_dir: str | os.PathLike[str] | None = None) -> None:
        """Delete the backing file and the registration (processes still attached keep their mapping)."""
        with registry.locked(data_dir) as reg_file:
            pools = registry.load(data_dir)
            record = pools.get(name)
            if record is None:
                raise BadInputError(f"unknown pool {name!r} (see `infercache kv list`)")
            path = Path(record["path"])
            try:
                with open(path, "rb") as handle:
                    head = handle.read(8)
                if int.from_bytes(head.ljust(8, b"\0"), "little") != MAGIC:
                    raise InfercacheError(f"{path} is not an infercache pool; not deleting it")
                path.unlink()
            except FileNotFoundError:
                log.warning("pool %s: backing file %s was already gone", name, path)
            del pools[name]
            registry.save(reg_file, pools)
        log.info("deleted pool %s (%s)", name, path)

    @classmethod
    def list_pools(cls, data_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
        """Stats of every registered pool whose file exists, plus `attached` (pids mapping it)."""
        rows = []
        for name, record in sorted(registry.load(data_dir).items()):
            path = Path(record["path"])
            if not path.exists():
                log.warning("pool %s: backing file %s is gone (stale registry entry)", name, path)
                continue
            attached = attached_pids(path)
            try:
                pool = cls.open(name, data_dir)
            except InfercacheError as exc:
                rows.append({"name": name, "tier": record.get("tier"), "path": str(path), "error": str(exc)})
                continue
            try:
                row = pool.stats()
            finally:
                pool.close()
            row["attached"] = attached
            rows.append(row)
        return rows

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
        self._release_views()
        try:
            os.close(self._fd)
        except OSError:
            pass

    def _release_views(self) -> None:
        """Drop every view of the mapping, then unmap; a view still exported elsewhere (a numpy
        array a caller kept) only delays the unmap to garbage collection."""
        views = []
        for attr in ("_index", "_alloc"):
            obj = getattr(self, attr, None)
            if obj is not None:
                views.append(obj.release)
        for attr in ("_free", "_ghost", "_tq", "_td", "_ts", "_hq", "_hd", "_mv"):
            view = getattr(self, attr, None)
            if view is not None:
                views.append(view.release)
        views.append(self._mm.close)
        for release in views:
            try:
                release()
            except BufferError:
                log.debug("pool %s: mapping still exported; left to the garbage collector", self.name)

    def __enter__(self) -> "Pool":
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

    @contextmanager
    def _mutating(self) -> Iterator[None]:
        """Exclusive section that may change metadata; marks the header dirty while inside."""
        self._check_open()
        with self._lock.exclusive():
            hq = self._hq
            if hq[HDR_DIRTY]:
                self._recover_locked(f"process {hq[HDR_DIRTY]} died (or failed) inside a pool update")
            hq[HDR_DIRTY] = self._pid
            yield
            hq[HDR_DIRTY] = 0

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """Shared section: many processes copy out at once; nothing in the mapping changes."""
        self._check_open()
        while True:
            self._lock._acquire(fcntl.LOCK_SH)
            if not self._hq[HDR_DIRTY]:
                break
            self._lock._release()
            with self._mutating():
                pass
        try:
            yield
        finally:
            self._lock._release()

    def _ex(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` in an exclusive, dirty-marked section (the hot-path form of `_mutating`).

        An exception inside leaves the header dirty on purpose: the next locker rebuilds.
        """
        if self._closed or _my_pid != self._pid:
            self._check_open()
        lock = self._lock
        lock._acquire(_LOCK_EX)
        hq = self._hq
        try:
            if hq[HDR_DIRTY]:
                self._recover_locked(f"process {hq[HDR_DIRTY]} died (or failed) inside a pool update")
            hq[HDR_DIRTY] = self._pid
            result = fn(*args)
        except BaseException:
            lock._release()
            raise
        hq[HDR_DIRTY] = 0
        lock._release()
        return result

    def _sh(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` under the shared lock (the hot-path form of `_reading`)."""
        self._enter_shared()
        try:
            return fn(*args)
        finally:
            self._lock._release()

    def _enter_shared(self) -> None:
        """Take the shared lock on a clean pool (a dirty one is recovered under the exclusive lock first)."""
        if self._closed or _my_pid != self._pid:
            self._check_open()
        lock = self._lock
        while True:
            lock._acquire(_LOCK_SH)
            if not self._hq[HDR_DIRTY]:
                return
            lock._release()
            self._ex(_noop)  # recovers

    def _attach_recovery(self) -> None:
        with self._mutating():
            self._reclaim_orphans_locked()
            self._claim_slot_locked()

    # ------------------------------------------------------------------ read counters
    def _use_global_counters(self) -> None:
        self._slot = -1
        self._slot_tried = False
        self._w_hits, self._w_misses, self._w_bytes_out = HDR_HITS, HDR_MISSES, HDR_BYTES_OUT

    def _claim_slot_locked(self) -> None:
        """Take a free counter slot (or one of a dead process, folding its counts into the totals)."""
        self._slot_tried = True
        hq = self._hq
        for i in range(N_SLOTS):
            base = SLOT_BASE + i * SLOT_WORDS
            pid = hq[base]
            if pid and _pid_alive(pid):
                continue
            if pid:
                self._fold_slot_locked(base)
            hq[base] = self._pid
            self._slot = base
            self._w_hits, self._w_misses, self._w_bytes_out = base + 1, base + 2, base + 3
            return
        log.info("pool %s: all %d counter slots in use; reads take the exclusive lock", self.name, N_SLOTS)

    def _fold_slot_locked(self, base: int) -> None:
        hq = self._hq
        hq[HDR_HITS] += hq[base + 1]
        hq[HDR_MISSES] += hq[base + 2]
        hq[HDR_BYTES_OUT] += hq[base + 3]
        for k in range(SLOT_WORDS):
            hq[base + k] = 0

    def _release_slot_locked(self) -> None:
        if self._slot >= 0 and self._hq[self._slot] == self._pid:
            self._fold_slot_locked(self._slot)
        self._use_global_counters()
        self._slot_tried = True

    def _read_counters(self) -> tuple[int, int, int]:
        """Totals of hits, misses and bytes out: the header's plus every slot's."""
        hq = self._hq
        hits, misses, out = hq[HDR_HITS], hq[HDR_MISSES], hq[HDR_BYTES_OUT]
        for i in range(N_SLOTS):
            base = SLOT_BASE + i * SLOT_WORDS
            hits += hq[base + 1]
            misses += hq[base + 2]
            out += hq[base + 3]
        return hits, misses, out

    def _shared_reads(self) -> bool:
        """True when this object may read under the shared lock (it has a counter slot)."""
        if _my_pid != self._pid or self._closed:
            self._check_open()
        if self._slot < 0 and not self._slot_tried:
            self._ex(self._claim_slot_locked)
        return self._slot >= 0

    # ------------------------------------------------------------------ entry helpers
    def _key_of(self, e: int) -> bytes:
        w = e * ENTRY_WORDS
        klen = (self._tq[w + E_CHECK] >> 32) & 0xFFFF
        if self._tq[w + E_FLAGS] & F_KEY_IN_DATA:
            base = self._data_off + self._tq[w + E_START] * self.block_size
        else:
            base = self._table_off + e * ENTRY_BYTES + KEY_OFFSET
        return self._mv[base : base + klen].tobytes()

    def _find(self, kb: bytes, h: int) -> int:
        """Published entry holding key `kb` (hash `h`), or -1.

        KeyIndex.find's probe inlined with the key comparison (hash, length, then bytes read
        straight from the mapping): this runs once or twice per op, and the generic form's
        closure and helper calls were a sixth of a small put.
        """
        slots = self._islots
        mask = self._imask
        tq = self._tq
        klen = len(kb)
        i = h & mask
        for _ in range(mask + 1):
            v = slots[i]
            if not v:
                return -1
            w = (v - 1) * ENTRY_WORDS
            if tq[w + E_HASH] == h and (tq[w + E_CHECK] >> 32) & 0xFFFF == klen:
                if tq[w + E_FLAGS] & F_KEY_IN_DATA:
                    base = self._data_off + tq[w + E_START] * self.block_size
                else:
                    base = self._table_off + (v - 1) * ENTRY_BYTES + KEY_OFFSET
                if self._mm[base : base + klen] == kb:
                    return v - 1
            i = (i + 1) & mask
        return -1

    def _data(self, e: int) -> memoryview:
        w = e * ENTRY_WORDS
        off = self._data_off + self._tq[w + E_START] * self.block_size
        if self._tq[w + E_FLAGS] & F_KEY_IN_DATA:  # a long key precedes the value
            off += (self._tq[w + E_CHECK] >> 32) & 0xFFFF
        return self._mv[off : off + self._tq[w + E_SIZE]]

    def _blocks_needed(self, e: int) -> int:
        """Blocks entry `e` must own for its value (and its key, when stored with the data)."""
        w = e * ENTRY_WORDS
        extra = (self._tq[w + E_CHECK] >> 32) & 0xFFFF if self._tq[w + E_FLAGS] & F_KEY_IN_DATA else 0
        return -(-(self._tq[w + E_SIZE] + extra) // self.block_size)

    def _tick(self) -> int:
        t = self._hq[HDR_CLOCK] + 1
        self._hq[HDR_CLOCK] = t
        return t

    def _rows(self) -> "np.ndarray":
        import numpy as np

        hwm = min(self._hq[HDR_HWM], self.capacity_entries)
        return np.frombuffer(self._mv, dtype=entry_dtype(), count=hwm, offset=self._table_off)

    def _pop_slot_locked(self) -> int:
        hq = self._hq
        top = hq[HDR_FREE_TOP]
        if top:
            hq[HDR_FREE_TOP] = top - 1
            return self._free[top - 1]
        hwm = hq[HDR_HWM]
        if hwm < self.capacity_entries:
            hq[HDR_HWM] = hwm + 1
            return hwm
        return -1

    def _slot_available(self) -> bool:
        return bool(self._hq[HDR_FREE_TOP]) or self._hq[HDR_HWM] < self.capacity_entries

    def _free_slot_locked(self, e: int) -> None:
        """Mark slot `e` free (bumping its generation) and push it on the free stack."""
        w = e * ENTRY_WORDS
        gen = self._tq[w + E_STATE] >> 8
        self._tq[w + E_STATE] = ((gen + 1) & ((1 << 56) - 1)) << 8 | ST_FREE
        top = self._hq[HDR_FREE_TOP]
        self._free[top] = e
        self._hq[HDR_FREE_TOP] = top + 1

    def _remove_locked(self, e: int) -> None:
        """Unpublish a published entry and free its blocks and slot (_free_slot_locked inlined)."""
        tq = self._tq
        hq = self._hq
        w = e * ENTRY_WORDS
        self._index.remove(tq[w + E_HASH], e)
        nb = tq[w + E_NBLOCKS]
        if nb:
            self._alloc.free(tq[w + E_START], nb)
        hq[HDR_ENTRIES] -= 1
        hq[HDR_VALUE_BYTES] -= tq[w + E_SIZE]
        tq[w + E_STATE] = (((tq[w + E_STATE] >> 8) + 1) & ((1 << 56) - 1)) << 8 | ST_FREE
        top = hq[HDR_FREE_TOP]
        self._free[top] = e
        hq[HDR_FREE_TOP] = top + 1

    def _drop_reservation_locked(self, e: int) -> None:
        """Free an unpublished (WRITING) entry's blocks and slot."""
        tq = self._tq
        w = e * ENTRY_WORDS
        nb = tq[w + E_NBLOCKS]
        if nb:
            self._alloc.free(tq[w + E_START], nb)
        self._free_slot_locked(e)

    def _evict_locked(self, e: int) -> None:
        if self._s3 and not self._tq[e * ENTRY_WORDS + E_FLAGS] & F_S3_MAIN:
            pos = self._hq[HDR_GHOST_POS]
            self._ghost[pos % self._ghost_cap] = self._tq[e * ENTRY_WORDS + E_HASH]
            self._hq[HDR_GHOST_POS] = pos + 1
        self._remove_locked(e)
        self._hq[HDR_EVICTIONS] += 1

    def _in_ghost_locked(self, h: int) -> bool:
        import numpy as np

        ring = np.frombuffer(self._ghost, dtype=np.uint64)
        hit = np.flatnonzero(ring == np.uint64(h))
        if len(hit):
            ring[hit] = 0
            return True
        return False

    def _victims_locked(self) -> Iterator[int]:
        """Evictable entries (published, unpinned) in the pool policy's order."""
        import numpy as np

        rows = self._rows()
        published = (rows["state"] & 0xFF) == ST_PUBLISHED
        slots = np.flatnonzero(published & (rows["pins"] == 0))
        cand = {name: rows[name][slots] for name in FIELDS}  # only the fields the policies use
        now = time.time()
        if self._s3:
            small = int(rows["nblocks"][published & ((rows["flags"] & F_S3_MAIN) == 0)].sum())

            def get_flags(slot: int) -> int:
                return self._tq[slot * ENTRY_WORDS + E_FLAGS] & _LOW32

            def set_queue(slot: int, flags: int) -> None:
                w = slot * ENTRY_WORDS
                self._tq[w + E_FLAGS] = (self._tq[w + E_FLAGS] & ~_LOW32) | flags
                self._tq[w + E_ITICK] = self._tick()

            yield from s3fifo_victims(cand, slots, now, self.n_blocks, small, get_flags, set_queue)
            return
        for pos in order(self.policy, cand, now):
            yield int(slots[pos])

    def _reclaim_orphans_locked(self) -> list[str]:
        """Free reservations whose writer process is gone (killed between reserve and publish)."""
        import numpy as np

        rows = self._rows()
        writing = np.flatnonzero((rows["state"] & 0xFF) == ST_WRITING)
        notes = []
        for e in writing.tolist():
            pid = self._tq[e * ENTRY_WORDS + E_FLAGS] >> 32
            if not _pid_alive(pid):
                key = self._key_of(e)
                self._drop_reservation_locked(e)
                notes.append(f"reclaimed the unpublished entry {key!r} of dead writer pid {pid}")
        for note in notes:
            log.warning("pool %s: %s", self.name, note)
        return notes

    def _make_room_locked(self, nblocks: int) -> tuple[int, int]:
        """(slot, first block) for a new entry, evicting by policy as needed; (-1, -1) if impossible.

        Once the new entry fits, eviction goes on along the same victim order until 1/256 of
        the blocks and of the entry slots are free (a low watermark): ranking victims scans the
        entry table, and this spreads one scan over the next puts instead of one per put.
        Pools under 256 blocks or entries get no headroom (every put evicts just enough).
        """
        alloc = self._alloc
        hq = self._hq
        for attempt in range(2):
            start = alloc.alloc(nblocks) if nblocks else 0
            if start >= 0 and (hq[HDR_FREE_TOP] or hq[HDR_HWM] < self.capacity_entries):
                return self._pop_slot_locked(), start
            victims = self._victims_locked()
            for victim in victims:
                self._evict_locked(victim)
                if start < 0:
                    start = alloc.alloc(nblocks)
                if start >= 0 and self._slot_available():
                    slot = self._pop_slot_locked()
                    self._headroom_locked(victims)
                    return slot, start
            if start >= 0 and nblocks:
                alloc.free(start, nblocks)
            if attempt == 0 and not self._reclaim_orphans_locked():
                break
        return -1, -1

    def _headroom_locked(self, victims: Iterator[int]) -> None:
        hq = self._hq
        want_blocks = self.n_blocks >> 8
        want_slots = self.capacity_entries >> 8
        for victim in victims:
            free_slots = hq[HDR_FREE_TOP] + self.capacity_entries - hq[HDR_HWM]
            if self._alloc.free_blocks >= want_blocks and free_slots >= want_slots:
                return
            self._evict_locked(victim)

    # ------------------------------------------------------------------ entries
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
        kb, flags, h = _key_info(key)
        src = _value_view(value)
        size = src.nbytes
        bs = self.block_size
        extra = len(kb) if len(kb) > KEY_INLINE else 0
        if extra:
            flags |= F_KEY_IN_DATA
        nblocks = -(-(size + extra) // bs)
        if nblocks > self.n_blocks:
            raise BadInputError(
                f"value of {size} bytes ({format_size(size)}) is larger than pool {self.name!r} "
                f"({self.n_blocks * bs} bytes)"
            )
        expiry = 0.0
        if ttl is not None:
            seconds = parse_duration(ttl)
            if seconds <= 0:
                raise BadInputError(f"ttl must be positive, got {ttl!r}")
            expiry = time.time() + seconds
        if not isinstance(priority, int) or not -(1 << 63) <= priority < 1 << 63:
            raise BadInputError(f"priority must be a 64-bit int, got {priority!r}")
        prefix_hash = 0
        if prefix is not None:
            prefix_hash = _prefix_hash(prefix)
            flags |= F_HAS_PREFIX
        check = _checksum(h, size, src)
        e, state = self._ex(self._put_locked, kb, h, flags, size, nblocks, priority, expiry, prefix_hash, check, src)
        if e < 0:
            return e == _DONE
        try:
            self._data(e)[:] = src  # outside the lock: the blocks are ours and invisible to readers
        except BaseException:
            self._ex(self._abandon_locked, e, state)
            raise
        return self._ex(self._finish_put_locked, e, state, kb, h)

    def _put_locked(
        self, kb: bytes, h: int, flags: int, size: int, nblocks: int, priority: int, expiry: float,
        prefix_hash: int, check: int, src: memoryview,
    ) -> tuple[int, int]:  # fmt: skip
        """Reserve; small values are also copied and published here. (_DONE|_FAILED, 0) or (entry, state).

        A small value is reserved, copied and published in this one exclusive section, so no
        other writer can have published the key meanwhile (no second lookup) and the record
        skips the WRITING state (nobody outside this section can see it; a crash inside leaves
        the header dirty and the rebuild drops the unpublished slot).
        """
        inline = size <= SMALL_COPY
        e, indexed = self._reserve_locked(kb, h, flags, size, nblocks, priority, expiry, prefix_hash, check, inline)
        if e < 0:
            return _FAILED, 0
        if inline:
            if size:
                off = self._data_off + self._tq[e * ENTRY_WORDS + E_START] * self.block_size
                if flags & F_KEY_IN_DATA:
                    off += len(kb)
                self._mm[off : off + size] = src  # data first ...
            tq = self._tq
            w = e * ENTRY_WORDS
            hq = self._hq
            if not indexed:
                self._index.insert(h, e)
                hq[HDR_ENTRIES] += 1
            tq[w + E_STATE] = (tq[w + E_STATE] >> 8) << 8 | ST_PUBLISHED  # ... published last
            hq[HDR_VALUE_BYTES] += size
            hq[HDR_PUTS] += 1
            hq[HDR_BYTES_IN] += size
            return _DONE, 0
        return e, self._tq[e * ENTRY_WORDS + E_STATE]

    def _abandon_locked(self, e: int, state: int) -> None:
        if self._tq[e * ENTRY_WORDS + E_STATE] == state:
            self._drop_reservation_locked(e)

    def _finish_put_locked(self, e: int, state: int, kb: bytes, h: int) -> bool:
        if self._tq[e * ENTRY_WORDS + E_STATE] != state:  # reclaimed meanwhile (should not happen)
            log.warning("pool %s: reservation for %r was reclaimed before publishing", self.name, kb)
            return False
        self._publish_locked(e, kb, h)
        return True

    def _reserve_locked(
        self, kb: bytes, h: int, flags: int, size: int, nblocks: int, priority: int, expiry: float,
        prefix_hash: int, check: int, inline: bool = False,
    ) -> tuple[int, bool]:  # fmt: skip
        """Write a new record for the key (dropping its old value): (slot, whether the key index
        already points at it), or (-1, False) when it cannot fit.

        The record is left WRITING (tagged with this pid) for a copy outside the lock; with
        `inline` the caller publishes it in the same section and it stays FREE until then.
        """
        tq = self._tq
        hq = self._hq
        pins = 0
        e = start = -1
        indexed = False
        old = self._find(kb, h)
        if old >= 0:  # replaced: the old value goes now, its pins carry over
            w = old * ENTRY_WORDS
            pins = tq[w + E_PINS]
            if inline and nblocks and tq[w + E_NBLOCKS] == nblocks:
                # Same block count, copied and published in this one section: the new value
                # takes over the old one's slot, blocks and index position (same key, same
                # hash). The old record is unpublished first; nobody can read the slot until
                # we publish, and a crash in between leaves the header dirty, so the rebuild
                # frees the slot and blocks and drops the index position.
                # (The entry count and the key bytes stay as they are: same key, one entry.)
                e, start, indexed = old, tq[w + E_START], True
                tq[w + E_STATE] = (((tq[w + E_STATE] >> 8) + 1) & ((1 << 56) - 1)) << 8 | ST_FREE
                hq[HDR_VALUE_BYTES] -= tq[w + E_SIZE]
            else:
                self._remove_locked(old)
        if self._s3 and self._in_ghost_locked(h):
            flags |= F_S3_MAIN
        if indexed:
            pass
        elif hq[HDR_FREE_TOP] and (not nblocks or (start := self._alloc.alloc(nblocks)) >= 0):
            e = self._pop_slot_locked()  # the common case of _make_room_locked, without the call
            start = max(start, 0)
        else:
            e, start = self._make_room_locked(nblocks)
            if e < 0:
                return -1, False
        tick = hq[HDR_CLOCK] + 1
        hq[HDR_CLOCK] = tick
        now = time.time()
        rec = self._table_off + e * ENTRY_BYTES
        klen = len(kb)
        _RECORD.pack_into(
            self._mm, rec + 8, h, start, nblocks, size, klen << 32 | check, now, now, expiry, 0, priority, pins,
            flags if inline else self._pid << 32 | flags, prefix_hash, tick, tick,
        )  # fmt: skip
        if not indexed:
            base = self._data_off + start * self.block_size if flags & F_KEY_IN_DATA else rec + KEY_OFFSET
            self._mm[base : base + klen] = kb
        if not inline:
            w = e * ENTRY_WORDS
            tq[w + E_STATE] = (tq[w + E_STATE] >> 8) << 8 | ST_WRITING  # last: the record is complete
        return e, indexed

    def _publish_locked(self, e: int, kb: bytes, h: int) -> None:
        tq = self._tq
        w = e * ENTRY_WORDS
        other = self._find(kb, h)
        if other >= 0:  # another writer published the same key while we copied: last one wins
            tq[w + E_PINS] = max(tq[w + E_PINS], tq[other * ENTRY_WORDS + E_PINS])
            self._remove_locked(other)
        tq[w + E_FLAGS] &= _LOW32
        self._index.insert(h, e)
        tq[w + E_STATE] = (tq[w + E_STATE] >> 8) << 8 | ST_PUBLISHED
        hq = self._hq
        size = tq[w + E_SIZE]
        hq[HDR_ENTRIES] += 1
        hq[HDR_VALUE_BYTES] += size
        hq[HDR_PUTS] += 1
        hq[HDR_BYTES_IN] += size

    def _lookup_locked(self, kb: bytes, h: int, count: bool, shared: bool) -> int:
        """Published, unexpired entry for the key, or -1; with `count`, updates hit/miss and recency.

        Under the shared lock (`shared`) only this process's counter slot and the entry's
        recency words are written: concurrent readers may lose an access-count increment or
        tie on a tick, which only blurs LRU/LFU order, never the structure. An expired entry
        is a miss; it is removed here only under the exclusive lock (else by eviction).
        """
        e = self._find(kb, h)
        hq = self._hq
        if e < 0:
            if count:
                hq[self._w_misses] += 1
            return -1
        w = e * ENTRY_WORDS
        tq = self._tq
        td = self._td
        expiry = td[w + E_EXPIRY]
        now = time.time()
        if expiry and expiry <= now:
            if count:
                hq[self._w_misses] += 1
                if not shared and not tq[w + E_PINS]:
                    self._remove_locked(e)
                    hq[HDR_EXPIRED] += 1
            return -1
        if count:
            hq[self._w_hits] += 1
            hq[self._w_bytes_out] += tq[w + E_SIZE]
            tick = hq[HDR_CLOCK] + 1
            hq[HDR_CLOCK] = tick
            tq[w + E_ATICK] = tick
            td[w + E_ATIME] = now
            tq[w + E_COUNT] += 1
            if self._s3:
                flags = tq[w + E_FLAGS]
                freq = min(3, ((flags & F_S3_FREQ_MASK) >> F_S3_FREQ_SHIFT) + 1)
                tq[w + E_FLAGS] = (flags & ~F_S3_FREQ_MASK) | freq << F_S3_FREQ_SHIFT
        return e

    def _read(
        self, key: str | bytes, copy: Callable[[memoryview], Any], expect: Callable[[int], str | None] | None = None
    ) -> Any:
        """Look up (counting a hit/miss) and run `copy` on the value's bytes, in one locked section.

        Normally under the shared lock, so readers in many processes look up and copy at once
        (writers wait); without a counter slot, under the exclusive lock. `expect(size)` returns
        an error message to refuse the value (raised once the lock is released).
        """
        kb, _, h = _key_info(key)
        if self._shared_reads():
            result = self._sh(self._read_locked, kb, h, copy, expect, True)
        else:
            result = self._ex(self._read_locked, kb, h, copy, expect, False)
        if isinstance(result, _Refusal):
            raise BadInputError(result.message)
        return result

    def _read_locked(
        self, kb: bytes, h: int, copy: Callable[[memoryview], Any], expect: Callable[[int], str | None] | None,
        shared: bool,
    ) -> Any:  # fmt: skip
        e = self._lookup_locked(kb, h, True, shared)
        if e < 0:
            return None
        if expect is not None:
            message = expect(self._tq[e * ENTRY_WORDS + E_SIZE])
            if message:
                return _Refusal(message)
        data = self._data(e)
        try:
            return copy(data)
        finally:
            data.release()

    def get(self, key: str | bytes) -> bytes | None:
        """A copy of the value, or None (missing or expired: a miss)."""
        if self._slot < 0 or self._closed or _my_pid != self._pid:  # no counter slot yet, closed or forked
            return self._read(key, _view_bytes)
        kb, _, h = _key_info(key)
        # _read's path with the calls inlined (the hot path of small gets): shared lock,
        # lookup, then one copy straight from the mapping into new bytes
        self._enter_shared()
        try:
            e = self._lookup_locked(kb, h, True, True)
            if e < 0:
                return None
            tq = self._tq
            w = e * ENTRY_WORDS
            off = self._data_off + tq[w + E_START] * self.block_size
            if tq[w + E_FLAGS] & F_KEY_IN_DATA:  # a long key precedes the value
                off += len(kb)
            return self._mm[off : off + tq[w + E_SIZE]]
        finally:
            self._lock._release()

    def get_into(self, key: str | bytes, out: Any) -> int | None:
        """Copy the value into the writable buffer `out` (no allocation); its size, or None on a miss."""
        target = memoryview(out).cast("B") if not isinstance(out, memoryview) else out.cast("B")

        def expect(size: int) -> str | None:
            if size > target.nbytes:
                return f"buffer of {target.nbytes} bytes is too small for a {size}-byte value"
            return None

        def copy(view: memoryview) -> int:
            target[: len(view)] = view
            return len(view)

        return self._read(key, copy, expect)

    def get_array(self, key: str | bytes, dtype: Any, shape: Any = None) -> "np.ndarray | None":
        """The value as a new numpy array of `dtype` and `shape` (1-D when None), or None on a miss."""
        import numpy as np

        dt = np.dtype(dtype)
        result: dict[str, Any] = {}

        def expect(size: int) -> str | None:
            if shape is None:
                if size % dt.itemsize:
                    return f"value of {size} bytes is not a whole number of {dt} items"
                shp: tuple[int, ...] = (size // dt.itemsize,)
            else:
                shp = tuple(shape) if isinstance(shape, (tuple, list)) else (int(shape),)
                if math.prod(shp) * dt.itemsize != size:
                    return f"value of {size} bytes does not match dtype {dt} and shape {shp}"
            result["arr"] = np.empty(shp, dtype=dt)
            return None

        def copy(view: memoryview) -> "np.ndarray":
            arr = result["arr"]
            if view.nbytes:
                arr.reshape(-1).view(np.uint8)[:] = np.frombuffer(view, dtype=np.uint8)
            return arr

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
        kb, _, h = _key_info(key)
        shared = self._shared_reads()
        failure: BaseException | None = None
        with self._reading() if shared else self._mutating():
            e = self._lookup_locked(kb, h, True, shared)
            if e < 0:
                data = ro = None
            else:
                data = self._data(e)
                ro = data.toreadonly()
            try:
                yield ro
            except BaseException as exc:  # re-raised below, once the lock is released
                failure = exc
            finally:
                if ro is not None:
                    ro.release()
                    data.release()
        if failure is not None:
            raise failure

    def contains(self, key: str | bytes) -> bool:
        """Present and unexpired (not counted as a hit or miss)."""
        kb, _, h = _key_info(key)
        return self._sh(self._lookup_locked, kb, h, False, True) >= 0

    def delete(self, key: str | bytes) -> bool:
        """Remove the entry (pinned or not); False when absent."""
        kb, _, h = _key_info(key)
        with self._mutating():
            e = self._find(kb, h)
            if e < 0:
                return False
            self._remove_locked(e)
            return True

    def pin(self, key: str | bytes) -> bool:
        """Protect the entry from eviction (pins nest); False when absent."""
        return self._adjust_pins(key, +1)

    def unpin(self, key: str | bytes) -> bool:
        """Undo one pin; False when absent."""
        return self._adjust_pins(key, -1)

    def _adjust_pins(self, key: str | bytes, delta: int) -> bool:
        kb, _, h = _key_info(key)
        with self._mutating():
            e = self._find(kb, h)
            if e < 0:
                return False
            w = e * ENTRY_WORDS + E_PINS
            self._tq[w] = max(0, self._tq[w] + delta)
            return True

    def info(self, key: str | bytes) -> dict[str, Any] | None:
        """Metadata of one entry (no hit counted), or None."""
        kb, _, h = _key_info(key)
        with self._reading():
            e = self._find(kb, h)
            if e < 0:
                return None
            return self._entry_info(e)

    def _entry_info(self, e: int) -> dict[str, Any]:
        tq, td = self._tq, self._td
        w = e * ENTRY_WORDS
        flags = tq[w + E_FLAGS] & _LOW32
        kb = self._key_of(e)
        return {
            "key": kb.decode(errors="replace") if flags & F_KEY_STR else kb,
            "size": tq[w + E_SIZE],
            "blocks": tq[w + E_NBLOCKS],
            "created": td[w + E_CREATED],
            "last_access": td[w + E_ATIME],
            "expires": td[w + E_EXPIRY] or None,
            "access_count": tq[w + E_COUNT],
            "priority": self._ts[w + E_PRIORITY],
            "pins": tq[w + E_PINS],
            "has_prefix": bool(flags & F_HAS_PREFIX),
            "insert_tick": tq[w + E_ITICK],  # the pool's logical clock: insertion / queue order
            "access_tick": tq[w + E_ATICK],  # ... and recency
            **(
                {"queue": "main" if flags & F_S3_MAIN else "small", "freq": (flags & F_S3_FREQ_MASK) >> F_S3_FREQ_SHIFT}
                if self._s3
                else {}
            ),
        }

    def keys(self) -> list[str | bytes]:
        """Every published key, oldest insertion first."""
        return [k for k, _ in self._published_keys(None)]

    def find_by_prefix(self, prefix: str | bytes | int) -> list[str | bytes]:
        """Keys put with this `prefix` tag (e.g. a token-prefix hash), oldest first."""
        return [k for k, _ in self._published_keys(_prefix_hash(prefix))]

    def _published_keys(self, prefix_hash: int | None) -> list[tuple[str | bytes, int]]:
        import numpy as np

        with self._reading():
            rows = self._rows()
            mask = (rows["state"] & 0xFF) == ST_PUBLISHED
            if prefix_hash is not None:
                mask &= ((rows["flags"] & F_HAS_PREFIX) != 0) & (rows["prefix"] == np.uint64(prefix_hash))
            slots = np.flatnonzero(mask)
            slots = slots[np.argsort(rows["itick"][slots], kind="stable")]
            out = []
            for e in slots.tolist():
                kb = self._key_of(e)
                flags = self._tq[e * ENTRY_WORDS + E_FLAGS]
                out.append((kb.decode() if flags & F_KEY_STR else kb, e))
            return out

    # ------------------------------------------------------------------ eviction
    def evict(self, percent: float | None = None, bytes: int | str | None = None, expired: bool = False) -> int:
        """Evict by policy until `percent` of the bytes in use or `bytes` are freed, or every expired
        entry (`expired=True`); pinned entries stay. Returns the number of entries evicted.

        Percent is of what the pool holds, not of its size, so `--percent 25` on a lightly used
        pool trims a quarter of it instead of emptying it."""
        modes = (percent is not None) + (bytes is not None) + bool(expired)
        if modes != 1:
            raise BadInputError("give exactly one of percent, bytes or expired")
        target = 0
        if percent is not None and not 0 < float(percent) <= 100:
            raise BadInputError(f"percent must be in (0, 100], got {percent}")
        elif bytes is not None:
            target = parse_size(bytes)
            if target <= 0:
                raise BadInputError(f"bytes must be positive, got {bytes!r}")
        count = 0
        with self._mutating():
            if percent is not None:
                used = (self.n_blocks - self._alloc.free_blocks) * self.block_size
                target = math.ceil(float(percent) / 100 * used)
            if expired:
                import numpy as np

                rows = self._rows()
                now = time.time()
                mask = ((rows["state"] & 0xFF) == ST_PUBLISHED) & (rows["pins"] == 0)
                mask &= (rows["expiry"] > 0) & (rows["expiry"] <= now)
                for e in np.flatnonzero(mask).tolist():
                    self._remove_locked(e)
                    self._hq[HDR_EXPIRED] += 1
                    self._hq[HDR_EVICTIONS] += 1
                    count += 1
                return count
            freed = 0
            for e in self._victims_locked():
                if freed >= target:
                    break
                freed += self._tq[e * ENTRY_WORDS + E_NBLOCKS] * self.block_size
                self._evict_locked(e)
                count += 1
        return count

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict[str, Any]:
        """Sizes, use and counters (the keys `kv status --format json` promises, and more)."""
        with self._reading():
            hq = self._hq
            size = self.n_blocks * self.block_size
            used = (self.n_blocks - self._alloc.free_blocks) * self.block_size
            hits, misses, bytes_out = self._read_counters()
            return {
                "name": self.name,
                "tier": self.tier,
                "path": str(self.path),
                "policy": self.policy,
                "size_bytes": size,
                "used_bytes": used,
                "free_bytes": size - used,
                "utilization": used / size if size else 0.0,
                "value_bytes": hq[HDR_VALUE_BYTES],
                "entries": hq[HDR_ENTRIES],
                "capacity_entries": self.capacity_entries,
                "block_size": self.block_size,
                "blocks": self.n_blocks,
                "free_blocks": self._alloc.free_blocks,
                "largest_free_bytes": self._alloc.largest_free() * self.block_size,
                "file_bytes": hq[HDR_FILE_SIZE],
                "hits": hits,
                "misses": misses,
                "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
                "evictions": hq[HDR_EVICTIONS],
                "expired": hq[HDR_EXPIRED],
                "puts": hq[HDR_PUTS],
                "bytes_in": hq[HDR_BYTES_IN],
                "bytes_out": bytes_out,
                "repairs": hq[HDR_REPAIRS],
                "created": self._hd[HDR_CREATED],
                "layout_version": hq[HDR_VERSION],
            }

    # ------------------------------------------------------------------ check / repair
    def check(self, repair: bool = False) -> CheckReport:
        """Verify every invariant; with `repair`, rebuild derived state from the entry table.

        Routine crash recovery (reclaiming unpublished entries of dead writers, rebuilding after
        a process died inside an update) happens first and is reported in `recovered`.
        """
        self._last_recovery = []
        with self._mutating():
            recovered = self._last_recovery + self._reclaim_orphans_locked()
            problems = self._problems_locked()
            repaired: list[str] = []
            ok = not problems
            if problems and repair:
                repaired = self._repair_locked()
                remaining = self._problems_locked()
                ok = not remaining
                if remaining:
                    log.error("pool %s: still inconsistent after repair: %s", self.name, remaining)
        return CheckReport(ok=ok, problems=tuple(problems), repaired=tuple(repaired), recovered=tuple(recovered))

    def _problems_locked(self) -> list[str]:
        import numpy as np

        problems: list[str] = []
        hq = self._hq
        cap = self.capacity_entries
        hwm = hq[HDR_HWM]
        if hwm > cap:
            problems.append(f"slot high-water mark {hwm} exceeds the table capacity {cap}")
            hwm = cap
        full = np.frombuffer(self._mv, dtype=entry_dtype(), count=cap, offset=self._table_off)
        states = full["state"] & 0xFF
        beyond = np.flatnonzero(states[hwm:] != ST_FREE)
        if len(beyond):
            problems.append(f"{len(beyond)} entries lie above the slot high-water mark {hwm}")
        st = states[:hwm]
        bad_state = np.flatnonzero((st != ST_FREE) & (st != ST_WRITING) & (st != ST_PUBLISHED))
        if len(bad_state):
            problems.append(f"{len(bad_state)} entries have an unknown state (slots {bad_state[:5].tolist()})")
        published = np.flatnonzero(st == ST_PUBLISHED)
        writing = np.flatnonzero(st == ST_WRITING)
        used: list[tuple[int, int]] = []
        keys: dict[bytes, int] = {}
        value_bytes = 0
        for e in published.tolist() + writing.tolist():
            w = e * ENTRY_WORDS
            start, nb, size = self._tq[w + E_START], self._tq[w + E_NBLOCKS], self._tq[w + E_SIZE]
            if nb != self._blocks_needed(e) or start + nb > self.n_blocks:
                problems.append(f"entry {e}: blocks {start}+{nb} do not fit a {size}-byte value in the pool")
                continue
            used.append((start, nb))
            if self._tq[w + E_STATE] & 0xFF != ST_PUBLISHED:
                continue
            value_bytes += size
            kb = self._key_of(e)
            if not kb or _key_hash(kb) != self._tq[w + E_HASH]:
                problems.append(f"entry {e}: stored key hash does not match its key {kb!r}")
                continue
            if kb in keys:
                problems.append(f"key {kb!r} is published twice (entries {keys[kb]} and {e})")
            keys[kb] = e
            if _checksum(self._tq[w + E_HASH], size, self._data(e)) != self._tq[w + E_CHECK] & _LOW32:
                problems.append(f"entry {e} ({kb!r}): checksum mismatch (record or data damaged)")
            if self._find(kb, self._tq[w + E_HASH]) != e:
                problems.append(f"entry {e} ({kb!r}): not reachable through the key index")
        members = self._index.members()
        if len(members) != len(published):
            problems.append(f"key index holds {len(members)} entries, the table {len(published)} published ones")
        stray = [m for m in members if m >= cap or (self._tq[m * ENTRY_WORDS + E_STATE] & 0xFF) != ST_PUBLISHED]
        if stray:
            problems.append(f"key index points at {len(stray)} unpublished slots ({stray[:5]})")
        if hq[HDR_ENTRIES] != len(published):
            problems.append(f"entry counter {hq[HDR_ENTRIES]} != {len(published)} published entries")
        if hq[HDR_VALUE_BYTES] != value_bytes:
            problems.append(f"value byte counter {hq[HDR_VALUE_BYTES]} != {value_bytes}")
        top = hq[HDR_FREE_TOP]
        free_slots = set(np.flatnonzero(st == ST_FREE).tolist())
        if top > cap:
            problems.append(f"free-slot stack depth {top} exceeds the capacity {cap}")
        else:
            stack = np.frombuffer(self._free, dtype=np.int32)[:top].tolist()
            if len(set(stack)) != len(stack) or set(stack) != free_slots:
                problems.append(
                    f"free-slot stack ({len(stack)} slots) disagrees with the {len(free_slots)} free table slots"
                )
        problems.extend(self._alloc.check(used))
        return problems

    def _repair_locked(self) -> list[str]:
        """Rebuild allocator, key index, free-slot stack and counters from the entry table."""
        import numpy as np

        done: list[str] = []
        cap = self.capacity_entries
        tq = self._tq
        full = np.frombuffer(self._mv, dtype=entry_dtype(), count=cap, offset=self._table_off)
        states = (full["state"] & 0xFF).copy()
        live = np.flatnonzero(states != ST_FREE).tolist()
        keep: list[int] = []
        for e in live:
            w = e * ENTRY_WORDS
            st = states[e]
            start, nb, size = tq[w + E_START], tq[w + E_NBLOCKS], tq[w + E_SIZE]
            reason = None
            if st not in (ST_WRITING, ST_PUBLISHED):
                reason = "unknown state"
            elif (tq[w + E_CHECK] >> 32) & 0xFFFF > KEY_MAX or nb != self._blocks_needed(e) or start + nb > self.n_blocks:
                reason = "blocks out of range"
            elif st == ST_WRITING and not _pid_alive(tq[w + E_FLAGS] >> 32):
                reason = "unpublished, writer gone"
            elif st == ST_PUBLISHED:
                kb = self._key_of(e)
                if not kb or _key_hash(kb) != tq[w + E_HASH]:
                    reason = "key hash mismatch"
                elif _checksum(tq[w + E_HASH], size, self._data(e)) != tq[w + E_CHECK] & _LOW32:
                    reason = "checksum mismatch: record or data damaged"
            if reason:
                tq[w + E_STATE] = ((tq[w + E_STATE] >> 8) + 1) << 8 | ST_FREE
                done.append(f"dropped entry {e} ({reason})")
            else:
                keep.append(e)
        # overlapping extents: keep the most recently inserted entry of a clash
        keep.sort(key=lambda e: -tq[e * ENTRY_WORDS + E_ITICK])
        taken: list[tuple[int, int]] = []
        by_key: dict[bytes, int] = {}
        final: list[int] = []
        import bisect

        for e in keep:
            w = e * ENTRY_WORDS
            s, n = tq[w + E_START], tq[w + E_NBLOCKS]
            clash = False
            if n:
                i = bisect.bisect_left(taken, (s, -1))
                if i < len(taken) and taken[i][0] < s + n:
                    clash = True
                if i > 0 and taken[i - 1][0] + taken[i - 1][1] > s:
                    clash = True
            if not clash and tq[w + E_STATE] & 0xFF == ST_PUBLISHED:
                kb = self._key_of(e)
                if kb in by_key:
                    clash = True
                else:
                    by_key[kb] = e
            if clash:
                tq[w + E_STATE] = ((tq[w + E_STATE] >> 8) + 1) << 8 | ST_FREE
                done.append(f"dropped entry {e} (overlaps or duplicates a newer entry)")
                continue
            if n:
                bisect.insort(taken, (s, n))
            final.append(e)
        self._alloc.rebuild(taken)
        published = [e for e in final if tq[e * ENTRY_WORDS + E_STATE] & 0xFF == ST_PUBLISHED]
        self._index.rebuild((tq[e * ENTRY_WORDS + E_HASH], e) for e in published)
        hq = self._hq
        hwm = max(final) + 1 if final else 0
        hq[HDR_HWM] = hwm
        used_slots = set(final)
        free = [e for e in range(hwm - 1, -1, -1) if e not in used_slots]
        for i, e in enumerate(free):
            self._free[i] = e
        hq[HDR_FREE_TOP] = len(free)
        hq[HDR_ENTRIES] = len(published)
        hq[HDR_VALUE_BYTES] = sum(tq[e * ENTRY_WORDS + E_SIZE] for e in published)
        hq[HDR_REPAIRS] += 1
        done.append(
            f"rebuilt allocator ({len(taken)} used extents), key index ({len(published)} keys), "
            f"free-slot stack ({len(free)}) and counters from the entry table"
        )
        return done

    def _recover_locked(self, reason: str) -> None:
        log.warning("pool %s: %s; rebuilding derived state from the entry table", self.name, reason)
        notes = self._repair_locked()
        self._last_recovery = [reason, *notes]

    # ------------------------------------------------------------------ persist / restore
    def persist(self, path: str | os.PathLike[str]) -> int:
        """Stream a snapshot to `path` (temp file + rename); returns the bytes written.

        Taken under the shared lock: a consistent image, readers go on, writers wait until the
        data has streamed out (about the time to write the used bytes to disk).
        """
        from infercache.kv import snapshot as snap

        target = Path(path).expanduser()
        if target.is_dir():
            raise BadInputError(f"{target} is a directory; give a file name")
        if not target.parent.is_dir():
            raise BadInputError(f"directory {target.parent} does not exist")
        written = 0
        with self._reading(), atomic_file(target, mode=0o600) as handle:
            import numpy as np

            rows = self._rows()
            slots = np.flatnonzero((rows["state"] & 0xFF) == ST_PUBLISHED)
            slots = slots[np.argsort(rows["itick"][slots], kind="stable")].tolist()
            hq = self._hq
            tq, td = self._tq, self._td
            hits, misses, bytes_out = self._read_counters()
            header = snap.SnapshotHeader(
                block_size=self.block_size, n_blocks=self.n_blocks, policy_id=hq[HDR_POLICY],
                tier_id=hq[HDR_TIER], n_entries=len(slots),
                data_bytes=sum(tq[e * ENTRY_WORDS + E_SIZE] for e in slots),
                keys_bytes=sum((tq[e * ENTRY_WORDS + E_CHECK] >> 32) & 0xFFFF for e in slots), hits=hits,
                misses=misses, evictions=hq[HDR_EVICTIONS], bytes_in=hq[HDR_BYTES_IN],
                bytes_out=bytes_out, puts=hq[HDR_PUTS], clock=hq[HDR_CLOCK],
                created=self._hd[HDR_CREATED], name=self.name,
            )  # fmt: skip
            written += snap.write_preamble(handle, header)
            crc = 0
            for e in slots:
                w = e * ENTRY_WORDS
                raw = snap.Record(
                    key=self._key_of(e), size=tq[w + E_SIZE], created=td[w + E_CREATED], atime=td[w + E_ATIME],
                    expiry=td[w + E_EXPIRY], count=tq[w + E_COUNT], priority=self._ts[w + E_PRIORITY],
                    pins=tq[w + E_PINS], flags=tq[w + E_FLAGS] & _LOW32, prefix=tq[w + E_PREFIX],
                    itick=tq[w + E_ITICK], atick=tq[w + E_ATICK],
                ).pack()  # fmt: skip
                crc = zlib.crc32(raw, crc)
                handle.write(raw)
                written += len(raw)
            handle.write(snap.CRC.pack(crc))
            written += snap.CRC.size
            crc = 0
            for e in slots:
                data = self._data(e)
                crc = zlib.crc32(data, crc)
                handle.write(data)
                written += len(data)
                data.release()
            handle.write(snap.CRC.pack(crc))
            written += snap.CRC.size
            handle.write(snap.TRAILER.pack(snap.END_MAGIC, written))
            written += snap.TRAILER.size
        log.info("persisted pool %s: %d entries, %d bytes to %s", self.name, len(slots), written, target)
        return written

    @classmethod
    def restore(
        cls,
        path: str | os.PathLike[str],
        name: str | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        tier: str = "cpu",
        pool_path: str | os.PathLike[str] | None = None,
    ) -> "Pool":
        """Create and register a pool from a snapshot; nothing is created unless all of it verifies."""
        from infercache.kv import snapshot as snap

        source = Path(path).expanduser()
        if not source.is_file():
            raise BadInputError(f"snapshot {source} does not exist or is not a file")
        with open(source, "rb") as handle:
            header = snap.read_header(handle, os.fstat(handle.fileno()).st_size)
            records = snap.read_records(handle, header)
            name = name or header.name
            registry.validate_name(name)
            if header.policy_id not in POLICY_NAMES:
                raise BadInputError(f"snapshot names unknown policy id {header.policy_id} (corrupt file)")
            policy = POLICY_NAMES[header.policy_id]
            if tier == "disk":
                if pool_path is None:
                    raise BadInputError("restoring to tier disk needs pool_path")
                target = Path(pool_path).expanduser().absolute()
            elif tier == "cpu":
                target = registry.shm_path(name, data_dir)
            else:
                raise BadInputError(f"cannot restore to tier {tier!r} (cpu or disk)")
            geometry = compute_geometry(header.n_blocks * header.block_size, header.block_size)
            if len(records) > geometry.table_cap:
                raise BadInputError("snapshot holds more entries than its pool geometry allows (corrupt file)")

            def populate(pool: "Pool") -> None:
                pool._load_snapshot(handle, header, records)

            with registry.locked(data_dir) as reg_file:
                pools = registry.load(data_dir)
                _check_room(name, target, geometry, pools, "restoring")
                pool = cls._build(name, target, geometry, policy, tier, data_dir, populate)
                pools[name] = {"path": str(target), "tier": tier, "created": time.time(), "restored_from": str(source)}
                registry.save(reg_file, pools)
        log.info("restored pool %s from %s: %d entries", name, source, len(records))
        return pool

    def _load_snapshot(self, handle: Any, header: Any, records: list[Any]) -> None:
        """Fill a fresh, unregistered pool from an open snapshot positioned at its data section."""
        from infercache.kv import snapshot as snap

        crc = 0
        tq, td = self._tq, self._td
        hq = self._hq
        max_tick = header.clock
        offset = handle.tell()
        with self._mutating():
            for rec in records:
                klen = len(rec.key)
                flags = rec.flags & _LOW32 & ~F_KEY_IN_DATA
                extra = klen if klen > KEY_INLINE else 0
                if extra:
                    flags |= F_KEY_IN_DATA
                nblocks = -(-(rec.size + extra) // self.block_size)
                e, start = self._pop_slot_locked(), (self._alloc.alloc(nblocks) if nblocks else 0)
                if e < 0 or start < 0:
                    raise BadInputError("snapshot entries do not fit its own pool geometry (corrupt file)")
                w = e * ENTRY_WORDS
                tq[w + E_START] = start
                tq[w + E_NBLOCKS] = nblocks
                tq[w + E_SIZE] = rec.size
                tq[w + E_FLAGS] = flags
                tq[w + E_CHECK] = klen << 32
                if extra:
                    base = self._data_off + start * self.block_size
                else:
                    base = self._table_off + e * ENTRY_BYTES + KEY_OFFSET
                self._mv[base : base + klen] = rec.key
                data = self._data(e)
                got = handle.readinto(data) if rec.size else 0
                if got != rec.size:
                    data.release()
                    raise BadInputError("snapshot truncated in the data section")
                crc = zlib.crc32(data, crc)
                h = _key_hash(rec.key)
                check = _checksum(h, rec.size, data)
                data.release()
                offset += rec.size
                if self._find(rec.key, h) >= 0:
                    raise BadInputError(f"snapshot holds key {rec.key!r} twice (corrupt file)")
                tq[w + E_HASH] = h
                tq[w + E_CHECK] = klen << 32 | check
                td[w + E_CREATED] = rec.created
                td[w + E_ATIME] = rec.atime
                td[w + E_EXPIRY] = rec.expiry
                tq[w + E_COUNT] = rec.count
                self._ts[w + E_PRIORITY] = rec.priority
                tq[w + E_PINS] = rec.pins
                tq[w + E_PREFIX] = rec.prefix
                tq[w + E_ITICK] = rec.itick
                tq[w + E_ATICK] = rec.atick
                max_tick = max(max_tick, rec.itick, rec.atick)
                self._index.insert(h, e)
                tq[w + E_STATE] = ST_PUBLISHED
                hq[HDR_ENTRIES] += 1
                hq[HDR_VALUE_BYTES] += rec.size
            snap.check_data_trailer(handle, crc, offset)
            for word, value in ((HDR_HITS, header.hits), (HDR_MISSES, header.misses),
                                (HDR_EVICTIONS, header.evictions), (HDR_BYTES_IN, header.bytes_in),
                                (HDR_BYTES_OUT, header.bytes_out), (HDR_PUTS, header.puts)):  # fmt: skip
                hq[word] = value
            hq[HDR_CLOCK] = max_tick + 1
            self._hd[HDR_CREATED] = header.created


_TMP_PREFIX = ".infercache-tmp-"
_LOCK_EX, _LOCK_SH = fcntl.LOCK_EX, fcntl.LOCK_SH


def _noop() -> None:
    return None


def _view_bytes(view: memoryview) -> bytes:
    return view.tobytes()


def _sweep_stale_temps(directory: Path) -> None:
    """Remove half-built pool files (ours, named .infercache-tmp-<pid>-<hex>) whose builder died.

    A create or restore killed before its final link leaves such a file; nothing else refers
    to it, and only files of this exact pattern, owned by us, with a dead pid, are touched.
    """
    try:
        candidates = [p for p in directory.iterdir() if p.name.startswith(_TMP_PREFIX)]
    except OSError:
        return
    for path in candidates:
        pid_text = path.name[len(_TMP_PREFIX) :].split("-", 1)[0]
        try:
            if not pid_text.isdigit() or path.stat().st_uid != os.getuid() or _pid_alive(int(pid_text)):
                continue
            path.unlink()
            log.info("removed %s left by a pool build that did not finish", path)
        except OSError:
            continue


def _header_problem(hq: memoryview, file_size: int) -> str | None:
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
    if hq[HDR_POLICY] not in POLICY_NAMES or hq[HDR_TIER] >= len(TIERS):
        return "unknown policy or tier"
    return None


def _format(fd: int, g: Geometry, policy: str, tier: str, name: str) -> None:
    """Write the header and an empty allocator into a freshly truncated (all-zero) file."""
    mm = mmap.mmap(fd, g.file_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    mv = memoryview(mm)
    try:
        hq = mv[:HEADER_BYTES].cast("Q")
        hd = mv[:HEADER_BYTES].cast("d")
        values = {
            HDR_VERSION: LAYOUT_VERSION, HDR_BLOCK_SIZE: g.block_size, HDR_N_BLOCKS: g.n_blocks,
            HDR_TABLE_CAP: g.table_cap, HDR_INDEX_CAP: g.index_cap, HDR_GHOST_CAP: g.ghost_cap,
            HDR_ALLOC_OFF: g.alloc_off, HDR_TABLE_OFF: g.table_off, HDR_INDEX_OFF: g.index_off,
            HDR_FREE_OFF: g.free_off, HDR_GHOST_OFF: g.ghost_off, HDR_DATA_OFF: g.data_off,
            HDR_FILE_SIZE: g.file_size, HDR_POLICY: POLICY_IDS[policy], HDR_TIER: TIERS.index(tier),
        }  # fmt: skip
        for word, value in values.items():
            hq[word] = value
        hd[HDR_CREATED] = time.time()
        raw = name.encode()[:NAME_MAX]
        mv[NAME_OFFSET : NAME_OFFSET + 2] = len(raw).to_bytes(2, "little")
        mv[NAME_OFFSET + 2 : NAME_OFFSET + 2 + len(raw)] = raw
        alloc = Allocator(mv[g.alloc_off : g.table_off], g.n_blocks, init=True)
        alloc.release()
        hq[HDR_MAGIC] = MAGIC  # last: a half-formatted file is never taken for a pool
        hq.release()
        hd.release()
    finally:
        mv.release()
        mm.close()

