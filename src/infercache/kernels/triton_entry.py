"""Lenient parser of one Triton cache entry directory (Triton 3.x).

A Triton cache directory holds one sub-directory per compiled kernel, but also
launcher/util modules, autotune results and leftovers of interrupted writes.
Metadata fields drift between Triton versions, so this parser never requires a
fixed schema: it keeps the full metadata JSON and fills what it can find.
It never raises for bad content; anything that is not a usable kernel comes
back as a :class:`NotAKernel` with a kind and a reason (the caller warns).

Symlinks are never followed: a symlinked entry or metadata file is reported,
not read, so a link pointing outside the cache root can never be parsed or
deleted through.
"""

from __future__ import annotations

import base64
import errno
import json
import json.scanner
import logging
import os
import stat
from collections import (
    abc,  # isinstance against abc, not typing: typing's check is slow
)
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple

from infercache.fsutil import atomic_write_bytes
from infercache.gpu.targets import arch_name, backend_name

logger = logging.getLogger(__name__)

GROUP_PREFIX = "__grp__"
TMP_PREFIX = "tmp.pid_"
#: Intermediate representations: rebuilt by Triton on a miss, never needed for a hit.
IR_TYPES: frozenset[str] = frozenset({"ttir", "ttgir", "llir", "source", "glir"})
#: Final binaries per backend.
BINARY_TYPES: Mapping[str, str] = {"cubin": "cuda", "hsaco": "hip"}
#: Files Triton may leave in an entry that are not part of the kernel.
_IGNORED_FILES = frozenset({"lock"})
#: Largest metadata/group JSON we read; bigger is not a Triton metadata file.
_MAX_JSON_BYTES = 16 << 20


@dataclass(frozen=True)
class EntryFile:
    """One file of an entry: `type` is the suffix after the kernel name ("ttir", "cubin", "json", "group")."""

    name: str
    type: str
    size: int


@dataclass(frozen=True)
class KernelFacts:
    """What a kernel's metadata says about it: the one list of kernel fields.

    Every other holder of these fields takes them from :data:`KERNEL_FIELDS`, in this order and
    under these names: :class:`TritonEntry` (a subclass), :class:`EntryScan`, the catalog's
    `entries` columns, `KernelRecord` and `kernels list --format json|csv`, the pack manifest.
    """

    name: str
    backend: str
    arch: str
    warp_size: int | None
    num_warps: int | None
    num_stages: int | None
    num_ctas: int | None
    shared: int | None
    ptx_version: int | None
    triton_version: str | None
    hash: str | None


#: The kernel fields' names, in order (also the catalog's column names and the JSON keys).
KERNEL_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(KernelFacts))
#: (name, annotation) of each kernel field, for the NamedTuples that hold them as plain values.
KERNEL_FIELD_TYPES: tuple[tuple[str, Any], ...] = tuple((f.name, f.type) for f in fields(KernelFacts))


@dataclass(frozen=True)
class TritonEntry(KernelFacts):
    """One compiled kernel as found on disk (raw numbers; presentation is the caller's).

    The kernel fields come first (from :class:`KernelFacts`), then where and what it is on disk.
    """

    key: str
    path: Path
    files: tuple[EntryFile, ...]
    group_file: Path | None
    metadata: Mapping[str, Any]
    total_size: int
    modified: float
    #: `tmp.pid_*` leftovers inside the entry dir (interrupted writes), for `prune --garbage`.
    leftovers: tuple[Path, ...] = field(default=())
    #: File names the group file lists (Triton 3.9 misses when any of them is absent).
    children: tuple[str, ...] = field(default=())

    @property
    def orphans(self) -> tuple[EntryFile, ...]:
        """Files in the entry dir that the group file does not list (and are not the group file)."""
        listed = set(self.children)
        return tuple(f for f in self.files if f.type != "group" and f.name not in listed)

    def files_by_type(self) -> dict[str, int]:
        """Bytes per file type, as `kernels list --format json` shows them."""
        out: dict[str, int] = {}
        for f in self.files:
            out[f.type] = out.get(f.type, 0) + f.size
        return out


