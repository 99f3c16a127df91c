"""`kernels stats`: what the catalog holds, grouped, plus hit counters (like `ccache -s`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from infercache.gpu.compat import installed_triton_version
from infercache.kernels.catalog import Catalog
from infercache.kernels.query import KernelFilter, iso
from infercache.kernels.triton_entry import IR_TYPES


@dataclass(frozen=True)
class Group:
    """Entries and bytes of one group (a backend, an arch...)."""

    entries: int
    total_size: int

    def to_json(self) -> dict[str, int]:
        return {"entries": self.entries, "total_size": self.total_size}


#: How many kernels `stats` lists by hits.
TOP_KERNELS = 10


def compute_hit_rate(hits: int, misses: int) -> float | None:
    """The share of lookups that hit; None before the first lookup (not 0: nothing was missed either)."""
    total = hits + misses
    return hits / total if total else None


@dataclass(frozen=True)
class KernelHits:
    """One kernel's runtime counters (a `top_kernels` row)."""

    key: str
    name: str
    backend: str
    arch: str
    hits: int
    misses: int
    last_access: float | None
    compile_time_s: float | None
    total_size: int

    @property
    def hit_rate(self) -> float | None:
        return compute_hit_rate(self.hits, self.misses)

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "name": self.name, "backend": self.backend, "arch": self.arch, "hits": self.hits,
                "misses": self.misses, "hit_rate": self.hit_rate, "last_access": iso(self.last_access),
                "compile_time_s": self.compile_time_s, "total_size": self.total_size}


def zero_counters(catalog: Catalog, flt: KernelFilter | None = None) -> int:
    """`stats --zero` (like `ccache -z`): reset hits/misses of the kernels `flt` selects; all without one.

    Counts of kernels not indexed yet are reset too when nothing restricts the selection.
    """
    flt = flt or KernelFilter()
    where, params = flt.where()
    if where == "1":
        return catalog.zero_usage(None)
    keys = sorted({r[0] for r in catalog.conn.execute(
        f"SELECT DISTINCT e.key FROM entries e LEFT JOIN usage u ON u.key = e.key WHERE {where}", params)})
    return catalog.zero_usage(keys)


def stats_then_zero(catalog: Catalog, flt: KernelFilter | None = None, top: int = TOP_KERNELS) -> "CacheStats":
    """`stats --zero`: the counters as they stand, then reset, in one write transaction.

    Why one: a tracker flushing between the read and the reset would have its hits reset
    without ever being shown; inside the transaction it waits and lands after the reset.
    """
    with catalog.transaction():
        stats = compute_stats(catalog, flt, top)
        zero_counters(catalog, flt)
    return stats


@dataclass(frozen=True)
class CacheStats:
    entries: int
    total_size: int
    by_backend: Mapping[str, Group]
    by_arch: Mapping[str, Group]
    by_triton_version: Mapping[str, Group]
    by_mode: Mapping[str, Group]
    by_file_type: Mapping[str, int]
    reclaimable_ir_bytes: int
    hits: int
    misses: int
    cache_dirs: tuple[str, ...]
    skipped: Mapping[str, Group]
    artifacts: Group
    installed_triton_version: str | None = None
    top_kernels: tuple[KernelHits, ...] = ()
    never_hit: Group = Group(0, 0)
    artifacts_by_kind: Mapping[str, Group] = field(default_factory=dict)

    @property
    def other_triton_entries(self) -> int:
        """Kernels compiled by a Triton other than the installed one: they can never hit here."""
        if self.installed_triton_version is None:
            return 0
        return sum(g.entries for v, g in self.by_triton_version.items() if v != self.installed_triton_version)

    @property
    def hit_rate(self) -> float | None:
        return compute_hit_rate(self.hits, self.misses)

    def to_json(self) -> dict[str, Any]:
        return {
            "entries": self.entries,
            "total_size": self.total_size,
            "by_backend": {k: v.to_json() for k, v in self.by_backend.items()},
            "by_arch": {k: v.to_json() for k, v in self.by_arch.items()},
            "by_triton_version": {k: v.to_json() for k, v in self.by_triton_version.items()},
            "by_mode": {k: v.to_json() for k, v in self.by_mode.items()},
            "by_file_type": dict(self.by_file_type),
            "reclaimable_ir_bytes": self.reclaimable_ir_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hit_rate,
            "top_kernels": [k.to_json() for k in self.top_kernels],
            "never_hit": self.never_hit.to_json(),
            "cache_dirs": list(self.cache_dirs),
            "skipped": {k: v.to_json() for k, v in self.skipped.items()},
            "artifacts": self.artifacts.to_json(),
            "artifacts_by_kind": {k: v.to_json() for k, v in self.artifacts_by_kind.items()},
            "installed_triton_version": self.installed_triton_version,
            "other_triton_entries": self.other_triton_entries,
        }


