"""`kernels prune --artifacts`: shrink compile caches without turning a warm start into a compile.

What a warm ``torch.compile`` start needs (torch 2.13, ``_inductor/codecache.py``, and
proven by ``tests/kernels/test_artifacts_prune.py`` counting C++ builds in a fresh process):

* the FX graph entry (``fxgraph/``) and AOTAutograd entry: they hold the wrapper source;
* every compiled module (``.so``; on GPU the Triton kernels): Inductor's ``write()`` puts
  back a missing ``.py``/``.cpp`` from the source it holds, then loads the ``.so`` if
  present and builds only when it is missing.

So the default (``free``) strategy removes only what Inductor rewrites for free:
generated sources (``.py``, ``.cpp``, headers) of matching modules, and lock and temp
files older than a few minutes (younger ones may belong to a compile in progress).
``full`` removes whole matching artifacts (a later start compiles them again);
``max_size`` evicts least recently used kernels and artifacts of each cache dir
(last access, else modification time) until the dir fits.

Plans are values (exact bytes, computed from the disk), executed second; only paths
inside indexed cache roots are touched, never through a symlink; the catalog is
re-indexed from the disk afterwards.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from infercache.kernels import artifacts as A
from infercache.kernels.catalog import Catalog
from infercache.kernels.indexer import index
from infercache.kernels.prune import (GARBAGE_MIN_AGE_S, PruneAction, PrunePlan, PruneResult, check_strategy,
                                     in_root, path_bytes, plan_roots, refusal, remove_path)
from infercache.kernels.query import ArtifactRecord, KernelFilter, query, query_artifacts
from infercache.kernels.triton_entry import tree_size
from infercache.units import format_size

logger = logging.getLogger(__name__)

STRATEGIES = ("free", "full", "max_size")


@dataclass(frozen=True)
class ArtifactPrunePlan(PrunePlan):
    """A kernel prune plan's value and JSON, with artifact actions (their kind is the artifact's)."""

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        out["actions"] = [{**a.to_json(), "kind": a.name} for a in self.actions]
        return {"strategy": out.pop("strategy"), "artifacts": True, **out}

    def execute(self, catalog: Catalog) -> PruneResult:
        return execute_artifact_plan(self, catalog)


def _lsize(path: str) -> int | None:
    """Bytes of a regular file (None: gone, a link or not a file)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _artifact_dir(r: ArtifactRecord) -> str:
    """Where an artifact's `files` lie: its own dir, or (module, single file) the dir holding it."""
    if r.kind == "module" and not os.path.isdir(r.path):
        return os.path.dirname(r.path)
    return r.path if os.path.isdir(r.path) else os.path.dirname(r.path)


def _free_action(r: ArtifactRecord, root: Path) -> PruneAction | None:
    """Generated sources of a module that Inductor writes again before loading it (no compile)."""
    if r.kind != "module" or os.path.isdir(r.path):
        return None
    base = _artifact_dir(r)
    names, total = [], 0
    for name in sorted(r.files):
        if not A.regenerable(name):
            continue
        size = _lsize(os.path.join(base, name))
        if size is not None:
            names.append(name)
            total += size
    if not names:
        return None
    return PruneAction("files", Path(base), root, total, "generated source (Inductor rewrites it)", r.key, r.kind,
                       tuple(names))


def _whole_action(r: ArtifactRecord, root: Path, reason: str) -> PruneAction | None:
    if r.kind == "module" and not os.path.isdir(r.path):
        base = _artifact_dir(r)
        sizes = {n: _lsize(os.path.join(base, n)) for n in sorted(r.files)}
        names = tuple(n for n, s in sizes.items() if s is not None)
        if not names:
            return None
        return PruneAction("files", Path(base), root, sum(s or 0 for s in sizes.values()), reason, r.key, r.kind,
                           names)
    try:
        st = os.lstat(r.path)
    except OSError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return None
    size = path_bytes(Path(r.path), st)
    return PruneAction("dir" if stat.S_ISDIR(st.st_mode) else "path", Path(r.path), root, size, reason, r.key, r.kind)


def _noise_actions(catalog: Catalog, roots: Sequence[Path], min_age: float, now: float,
                   scope: Sequence[Path] = ()) -> list[PruneAction]:
    """Stale lock and temp files (classified by the scan, never artifacts); only those under `scope`
    (the --cache-dir given, which may lie inside an indexed root) when there is one."""
    actions = []
    for root in roots:
        rows = catalog.conn.execute(
            "SELECT path, kind FROM skipped WHERE cache_root = ? AND owner = 'artifacts' ORDER BY path", (str(root),)
        ).fetchall()
        for row in rows:
            if scope and not any(in_root(row["path"], str(d)) for d in scope):
                continue
            try:
                st = os.lstat(row["path"])
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode) or now - st.st_mtime < min_age:
                continue
            what = "stale lock file" if row["kind"] == "lock" else "temp file of an interrupted write"
            actions.append(PruneAction("path", Path(row["path"]), root, st.st_size, what, None, row["kind"]))
    return actions


