"""Catalog queries behind `kernels list` and `prune`: filters, sorting, limits.

Filters are validated up front (bad backend, duration or sort field →
BadInputError naming the value) and compiled to one SQL statement over indexed
columns, so a query over 10,000 kernels takes milliseconds. Fixes MCM's
defects: `rocm` is an alias of `hip`, any duration unit works, and a zero
duration (`--older-than 0d`) is a real filter, not "no filter".
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence, TypeVar

from infercache.errors import BadInputError
from infercache.gpu.targets import arch_name, normalize_backend
from infercache.kernels.catalog import Catalog
from infercache.kernels.discovery import VllmInfo, check_mode, check_root
from infercache.kernels.triton_entry import KERNEL_FIELD_TYPES, KERNEL_FIELDS
from infercache.units import parse_duration

R = TypeVar("R")

#: Sort field (CLI name) → SQL expression.
SORT_FIELDS: Mapping[str, str] = {
    "name": "e.name",
    "key": "e.key",
    "backend": "e.backend",
    "arch": "e.arch",
    "size": "e.total_size",
    "total_size": "e.total_size",
    "modified": "e.modified",
    "age": "e.modified",
    "hits": "coalesce(u.hits, 0)",
    "misses": "coalesce(u.misses, 0)",
    "last_access": "u.last_access",
    "num_warps": "e.num_warps",
    "warps": "e.num_warps",
    "num_stages": "e.num_stages",
    "triton_version": "e.triton_version",
    "version": "e.triton_version",
    "mode": "e.mode",
    "path": "e.path",
}


def normalise_backend(value: str | None) -> str | None:
    """'cuda' | 'hip' from user input ('rocm' is 'hip'); BadInputError otherwise; None for no filter."""
    return normalize_backend(value) if value and value.strip() else None


def normalise_arch(value: str | None) -> str | None:
    """'80', 'sm80', 'sm_80' → '80'; 'gfx90a' stays: the spelling entries are stored with."""
    return arch_name(value)


#: KernelFilter field → its SQL condition (one `?`), and whether the value is an age (seconds before now).
_CONDITIONS: tuple[tuple[str, str, bool], ...] = (
    ("name", "e.name = ?", False),
    ("name_like", "e.name GLOB ?", False),
    ("backend", "e.backend = ?", False),
    ("arch", "e.arch = ?", False),
    ("older_than", "e.modified < ?", True),
    ("younger_than", "e.modified > ?", True),
    ("hits_lower", "coalesce(u.hits, 0) < ?", False),
    ("hits_higher", "coalesce(u.hits, 0) > ?", False),
    ("mode", "e.mode = ?", False),
)


@dataclass(frozen=True)
class KernelFilter:
    """Which catalog entries a command applies to; None means "no condition"."""

    name: str | None = None
    name_like: str | None = None
    backend: str | None = None
    arch: str | None = None
    older_than: float | None = None  # seconds
    younger_than: float | None = None
    hits_lower: int | None = None  # hits < N
    hits_higher: int | None = None  # hits > N
    cache_dirs: tuple[Path, ...] = ()
    mode: str | None = None

    @classmethod
    def build(
        cls,
        *,
        name: str | None = None,
        name_like: str | None = None,
        backend: str | None = None,
        arch: str | None = None,
        older_than: str | float | None = None,
        younger_than: str | float | None = None,
        hits_lower: int | None = None,
        hits_higher: int | None = None,
        cache_dirs: Sequence[str | os.PathLike[str]] = (),
        mode: str | None = None,
    ) -> "KernelFilter":
        """Validate user input (strings from the CLI) into a filter."""
        if mode is not None:
            check_mode(mode)
        for label, n in (("--cache-hit-lower", hits_lower), ("--cache-hit-higher", hits_higher)):
            if n is not None and n < 0:
                raise BadInputError(f"{label} must not be negative: {n}")
        dirs = [check_root(d) for d in cache_dirs]
        return cls(
            name=name or None,
            name_like=name_like or None,
            backend=normalise_backend(backend),
            arch=normalise_arch(arch),
            older_than=None if older_than is None else parse_duration(older_than),
            younger_than=None if younger_than is None else parse_duration(younger_than),
            hits_lower=hits_lower,
            hits_higher=hits_higher,
            cache_dirs=tuple(dirs),
            mode=None if mode in (None, "auto") else mode,
        )

    def check_for_artifacts(self) -> None:
        """Artifacts have no backend, arch or hit counts: filtering them on one is a mistake, not an empty result."""
        if any(v is not None for v in (self.backend, self.arch, self.hits_lower, self.hits_higher)):
            raise BadInputError("--backend, --arch and hit filters apply to kernels, not to --artifacts")

    def where(self, now: float | None = None) -> tuple[str, list[Any]]:
        """SQL condition (over `entries e LEFT JOIN usage u`) and its parameters."""
        now = time.time() if now is None else now
        clauses: list[str] = []
        params: list[Any] = []
        for attr, condition, is_age in _CONDITIONS:
            value = getattr(self, attr)
            if value is not None:
                clauses.append(condition)
                params.append(now - value if is_age else value)
        if self.cache_dirs:
            ors = []
            for d in self.cache_dirs:
                prefix = str(d).rstrip("/") + "/"
                ors.append("(e.cache_root = ? OR substr(e.path, 1, ?) = ?)")
                params.extend([str(d), len(prefix), prefix])
            clauses.append("(" + " OR ".join(ors) + ")")
        return (" AND ".join(clauses) or "1"), params


def parse_sort(spec: str | None, fields: Mapping[str, str] | None = None, what: str = "") -> tuple[str, bool]:
    """'size:desc' → ('e.total_size', True) over `fields` (default SORT_FIELDS, sorted by name when
    `spec` is empty); BadInputError for unknown fields or orders (`what` names the listing)."""
    fields = SORT_FIELDS if fields is None else fields
    if not spec:
        return fields["name"], False
    field, _, order = spec.partition(":")
    field = field.strip().lower()
    if field not in fields:
        raise BadInputError(f"unknown sort field {field!r}{what} (expected one of {', '.join(sorted(fields))})")
    order = order.strip().lower() or "asc"
    if order not in ("asc", "desc"):
        raise BadInputError(f"unknown sort order {order!r} in {spec!r} (expected asc or desc)")
    return fields[field], order == "desc"


def iso(ts: float | None) -> str | None:
    """ISO-8601 UTC with a Z (None stays None)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat().replace("+00:00", "Z")


