"""Eviction policies as data: each is one `Policy` entry in `REGISTRY` (as in python-diskcache).

A policy says which published, unpinned entries (pins past their deadline count as none) go first when space is needed:
- `order_key`: numpy sort keys (np.lexsort order, primary key last) over the candidates'
  record fields (FIELDS); or, for a policy with queues of its own, `victims`, a generator;
- hooks: `on_insert` (extra F_* flags for a new entry), `on_access` (a read) and
  `on_evict` (an entry leaves): called by the pool, all under its lock.
Adding a policy is adding one entry below (its `id` is stored in pool headers: never reuse one).

Victim order is computed with numpy over the entry table (one record per value, far fewer
than blocks) and consumed lazily until the request fits: a partial sort (lazy_order) keeps
a put into a full pool at O(entries) vectorised work. For every policy, entries whose TTL
has passed go first (soonest expiry first): an expired entry is already a miss.

S3-FIFO (Yang et al., SOSP'23) keeps its state in the records (a "main queue" flag, a 2-bit
frequency, the queue tick) and in a ghost ring of key hashes in the mapping (`GhostRing`).
An entry in the small queue that was read at least once since insertion moves to the main
queue instead of being evicted; the main queue gives entries with frequency > 0 another
round (frequency - 1). The small queue is targeted while it holds >= 10% of the blocks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

from infercache.kv.layout import F_S3_FREQ_MASK, F_S3_FREQ_SHIFT, F_S3_MAIN, HDR_GHOST_POS, ST_PUBLISHED
from infercache.kv.table import EntryTable

if TYPE_CHECKING:
    import numpy as np

FIELDS = ("expiry", "atick", "itick", "count", "priority", "flags", "nblocks")
S3_SMALL_RATIO = 0.10
_BATCH = 16
Fields = dict[str, "np.ndarray"]


class GhostRing:
    """S3-FIFO's ghost queue: the hashes of keys recently evicted from the small queue."""

    __slots__ = ("_ring", "_hq")

    def __init__(self, ring: memoryview, header: memoryview) -> None:
        self._ring = ring  # uint64 view in the mapping
        self._hq = header  # uint64 view of the header (the write position)

    def push(self, key_hash: int) -> None:
        pos = self._hq[HDR_GHOST_POS]
        self._ring[pos % len(self._ring)] = key_hash
        self._hq[HDR_GHOST_POS] = pos + 1

    def take(self, key_hash: int) -> bool:
        """True (and forget it) when `key_hash` is in the ring."""
        import numpy as np

        ring = np.frombuffer(self._ring, dtype=np.uint64)
        hit = np.flatnonzero(ring == np.uint64(key_hash))
        if len(hit):
            ring[hit] = 0
            return True
        return False

    def release(self) -> None:
        self._ring.release()


class PolicyContext(Protocol):
    """What a policy may use of a pool (all under its lock)."""

    table: EntryTable
    ghost: GhostRing
    n_blocks: int

    def rows(self) -> "np.ndarray": ...

    def tick(self) -> int: ...


class Queues(Protocol):
    """How a victim generator reads and moves entries between queues (real or planned)."""

    def flags(self, slot: int) -> int: ...

    def move(self, slot: int, flags: int) -> None: ...


class TableQueues:
    """Queue moves written to the entry table (a real eviction)."""

    def __init__(self, ctx: PolicyContext) -> None:
        self._table = ctx.table
        self._tick = ctx.tick

    def flags(self, slot: int) -> int:
        return self._table.flags(slot)

    def move(self, slot: int, flags: int) -> None:
        self._table.requeue(slot, flags, self._tick())


class PlannedQueues:
    """Queue moves kept aside (a dry run); `moves` lists them for the plan's execution."""

    def __init__(self, table: EntryTable) -> None:
        self._table = table
        self._overlay: dict[int, int] = {}
        self.moves: list[tuple[int, int]] = []

    def flags(self, slot: int) -> int:
        return self._overlay.get(slot, self._table.flags(slot))

    def move(self, slot: int, flags: int) -> None:
        self._overlay[slot] = flags
        self.moves.append((slot, flags))


