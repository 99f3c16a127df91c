"""Incremental indexing of kernel caches into the catalog.

Why incremental: big caches hold tens of thousands of entries and MCM re-read
every one of them on each run (126 s for 10,000). Triton writes every file of
an entry through a rename into the entry directory, so the directory's own
stat (inode, mtime, size) changes whenever its content does: one `lstat` per
entry decides whether it must be parsed again. Rows whose directories vanished
are removed. Parsing happens outside the write transaction and rows are
written in batches, so a concurrent `index` or `prune` only waits briefly.

Why so much care for the first index: it parses everything (a dozen syscalls and
two JSON files per entry) and writes ~10 rows per entry. Parsing returns plain
tuples (no dataclasses or Path objects), rows go in sorted by path with one
`executemany` per table and batch, and a big scan is parsed by forked worker
processes while this process writes (see `index_workers`; the rows themselves are `entry_rows`').
"""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from infercache.errors import BadInputError
from infercache.kernels import discovery, entry_rows, index_workers, inductor
from infercache.kernels.catalog import Catalog
from infercache.kernels.entry_rows import CacheDirInfo, Item, RunCounts, SkipNote, signature, write_batch
from infercache.kernels.index_workers import default_workers
from infercache.units import ProgressCallback, format_size

__all__ = ["BATCH", "PARALLEL_MIN", "IndexSummary", "ProgressCallback", "SkipNote", "default_workers", "index",
           "resolve_roots"]

logger = logging.getLogger(__name__)

#: Entries written per transaction: short enough that other writers wait only briefly.
BATCH = 500
#: Entries to (re)read before worker processes pay off (a fork each, results shipped back).
PARALLEL_MIN = 1000



@dataclass(frozen=True)
class IndexSummary:
    """What one `index` run did (counts), like `hf cache scan`'s closing line."""

    roots: tuple[Path, ...]
    modes: tuple[str, ...]
    new: int
    updated: int
    unchanged: int
    removed: int
    skipped: Mapping[str, int]
    problems: tuple[SkipNote, ...]
    artifacts: int
    entries: int
    total_size: int
    elapsed: float
    cache_dirs: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def line(self) -> str:
        """One human line: '24 kernels (12.3 MiB): 24 new, 0 updated, ...'."""
        skipped = ", ".join(f"{n} {k}" for k, n in sorted(self.skipped.items()))
        text = (
            f"{self.entries} kernels ({format_size(self.total_size)}) in {len(self.roots)} cache dir(s): "
            f"{self.new} new, {self.updated} updated, {self.unchanged} unchanged, {self.removed} removed, "
            f"{self.skipped_total} skipped" + (f" ({skipped})" if skipped else "")
        )
        if self.artifacts:
            kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.extra.get("artifacts_by_kind", {}).items()))
            text += f", {self.artifacts} artifacts" + (f" ({kinds})" if kinds else "")
        return text + f" in {self.elapsed:.2f}s"

    def to_json(self) -> dict[str, Any]:
        return {
            "roots": [str(r) for r in self.roots],
            "modes": list(self.modes),
            "entries": self.entries,
            "total_size": self.total_size,
            "new": self.new,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "removed": self.removed,
            "skipped": dict(self.skipped),
            "problems": [{"path": str(p.path), "kind": p.kind, "reason": p.reason} for p in self.problems],
            "artifacts": self.artifacts,
            "artifacts_by_kind": dict(self.extra.get("artifacts_by_kind", {})),
            "elapsed_s": round(self.elapsed, 4),
        }


def resolve_roots(cache_dirs: Sequence[str | os.PathLike[str]] | None, mode: str) -> list[Path]:
    """The cache dirs to index: the given ones (must exist), else the mode's defaults."""
    if cache_dirs:
        return list(dict.fromkeys(discovery.check_root(d) for d in cache_dirs))
    defaults = discovery.default_cache_dirs(mode)
    found = [p for p in defaults if p.is_dir()]
    if not found:
        where = ", ".join(str(p) for p in defaults) or "the default locations"
        raise BadInputError(f"no cache directory found (looked in {where}); pass --cache-dir")
    return [p.resolve() for p in found]