#: A `list` row: (field, SQL expression over `entries e LEFT JOIN usage u`), in KernelRecord's order.
_ROW: tuple[tuple[str, Any, str], ...] = (
    ("id", int, "e.id"),
    ("key", str, "e.key"),
    *((name, kind, f"e.{name}") for name, kind in KERNEL_FIELD_TYPES),
    ("mode", str, "e.mode"),
    ("path_str", str, "e.path"),
    ("cache_root_str", str, "e.cache_root"),
    ("total_size", int, "e.total_size"),
    ("files_json", str, "e.files_json"),
    ("modified", float, "e.modified"),
    ("hits", int, "coalesce(u.hits, 0)"),
    ("misses", int, "coalesce(u.misses, 0)"),
    ("last_access", float | None, "u.last_access"),
    ("vllm_hash", str | None, "e.vllm_hash"),
    ("vllm_rank", str | None, "e.vllm_rank"),
    ("vllm_prefix", str | None, "e.vllm_prefix"),
    ("group_file_str", str | None, "e.group_file"),
    ("dedup_key", str, "e.dedup_key"),
)
#: Where the kernel fields stand in a KernelRecord (after id and key).
_RECORD_KERNEL_FIELDS = slice(2, 2 + len(KERNEL_FIELDS))


class _Listed:
    """What kernel and artifact rows share: files by type (a JSON column) and the time prune's LRU goes by."""

    __slots__ = ()
    files_json: str | None
    last_access: float | None
    modified: float

    @property
    def files(self) -> dict[str, int]:
        """Bytes per file type."""
        return json.loads(self.files_json) if self.files_json else {}

    @property
    def last_used(self) -> float:
        """Last access when tracked, else modification time (LRU order for --max-size)."""
        return self.last_access if self.last_access is not None else self.modified


class KernelRecord(NamedTuple("_KernelRow", [(name, kind) for name, kind, _sql in _ROW]), _Listed):  # type: ignore[misc]
    """One catalog row as `list` shows it (raw numbers; `to_json` gives the spec's shape).

    Immutable, and a NamedTuple rather than a dataclass on purpose: it is built straight from
    the SQLite row tuple (`_make`), so `list` on 10,000 kernels spends no Python per field;
    paths, files and vLLM info are converted on access. Fields: id, key, the kernel fields
    (triton_entry.KERNEL_FIELDS), then mode, paths, sizes, usage and vLLM info (see `_ROW`).
    """

    __slots__ = ()

    @property
    def path(self) -> Path:
        return Path(self.path_str)

    @property
    def cache_root(self) -> Path:
        return Path(self.cache_root_str)

    @property
    def vllm(self) -> dict[str, str | None] | None:
        return VllmInfo(self.vllm_hash, self.vllm_rank, self.vllm_prefix).to_json()

    @property
    def group_file(self) -> Path | None:
        return Path(self.group_file_str) if self.group_file_str else None

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            **dict(zip(KERNEL_FIELDS, self[_RECORD_KERNEL_FIELDS])),
            "mode": self.mode,
            "path": self.path_str,
            "cache_root": self.cache_root_str,
            "total_size": self.total_size,
            "files": self.files,
            "modified": iso(self.modified),
            "hits": self.hits,
            "misses": self.misses,
            "last_access": iso(self.last_access),
            "vllm": self.vllm,
        }


_SELECT = f"SELECT {', '.join(sql for _n, _k, sql in _ROW)} FROM entries e LEFT JOIN usage u ON u.key = e.key"


