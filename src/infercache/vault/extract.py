"""Safe extraction of an untrusted image layer into a private staging directory.

A layer is hostile until proven otherwise (MCV extracted without any checks).
Python's `tarfile` filters (3.12's `data_filter`) are not available on every
supported Python and do not know our layout rules, so the checks are ours:

* names: no absolute paths, no `..`, no NUL, only the expected top-level dirs;
* types: regular files and directories; symlinks and hard links only when they
  stay inside their top-level dir (hard links only to files already extracted);
  device nodes, FIFOs, sparse and unknown types are refused;
* nothing is ever written through a symlink (parents are checked with lstat and
  files are created with O_EXCL | O_NOFOLLOW);
* size: a total, a per-member cap and a decompression-ratio cap (bombs), counted
  on the decompressed stream itself so tar padding and headers count too.

Modes from the archive are ignored (files 0644, dirs 0755): no setuid, no surprises.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import posixpath
import stat
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from infercache.errors import InfercacheError
from infercache.vault.image import open_decompressed

logger = logging.getLogger(__name__)
_CHUNK = 1 << 20


class UnsafeImageError(InfercacheError):
    """The image's content is malicious or corrupt; nothing of it was installed."""


@dataclass(frozen=True)
class ExtractLimits:
    """Bounds on what one image may expand to (defaults sized for real kernel caches)."""

    max_total_bytes: int = 64 << 30
    max_member_bytes: int = 8 << 30
    max_members: int = 2_000_000
    #: decompressed / compressed; kernel caches compress 2-10x, zstd on repeated data ~50x.
    max_ratio: float = 250.0
    #: the ratio is only enforced past this many decompressed bytes (tiny layers are mostly tar padding).
    ratio_floor_bytes: int = 256 << 20


class _CountingReader:
    """Counts decompressed bytes and stops a decompression bomb as soon as it crosses a limit.

    It is also the file tarfile reads (mode "r:", not the stream mode "r|"): it pulls 1 MiB
    at a time from the decompressor, answers reads with one slice (or one join across
    chunks) and seeks forward by skipping. tarfile's stream wrapper would re-buffer
    through a 64 KiB window instead: three copies of every byte plus a buffer copy per header.
    """

    def __init__(self, stream: BinaryIO, compressed_size: int, limits: ExtractLimits) -> None:
        self._stream = stream
        self._limit_ratio = max(limits.ratio_floor_bytes, int(limits.max_ratio * max(compressed_size, 1)))
        #: the most decompressed bytes this layer may produce
        self.limit = min(self._limit_ratio, limits.max_total_bytes)
        self._limits = limits
        self._compressed = compressed_size
        self._buf = b""
        self._pos = 0
        self._offset = 0  # bytes handed out (or skipped) so far
        self.count = 0

    def _fill(self) -> bytes:
        try:
            data = self._stream.read(_CHUNK)
        except InfercacheError:
            raise  # digest / size errors from the verifying reader underneath
        except EOFError:
            raise UnsafeImageError("layer is truncated (compressed stream ends early)") from None
        except Exception as exc:  # noqa: BLE001 - gzip/zlib/isal/zstd each raise their own error types
            raise UnsafeImageError(f"layer data is corrupt: {type(exc).__name__}: {exc}") from None
        self.count += len(data)
        if self.count > self._limits.max_total_bytes:
            raise UnsafeImageError(
                f"layer expands beyond {self._limits.max_total_bytes} bytes: refused as a decompression bomb"
            )
        if self.count > self._limit_ratio:
            raise UnsafeImageError(
                f"layer expands more than {self._limits.max_ratio:g}x its compressed size "
                f"({self._compressed} bytes): refused as a decompression bomb"
            )
        return data

    def read(self, size: int | None = -1) -> bytes:
        """Exactly `size` bytes, fewer only at the end of the data."""
        if size is None or size < 0:
            size = _CHUNK
        pos = self._pos
        end = pos + size
        if end <= len(self._buf):
            self._pos = end
            self._offset += size
            return self._buf[pos:end]
        parts = [memoryview(self._buf)[pos:]]
        got = len(self._buf) - pos
        self._buf, self._pos = b"", 0
        while got < size:
            chunk = self._fill()
            if not chunk:
                break
            need = size - got
            if len(chunk) > need:
                parts.append(memoryview(chunk)[:need])
                self._buf, self._pos = chunk, need
                got = size
                break
            parts.append(memoryview(chunk))
            got += len(chunk)
        self._offset += got
        return b"".join(parts)

    def tell(self) -> int:
        return self._offset

    def seek(self, offset: int, whence: int = 0) -> int:
        """Forward only (a stream): skips the bytes in between."""
        if whence != 0 or offset < self._offset:
            raise tarfile.ReadError("layer stream cannot seek backwards")
        while offset > self._offset:
            step = offset - self._offset
            left = len(self._buf) - self._pos
            if left == 0:
                self._buf, self._pos = self._fill(), 0
                if not self._buf:
                    break  # the next read reports the end of data
                continue
            step = min(step, left)
            self._pos += step
            self._offset += step
        return self._offset