@dataclass(frozen=True)
class NotAKernel:
    """A directory (or file) in a cache dir that is not a usable kernel entry, and why.

    kind: "garbage" (tmp.pid_* leftover), "launcher" (launcher/util module), "autotune",
    "empty", "incomplete" (no group file yet: interrupted write), "truncated" (group file
    lists missing children), "unparsable" (corrupt/odd JSON), "unreadable" (permission
    denied, I/O error), "symlink" (never followed), "orphan" (a stray file), "other".
    """

    path: Path
    kind: str
    reason: str
    size: int = 0


def key_for_hash(hash_hex: str) -> str:
    """Triton's directory name for a compiled kernel's hex hash: RFC 4648 base32 without padding."""
    return base64.b32encode(bytes.fromhex(hash_hex)).decode().rstrip("=")


def group_children(group_json: Mapping[str, Any]) -> list[str]:
    """Child file names of a group file, from either form Triton has written.

    Triton 3.x writes ``{"child_paths": {name: absolute_path}}``; older Triton and the
    remote cache manager write ``{"child_paths": [name, ...]}``. Names only are returned
    (the location is always the entry directory itself).
    """
    children = group_json.get("child_paths") if isinstance(group_json, (dict, abc.Mapping)) else None
    if isinstance(children, (dict, abc.Mapping)):
        names = [str(k) for k in children.keys()]
    elif isinstance(children, (list, tuple)):
        names = [os.path.basename(str(c)) for c in children]
    else:
        return []
    return [n for n in names if n]


def group_file_bytes(children: Iterable[str], base_dir: Path | None) -> bytes:
    """The exact bytes :func:`write_group_file` writes (prune plans use it to count bytes freed)."""
    names = list(dict.fromkeys(os.path.basename(str(c)) for c in children))
    if base_dir is None:
        child_paths = {n: n for n in names}
    else:
        base = Path(base_dir)
        child_paths = {n: str(base / n) for n in names}
    # Same encoding as Triton's put_group: json.dumps with default separators.
    return json.dumps({"child_paths": child_paths}).encode()


def write_group_file(group_path: Path, children: Iterable[str], base_dir: Path | None) -> None:
    """Write a group file atomically (temp file + rename: Triton treats it as the commit marker).

    With `base_dir`, children map to absolute paths under it (what Triton's loader needs).
    With ``base_dir=None`` the portable form ``{"child_paths": {name: name}}`` is written:
    a dict of relative names, which both the dict reader (Triton 3.x) and
    :func:`group_children` understand; it must be rewritten with a base dir before Triton
    can hit on it.
    """
    atomic_write_bytes(Path(group_path), group_file_bytes(children, base_dir))


def _file_type(filename: str, kernel_name: str | None) -> str:
    if filename.startswith(GROUP_PREFIX):
        return "group"
    if kernel_name and filename.startswith(kernel_name + "."):
        return filename[len(kernel_name) + 1 :].lower() or "other"
    if "." in filename:
        return filename.rsplit(".", 1)[1].lower()
    return "other"


def _as_int(value: Any) -> int | None:
    if type(value) is int:  # the common case first (bool is not `int` here)
        return value
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def _read_bytes(path: str, dir_fd: int | None = None, size_hint: int | None = None) -> bytes:
    """Read a small JSON file without following a symlink (O_NOFOLLOW → ELOOP on a link).

    Reads in requests of the expected size (+1), not of the 16 MiB cap: `os.read(fd, n)`
    allocates n bytes up front, which would dominate indexing time.
    """
    fd = os.open(path, _OPEN_FLAGS, dir_fd=dir_fd)
    try:
        want = min(size_hint + 1, _MAX_JSON_BYTES + 1) if size_hint is not None else 65536
        chunks = []
        size = 0
        while True:
            chunk = os.read(fd, want)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > _MAX_JSON_BYTES:
                raise ValueError("file too large for a metadata JSON")
            if len(chunk) < want:  # a short read of a regular file is its end
                break
    finally:
        os.close(fd)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _loads(raw: bytes) -> Any:
    """`json.loads(raw)`, minus its Python-level layers for the common case (UTF-8, no padding).

    Why: two JSON files per entry; the wrappers around the C scanner cost as much as the
    scan itself. Anything unusual (BOM, UTF-16, whitespace, junk) goes to `json.loads`,
    so results and errors are exactly json.loads'.
    """
    try:
        obj, end = _SCAN(raw.decode("utf-8"), 0)
    except (UnicodeDecodeError, StopIteration, ValueError):
        return json.loads(raw)
    if end != len(raw):  # trailing content (or non-ASCII: lengths differ), let json decide
        return json.loads(raw)
    return obj