def index(
    catalog: Catalog,
    cache_dirs: Sequence[str | os.PathLike[str]] | None = None,
    mode: str = "auto",
    progress: ProgressCallback | None = None,
    rescan: bool = False,
    workers: int | None = None,
) -> IndexSummary:
    """Bring the catalog in line with the given cache dirs (or the defaults); incremental unless `rescan`.

    `workers`: parsing processes for big scans (default: one per CPU, at most MAX_WORKERS;
    1 = parse in this process). The catalog is only ever written by this process.
    """
    # Scanning makes ~50 small acyclic objects per entry; the cyclic GC would re-walk them
    # over and over (~15% of a 10,000-entry index). Reference counting frees them anyway.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        with catalog.bulk_writes():
            return _index(catalog, cache_dirs, mode, progress, rescan, default_workers() if workers is None else workers)
    finally:
        if gc_was_enabled:
            gc.enable()


def _index(
    catalog: Catalog,
    cache_dirs: Sequence[str | os.PathLike[str]] | None,
    mode: str,
    progress: ProgressCallback | None,
    rescan: bool,
    workers: int,
) -> IndexSummary:
    started = time.perf_counter()
    discovery.check_mode(mode)
    roots = resolve_roots(cache_dirs, mode)
    run = RunCounts()
    modes: list[str] = []
    # 1. Discover the Triton cache dirs and list their children (cheap: one lstat each).
    jobs: list[tuple[Any, list[os.DirEntry[str]]]] = []
    root_modes: dict[Path, str] = {}
    for root in roots:
        root_mode = discovery.detect_mode(root) if mode == "auto" else mode
        root_modes[root] = root_mode
        modes.append(root_mode)
        for item in discovery.discover(root, root_mode):  # artifacts: inductor.scan_root below
            jobs.append((item, _list_children(item.path)))
    total = sum(len(children) for _, children in jobs)
    done = 0
    if progress:
        progress(0, total)
    # 2. Per cache dir: compare signatures, parse what changed, write in batches.
    for tcd, children in jobs:
        done = _index_dir(catalog, tcd, children, run, rescan, progress, done, total, workers)
    # 3. Artifacts (scanned outside the write lock, unchanged ones reused), vanished cache dirs, roots.
    scans = {root: inductor.scan_root(root, root_modes[root],
                                      {} if rescan or root_modes[root] == "triton" else inductor.known_rows(catalog.conn, str(root)))
             for root in roots}
    now = time.time()
    with catalog.transaction() as conn:
        for root in roots:
            live_dirs = {str(t.path) for t, _ in jobs if Path(t.cache_root) == root}
            for row in conn.execute("SELECT DISTINCT parent FROM entries WHERE cache_root = ?", (str(root),)).fetchall():
                if row["parent"] not in live_dirs:
                    run.removed += conn.execute("DELETE FROM entries WHERE parent = ?", (row["parent"],)).rowcount
            for row in conn.execute("SELECT DISTINCT parent FROM skipped WHERE cache_root = ?", (str(root),)).fetchall():
                if row["parent"] not in live_dirs:
                    conn.execute("DELETE FROM skipped WHERE parent = ?", (row["parent"],))
            inductor.write_scan(conn, str(root), scans[root], now)
            conn.execute(
                "INSERT INTO roots(path, mode, indexed_at) VALUES (?, ?, ?) "
                "ON CONFLICT(path) DO UPDATE SET mode = excluded.mode, indexed_at = excluded.indexed_at",
                (str(root), root_modes[root], now),
            )
        by_kind: dict[str, int] = {}
        for scan in scans.values():
            for kind, n in scan.by_kind().items():
                by_kind[kind] = by_kind.get(kind, 0) + n
            for note in scan.noise:
                run.skipped[note.kind] = run.skipped.get(note.kind, 0) + 1
            run.problems.extend(SkipNote(Path(p.path), p.kind, p.reason) for p in scan.problems)
        run.artifacts = sum(by_kind.values())
        placeholders = ",".join("?" * len(roots))
        count, size = conn.execute(
            f"SELECT count(*), coalesce(sum(total_size), 0) FROM entries WHERE cache_root IN ({placeholders})",
            [str(r) for r in roots],
        ).fetchone()
    if progress:
        progress(total, total)
    summary = IndexSummary(
        roots=tuple(roots),
        modes=tuple(modes),
        new=run.new,
        updated=run.updated,
        unchanged=run.unchanged,
        removed=run.removed,
        skipped=dict(run.skipped),
        problems=tuple(run.problems),
        artifacts=run.artifacts,
        entries=count,
        total_size=size,
        elapsed=time.perf_counter() - started,
        cache_dirs=len(jobs),
        extra={"artifacts_by_kind": dict(sorted(by_kind.items()))},
    )
    logger.info("%s", summary.line())
    return summary