def plan_artifact_prune(
    catalog: Catalog,
    flt: KernelFilter | None = None,
    strategy: str = "free",
    *,
    kinds: Sequence[str] | None = None,
    max_size: int | None = None,
    min_age: float = GARBAGE_MIN_AGE_S,
    now: float | None = None,
    refresh: bool = True,
) -> ArtifactPrunePlan:
    """Work out what an artifact prune would delete and the exact bytes; changes nothing."""
    flt = flt or KernelFilter()
    now = time.time() if now is None else now
    check_strategy("artifact prune", strategy, STRATEGIES, max_size)
    flt.check_for_artifacts()
    roots = plan_roots(catalog, flt, refresh)
    root_set = {str(r): r for r in roots}
    rows = [r for r in query_artifacts(catalog, flt, kinds=kinds, sort="modified:asc", now=now)
            if r.cache_root in root_set and in_root(r.path, r.cache_root)]
    actions: list[PruneAction] = []
    notes: list[str] = []
    if strategy == "free":
        actions = [a for a in (_free_action(r, root_set[r.cache_root]) for r in rows) if a is not None]
        if not kinds and flt.name is None and flt.name_like is None:
            actions += _noise_actions(catalog, roots, min_age, now, flt.cache_dirs)
        notes.append("kept everything a warm start needs (FX graph/AOTAutograd entries, compiled modules); "
                     "--full removes whole artifacts")
    elif strategy == "full":
        actions = [a for a in (_whole_action(r, root_set[r.cache_root], "full prune") for r in rows) if a is not None]
    else:
        actions, notes = _plan_max_size(catalog, flt, rows, root_set, int(max_size or 0), now)
    return ArtifactPrunePlan(strategy, tuple(actions), roots, tuple(notes))


def _plan_max_size(catalog: Catalog, flt: KernelFilter, rows: list[ArtifactRecord], roots: dict[str, Path],
                   max_size: int, now: float) -> tuple[list[PruneAction], list[str]]:
    """Per cache dir: least recently used kernels and artifacts go until the dir fits in `max_size`."""
    kernel_flt = KernelFilter(name=flt.name, name_like=flt.name_like, older_than=flt.older_than,
                              younger_than=flt.younger_than, cache_dirs=flt.cache_dirs, mode=flt.mode)
    items: dict[str, list[tuple[float, str, int, Any]]] = {root: [] for root in roots}
    for r in rows:
        items[r.cache_root].append((r.last_used, r.path, r.size, r))
    for k in query(catalog, kernel_flt, now=now):
        if k.cache_root_str in items:
            items[k.cache_root_str].append((k.last_used, k.path_str, k.total_size, k))
    actions: list[PruneAction] = []
    notes = []
    for root_s, members in items.items():
        total = sum(m[2] for m in members)
        for _used, path, size, item in sorted(members, key=lambda m: (m[0], m[1])):
            if total <= max_size:
                break
            if isinstance(item, ArtifactRecord):
                action = _whole_action(item, roots[root_s], "least recently used")
            else:
                action = PruneAction("dir", item.path, roots[root_s], tree_size(item.path), "least recently used",
                                     item.key, "kernel")
            if action is not None:
                actions.append(action)
            total -= size
        notes.append(f"{root_s}: {format_size(total)} of kernels and artifacts after prune "
                     f"(limit {format_size(max_size)})")
    return actions, notes


def execute_artifact_plan(plan: ArtifactPrunePlan, catalog: Catalog) -> PruneResult:
    """Carry out `plan`, then re-index the roots it touched so the catalog matches the disk."""
    known_roots = dict(catalog.roots())
    freed = removed = paths = 0
    skipped: list[tuple[str, str]] = []
    touched: set[Path] = set()
    for action in plan.actions:
        why = refusal(action, known_roots)
        if why:
            skipped.append((str(action.path), why))
            continue
        touched.add(action.root)
        try:
            if action.kind == "files":
                for name in action.files:
                    target = action.path / name
                    size = _lsize(str(target))
                    if size is None or "/" in name:
                        continue
                    os.unlink(target)
                    freed += size
                    paths += 1
                removed += 1
            elif action.kind == "dir":
                freed += remove_path(action.path)
                removed += 1
            else:
                size = _lsize(str(action.path))
                if size is None:
                    skipped.append((str(action.path), "not a regular file"))
                    continue
                os.unlink(action.path)
                freed += size
                paths += 1
        except OSError as exc:
            logger.warning("could not prune %s: %s", action.path, exc)
            skipped.append((str(action.path), str(exc)))
    for root in sorted(touched):
        index(catalog, [root], mode=known_roots[root])
    return PruneResult(plan.strategy, removed, 0, paths, freed, tuple(skipped))
