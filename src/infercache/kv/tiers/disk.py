"""Disk tier: one file per chunk in a directory with a size cap; async bounded writes; checked reads.

- A write copies the chunk into one of `queue` reusable buffers (store blocks only when all
  are in flight: bounded memory), then a writer thread computes the crc32, writes a temp file
  and renames it into place: a file under its final name is always complete.
- The index (keys, sizes, expiry) is rebuilt at start from the files' headers, so a new
  engine on the same directory finds every chunk that was fully written; temp files left by a
  dead writer and short or foreign-looking chunk files are removed. (LMCache forgets its disk.)
  A chunk file another engine wrote later is found by its name (derived from the key) on a
  miss; the size cap is accounted per engine.
- Reads check the header, the key and the payload's crc32; a bad file is a miss, removed and
  counted. Disk full during a write: that chunk is not stored, its temp file is removed.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import threading
import uuid
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from infercache.kv.procs import pid_alive
from infercache.kv.tiers.base import HEADER_BYTES, ChunkHeader, Sink, Tier, Tracker

log = logging.getLogger(__name__)
SUFFIX = ".kvc"
_PIECE = 1 << 20  # write and checksum unit
TMP_PREFIX = ".tmp-"
# temp files this process is writing now (any DiskTier): a second tier on the same directory
# in this process must not take them for a dead writer's leftovers
_WRITING: set[str] = set()
_WRITING_LOCK = threading.Lock()


class _Pending:
    """A chunk queued for writing: its bytes stay readable until the file is in place."""

    __slots__ = ("buf", "head", "cancelled")

    def __init__(self, buf: Any, head: ChunkHeader) -> None:
        self.buf = buf
        self.head = head
        self.cancelled = False


class DiskTier(Tier):
    name = "disk"

    def __init__(self, directory: str | os.PathLike[str], size: int, policy: str, writers: int = 4, queue: int = 8) -> None:
        super().__init__()
        self.dir = Path(directory).expanduser()
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.capacity = size
        self.book = Tracker(policy)
        self._lock = threading.RLock()
        self._slots = threading.BoundedSemaphore(queue)
        self._free: list[Any] = []
        self._pending: dict[str, _Pending] = {}
        self._futures: set[Future[None]] = set()
        self._pool = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="kv-disk")
        self._read_buf: Any = None
        self._logged: set[str] = set()
        self._load_index()

    # --------------------------------------------------------------- index
    def path_of(self, key: str) -> Path:
        return self.dir / (hashlib.sha256(key.encode()).hexdigest()[:40] + SUFFIX)

    def _load_index(self) -> None:
        found = removed = 0
        for entry in os.scandir(self.dir):
            name = entry.name
            if name.startswith(TMP_PREFIX) and name.endswith(".part"):
                pid = name[len(TMP_PREFIX) :].split("-", 1)[0]
                with _WRITING_LOCK:
                    ours = name in _WRITING
                if not ours and (not pid.isdigit() or not pid_alive(int(pid)) or int(pid) == os.getpid()):
                    _unlink(entry.path)
                    removed += 1
                continue
            if not name.endswith(SUFFIX) or not entry.is_file(follow_symlinks=False):
                continue
            parsed = self._read_head(entry.path, entry.stat().st_size)
            if parsed is None:
                _unlink(entry.path)
                removed += 1
                continue
            key, head = parsed
            if self.path_of(key).name != name:
                _unlink(entry.path)
                removed += 1
                continue
            self.book.add(key, head.nbytes + HEADER_BYTES + len(key.encode()), head.expires, head)
            found += 1
        if found or removed:
            log.info("disk tier %s: %d chunks indexed, %d partial/foreign files removed", self.dir, found, removed)

    @staticmethod
    def _read_head(path: str, size: int) -> tuple[str, ChunkHeader] | None:
        try:
            with open(path, "rb", buffering=0) as handle:
                raw = handle.read(HEADER_BYTES + 1024)
                head, key_len = ChunkHeader.unpack(raw)
                if size != HEADER_BYTES + key_len + head.nbytes:
                    return None
                if len(raw) < HEADER_BYTES + key_len:  # a key over 1 KiB: read the rest of it
                    raw += handle.read(HEADER_BYTES + key_len - len(raw))
            if len(raw) < HEADER_BYTES + key_len:
                return None
            return raw[HEADER_BYTES : HEADER_BYTES + key_len].decode(), head
        except (OSError, ValueError, UnicodeDecodeError, Exception):  # noqa: BLE001 - any bad file is skipped
            return None

    # --------------------------------------------------------------- interface
    def contains(self, key: str) -> bool:
        entry = self.book.entries.get(key)
        if entry is None:
            entry = self._adopt(key)
        return entry is not None and not entry.extra.expired()

    def _adopt(self, key: str) -> Any:
        """A chunk another engine wrote into this directory since we indexed it: index it now."""
        path = self.path_of(key)
        try:
            size = path.stat().st_size
        except OSError:
            return None
        parsed = self._read_head(str(path), size)
        if parsed is None or parsed[0] != key:
            return None
        with self._lock:
            if key not in self.book.entries:
                self.book.add(key, size, parsed[1].expires, parsed[1])
            return self.book.entries.get(key)

    def put(self, key: str, head: ChunkHeader, payload: Any, ttl: float | None = None) -> bool:
        import time

        import numpy as np

        kb = key.encode()
        size = HEADER_BYTES + len(kb) + head.nbytes
        if size > self.capacity:
            return False
        head = replace(head, expires=time.time() + ttl if ttl else 0.0)
        self._slots.acquire()  # bounded: at most `queue` chunks in flight
        try:
            with self._lock:
                buf = self._take_buffer(head.nbytes)
            body = buf[: head.nbytes]
            if isinstance(payload, np.ndarray):
                body.view(payload.dtype).reshape(payload.shape)[...] = payload
            else:
                body[:] = np.frombuffer(payload, dtype=np.uint8)
            self._make_room(size, key)  # after the copy: demotion may reuse read buffers
            pending = _Pending(buf, head)
            with self._lock:
                old = self._pending.get(key)
                if old is not None:
                    old.cancelled = True
                self._pending[key] = pending
                self.book.add(key, size, head.expires, head)
                future = self._pool.submit(self._write, key, kb, pending)
                self._futures.add(future)
                future.add_done_callback(self._futures.discard)
        except BaseException:
            self._slots.release()
            raise
        self.counters.stores += 1
        return True

    def read(self, key: str, sink: Sink, expired_ok: bool = False) -> tuple[bool, Any]:
        with self._lock:
            entry = self.book.entries.get(key) or self._adopt(key)
            if entry is None or (entry.extra.expired() and not expired_ok):
                return False, None
            pending = self._pending.get(key)
            if pending is not None:
                self.book.touch(key)
                return self._deliver(key, sink, pending.head, memoryview(pending.buf)[: pending.head.nbytes])
            path = self.path_of(key)
            try:
                with open(path, "rb", buffering=0) as handle:
                    size = os.fstat(handle.fileno()).st_size
                    if self._read_buf is None or len(self._read_buf) < size:
                        self._read_buf = bytearray(size)
                    view = memoryview(self._read_buf)[:size]
                    got = handle.readinto(view)
                head, key_len = ChunkHeader.unpack(view)
                start = HEADER_BYTES + key_len
                body = view[start : start + head.nbytes]
                if got != size or size != start + head.nbytes or bytes(view[HEADER_BYTES:start]) != key.encode():
                    raise ValueError("short or foreign chunk file")
                if head.crc is not None and zlib.crc32(body) != head.crc:
                    raise ValueError("checksum mismatch")
            except FileNotFoundError:
                self.book.remove(key)
                return False, None
            except (OSError, ValueError) as exc:
                self._error("read", exc, f"{path.name}: ")
                self.delete(key)
                return False, None
            self.book.touch(key)
            return self._deliver(key, sink, head, body)

    def _deliver(self, key: str, sink: Sink, head: ChunkHeader, body: Any) -> tuple[bool, Any]:
        try:
            return True, sink(head, body)
        except ValueError as exc:  # the record does not fit the request (another geometry)
            self._error("read", exc, f"{key}: ")
            return False, None

    def delete(self, key: str) -> bool:
        with self._lock:
            entry = self.book.remove(key)
            pending = self._pending.pop(key, None)
            if pending is not None:
                pending.cancelled = True
        existed = _unlink(self.path_of(key))
        return entry is not None or existed

    def keys(self) -> list[str]:
        """Every chunk in the directory: the index, plus files other engines wrote since (read from
        their headers; for `clear`, which must not leave another engine's chunks of the model behind)."""
        with self._lock:
            found = list(self.book.entries)
            indexed = {self.path_of(k).name for k in found}
        for entry in os.scandir(self.dir):
            if entry.name.endswith(SUFFIX) and entry.name not in indexed and entry.is_file(follow_symlinks=False):
                parsed = self._read_head(entry.path, entry.stat().st_size)
                if parsed is not None and self.path_of(parsed[0]).name == entry.name:
                    found.append(parsed[0])
        return found

    def pin(self, key: str, timeout: float | None = None, renew: bool = False) -> bool:
        # in-process book: the engine's own pin_timeout_s releases it, and it dies with the process
        with self._lock:
            entry = self.book.entries.get(key)
            if entry is None:
                return False
            entry.pins += 0 if renew and entry.pins else 1
            return True

    def unpin(self, key: str) -> bool:
        with self._lock:
            entry = self.book.entries.get(key)
            if entry is None:
                return False
            entry.pins = max(0, entry.pins - 1)
            return True

    def expiries(self) -> Any:
        with self._lock:
            return [(k, e.expires) for k, e in self.book.entries.items() if e.expires]

    def bytes_used(self) -> int:
        return self.book.total

    def flush(self) -> None:
        while True:
            with self._lock:
                futures = list(self._futures)
            if not futures:
                return
            for future in futures:
                future.exception()

    def close(self) -> None:
        self.flush()
        self._pool.shutdown(wait=True)

    # --------------------------------------------------------------- writes
    def _take_buffer(self, nbytes: int) -> Any:
        import numpy as np

        for i, buf in enumerate(self._free):
            if buf.nbytes >= nbytes:
                return self._free.pop(i)
        if self._free:
            self._free.pop(0)
        return np.empty(nbytes, dtype=np.uint8)

    def _write(self, key: str, kb: bytes, pending: _Pending) -> None:
        head = pending.head
        body = memoryview(pending.buf)[: head.nbytes]
        tmp = self.dir / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}.part"
        final = self.path_of(key)
        with _WRITING_LOCK:
            _WRITING.add(tmp.name)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                _write_all(fd, bytes(HEADER_BYTES) + kb)  # the header goes in last, with the crc
                crc = 0
                for off in range(0, head.nbytes, _PIECE):  # crc each piece while it is still in cache
                    piece = body[off : off + _PIECE]
                    crc = zlib.crc32(piece, crc)
                    _write_all(fd, piece)
                if head.crc is not None and head.crc != crc:
                    raise ValueError("payload changed while queued")
                head = replace(head, crc=crc)
                os.pwrite(fd, head.pack(kb), 0)
            finally:
                os.close(fd)
            with self._lock:
                if pending.cancelled:
                    _unlink(tmp)
                else:
                    os.replace(tmp, final)
                    entry = self.book.entries.get(key)
                    if entry is not None:
                        entry.extra = head
        except (OSError, ValueError) as exc:
            _unlink(tmp)
            with self._lock:
                if self._pending.get(key) is pending:
                    self.book.remove(key)
            full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
            what = "write (disk full: chunk not stored)" if full else "write"
            self._error(what, exc, "")
        finally:
            with _WRITING_LOCK:
                _WRITING.discard(tmp.name)
            with self._lock:
                if self._pending.get(key) is pending:
                    del self._pending[key]
                self._free.append(pending.buf)
            self._slots.release()

    def _make_room(self, size: int, incoming: str) -> None:
        """Evict by policy (write_back: demote through evict_hook) until `size` more bytes fit."""
        with self._lock:
            victims = self.book.pick(self.book.total + size - self.capacity, (incoming,))
        for victim in victims:
            if self.evict_hook is not None:
                self.read(victim, lambda head, payload, v=victim: self.evict_hook(v, head, payload))  # type: ignore[misc]
            self.delete(victim)
            self.counters.evictions += 1

    def _error(self, what: str, exc: BaseException, where: str) -> None:
        self.counters.errors += 1
        level = logging.WARNING if what not in self._logged else logging.DEBUG
        self._logged.add(what)
        log.log(level, "disk tier %s: %s failed: %s%s", self.dir, what, where, exc)


def _write_all(fd: int, data: Any) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _unlink(path: str | os.PathLike[str]) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
