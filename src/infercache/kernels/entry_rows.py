"""The catalog rows of a Triton cache entry: parse one entry, write a batch, re-read one.

Why its own module: the indexer (a whole cache dir, incremental), its worker processes (parsing
only) and prune (re-reading the entries it changed) all turn an entry on disk into the same
rows, and each batch is checked against the disk again inside its write transaction.

Parsing returns plain tuples (no dataclasses or Path objects), so that forked workers can
ship them back as one `marshal` blob.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from infercache.kernels.catalog import Catalog
from infercache.kernels.discovery import VllmInfo
from infercache.kernels.triton_entry import (
    KERNEL_FIELDS,
    SCAN_KERNEL_FIELDS,
    EntryScan,
    NotAKernel,
    scan,
    tree_size,
)

logger = logging.getLogger(__name__)

#: Kinds of non-kernels that deserve a warning (the rest is normal cache content).
PROBLEM_KINDS = frozenset({"unparsable", "truncated", "unreadable", "symlink"})


@dataclass(frozen=True)
class SkipNote:
    """Something that was not indexed as a kernel, and why."""

    path: Path
    kind: str
    reason: str


class RunCounts:
    """Mutable counters of one run (the summary is frozen at the end)."""

    def __init__(self) -> None:
        self.new = self.updated = self.unchanged = self.removed = self.artifacts = 0
        self.skipped: dict[str, int] = {}
        self.problems: list[SkipNote] = []

    def skip(self, path: Path, kind: str, reason: str) -> None:
        self.skipped[kind] = self.skipped.get(kind, 0) + 1
        if kind in PROBLEM_KINDS:
            self.problems.append(SkipNote(path, kind, reason))
            logger.warning("skipped %s: %s (%s)", path, reason, kind)
        else:
            logger.debug("skipped %s: %s (%s)", path, reason, kind)


def signature(st: os.stat_result) -> str:
    """What changes when an entry directory changes (renames into it bump its mtime)."""
    return f"{stat.S_IFMT(st.st_mode):o}:{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"


def dedup_key(name: str, raw: bytes | None, metadata: Mapping[str, Any], digest: str | None) -> str:
    """Equal for entries whose metadata is identical apart from `hash` (prune --deduplicate)."""
    if raw is not None and digest:
        body = raw.replace(digest.encode(), b"")
    else:
        body = json.dumps({k: v for k, v in metadata.items() if k != "hash"}, sort_keys=True).encode()
    return name + ":" + hashlib.sha1(body).hexdigest()


@dataclass(frozen=True)
class CacheDirInfo:
    """The cache-dir facts of a catalog row (what discovery had said), for re-reading one entry."""

    path: Path
    mode: str
    cache_root: Path
    vllm: VllmInfo | None

    @property
    def path_s(self) -> str:
        return str(self.path)

    @property
    def root_s(self) -> str:
        return str(self.cache_root)

    @classmethod
    def of(cls, tcd: Any) -> CacheDirInfo:
        """From discovery's TritonCacheDir (plain, picklable values for worker processes)."""
        v = tcd.vllm
        return cls(Path(tcd.path), tcd.mode, Path(tcd.cache_root), v)

    @classmethod
    def from_row(cls, row: Any) -> CacheDirInfo:
        vllm = VllmInfo(row["vllm_hash"], row["vllm_rank"], row["vllm_prefix"]) if row["vllm_hash"] is not None else None
        return cls(Path(row["parent"]), row["mode"], Path(row["cache_root"]), vllm)


# A prepared item is what the catalog writer needs, made of plain values:
#   ("k", path, sig, entry_row, [(name, type, size)], [skipped-row extras] | None)   a kernel
#   ("s", path, sig, kind, reason, size, mtime)                               not a kernel
Item = tuple


def prepare(path: str, st: os.stat_result | None, info: CacheDirInfo, now: float) -> Item:
    """Parse one candidate and turn it into catalog rows (`st`: its lstat, if already known)."""
    if st is None:
        try:
            st = os.lstat(path)
        except OSError as exc:  # vanished (the write re-check drops it) or unreadable
            return ("s", path, "", "unreadable", exc.strerror or str(exc), 0, 0.0)
    sig = signature(st)
    result = scan(path, st)
    if isinstance(result, NotAKernel):
        return ("s", path, sig, result.kind, result.reason, result.size, st.st_mtime)
    extras = None
    if result.leftovers or result.orphans:
        parent = info.path_s
        root = info.root_s
        extras = [
            (p, parent, root, "garbage", "leftover of an interrupted write", tree_size(Path(p)), _mtime(Path(p)), "", path)
            for p in result.leftovers
        ] + [
            (os.path.join(path, name), parent, root, "orphan", "file not listed in the group file", size, mtime, "", path)
            for name, size, mtime in result.orphans
        ]
    return ("k", path, sig, entry_row(result, info, sig, now), result.files, extras)


#: The `entries` columns entry_row fills, in its order (the kernel fields under their own names).
_ENTRY_COLUMNS: tuple[str, ...] = (
    "path", "parent", "key", "cache_root", "mode", *KERNEL_FIELDS, "maxnreg", "enable_fp_fusion", "total_size",
    "modified", "files_json", "group_file", "dedup_key", "vllm_hash", "vllm_rank", "vllm_prefix", "signature",
    "indexed_at", "metadata",
)
_INSERT = f"INSERT INTO entries(id, {', '.join(_ENTRY_COLUMNS)}) VALUES ({','.join('?' * (1 + len(_ENTRY_COLUMNS)))})"
_UPSERT = _INSERT + " ON CONFLICT(path) DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in _ENTRY_COLUMNS[1:])