_SCAN = json.scanner.make_scanner(json.JSONDecoder())
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = _OPEN_FLAGS | getattr(os, "O_DIRECTORY", 0)
_USE_DIR_FD = os.stat in os.supports_dir_fd and os.open in os.supports_dir_fd and os.listdir in os.supports_fd


_EntryScanRow = NamedTuple("_EntryScanRow", [  # type: ignore[misc]
    ("path", str),
    *KERNEL_FIELD_TYPES,
    ("files", list[tuple[str, str, int]]),  # (name, type, size) of every regular file, sorted by name
    ("group_name", str),
    ("metadata", dict[str, Any]),
    ("raw", bytes),  # the metadata file's bytes as read (valid JSON: stored as is, never re-encoded)
    ("total_size", int),
    ("modified", float),
    ("leftovers", list[str]),  # paths of `tmp.pid_*` sub-directories (interrupted writes)
    ("children", list[str]),  # names the group file lists
    ("orphans", list[tuple[str, int, float]]),  # (name, size, mtime) of files the group file does not list
])
#: Where the kernel fields stand in an EntryScan (right after `path`).
SCAN_KERNEL_FIELDS = slice(1, 1 + len(KERNEL_FIELDS))


class EntryScan(_EntryScanRow):
    """A kernel entry as plain values: what :func:`scan` returns (`path`, the kernel fields, then files).

    Why a NamedTuple and str paths: the indexer scans tens of thousands of entries and
    turns each straight into catalog rows; frozen dataclasses and `Path` objects cost more
    than the parsing itself. :meth:`to_entry` gives the :class:`TritonEntry` other callers use.
    """

    __slots__ = ()

    @property
    def key(self) -> str:
        return os.path.basename(self.path)

    def files_by_type(self) -> dict[str, int]:
        """Bytes per file type, as `kernels list --format json` shows them."""
        out: dict[str, int] = {}
        for _name, ftype, size in self.files:
            out[ftype] = out.get(ftype, 0) + size
        return out

    def files_by_type_json(self) -> str:
        """`json.dumps(self.files_by_type())`, built directly when every type is a plain word.

        Why: json.dumps builds a new encoder per call, a tenth of an entry's indexing time.
        """
        by_type = self.files_by_type()
        if all(t.isalnum() and t.isascii() for t in by_type):
            return "{" + ", ".join(f'"{t}": {n}' for t, n in by_type.items()) + "}"
        return json.dumps(by_type)

    def to_entry(self) -> TritonEntry:
        path = Path(self.path)
        return TritonEntry(
            *self[SCAN_KERNEL_FIELDS],
            key=path.name,
            path=path,
            files=tuple(EntryFile(n, t, s) for n, t, s in self.files),
            group_file=path / self.group_name,
            metadata=self.metadata,
            total_size=self.total_size,
            modified=self.modified,
            leftovers=tuple(Path(p) for p in self.leftovers),
            children=tuple(self.children),
        )


def parse_entry(path: Path) -> TritonEntry | NotAKernel:
    """Classify one child of a Triton cache dir; never raises for bad content."""
    return scan_entry(path)[0]


def scan_entry(path: Path, st: os.stat_result | None = None) -> tuple[TritonEntry | NotAKernel, bytes | None]:
    """:func:`parse_entry` plus the raw metadata bytes (the indexer stores them without re-encoding).

    `st` is the entry's own lstat result when the caller already has it.
    """
    result = scan(os.fspath(path), st)
    if isinstance(result, NotAKernel):
        return result, None
    return result.to_entry(), result.raw


