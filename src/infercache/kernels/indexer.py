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
processes while this process writes (see `_prepare_parallel`).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from infercache.errors import BadInputError, InfercacheError
from infercache.kernels import inductor
from infercache.kernels.catalog import Catalog
from infercache.kernels.discovery import VllmInfo
from infercache.kernels.triton_entry import EntryScan, NotAKernel, scan

logger = logging.getLogger(__name__)

#: Kinds of non-kernels that deserve a warning (the rest is normal cache content).
PROBLEM_KINDS = frozenset({"unparsable", "truncated", "unreadable", "symlink"})
#: Entries written per transaction: short enough that other writers wait only briefly.
BATCH = 500
#: Entries to (re)read before worker processes pay off (a fork each, results shipped back).
PARALLEL_MIN = 1000
#: Entries per worker task: big enough to amortise the round trip, small enough to balance.
CHUNK = 125
#: Most parsing workers worth having: beyond this the single catalog writer is the bottleneck.
MAX_WORKERS = 4

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class SkipNote:
    """Something that was not indexed as a kernel, and why."""

    path: Path
    kind: str
    reason: str


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
        from infercache.units import format_size

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


def resolve_roots(cache_dirs: Sequence[str | os.PathLike[str]] | None, mode: str) -> list[Path]:
    """The cache dirs to index: the given ones (must exist), else the mode's defaults."""
    from infercache.kernels import discovery

    if cache_dirs:
        roots = []
        for d in cache_dirs:
            p = Path(d).expanduser()
            if not p.exists():
                raise BadInputError(f"cache directory does not exist: {p}")
            if not p.is_dir():
                raise BadInputError(f"not a directory: {p}")
            if not os.access(p, os.R_OK | os.X_OK):
                raise BadInputError(f"cache directory is not readable: {p}")
            roots.append(p.resolve())
        return list(dict.fromkeys(roots))
    defaults = discovery.default_cache_dirs(mode)
    found = [p for p in defaults if p.is_dir()]
    if not found:
        where = ", ".join(str(p) for p in defaults) or "the default locations"
        raise BadInputError(f"no cache directory found (looked in {where}); pass --cache-dir")
    return [p.resolve() for p in found]


class _Run:
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
    from infercache.kernels import discovery

    started = time.perf_counter()
    if mode not in ("auto", *discovery.MODES):
        raise BadInputError(f"unknown cache mode {mode!r} (expected auto, {', '.join(discovery.MODES)})")
    roots = resolve_roots(cache_dirs, mode)
    run = _Run()
    modes: list[str] = []
    # 1. Discover the Triton cache dirs and list their children (cheap: one lstat each).
    jobs: list[tuple[Any, list[os.DirEntry[str]]]] = []
    artifacts: list[Any] = []
    root_modes: dict[Path, str] = {}
    for root in roots:
        root_mode = discovery.detect_mode(root) if mode == "auto" else mode
        root_modes[root] = root_mode
        modes.append(root_mode)
        for item in discovery.discover(root, root_mode):
            if isinstance(item, discovery.TritonCacheDir):
                jobs.append((item, _list_children(item.path)))
            else:
                artifacts.append(item)
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


# A prepared item is what the catalog writer needs, made of plain values:
#   ("k", path, sig, entry_row, [(name, type, size)], [skipped-row extras] | None)   a kernel
#   ("s", path, sig, kind, reason, size, mtime)                               not a kernel
Item = tuple


def _prepare(path: str, st: os.stat_result | None, info: "_CacheDirInfo", now: float) -> Item:
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
            (p, parent, root, "garbage", "leftover of an interrupted write", _size_of(Path(p)), _mtime(Path(p)), "", path)
            for p in result.leftovers
        ] + [
            (os.path.join(path, name), parent, root, "orphan", "file not listed in the group file", size, mtime, "", path)
            for name, size, mtime in result.orphans
        ]
    return ("k", path, sig, entry_row(result, info, sig, now), result.files, extras)