def safe_member_path(name: str, allowed_top: Iterable[str]) -> tuple[str, ...] | None:
    """Path components of an archive member name, or UnsafeImageError; None for the archive root."""
    if "\x00" in name:
        raise UnsafeImageError(f"entry {name!r} has a NUL byte in its name")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":" and name[0].isalpha()):
        raise UnsafeImageError(f"entry {name!r} has an absolute path")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if not parts:
        return None
    if ".." in parts:
        raise UnsafeImageError(f"entry {name!r} climbs out with '..'")
    if parts[0] not in allowed_top:
        raise UnsafeImageError(
            f"entry {name!r} is outside the expected top-level dirs ({', '.join(sorted(allowed_top))})"
        )
    if any(p.startswith(".wh.") for p in parts):
        raise UnsafeImageError(f"entry {name!r} is a whiteout; cache images are single-layer content only")
    return parts


@dataclass(frozen=True)
class ExtractedFile:
    """A regular file written to staging: its size and sha256 (hashed while writing, never re-read)."""

    size: int
    sha256: str


class StagingState:
    """Creates paths under the staging root, never through anything but real directories.

    The staging dir starts empty (a fresh mkdtemp), so everything in it was made here:
    directories created are remembered (a directory can never be turned into a link later,
    replacing one is refused), and only paths made earlier need a check before reuse.
    Pass the same state to every layer of one image.
    """

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self._dirs: set[str] = set()  # directories known to be real (made or checked here)
        self._created: set[str] = {""}  # directories made here ("" = the fresh staging root)
        self._made: set[str] = set()  # files and links made here
        self.writer: _FileWriter | None = None

    def ensure_dirs(self, parts: tuple[str, ...]) -> str:
        current = self.root
        rel = ""
        for depth, part in enumerate(parts):
            parent = rel
            current = current + "/" + part
            rel = rel + "/" + part if rel else part
            if rel in self._dirs:
                continue
            if parent in self._created and rel not in self._made:
                # Nothing can be there: its parent is ours and fresh. Below the top level it is
                # made by the writer thread that owns its subtree (files in it are queued after it).
                if depth and self.writer is not None and self.writer.parallel:
                    self.writer.mkdir(rel, current)
                else:
                    os.mkdir(current, 0o755)
                self._dirs.add(rel)
                self._created.add(rel)
                continue
            if self.writer is not None:
                self.writer.flush()  # what is at this path may still be queued: look once it landed
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                os.mkdir(current, 0o755)
                self._dirs.add(rel)
                self._created.add(rel)
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise UnsafeImageError(f"entry path {'/'.join(parts)} goes through a non-directory (link or file)")
            self._dirs.add(rel)
        return current

    def remove_existing(self, rel: str, path: str) -> None:
        """A later duplicate member replaces an earlier file or link, never a directory."""
        if rel in self._dirs:
            raise UnsafeImageError(f"entry {rel} would replace a directory")
        if rel not in self._made:
            self._made.add(rel)
            return
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            raise UnsafeImageError(f"entry {rel} would replace a directory")
        os.unlink(path)


Rewrite = Callable[[bytes], bytes]


_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _create_file(target: str, data: bytes, rel: str, rewrite: Rewrite | None = None) -> ExtractedFile:
    """Create a new file (never through a link) holding `data`; returns the size and sha256 of `data`.

    `rewrite`: what to write instead (e.g. a group file pointed at its final place); the
    returned size and hash stay those of the layer's bytes, which the manifest describes.
    Bare os.open/os.write: a buffered file object adds fstat/ioctl/lseek calls per file.
    """
    result = ExtractedFile(len(data), hashlib.sha256(data).hexdigest())
    if rewrite is not None:
        data = rewrite(data)
    try:
        fd = os.open(target, _CREATE_FLAGS, 0o644)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ELOOP):
            raise UnsafeImageError(f"entry {rel} collides with a link") from None
        raise
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    return result