def scan(path: str, st: os.stat_result | None = None) -> EntryScan | NotAKernel:
    """Classify one child of a Triton cache dir (str path, plain values); never raises for bad content.

    THE parser: :func:`parse_entry` / :func:`scan_entry` and the indexer all go through it.
    """
    try:
        return _parse(path, st)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return NotAKernel(Path(path), "symlink", "symbolic link loop (not followed)")
        return NotAKernel(Path(path), "unreadable", f"{exc.strerror or exc}")
    except Exception as exc:  # noqa: BLE001 - the contract is: never crash on a bad entry
        logger.debug("unexpected error parsing %s", path, exc_info=True)
        return NotAKernel(Path(path), "unparsable", f"{type(exc).__name__}: {exc}")


def _parse(path_s: str, st: os.stat_result | None) -> EntryScan | NotAKernel:
    if st is None:
        st = os.lstat(path_s)
    base = os.path.basename(path_s)
    if stat.S_ISLNK(st.st_mode):
        return NotAKernel(Path(path_s), "symlink", "symbolic link (not followed)")
    if base.startswith(TMP_PREFIX):
        return NotAKernel(Path(path_s), "garbage", "leftover of an interrupted write", tree_size(Path(path_s)))
    if not stat.S_ISDIR(st.st_mode):
        if base.endswith(".autotune.json"):
            return NotAKernel(Path(path_s), "autotune", "autotune results", st.st_size)
        return NotAKernel(Path(path_s), "orphan", "stray file in the cache dir", st.st_size)

    files: dict[str, os.stat_result] = {}
    leftovers: list[str] = []
    links: list[str] = []
    others: list[str] = []
    # One directory fd for the whole entry: listdir + fstatat/openat relative to it are the
    # cheapest syscalls per file (no path walk per file), and no race can swap the dir for a link.
    dfd = os.open(path_s, _DIR_FLAGS) if _USE_DIR_FD else None
    prefix = "" if dfd is not None else path_s + os.sep
    size_all = 0
    groups: list[str] = []
    try:
        for child in os.listdir(dfd if dfd is not None else path_s):
            cst = os.stat(prefix + child, dir_fd=dfd, follow_symlinks=False)
            mode = cst.st_mode
            if stat.S_ISREG(mode):
                files[child] = cst
                size_all += cst.st_size
                if child.startswith(GROUP_PREFIX) and child.endswith(".json"):
                    groups.append(child)
            elif stat.S_ISLNK(mode):
                links.append(child)
            elif stat.S_ISDIR(mode) and child.startswith(TMP_PREFIX):
                leftovers.append(os.path.join(path_s, child))
            else:
                others.append(child)
        return _classify(path_s, dfd, prefix, files, size_all, groups, leftovers, links, others)
    finally:
        if dfd is not None:
            os.close(dfd)