def entry_row(entry: EntryScan, tcd: CacheDirInfo, sig: str, now: float) -> tuple[Any, ...]:
    """The `entries` row of a parsed entry (column order of `_ENTRY_COLUMNS`)."""
    md = entry.metadata
    maxnreg = md.get("maxnreg")
    fp_fusion = md.get("enable_fp_fusion")
    vllm = tcd.vllm
    path = entry.path
    return (
        path,
        tcd.path_s,
        os.path.basename(path),
        tcd.root_s,
        tcd.mode,
        *entry[SCAN_KERNEL_FIELDS],
        maxnreg if isinstance(maxnreg, int) else None,
        int(fp_fusion) if isinstance(fp_fusion, bool) else None,
        entry.total_size,
        entry.modified,
        entry.files_by_type_json(),
        os.path.join(path, entry.group_name),
        dedup_key(entry.name, entry.raw, md, entry.hash),
        vllm.hash if vllm else None,
        vllm.rank if vllm else None,
        vllm.prefix if vllm else None,
        sig,
        now,
        # The file's own bytes (valid JSON, parsed above): no re-encoding.
        entry.raw.decode("utf-8", "replace"),
    )


def forget_entry(conn: Any, path: str) -> int:
    """Drop a vanished entry's row and the notes about it and inside it; the entry rows removed (0 or 1)."""
    removed = conn.execute("DELETE FROM entries WHERE path = ?", (path,)).rowcount
    conn.execute("DELETE FROM skipped WHERE path = ? OR owner = ?", (path, path))
    return removed


def write_batch(
    catalog: Catalog,
    info: CacheDirInfo,
    pending: list[Item],
    run: RunCounts,
    skip_paths: Iterable[str] = (),
) -> None:
    """Write one batch in one transaction, with a handful of executemany calls (fast for 10,000).

    Inside the transaction each item's directory is checked again (one lstat): an entry that
    a concurrent prune deleted or changed after we parsed it is dropped or re-read, so the
    rows always match the disk.
    """
    had_skip = set(skip_paths)
    with catalog.transaction() as conn:
        now = time.time()
        current: list[Item] = []
        for item in pending:
            try:
                st = os.lstat(item[1])
            except FileNotFoundError:
                run.removed += forget_entry(conn, item[1])
                continue
            except OSError:
                current.append(item)
                continue
            current.append(item if signature(st) == item[2] else prepare(item[1], st, info, now))
        kernels = [it for it in current if it[0] == "k"]
        others = [it for it in current if it[0] == "s"]
        paths = [it[1] for it in kernels]
        existing: dict[str, int] = {}
        for i in range(0, len(paths), 900):
            chunk = paths[i : i + 900]
            existing.update(
                (row[1], row[0])
                for row in conn.execute(
                    f"SELECT id, path FROM entries WHERE path IN ({','.join('?' * len(chunk))})", chunk
                )
            )
        next_id = conn.execute("SELECT coalesce(max(id), 0) + 1 FROM entries").fetchone()[0]
        inserts = []
        updates = []
        files = []
        extras = []
        clear = []
        for _tag, path, _sig, row, entry_files, entry_extras in kernels:
            entry_id = existing.get(path)
            if entry_id is None:
                entry_id = next_id
                next_id += 1
                run.new += 1
                inserts.append((entry_id, *row))
                if path in had_skip:
                    clear.append((path, path))
            else:
                run.updated += 1
                updates.append((entry_id, *row))
                clear.append((path, path))
            files += [(entry_id, name, ftype, size) for name, ftype, size in entry_files]
            if entry_extras:
                extras.extend(entry_extras)
        if existing:
            conn.executemany("DELETE FROM files WHERE entry_id = ?", [(i,) for i in existing.values()])
        if clear:
            conn.executemany("DELETE FROM skipped WHERE path = ? OR owner = ?", clear)
        if inserts:
            conn.executemany(_INSERT, inserts)
        if updates:
            conn.executemany(_UPSERT, updates)
        conn.executemany("INSERT INTO files(entry_id, name, type, size) VALUES (?, ?, ?, ?)", files)
        if extras:
            conn.executemany(
                "INSERT OR REPLACE INTO skipped(path, parent, cache_root, kind, reason, size, modified, "
                "signature, owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                extras,
            )
        parent = str(info.path)
        root = str(info.cache_root)
        for _tag, path, sig, kind, reason, size, mtime in others:
            run.removed += conn.execute("DELETE FROM entries WHERE path = ?", (path,)).rowcount
            conn.execute("DELETE FROM skipped WHERE owner = ?", (path,))
            conn.execute(
                "INSERT OR REPLACE INTO skipped(path, parent, cache_root, kind, reason, size, modified, "
                "signature, owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                (path, parent, root, kind, reason, size, mtime, sig),
            )
            run.skip(Path(path), kind, reason)


def _mtime(path: Path) -> float:
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return 0.0


def refresh_paths(catalog: Catalog, entry_paths: Iterable[Path]) -> None:
    """Re-read (or drop) specific entries after we changed them (prune), keeping their cache dir info."""
    conn = catalog.conn
    for p in entry_paths:
        path = str(p)
        row = conn.execute(
            "SELECT parent, cache_root, mode, vllm_hash, vllm_rank, vllm_prefix FROM entries WHERE path = ?", (path,)
        ).fetchone()
        if row is None:
            continue
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            with catalog.transaction() as c:
                forget_entry(c, path)
            continue
        info = CacheDirInfo.from_row(row)
        write_batch(catalog, info, [prepare(path, st, info, time.time())], RunCounts(), [path])