class _Worker:
    """One writer thread and its queue of job batches (None = stop)."""

    def __init__(self, owner: _FileWriter, index: int) -> None:
        import queue
        import threading

        self.queue: queue.SimpleQueue[tuple[list[tuple[Any, ...]], int] | None] = queue.SimpleQueue()
        self.results: dict[str, ExtractedFile] = {}
        self.batch: list[tuple[Any, ...]] = []
        self.batch_bytes = 0
        self._owner = owner
        self.thread = threading.Thread(target=self._run, name=f"infercache-unpack-{index}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        owner = self._owner
        results = self.results
        while True:
            item = self.queue.get()
            if item is None:
                return
            batch, nbytes = item
            for job in batch:
                if owner.stopped:  # after a failure the rest is dropped, not written
                    break
                try:
                    if job[0] is None:
                        os.mkdir(job[1], 0o755)
                    else:
                        results[job[0]] = _create_file(job[1], job[2], job[0], job[3])
                except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                    owner.fail(exc)
            owner.retire(nbytes, len(batch))


class _FileWriter:
    """Creates small files on a few threads while the tar stream is read on the caller's thread.

    Unpacking a cache is thousands of small files: the time goes to file creation (kernel
    time, GIL released) and hashing (GIL released), not to Python; `tar -x` does them one
    by one. Each entry directory's subtree belongs to one thread (its mkdir, then its files,
    in order), so threads never contend for one directory's lock and no job waits on
    another thread's. Jobs go in batches (one queue hand-off and one lock per ~1 MiB, not
    per file); in-flight bytes are bounded; the caller flushes before anything that depends
    on earlier files (links, duplicate paths, lstat checks).
    """

    _BATCH_BYTES = 1 << 20
    _BATCH_JOBS = 64

    def __init__(self, threads: int, max_bytes: int = 64 << 20) -> None:
        import threading

        self.error: BaseException | None = None
        #: set on a failure (here or on the caller's side): queued jobs are dropped
        self.stopped = False
        self._cond = threading.Condition(threading.Lock())
        self._inflight_bytes = 0  # sent to a thread and not written yet
        self._inflight_jobs = 0
        self._max = max_bytes
        self._waiting = False
        self._queued: set[str] = set()  # files queued since the last flush
        self._workers = [_Worker(self, i) for i in range(threads)] if threads > 1 else []
        self.results: dict[str, ExtractedFile] = {}

    @property
    def parallel(self) -> bool:
        return bool(self._workers)

    def pending(self, rel: str) -> bool:
        return rel in self._queued

    # -- called on worker threads
    def fail(self, exc: BaseException) -> None:
        with self._cond:
            if self.error is None:
                self.error = exc
            self.stopped = True

    def retire(self, nbytes: int, njobs: int) -> None:
        with self._cond:
            self._inflight_bytes -= nbytes
            self._inflight_jobs -= njobs
            if self._waiting:
                self._cond.notify()

    # -- called on the caller's thread
    def _worker_for(self, rel: str) -> _Worker:
        parts = rel.split("/", 2)
        owner = parts[0] + "/" + parts[1] if len(parts) > 1 else rel
        return self._workers[hash(owner) % len(self._workers)]

    def _add(self, worker: _Worker, job: tuple[Any, ...], size: int) -> None:
        if self.error is not None:
            self.flush()  # raises it
        worker.batch.append(job)
        worker.batch_bytes += size
        if worker.batch_bytes >= self._BATCH_BYTES or len(worker.batch) >= self._BATCH_JOBS:
            self._send(worker)
            if self._inflight_bytes > self._max:
                for w in self._workers:
                    self._send(w)
                with self._cond:
                    self._waiting = True
                    while self._inflight_bytes > self._max // 2 and self.error is None:
                        self._cond.wait()
                    self._waiting = False

    def _send(self, worker: _Worker) -> None:
        if worker.batch:
            with self._cond:
                self._inflight_bytes += worker.batch_bytes
                self._inflight_jobs += len(worker.batch)
            worker.queue.put((worker.batch, worker.batch_bytes))
            worker.batch = []
            worker.batch_bytes = 0

    def mkdir(self, rel: str, path: str) -> None:
        """Make a directory below the top level, on the thread that owns its subtree."""
        self._add(self._worker_for(rel), (None, path), 0)

    def submit(self, rel: str, target: str, data: bytes, rewrite: Rewrite | None = None) -> None:
        self._queued.add(rel)
        self._add(self._worker_for(rel), (rel, target, data, rewrite), len(data))

    def flush(self) -> None:
        """Wait until every queued job has run; raise the first failure."""
        if self._workers:
            for w in self._workers:
                self._send(w)
            with self._cond:
                self._waiting = True
                while self._inflight_jobs:
                    self._cond.wait()
                self._waiting = False
            for w in self._workers:
                self.results.update(w.results)
                w.results.clear()
        self._queued.clear()
        if self.error is not None:
            raise self.error

    def close(self, abandon: bool = False) -> None:
        """Wait for the threads and stop them; `abandon`: the layer failed, queued jobs are dropped."""
        if abandon:
            self.stopped = True
            for w in self._workers:
                w.batch, w.batch_bytes = [], 0
        try:
            self.flush()
        finally:
            for w in self._workers:
                w.queue.put(None)
            for w in self._workers:
                w.thread.join()


#: Files up to this size are read whole and written by the thread pool; bigger ones stream.
_PARALLEL_MAX_FILE = 4 << 20
#: A file that is rewritten on the way (group files) is read whole: it may not be bigger.
MAX_REWRITTEN_FILE = 16 << 20


def default_threads() -> int:
    """Writer threads: one per core, 2 to 4 (on top of the reading thread). More threads than
    cores only add GIL hand-offs (measured on 2 cores: 2 beat 4 on tmpfs, tie on ext4)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return min(4, max(2, cores))


def extract_layer(
    stream: BinaryIO,
    compressed_size: int,
    staging: Path,
    allowed_top: Iterable[str],
    limits: ExtractLimits | None = None,
    progress: Callable[[int], None] | None = None,
    threads: int | None = None,
    state: StagingState | None = None,
    rewrite: Callable[[str], Rewrite | None] | None = None,
) -> dict[str, ExtractedFile]:
    """Extract one (possibly compressed) tar layer into `staging`; returns {regular file: size and sha256}.

    `stream` should be a digest-verifying reader: the caller must drain and verify it
    after this returns and treat staging as untrusted until then. Paths replaced by a
    link later in the layer are dropped from the result. `rewrite(path)` may return a
    function that turns a file's bytes into what is written instead.
    """
    limits = limits or ExtractLimits()
    allowed = frozenset(allowed_top)
    place = state or StagingState(Path(staging))
    counting = _CountingReader(open_decompressed(stream), compressed_size, limits)
    writer = _FileWriter(default_threads() if threads is None else threads)
    place.writer = writer
    written = writer.results
    members = 0
    try:
        # Mode "r:" on our forward-only reader, not stream mode "r|": see _CountingReader.
        tar = tarfile.open(fileobj=counting, mode="r:")  # type: ignore[call-overload]  # noqa: SIM115 - closed below
    except tarfile.TarError as exc:
        writer.close()
        raise UnsafeImageError(f"layer is not a valid tar archive: {exc}") from None
    try:
        try:
            for member in _members(tar):
                members += 1
                if members > limits.max_members:
                    raise UnsafeImageError(f"layer holds more than {limits.max_members} entries")
                parts = safe_member_path(member.name, allowed)
                if parts is None:
                    continue
                rel = "/".join(parts)
                if member.isdir():
                    place.ensure_dirs(parts)
                    continue
                target = place.ensure_dirs(parts[:-1]) + "/" + parts[-1]
                if member.isreg() and not member.issparse():
                    if member.size > limits.max_member_bytes:
                        raise UnsafeImageError(f"entry {rel} is {member.size} bytes, over the per-file limit")
                    if counting.count + member.size > counting.limit:  # refuse before writing a byte of it
                        raise UnsafeImageError(
                            f"entry {rel} declares {member.size} bytes, more than the layer may expand to "
                            f"({counting.limit} bytes for {compressed_size} compressed): refused as a decompression bomb"
                        )
                    if writer.pending(rel):
                        writer.flush()  # a duplicate path: the earlier write must land before it is replaced
                    place.remove_existing(rel, target)
                    change = rewrite(rel) if rewrite is not None else None
                    if change is not None and member.size > MAX_REWRITTEN_FILE:
                        raise UnsafeImageError(f"entry {rel} is {member.size} bytes: too large for a group file")
                    if writer.parallel and (member.size <= _PARALLEL_MAX_FILE or change is not None):
                        writer.submit(rel, target, _read_member(tar, member), change)
                    else:
                        writer.flush()  # its directory may still be queued on a writer thread
                        if change is not None:
                            written[rel] = _create_file(target, _read_member(tar, member), rel, change)
                        else:
                            written[rel] = ExtractedFile(member.size, _write_member(tar, member, target))
                    if progress is not None:
                        progress(counting.count)
                elif member.issym():
                    writer.flush()
                    _check_symlink(member, parts)
                    place.remove_existing(rel, target)
                    written.pop(rel, None)
                    os.symlink(member.linkname, target)
                elif member.islnk():
                    writer.flush()
                    link_parts = safe_member_path(member.linkname, allowed)
                    if link_parts is None or link_parts[0] != parts[0]:
                        raise UnsafeImageError(f"hard link {rel} → {member.linkname} leaves its directory")
                    link_rel = "/".join(link_parts)
                    if link_rel not in written:
                        raise UnsafeImageError(f"hard link {rel} → {member.linkname} points to no extracted file")
                    place.remove_existing(rel, target)
                    os.link(place.root + "/" + link_rel, target, follow_symlinks=False)
                    written[rel] = written[link_rel]
                elif member.ischr() or member.isblk():
                    raise UnsafeImageError(f"entry {rel} is a device node: refused")
                elif member.isfifo():
                    raise UnsafeImageError(f"entry {rel} is a FIFO: refused")
                else:
                    raise UnsafeImageError(f"entry {rel} has an unsupported type {member.type!r}: refused")
        except tarfile.TarError as exc:
            raise UnsafeImageError(f"layer is not a valid tar archive: {exc}") from None
        except EOFError:
            raise UnsafeImageError("layer is truncated (unexpected end of data)") from None
    except BaseException:
        try:
            writer.close(abandon=True)  # never let the caller clean staging with writes in flight
        except BaseException as exc:  # noqa: BLE001 - the first error is the one to report
            logger.debug("writer error after the layer failed: %s", exc)
        raise
    else:
        writer.close()
    finally:
        tar.close()
    return written


def _members(tar: tarfile.TarFile) -> Any:
    """Iterate members without tarfile keeping them all in memory (one at a time, forward only)."""
    while True:
        member = tar.next()
        if member is None:
            return
        yield member
        tar.members = []  # stream mode keeps a list otherwise; a million entries would add up


def _check_symlink(member: tarfile.TarInfo, parts: tuple[str, ...]) -> None:
    link = member.linkname
    rel = "/".join(parts)
    if not link or link.startswith("/") or "\x00" in link:
        raise UnsafeImageError(f"symlink {rel} → {link!r} is absolute or empty: refused")
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(rel), link))
    if resolved == ".." or resolved.startswith("../") or resolved.split("/")[0] != parts[0]:
        raise UnsafeImageError(f"symlink {rel} → {link} points outside its directory: refused")


def _member_data(tar: tarfile.TarFile, member: tarfile.TarInfo) -> Any:
    """A reader of the member's bytes: the layer stream itself, which sits at them right after
    `next()`; skips tarfile's per-member file object and its buffer copies."""
    stream = tar.fileobj
    if stream is not None and stream.tell() == member.offset_data:
        return stream
    return tar.extractfile(member)  # pragma: no cover - never seeks back: the stream sits at the data


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    source = _member_data(tar, member)
    data = source.read(member.size) if source is not None else b""
    if len(data) != member.size:
        raise UnsafeImageError(f"layer is truncated inside {member.name}")
    return data


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: str) -> str:
    """Write the member's data to a new file (never through a link); returns its sha256."""
    source = _member_data(tar, member)
    if source is None:  # pragma: no cover - regular files always have data
        raise UnsafeImageError(f"entry {member.name} has no data")
    try:
        fd = os.open(target, _CREATE_FLAGS, 0o644)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ELOOP):
            raise UnsafeImageError(f"entry {member.name} collides with a link") from None
        raise
    remaining = member.size
    digest = hashlib.sha256()
    try:
        while remaining > 0:
            chunk = source.read(min(_CHUNK, remaining))
            if not chunk:
                raise UnsafeImageError(f"layer is truncated inside {member.name}")
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
            digest.update(chunk)
            remaining -= len(chunk)
    finally:
        os.close(fd)
    return digest.hexdigest()
