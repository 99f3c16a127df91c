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
from infercache.vault.archive import open_decompressed
from infercache.vault.file_writer import (
    ExtractedFile,
    FileWriter,
    Rewrite,
    UnsafeImageError,
    create_file,
    default_threads,
    open_new,
)

logger = logging.getLogger(__name__)
_CHUNK = 1 << 20


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
        self.writer: FileWriter | None = None

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


#: Files up to this size are read whole and written by the thread pool; bigger ones stream.
_PARALLEL_MAX_FILE = 4 << 20
#: A file that is rewritten on the way (group files) is read whole: it may not be bigger.
MAX_REWRITTEN_FILE = 16 << 20


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
    writer = FileWriter(default_threads() if threads is None else threads)
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
                            written[rel] = create_file(target, _read_member(tar, member), rel, change)
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
    fd = open_new(target, member.name)
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
