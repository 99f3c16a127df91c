"""Pruning kernel caches: plan first (a frozen value with the exact bytes it frees), execute second.

Strategies:

* ``ir`` (default): delete the intermediate files (``.ttir .ttgir .llir .source``,
  3.9's ``.glir``) and rewrite the group file to list only what remains (temp file +
  rename). Triton 3.9's loader misses when any listed child is missing, so this
  rewrite is what keeps every pruned kernel a cache hit (MCM's IR prune broke them).
* ``full``: delete whole entry directories.
* ``deduplicate``: entries whose metadata is identical apart from ``hash`` (same
  kernel compiled by another Triton install, or moved in its file): keep the newest.
* ``max_size``: ccache-like: delete least recently used entries (last access when
  tracked, else modification time) until the matching entries fit in the size.
* ``garbage``: stale ``tmp.pid_*`` leftovers, empty entry dirs and orphan files
  (stray files in a cache dir, files a group file does not list), once older than
  a few minutes (younger ones may belong to a compile in progress).

Safety: only paths inside cache roots recorded in the catalog are touched, never
through a symlink; an entry that changed between plan and execution is left alone;
the catalog is updated from the disk afterwards.
"""

from __future__ import annotations

import json
from collections import abc  # isinstance against abc, not typing: typing's check is slow
import logging
import os
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Container, Mapping

from infercache.errors import BadInputError, InfercacheError
from infercache.fsutil import atomic_write_bytes, is_within
from infercache.kernels.catalog import Catalog
from infercache.kernels.entry_rows import refresh_paths
from infercache.kernels.indexer import index
from infercache.kernels.query import KernelFilter, KernelRecord, metadata_of, query
from infercache.kernels.triton_entry import IR_TYPES, tree_size, group_children, group_file_bytes
from infercache.units import format_size

logger = logging.getLogger(__name__)

STRATEGIES = ("ir", "full", "deduplicate", "max_size", "garbage")
#: Leftovers younger than this may belong to a compile in progress.
GARBAGE_MIN_AGE_S = 600.0
GARBAGE_KINDS = ("garbage", "empty", "orphan")


@dataclass(frozen=True)
class PruneAction:
    """One change: remove IR files of an entry ("ir"), an entry dir ("dir") or a garbage path ("path")."""

    kind: str
    path: Path
    root: Path
    bytes: int
    reason: str
    key: str | None = None
    name: str | None = None
    files: tuple[str, ...] = ()
    keep: tuple[str, ...] = ()
    group_form: str = "absolute"  # "absolute" | "relative" | "list"
    owner: Path | None = None  # entry dir a garbage file lies in

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.kind,
            "path": str(self.path),
            "key": self.key,
            "name": self.name,
            "files": list(self.files),
            "bytes": self.bytes,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class PruneResult:
    """What execution did: bytes actually freed and what it left alone (with reasons)."""

    strategy: str
    entries_removed: int
    entries_pruned: int
    paths_removed: int
    bytes_freed: int
    skipped: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "entries_removed": self.entries_removed,
            "entries_pruned": self.entries_pruned,
            "paths_removed": self.paths_removed,
            "bytes_freed": self.bytes_freed,
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
        }

    def line(self) -> str:
        text = f"freed {format_size(self.bytes_freed)} ({self.bytes_freed} bytes): "
        if self.strategy == "ir":
            text += f"IR files removed from {self.entries_pruned} kernels"
        elif self.strategy == "garbage":
            text += f"{self.paths_removed} garbage paths removed"
        else:
            text += f"{self.entries_removed} kernels removed"
        if self.skipped:
            text += f"; {len(self.skipped)} left alone (changed or unsafe)"
        return text