def _classify(
    path_s: str,
    dfd: int | None,
    prefix: str,
    files: dict[str, os.stat_result],
    size_all: int,
    groups: list[str],
    leftovers: list[str],
    links: list[str],
    others: list[str],
) -> EntryScan | NotAKernel:
    if not files and not links:
        if leftovers:
            return NotAKernel(Path(path_s), "garbage", "only leftovers of interrupted writes", tree_size(Path(path_s)))
        if others:
            return NotAKernel(Path(path_s), "other", f"no files, only sub-directories: {', '.join(sorted(others)[:3])}")
        return NotAKernel(Path(path_s), "empty", "empty directory")

    if not groups:
        return _classify_groupless(Path(path_s), set(files), links, size_all)

    names = sorted(files)
    group_name = min(groups)
    if len(groups) > 1:
        logger.debug("%s: several group files, using %s", path_s, group_name)
    meta_name = group_name[len(GROUP_PREFIX) :]
    kernel_name = meta_name[: -len(".json")]
    try:
        group_json = _loads(_read_bytes(prefix + group_name, dfd, files[group_name].st_size))
    except (ValueError, UnicodeDecodeError) as exc:
        return NotAKernel(Path(path_s), "unparsable", f"corrupt group file {group_name}: {exc}", size_all)
    if not isinstance(group_json, (dict, abc.Mapping)) or "child_paths" not in group_json:
        return NotAKernel(Path(path_s), "unparsable", f"group file {group_name} has no child_paths", size_all)
    children = group_children(group_json)
    if links:
        linked = sorted(c for c in children if c in links)
        if linked or meta_name in links:
            what = ", ".join(linked) or meta_name
            return NotAKernel(Path(path_s), "symlink", f"entry files are symbolic links (not followed): {what}", size_all)
    missing = [c for c in children if c not in files]
    if missing:
        return NotAKernel(
            Path(path_s), "truncated", f"group file lists missing files: {', '.join(sorted(missing))}", size_all
        )
    meta_st = files.get(meta_name)
    if meta_st is None:
        return NotAKernel(Path(path_s), "truncated", f"metadata file {meta_name} is missing", size_all)

    try:
        raw = _read_bytes(prefix + meta_name, dfd, meta_st.st_size)
        metadata = _loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return NotAKernel(Path(path_s), "unparsable", f"corrupt metadata {meta_name}: {exc}", size_all)
    if not isinstance(metadata, (dict, abc.Mapping)):
        return NotAKernel(Path(path_s), "unparsable", f"metadata {meta_name} is not a JSON object", size_all)

    target = metadata.get("target")
    if not isinstance(target, (dict, abc.Mapping)):
        target = {}
    prefix = kernel_name + "."
    prefix_len = len(prefix)
    listed = set(children)
    entry_files = []
    orphans = []
    for fname in names:
        fst = files[fname]
        if fname == meta_name:
            ftype = "json"
        elif fname.startswith(prefix):
            ftype = fname[prefix_len:].lower() or "other"
        else:
            ftype = _file_type(fname, None)
        entry_files.append((fname, ftype, fst.st_size))
        if fname not in listed and ftype != "group":
            orphans.append((fname, fst.st_size, fst.st_mtime))
    backend = backend_name(target.get("backend")) or backend_name(metadata.get("backend_name"))
    if backend is None:
        types = {t for _n, t, _s in entry_files}
        backend = next((b for t, b in BINARY_TYPES.items() if t in types), None)
        if backend is None:
            backend = "hip" if "amdgcn" in types else "cuda" if "ptx" in types else "unknown"
    arch = arch_name(target.get("arch")) or arch_name(metadata.get("arch")) or "unknown"
    warp_size = _as_int(target.get("warp_size"))
    if warp_size is None:
        warp_size = _as_int(metadata.get("warp_size"))
    tv = metadata.get("triton_version")
    digest = metadata.get("hash")
    name = metadata.get("name")
    get = metadata.get
    return EntryScan(  # positional: keyword construction of a NamedTuple is markedly slower
        path_s,
        name if isinstance(name, str) and name else kernel_name,
        backend,
        arch,
        warp_size,
        _as_int(get("num_warps")),
        _as_int(get("num_stages")),
        _as_int(get("num_ctas")),
        _as_int(get("shared")),
        _as_int(get("ptx_version")),
        str(tv) if tv is not None else None,
        str(digest) if digest is not None else None,
        entry_files,
        group_name,
        metadata,
        raw,
        size_all,
        meta_st.st_mtime,
        sorted(leftovers),
        children,
        orphans,
    )


def _classify_groupless(path: Path, names: set[str], links: list[str], size: int) -> NotAKernel:
    """A directory without a group file: launcher module, autotune result, or an unfinished write."""
    if any(n.endswith(".so") or n.endswith(".pyd") for n in names):
        return NotAKernel(path, "launcher", "launcher/util module", size)
    if names and all(n.endswith(".autotune.json") or n in _IGNORED_FILES for n in names):
        return NotAKernel(path, "autotune", "autotune results", size)
    if links and not names:
        return NotAKernel(path, "symlink", "only symbolic links (not followed)", size)
    if any(n.endswith(".json") for n in names):
        return NotAKernel(path, "incomplete", "no group file (interrupted write or foreign layout)", size)
    return NotAKernel(path, "other", "no group or metadata file", size)


def tree_size(path: Path) -> int:
    """Bytes of regular files under `path`, without following symlinks."""
    total = 0
    for dirpath, _dirs, filenames in os.walk(path, followlinks=False):
        for name in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total