def query(
    catalog: Catalog,
    flt: KernelFilter | None = None,
    sort: str | None = None,
    limit: int | None = None,
    now: float | None = None,
) -> list[KernelRecord]:
    """Entries matching `flt`, sorted (`FIELD[:asc|desc]`, default name) and limited."""
    flt = flt or KernelFilter()
    expr, desc = parse_sort(sort)
    where, params = flt.where(now)
    direction = "DESC" if desc else "ASC"
    sql = f"{_SELECT} WHERE {where} ORDER BY {expr} {direction} NULLS LAST, e.path ASC"
    return _fetch(catalog, sql, params, limit, KernelRecord._make)


def _fetch(catalog: Catalog, sql: str, params: list[Any], limit: int | None, make: Callable[[Any], R]) -> list[R]:
    """A listing's rows as records (`LIMIT` when given: a negative one is bad input), built from
    plain tuples with no Python per field."""
    if limit is not None:
        if limit < 0:
            raise BadInputError(f"--limit must not be negative: {limit}")
        sql += " LIMIT ?"
        params = [*params, limit]
    cursor = catalog.conn.cursor()
    cursor.row_factory = None
    return [make(r) for r in cursor.execute(sql, params)]


def metadata_of(catalog: Catalog, entry_id: int) -> dict[str, Any]:
    """The full metadata JSON of one entry (kept out of `query` for speed)."""
    row = catalog.conn.execute("SELECT metadata FROM entries WHERE id = ?", (entry_id,)).fetchone()
    return json.loads(row[0]) if row else {}


ARTIFACT_KINDS: tuple[str, ...] = ("fxgraph", "aotautograd", "module", "autotune", "vllm-artifact", "vllm-graph",
                                   "aot-model")
#: Sort field (CLI name) → SQL expression, for `list --artifacts`.
ARTIFACT_SORT_FIELDS: Mapping[str, str] = {
    "kind": "e.kind", "key": "e.key", "name": "e.key", "size": "e.size", "total_size": "e.size",
    "modified": "e.modified", "age": "e.modified", "last_access": "e.last_access", "path": "e.path",
    "mode": "e.mode", "torch_version": "e.torch_version", "version": "e.torch_version",
}


def normalise_kinds(kinds: Sequence[str] | None) -> tuple[str, ...]:
    """Validated artifact kinds (BadInputError names the bad one); empty means all."""
    out = []
    for kind in kinds or ():
        k = kind.strip().lower()
        if k not in ARTIFACT_KINDS:
            raise BadInputError(f"unknown artifact kind {kind!r} (expected one of {', '.join(ARTIFACT_KINDS)})")
        out.append(k)
    return tuple(dict.fromkeys(out))


class _ArtifactRow(NamedTuple):
    path: str
    cache_root: str
    kind: str
    size: int
    modified: float
    vllm_hash: str | None
    vllm_rank: str | None
    vllm_prefix: str | None
    key: str | None
    mode: str | None
    files_json: str | None
    last_access: float | None
    torch_version: str | None


class ArtifactRecord(_ArtifactRow, _Listed):
    """One compile-cache artifact row as `list --artifacts` shows it (spec shape from `to_json`)."""

    __slots__ = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "key": self.key or os.path.basename(self.path),
            "path": self.path,
            "cache_root": self.cache_root,
            "mode": self.mode,
            "size": self.size,
            "files": self.files,
            "modified": iso(self.modified),
            "last_access": iso(self.last_access),
            "torch_version": self.torch_version,
            "vllm": VllmInfo(self.vllm_hash, self.vllm_rank, self.vllm_prefix).to_json(),
        }


def query_artifacts(
    catalog: Catalog,
    flt: KernelFilter | None = None,
    limit: int | None = None,
    *,
    kinds: Sequence[str] | None = None,
    sort: str | None = None,
    now: float | None = None,
) -> list[ArtifactRecord]:
    """Artifacts matching the cache-dir, mode, age and name (= key) parts of `flt` and `kinds`.

    Default order: newest first; `sort` takes `FIELD[:asc|desc]` over ARTIFACT_SORT_FIELDS.
    """
    flt = flt or KernelFilter()
    where, params = KernelFilter(cache_dirs=flt.cache_dirs, older_than=flt.older_than,
                                 younger_than=flt.younger_than, mode=flt.mode).where(now)
    if flt.name is not None:
        where += " AND e.key = ?"
        params.append(flt.name)
    if flt.name_like is not None:
        where += " AND e.key GLOB ?"
        params.append(flt.name_like)
    wanted = normalise_kinds(kinds)
    if wanted:
        where += f" AND e.kind IN ({','.join('?' * len(wanted))})"
        params.extend(wanted)
    order = "e.modified DESC, e.path"
    if sort:
        expr, desc = parse_sort(sort, ARTIFACT_SORT_FIELDS, " for artifacts")
        order = f"{expr} {'DESC' if desc else 'ASC'} NULLS LAST, e.path"
    columns = ", ".join(f"e.{name}" for name in ArtifactRecord._fields)
    sql = f"SELECT {columns} FROM artifacts e WHERE {where} ORDER BY {order}"
    return _fetch(catalog, sql, params, limit, ArtifactRecord._make)