def _list_children(path: Path) -> list[os.DirEntry[str]]:
    """The children of a Triton cache dir (their lstat comes later, and only where needed)."""
    try:
        with os.scandir(path) as it:
            return list(it)
    except OSError as exc:
        logger.warning("cannot list %s: %s", path, exc)
        return []

def _index_dir(
    catalog: Catalog,
    tcd: Any,
    children: list[os.DirEntry[str]],
    run: RunCounts,
    rescan: bool,
    progress: ProgressCallback | None,
    done: int,
    total: int,
    workers: int = 1,
) -> int:
    parent = str(tcd.path)
    info = CacheDirInfo.of(tcd)
    conn = catalog.conn
    known = {r[0]: r[1] for r in conn.execute("SELECT path, signature FROM entries WHERE parent = ?", (parent,))}
    known_skips = {
        r[0]: (r[1], r[2], r[3])
        for r in conn.execute(
            "SELECT path, signature, kind, reason FROM skipped WHERE parent = ? AND owner IS NULL", (parent,)
        )
    }
    seen: set[str] = set()
    todo: list[tuple[str, os.stat_result | None]] = []
    # Signatures are only compared with what the catalog knows: a first index (or a rescan)
    # leaves the lstat to the parser (in the workers, when there are some).
    compare = not rescan and bool(known or known_skips)
    for child in children:
        name = child.name
        path = os.path.join(parent, name)
        seen.add(path)
        if not compare:
            todo.append((name, None))
            continue
        try:
            st = child.stat(follow_symlinks=False)
        except OSError as exc:
            logger.warning("cannot stat %s: %s", path, exc)
            continue
        sig = signature(st)
        if known.get(path) == sig:
            run.unchanged += 1
            done += 1
            continue
        prior = known_skips.get(path)
        if prior is not None and prior[0] == sig:
            run.skip(Path(path), prior[1], prior[2])
            done += 1
            continue
        todo.append((name, st))
    # Path order: rows then land in the path-keyed indexes in order (fewer page splits).
    todo.sort(key=lambda c: c[0])
    if progress:
        progress(done, total)

    now = time.time()
    if workers > 1 and len(todo) >= PARALLEL_MIN and index_workers.can_fork():
        prepared = index_workers.prepare_parallel(parent, todo, info, now, workers)
    else:
        prepared = (entry_rows.prepare(os.path.join(parent, name), st, info, now) for name, st in todo)
    pending: list[Item] = []
    for item in prepared:
        pending.append(item)
        if len(pending) >= BATCH:
            write_batch(catalog, info, pending, run, known_skips)
            done += len(pending)
            pending = []
            if progress:
                progress(done, total)
    if pending:
        write_batch(catalog, info, pending, run, known_skips)
        done += len(pending)
    gone_entries = [p for p in known if p not in seen]
    gone_skips = [p for p in known_skips if p not in seen]
    if gone_entries or gone_skips:
        with catalog.transaction() as c:
            for p in gone_entries:
                run.removed += c.execute("DELETE FROM entries WHERE path = ?", (p,)).rowcount
                c.execute("DELETE FROM skipped WHERE owner = ?", (p,))
            for p in gone_skips:
                c.execute("DELETE FROM skipped WHERE path = ?", (p,))
    if progress:
        progress(done, total)
    return done