def compute_stats(catalog: Catalog, flt: KernelFilter | None = None, top: int = TOP_KERNELS) -> CacheStats:
    """Aggregate the catalog (optionally restricted by `flt`, e.g. to one cache dir) in SQL."""
    flt = flt or KernelFilter()
    where, params = flt.where()
    base = f"FROM entries e LEFT JOIN usage u ON u.key = e.key WHERE {where}"
    conn = catalog.conn

    def grouped(column: str) -> dict[str, Group]:
        rows = conn.execute(
            f"SELECT coalesce({column}, 'unknown'), count(*), coalesce(sum(e.total_size), 0) {base} "
            f"GROUP BY 1 ORDER BY 3 DESC, 1",
            params,
        )
        return {str(r[0]): Group(r[1], r[2]) for r in rows}

    entries, total = conn.execute(f"SELECT count(*), coalesce(sum(e.total_size), 0) {base}", params).fetchone()
    # Usage is one row per key, and copies of a kernel (TP ranks, two cache dirs) share their key:
    # count each selected key's row once, not once per copy.
    hits, misses = conn.execute(
        f"SELECT coalesce(sum(hits), 0), coalesce(sum(misses), 0) FROM usage WHERE key IN (SELECT e.key {base})",
        params,
    ).fetchone()
    by_file_type = {
        r[0]: r[1]
        for r in conn.execute(
            f"SELECT f.type, sum(f.size) FROM files f WHERE f.entry_id IN (SELECT e.id {base}) GROUP BY 1 ORDER BY 2 DESC",
            params,
        )
    }
    roots = tuple(r[0] for r in conn.execute(f"SELECT DISTINCT e.cache_root {base} ORDER BY 1", params))
    # Non-kernels and artifacts are per cache dir, so only the cache-dir part of the filter applies.
    dir_where, dir_params = KernelFilter(cache_dirs=flt.cache_dirs).where()
    dir_where = dir_where.replace("e.", "s.")
    skipped = {
        r[0]: Group(r[1], r[2])
        for r in conn.execute(
            f"SELECT s.kind, count(*), coalesce(sum(s.size), 0) FROM skipped s WHERE {dir_where} GROUP BY 1 ORDER BY 1",
            dir_params,
        )
    }
    art = conn.execute(
        f"SELECT count(*), coalesce(sum(s.size), 0) FROM artifacts s WHERE {dir_where}", dir_params
    ).fetchone()
    by_kind = {
        r[0]: Group(r[1], r[2])
        for r in conn.execute(
            f"SELECT s.kind, count(*), coalesce(sum(s.size), 0) FROM artifacts s WHERE {dir_where} GROUP BY 1 ORDER BY 1",
            dir_params,
        )
    }
    top_kernels = tuple(
        KernelHits(*r)
        for r in conn.execute(
            f"SELECT e.key, min(e.name), min(e.backend), min(e.arch), u.hits, u.misses, u.last_access, "
            f"u.compile_time_s, max(e.total_size) {base} AND u.hits > 0 GROUP BY e.key "
            f"ORDER BY u.hits DESC, 2, e.key LIMIT ?",
            [*params, top],
        )
    )
    never = conn.execute(
        f"SELECT count(*), coalesce(sum(e.total_size), 0) {base} AND coalesce(u.hits, 0) = 0", params
    ).fetchone()
    return CacheStats(
        entries=entries,
        total_size=total,
        by_backend=grouped("e.backend"),
        by_arch=grouped("e.arch"),
        by_triton_version=grouped("e.triton_version"),
        by_mode=grouped("e.mode"),
        by_file_type=by_file_type,
        reclaimable_ir_bytes=sum(v for k, v in by_file_type.items() if k in IR_TYPES),
        hits=hits,
        misses=misses,
        top_kernels=top_kernels,
        never_hit=Group(never[0], never[1]),
        cache_dirs=roots,
        skipped=skipped,
        artifacts=Group(art[0], art[1]),
        installed_triton_version=installed_triton_version(),
        artifacts_by_kind=by_kind,
    )