def default_workers() -> int:
    """Parsing processes worth starting here: the CPUs this process may use, capped."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_WORKERS))


def _index_dir(
    catalog: Catalog,
    tcd: Any,
    children: list[os.DirEntry[str]],
    run: _Run,
    rescan: bool,
    progress: ProgressCallback | None,
    done: int,
    total: int,
    workers: int = 1,
) -> int:
    parent = str(tcd.path)
    info = _CacheDirInfo.of(tcd)
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
    if workers > 1 and len(todo) >= PARALLEL_MIN and _can_fork():
        prepared = _prepare_parallel(parent, todo, info, now, workers)
    else:
        prepared = (_prepare(os.path.join(parent, name), st, info, now) for name, st in todo)
    pending: list[Item] = []
    for item in prepared:
        pending.append(item)
        if len(pending) >= BATCH:
            _write(catalog, info, pending, run, known_skips)
            done += len(pending)
            pending = []
            if progress:
                progress(done, total)
    if pending:
        _write(catalog, info, pending, run, known_skips)
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


# --- parsing in worker processes -------------------------------------------------------------
# Why processes: parsing (a dozen syscalls and two JSON files per entry) is most of a first
# index and holds the GIL. Workers are forked, so they inherit the work list (no pickling of
# inputs) and return plain rows as one `marshal` blob per chunk (several times cheaper than
# pickling them). They never touch SQLite (a connection must not cross a fork): this process
# stays the only writer, with the same batches, re-checks and counters as the serial path.

_FORK_STATE: tuple[str, list[tuple[str, os.stat_result | None]], "_CacheDirInfo", float] | None = None


def _can_fork() -> bool:
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
    return marshal.dumps([_prepare(os.path.join(parent, name), st, info, now) for name, st in todo[lo:hi]])


def _prepare_parallel(
    parent: str, todo: list[tuple[str, os.stat_result | None]], info: "_CacheDirInfo", now: float, workers: int
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
        yield from (_prepare(os.path.join(parent, name), st, info, now) for name, st in todo)
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
            yield from (_prepare(os.path.join(parent, name), st, info, now) for name, st in todo)
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


_PARALLEL = threading.Lock()


_ENTRY_COLUMNS = (
    "path, parent, key, cache_root, mode, name, backend, arch, warp_size, num_warps, num_stages, num_ctas, "
    "shared, maxnreg, ptx_version, enable_fp_fusion, triton_version, hash, total_size, modified, files_json, "
    "group_file, dedup_key, vllm_hash, vllm_rank, vllm_prefix, signature, indexed_at, metadata"
)
_INSERT = f"INSERT INTO entries(id, {_ENTRY_COLUMNS}) VALUES ({','.join('?' * 30)})"
_UPSERT = (
    _INSERT + " ON CONFLICT(path) DO UPDATE SET "
    + ", ".join(f"{c.strip()} = excluded.{c.strip()}" for c in _ENTRY_COLUMNS.split(",")[1:])
)


def entry_row(entry: EntryScan, tcd: "_CacheDirInfo", sig: str, now: float) -> tuple[Any, ...]:
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
        entry.name,
        entry.backend,
        entry.arch,
        entry.warp_size,
        entry.num_warps,
        entry.num_stages,
        entry.num_ctas,
        entry.shared,
        maxnreg if isinstance(maxnreg, int) else None,
        entry.ptx_version,
        int(fp_fusion) if isinstance(fp_fusion, bool) else None,
        entry.triton_version,
        entry.hash,
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


def _write(
    catalog: Catalog,
    info: "_CacheDirInfo",
    pending: list[Item],
    run: _Run,
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
                run.removed += conn.execute("DELETE FROM entries WHERE path = ?", (item[1],)).rowcount
                conn.execute("DELETE FROM skipped WHERE path = ? OR owner = ?", (item[1], item[1]))
                continue
            except OSError:
                current.append(item)
                continue
            current.append(item if signature(st) == item[2] else _prepare(item[1], st, info, now))
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


def _size_of(path: Path) -> int:
    from infercache.kernels.triton_entry import _tree_size

    return _tree_size(path)


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
                c.execute("DELETE FROM entries WHERE path = ?", (path,))
                c.execute("DELETE FROM skipped WHERE path = ? OR owner = ?", (path, path))
            continue
        info = _CacheDirInfo.from_row(row)
        _write(catalog, info, [_prepare(path, st, info, time.time())], _Run(), [path])


@dataclass(frozen=True)
class _CacheDirInfo:
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
    def of(cls, tcd: Any) -> "_CacheDirInfo":
        """From discovery's TritonCacheDir (plain, picklable values for worker processes)."""
        v = tcd.vllm
        return cls(Path(tcd.path), tcd.mode, Path(tcd.cache_root), v)

    @classmethod
    def from_row(cls, row: Any) -> "_CacheDirInfo":
        vllm = VllmInfo(row["vllm_hash"], row["vllm_rank"], row["vllm_prefix"]) if row["vllm_hash"] is not None else None
        return cls(Path(row["parent"]), row["mode"], Path(row["cache_root"]), vllm)