@dataclass(frozen=True)
class Policy:
    id: int
    name: str
    description: str
    order_key: Callable[[Fields], tuple[Any, ...]] | None = None
    victims: Callable[..., Iterator[int]] | None = None  # (candidates, their slots, ctx, queues, ...)
    on_insert: Callable[[PolicyContext, int], int] | None = None
    on_access: Callable[[EntryTable, int], None] | None = None
    on_evict: Callable[[PolicyContext, int], None] | None = None
    describe: Callable[[int], dict[str, Any]] | None = None  # F_* flags -> extra `Pool.info` fields


def lazy_order(positions: "np.ndarray", keys: tuple["np.ndarray", ...]) -> Iterator[int]:
    """Yield `positions` in np.lexsort order of `keys` (primary key last), sorting lazily.

    Eviction usually needs one or a few victims, so instead of sorting every candidate on
    each put (O(n log n) per put on a full pool), each round partitions on the primary key
    and sorts only the candidates at or below the 16th smallest value: O(n) per round, exact
    (everything left out has a strictly larger primary key).
    """
    import numpy as np

    while len(positions):
        if len(positions) <= 4 * _BATCH:
            yield from positions[np.lexsort(keys)].tolist()
            return
        primary = keys[-1]
        kth = np.partition(primary, _BATCH)[_BATCH]
        sel = primary <= kth
        chosen = np.flatnonzero(sel)
        sub_keys = tuple(k[chosen] for k in keys)
        yield from positions[chosen][np.lexsort(sub_keys)].tolist()
        rest = ~sel
        positions = positions[rest]
        keys = tuple(k[rest] for k in keys)


def _expired_first(fields: Fields, now: float) -> tuple["np.ndarray", "np.ndarray"]:
    """(expired positions by expiry, the other positions)."""
    import numpy as np

    expiry = fields["expiry"]
    expired = (expiry > 0) & (expiry <= now)
    first = np.flatnonzero(expired)
    first = first[np.argsort(expiry[first], kind="stable")]
    return first, np.flatnonzero(~expired)


def victims(policy: Policy, ctx: PolicyContext, now: float, queues: Queues) -> Iterator[int]:
    """Evictable entry slots (published, no live pin) in `policy`'s order, expired ones first."""
    import numpy as np

    rows = ctx.rows()
    published = EntryTable.states(rows) == ST_PUBLISHED
    slots = np.flatnonzero(published & EntryTable.unpinned(rows, now))  # pins past their deadline count as none
    cand = {name: rows[name][slots] for name in FIELDS}  # only the fields the policies use
    first, rest = _expired_first(cand, now)
    if policy.victims is not None:
        yield from policy.victims(cand, slots, ctx, queues, first, rest, rows, published)
        return
    assert policy.order_key is not None
    yield from slots[first].tolist()
    for pos in lazy_order(rest, tuple(k[rest] for k in policy.order_key(cand))):
        yield int(slots[pos])


# ---------------------------------------------------------------- S3-FIFO
def _freq(flags: int) -> int:
    return (flags & F_S3_FREQ_MASK) >> F_S3_FREQ_SHIFT


def _s3_on_insert(ctx: PolicyContext, key_hash: int) -> int:
    """A key evicted recently from the small queue (in the ghost ring) comes back into main."""
    return F_S3_MAIN if ctx.ghost.take(key_hash) else 0


def _s3_on_access(table: EntryTable, e: int) -> None:
    flags = table.flags(e)
    table.set_flags(e, (flags & ~F_S3_FREQ_MASK) | min(3, _freq(flags) + 1) << F_S3_FREQ_SHIFT)


def _s3_describe(flags: int) -> dict[str, Any]:
    return {"queue": "main" if flags & F_S3_MAIN else "small", "freq": _freq(flags)}