@dataclass(frozen=True)
class PrunePlan:
    """What a prune would do; `execute` carries it out. Dry runs just print this."""

    strategy: str
    actions: tuple[PruneAction, ...]
    roots: tuple[Path, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def bytes_freed(self) -> int:
        return sum(a.bytes for a in self.actions)

    def to_json(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "actions": [a.to_json() for a in self.actions],
            "count": len(self.actions),
            "bytes_freed": self.bytes_freed,
            "roots": [str(r) for r in self.roots],
            "notes": list(self.notes),
        }

    def execute(self, catalog: Catalog) -> PruneResult:
        return execute_plan(self, catalog)


def plan_roots(catalog: Catalog, flt: KernelFilter, refresh: bool = True) -> tuple[Path, ...]:
    """The cache roots a plan may touch: those in scope, re-indexed (incrementally) first so the plan
    matches the disk; without `refresh`, every indexed root as the catalog has it."""
    if not refresh:
        return tuple(r for r, _ in catalog.roots())
    known = dict(catalog.roots())
    if flt.cache_dirs:
        scope = []
        for d in flt.cache_dirs:
            root = next((r for r in known if d == r or is_within(d, r)), None)
            scope.append((root or d, known.get(root or d, flt.mode or "auto")))
    else:
        scope = [(r, m) for r, m in known.items() if (flt.mode is None or m == flt.mode)]
    roots = []
    for root, mode in scope:
        if not root.is_dir():
            logger.warning("indexed cache dir %s no longer exists; skipping it", root)
            continue
        index(catalog, [root], mode=mode)
        roots.append(root)
    return tuple(roots)


def check_strategy(what: str, strategy: str, strategies: tuple[str, ...], max_size: int | None) -> None:
    """A known strategy, and max_size comes with a size (kernel and artifact prunes alike)."""
    if strategy not in strategies:
        raise BadInputError(f"unknown {what} strategy {strategy!r} (expected one of {', '.join(strategies)})")
    if strategy == "max_size" and (max_size is None or max_size < 0):
        raise BadInputError("--max-size needs a size, e.g. 10G")


def plan_prune(
    catalog: Catalog,
    flt: KernelFilter | None = None,
    strategy: str = "ir",
    *,
    max_size: int | None = None,
    garbage_min_age: float = GARBAGE_MIN_AGE_S,
    now: float | None = None,
    refresh: bool = True,
) -> PrunePlan:
    """Work out what a prune would delete and how many bytes that frees; changes nothing."""
    flt = flt or KernelFilter()
    now = time.time() if now is None else now
    check_strategy("prune", strategy, STRATEGIES, max_size)
    roots = plan_roots(catalog, flt, refresh)
    if strategy == "garbage":
        return _plan_garbage(catalog, flt, roots, garbage_min_age, now)
    root_set = {str(r) for r in roots}
    rows = [r for r in query(catalog, flt, sort="modified:asc", now=now)
            if r.cache_root_str in root_set and in_root(r.path_str, r.cache_root_str)]
    if strategy == "ir":
        actions = [a for a in (_plan_ir(catalog, r, roots) for r in rows) if a is not None]
        return PrunePlan("ir", tuple(actions), roots)
    if strategy == "full":
        return PrunePlan("full", tuple(_dir_action(r, roots, "full prune") for r in rows), roots)
    if strategy == "deduplicate":
        return _plan_dedup(catalog, rows, roots)
    return _plan_max_size(rows, roots, int(max_size or 0))


def _root_of(path: Path, roots: tuple[Path, ...]) -> Path | None:
    for root in roots:
        if path != root and is_within(path.parent, root):
            return root
    return None


def _dir_action(r: KernelRecord, roots: tuple[Path, ...], reason: str) -> PruneAction:
    # Rows were filtered to lie under one of `roots` (their indexed cache_root); execution
    # re-checks containment with symlinks resolved before deleting anything.
    return PruneAction("dir", r.path, r.cache_root, tree_size(r.path), reason, r.key, r.name)


def _plan_ir(catalog: Catalog, r: KernelRecord, roots: tuple[Path, ...]) -> PruneAction | None:
    if not any(t in IR_TYPES for t in r.files) or r.group_file is None:
        return None
    files = catalog.conn.execute("SELECT name, type, size FROM files WHERE entry_id = ?", (r.id,)).fetchall()
    remove = [(f["name"], f["size"]) for f in files if f["type"] in IR_TYPES]
    try:
        group_raw = r.group_file.read_bytes()
        group_json = json.loads(group_raw)
    except (OSError, ValueError) as exc:
        logger.warning("not pruning %s: cannot read its group file: %s", r.path, exc)
        return None
    children = group_children(group_json)
    removed_names = {n for n, _ in remove}
    keep = tuple(c for c in children if c not in removed_names)
    form = _group_form(group_json)
    new_bytes = _render_group(keep, r.path, form)
    freed = sum(size for _, size in remove) + len(group_raw) - len(new_bytes)
    return PruneAction(
        "ir", r.path, r.cache_root, freed, "IR files", r.key, r.name, tuple(sorted(removed_names)), keep, form
    )


def _group_form(group_json: Mapping[str, Any]) -> str:
    children = group_json.get("child_paths")
    if isinstance(children, list):
        return "list"
    if isinstance(children, abc.Mapping) and children and all(not os.path.isabs(str(v)) for v in children.values()):
        return "relative"
    return "absolute"


def _render_group(keep: tuple[str, ...], entry_dir: Path, form: str) -> bytes:
    """The rewritten group file, in the form it had (older Triton reads the list form)."""
    if form == "list":
        return json.dumps({"child_paths": sorted(keep)}).encode()
    return group_file_bytes(keep, None if form == "relative" else entry_dir)


def _plan_dedup(catalog: Catalog, rows: list[KernelRecord], roots: tuple[Path, ...]) -> PrunePlan:
    groups: dict[str, list[KernelRecord]] = {}
    for r in rows:
        groups.setdefault(r.dedup_key, []).append(r)
    actions = []
    for members in groups.values():
        if len(members) < 2:
            continue
        # The dedup key hashes the raw JSON; confirm with a real comparison before deleting.
        buckets: list[tuple[dict[str, Any], list[KernelRecord]]] = []
        for r in members:
            md = {k: v for k, v in metadata_of(catalog, r.id).items() if k != "hash"}
            for other_md, bucket in buckets:
                if other_md == md:
                    bucket.append(r)
                    break
            else:
                buckets.append((md, [r]))
        for _md, bucket in buckets:
            if len(bucket) < 2:
                continue
            bucket.sort(key=lambda r: (r.modified, r.last_used, r.key), reverse=True)
            newest = bucket[0]
            for r in bucket[1:]:
                actions.append(_dir_action(r, roots, f"duplicate of {newest.key}"))
    return PrunePlan("deduplicate", tuple(actions), roots)


def _plan_max_size(rows: list[KernelRecord], roots: tuple[Path, ...], max_size: int) -> PrunePlan:
    total = sum(r.total_size for r in rows)
    actions = []
    for r in sorted(rows, key=lambda r: (r.last_used, r.modified, r.key)):
        if total <= max_size:
            break
        actions.append(_dir_action(r, roots, "least recently used"))
        total -= r.total_size
    notes = (f"matching kernels after prune: {format_size(total)} (limit {format_size(max_size)})",)
    return PrunePlan("max_size", tuple(actions), roots, notes)


def _plan_garbage(
    catalog: Catalog, flt: KernelFilter, roots: tuple[Path, ...], min_age: float, now: float
) -> PrunePlan:
    if any(v is not None for v in (flt.name, flt.name_like, flt.backend, flt.arch, flt.older_than,
                                   flt.younger_than, flt.hits_lower, flt.hits_higher)):
        raise BadInputError("--garbage takes no kernel filters (only --cache-dir and --mode)")
    actions = []
    marks = ",".join("?" * len(GARBAGE_KINDS))
    for root in roots:
        rows = catalog.conn.execute(
            f"SELECT path, kind, reason, owner FROM skipped WHERE cache_root = ? AND kind IN ({marks}) ORDER BY path",
            (str(root), *GARBAGE_KINDS),
        ).fetchall()
        for row in rows:
            path = Path(row["path"])
            # A --cache-dir inside an indexed root (one vLLM rank) limits the leftovers to it.
            if flt.cache_dirs and not any(in_root(row["path"], str(d)) for d in flt.cache_dirs):
                continue
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISLNK(st.st_mode) or _root_of(path, (root,)) is None:
                continue
            if now - st.st_mtime < min_age:
                logger.info("keeping %s: younger than %ds (may be a compile in progress)", path, min_age)
                continue
            size = path_bytes(path, st)
            owner = Path(row["owner"]) if row["owner"] else None
            actions.append(PruneAction("path", path, root, size, f"{row['kind']}: {row['reason']}", owner=owner))
    return PrunePlan("garbage", tuple(actions), roots)


def path_bytes(path: Path, st: os.stat_result) -> int:
    """Bytes a file or a directory tree (`st`: its lstat) holds on disk; what deleting it frees."""
    return tree_size(path) if stat.S_ISDIR(st.st_mode) else st.st_size


def remove_path(path: Path) -> int:
    """Delete a file or a whole directory tree (a link itself, never its target); the bytes freed."""
    st = os.lstat(path)
    size = path_bytes(path, st)
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)
    return size


