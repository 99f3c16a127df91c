"""What the pool API returns: frozen dataclasses with `to_json()` that also read like dicts.

`ResultMixin` (defined once, here) makes a frozen dataclass a read-only Mapping of its
fields, so `stats["used_bytes"]`, `stats.get("path")` and `dict(stats)` keep working for
callers written against the dicts these replaced (and the spec's `pool.stats() -> dict`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Iterator

from infercache.units import format_size


def _plain(value: Any) -> Any:
    if isinstance(value, ResultMixin):
        return value.to_json()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return value.decode(errors="backslashreplace")
    return value


class ResultMixin(Mapping[str, Any]):
    """Read-only Mapping view of a frozen dataclass's fields; `to_json()` gives plain JSON types.

    Fields named in `_OMIT_NONE` are left out while None (e.g. per-policy details)."""

    _OMIT_NONE: ClassVar[tuple[str, ...]] = ()

    def _names(self) -> list[str]:
        omit = self._OMIT_NONE
        return [f.name for f in fields(self) if not (f.name in omit and getattr(self, f.name) is None)]  # type: ignore[arg-type]

    def __getitem__(self, key: str) -> Any:
        if key in self._names():
            return getattr(self, key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def to_json(self) -> dict[str, Any]:
        return {name: _plain(getattr(self, name)) for name in self._names()}


@dataclass(frozen=True)
class PoolStats(ResultMixin):
    """Sizes, use and counters of a pool (a superset of the keys the spec promises for `kv status`)."""

    _OMIT_NONE: ClassVar[tuple[str, ...]] = ("attached",)

    name: str
    tier: str
    path: str
    policy: str
    size_bytes: int
    used_bytes: int
    free_bytes: int
    utilization: float
    value_bytes: int
    entries: int
    capacity_entries: int
    block_size: int
    blocks: int
    free_blocks: int
    largest_free_bytes: int
    file_bytes: int
    hits: int
    misses: int
    hit_rate: float
    evictions: int
    expired: int
    puts: int
    bytes_in: int
    bytes_out: int
    repairs: int
    created: float
    layout_version: int
    pinned_entries: int = 0  # entries a live pin protects from eviction
    next_pin_deadline: float | None = None  # soonest time a timed pin stops protecting its entry
    attached: tuple[int, ...] | None = None  # pids mapping the pool (list_pools, `kv status`)


@dataclass(frozen=True)
class PoolError(ResultMixin):
    """A registered pool that could not be opened (a row of `list_pools`)."""

    name: str
    tier: str | None
    path: str
    error: str


@dataclass(frozen=True)
class EntryInfo(ResultMixin):
    """Metadata of one entry (`Pool.info`); `queue` and `freq` only under s3fifo."""

    _OMIT_NONE: ClassVar[tuple[str, ...]] = ("queue", "freq")

    key: str | bytes
    size: int
    blocks: int
    created: float
    last_access: float
    expires: float | None
    access_count: int
    priority: int
    pins: int  # live pins (0 once their deadline has passed)
    pin_deadline: float | None  # when the pins stop protecting the entry; None: never (or no pins)
    has_prefix: bool
    insert_tick: int  # the pool's logical clock: insertion / queue order
    access_tick: int  # ... and recency
    queue: str | None = None
    freq: int | None = None


@dataclass(frozen=True)
class PlannedEviction(ResultMixin):
    """One entry an eviction plan removes; `slot`/`stamp` tell whether it is still the same entry."""

    key: str | bytes
    size: int  # value bytes
    bytes: int  # block bytes freed
    slot: int
    stamp: int

    def to_json(self) -> dict[str, Any]:
        return {"key": _plain(self.key), "size": self.size, "bytes": self.bytes}


@dataclass(frozen=True)
class EvictionPlan(ResultMixin):
    """What `Pool.evict` would remove, in order, with the exact bytes; `Pool.execute_eviction` carries it out.

    `moves` are S3-FIFO queue moves made while ranking victims ((slot, stamp, flags)): applied with the plan."""

    pool: str
    mode: str  # "percent" | "bytes" | "expired"
    target_bytes: int
    victims: tuple[PlannedEviction, ...]
    moves: tuple[tuple[int, int, int], ...] = ()

    @property
    def bytes_freed(self) -> int:
        return sum(v.bytes for v in self.victims)

    def to_json(self) -> dict[str, Any]:
        return {
            "pool": self.pool, "mode": self.mode, "target_bytes": self.target_bytes, "count": len(self.victims),
            "bytes_freed": self.bytes_freed, "victims": [v.to_json() for v in self.victims],
        }  # fmt: skip

    def line(self) -> str:
        return (f"would evict {len(self.victims)} entries from {self.pool}, freeing "
                f"{format_size(self.bytes_freed)} ({self.bytes_freed} bytes)")  # fmt: skip


@dataclass(frozen=True)
class EvictionResult(ResultMixin):
    """What executing an eviction plan did (entries changed since planning are skipped)."""

    pool: str
    evicted: int
    bytes_freed: int
    skipped: int = 0

    def line(self) -> str:
        text = f"evicted {self.evicted} entries from {self.pool}, {format_size(self.bytes_freed)} freed"
        return text + (f"; {self.skipped} skipped (changed since planning)" if self.skipped else "")