def _s3_on_evict(ctx: PolicyContext, e: int) -> None:
    if not ctx.table.flags(e) & F_S3_MAIN:
        ctx.ghost.push(ctx.table.hash(e))


def _s3_victims(
    fields: Fields, slots: "np.ndarray", ctx: PolicyContext, queues: Queues, first: "np.ndarray",
    rest: "np.ndarray", rows: "np.ndarray", published: "np.ndarray",
) -> Iterator[int]:  # fmt: skip
    """Entry slots to evict, in S3-FIFO order; moves entries between queues (`queues`) as it goes.

    A moved entry goes to the tail of its queue, after every entry already there, so a
    queue is: the old entries by tick, then the moved ones.
    """
    small_blocks = int(rows["nblocks"][published & ((rows["flags"] & F_S3_MAIN) == 0)].sum())
    nblocks = fields["nblocks"]
    for pos in first.tolist():
        slot = int(slots[pos])
        if not queues.flags(slot) & F_S3_MAIN:
            small_blocks -= int(nblocks[pos])
        yield slot
    main = (fields["flags"][rest] & F_S3_MAIN).astype(bool)
    small_pos, main_pos = rest[~main], rest[main]
    small_iter = lazy_order(small_pos, (fields["itick"][small_pos],))
    main_old = lazy_order(main_pos, (fields["itick"][main_pos],))
    main_new: deque[tuple[int, int]] = deque()
    n_small, n_main = len(small_pos), len(main_pos)
    threshold = S3_SMALL_RATIO * ctx.n_blocks

    def pop_main() -> tuple[int, int]:
        pos = next(main_old, None)
        if pos is None:
            return main_new.popleft()
        return int(slots[pos]), int(nblocks[pos])

    while n_small or n_main:
        if n_small and (small_blocks >= threshold or not n_main):
            pos = next(small_iter)
            n_small -= 1
            slot, nb = int(slots[pos]), int(nblocks[pos])
            flags = queues.flags(slot)
            small_blocks -= nb
            if _freq(flags) >= 1:  # read while on probation: keep it
                queues.move(slot, (flags | F_S3_MAIN) & ~F_S3_FREQ_MASK)
                main_new.append((slot, nb))
                n_main += 1
                continue
            yield slot
        else:
            slot, nb = pop_main()
            n_main -= 1
            flags = queues.flags(slot)
            freq = _freq(flags)
            if freq > 0:
                queues.move(slot, (flags & ~F_S3_FREQ_MASK) | ((freq - 1) << F_S3_FREQ_SHIFT))
                main_new.append((slot, nb))
                n_main += 1
                continue
            yield slot


def _ttl_key(f: Fields) -> tuple[Any, ...]:
    import numpy as np

    return f["atick"], np.where(f["expiry"] > 0, f["expiry"], np.inf)


# ---------------------------------------------------------------- the policies
REGISTRY: dict[str, Policy] = {
    p.name: p
    for p in (
        Policy(0, "lru", "least recently used first (recency of put or get)", order_key=lambda f: (f["atick"],)),
        Policy(1, "lfu", "least frequently read first (ties: least recently used)",
               order_key=lambda f: (f["atick"], f["count"])),
        Policy(2, "fifo", "oldest insertion first, reads do not matter", order_key=lambda f: (f["itick"],)),
        Policy(3, "priority", "lowest priority first (ties: least recently used)",
               order_key=lambda f: (f["atick"], f["priority"])),
        Policy(4, "ttl", "expired first, then soonest expiry; entries without TTL last (least recently used)",
               order_key=_ttl_key),
        Policy(5, "s3fifo", "S3-FIFO: small probationary FIFO + main FIFO + ghost queue (one-hit wonders leave fast)",
               victims=_s3_victims, on_insert=_s3_on_insert, on_access=_s3_on_access, on_evict=_s3_on_evict,
               describe=_s3_describe),
    )
}  # fmt: skip
POLICIES: dict[str, str] = {name: p.description for name, p in REGISTRY.items()}
BY_ID: dict[int, Policy] = {p.id: p for p in REGISTRY.values()}