def in_root(path: str, root: str) -> bool:
    """`path` lies below the cache root `root` (a catalog row a plan may act on)."""
    return path.startswith(root.rstrip("/") + "/")


def refusal(action: PruneAction, known_roots: Container[Path]) -> str | None:
    """Why an action must not run now (its root is no longer indexed, or :func:`safe_target`'s reason)."""
    if action.root not in known_roots:
        return f"{action.root} is not an indexed cache dir"
    return safe_target(action.path, action.root)


def safe_target(path: Path, root: Path) -> str | None:
    """Why `path` must not be deleted, or None when it is safe (inside root, not a symlink)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "already gone"
    except OSError as exc:
        return str(exc)
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if path == root or not is_within(path.parent, root):
        return f"outside the cache root {root}"
    return None


def execute_plan(plan: PrunePlan, catalog: Catalog) -> PruneResult:
    """Carry out `plan`; entries that changed since planning are left alone and reported.

    Each action changes the disk and the catalog inside one write transaction, and the
    indexer re-checks every entry inside its own: a concurrent `index` can never write back
    a row for a directory this just deleted or changed.
    """
    known_roots = {r for r, _ in catalog.roots()}
    freed = removed = pruned = paths = 0
    skipped: list[tuple[str, str]] = []
    for action in plan.actions:
        with catalog.transaction() as conn:
            why = refusal(action, known_roots)
            if why:
                skipped.append((str(action.path), why))
                continue
            try:
                if action.kind == "ir":
                    got = _execute_ir(action)
                    if got is None:
                        skipped.append((str(action.path), "entry changed since the plan was made"))
                        continue
                    freed += got
                    pruned += 1
                elif action.kind == "dir":
                    freed += remove_path(action.path)
                    removed += 1
                else:
                    freed += remove_path(action.path)
                    paths += 1
                    conn.execute("DELETE FROM skipped WHERE path = ?", (str(action.path),))
            except OSError as exc:
                logger.warning("could not prune %s: %s", action.path, exc)
                skipped.append((str(action.path), str(exc)))
            refresh_paths(catalog, [action.owner or action.path])
    return PruneResult(plan.strategy, removed, pruned, paths, freed, tuple(skipped))


def _execute_ir(action: PruneAction) -> int | None:
    """Rewrite the group file (atomically) to list only what stays, then delete the IR files.

    Group first: if we are interrupted, the group never lists a missing file, so the
    entry stays a hit. Returns the bytes freed, or None if the entry changed.
    """
    group_path = next(action.path.glob("__grp__*.json"), None)
    if group_path is None:
        return None
    try:
        raw = group_path.read_bytes()
        children = group_children(json.loads(raw))
    except (OSError, ValueError):
        return None
    if set(children) != set(action.keep) | (set(action.files) & set(children)):
        return None
    sizes = {}
    for name in action.files:
        try:
            st = os.lstat(action.path / name)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            raise InfercacheError(f"refusing to delete non-regular file {action.path / name}")
        sizes[name] = st.st_size
    new = _render_group(action.keep, action.path, action.group_form)
    if new != raw:
        atomic_write_bytes(group_path, new)
    for name in sizes:
        os.unlink(action.path / name)
    return sum(sizes.values()) + len(raw) - len(new)
