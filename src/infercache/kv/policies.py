"""Eviction policies: which published, unpinned entries go first when space is needed.

Victim order is computed with numpy over the entry table (one record per value, far fewer
than blocks) and consumed lazily until the request fits: a partial sort (see lazy_order)
keeps a put into a full pool at O(entries) vectorised work, not a full sort. For every policy, entries whose TTL has passed go first (soonest expiry first):
an expired entry is already a miss, keeping it only wastes space.

S3-FIFO (Yang et al., SOSP'23) keeps its state in the records: a "main queue" flag, a
2-bit frequency and the queue tick; the ghost queue is a ring of key hashes in the mapping.
An entry in the small queue that was read at least once since insertion moves to the main
queue instead of being evicted; the main queue gives entries with frequency > 0 another
round (frequency - 1). The small queue is targeted while it holds >= 10% of the blocks.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Callable, Iterator

from infercache.kv.layout import F_S3_FREQ_MASK, F_S3_FREQ_SHIFT, F_S3_MAIN

if TYPE_CHECKING:
    import numpy as np

POLICIES: dict[str, str] = {
    "lru": "least recently used first (recency of put or get)",
    "lfu": "least frequently read first (ties: least recently used)",
    "fifo": "oldest insertion first, reads do not matter",
    "priority": "lowest priority first (ties: least recently used)",
    "ttl": "expired first, then soonest expiry; entries without TTL last (least recently used)",
    "s3fifo": "S3-FIFO: small probationary FIFO + main FIFO + ghost queue (one-hit wonders leave fast)",
}
POLICY_IDS = {name: i for i, name in enumerate(POLICIES)}
POLICY_NAMES = {i: name for name, i in POLICY_IDS.items()}
S3_SMALL_RATIO = 0.10


FIELDS = ("expiry", "atick", "itick", "count", "priority", "flags", "nblocks")
_BATCH = 16


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


def _expired_first(fields: dict[str, "np.ndarray"], now: float) -> tuple["np.ndarray", "np.ndarray"]:
    """(expired positions by expiry, the other positions)."""
    import numpy as np

    expiry = fields["expiry"]
    expired = (expiry > 0) & (expiry <= now)
    first = np.flatnonzero(expired)
    first = first[np.argsort(expiry[first], kind="stable")]
    return first, np.flatnonzero(~expired)


def order(policy: str, fields: dict[str, "np.ndarray"], now: float) -> Iterator[int]:
    """Positions into the candidate arrays `fields` (FIELDS) in eviction order, expired first."""
    import numpy as np

    first, rest = _expired_first(fields, now)
    yield from first.tolist()
    if policy == "lru":
        keys: tuple = (fields["atick"][rest],)
    elif policy == "lfu":
        keys = (fields["atick"][rest], fields["count"][rest])
    elif policy == "fifo":
        keys = (fields["itick"][rest],)
    elif policy == "priority":
        keys = (fields["atick"][rest], fields["priority"][rest])
    elif policy == "ttl":
        exp = fields["expiry"][rest]
        keys = (fields["atick"][rest], np.where(exp > 0, exp, np.inf))
    else:
        raise ValueError(f"policy {policy!r} has no static order")
    yield from lazy_order(rest, keys)


def s3fifo_victims(
    fields: dict[str, "np.ndarray"],
    slots: "np.ndarray",
    now: float,
    total_blocks: int,
    small_blocks: int,
    get_flags: Callable[[int], int],
    set_queue: Callable[[int, int], None],
) -> Iterator[int]:
    """Entry slots to evict, in S3-FIFO order; moves entries between queues as it goes.

    `fields`/`slots`: candidate records (FIELDS arrays) and their slots; `small_blocks`:
    blocks held by all published entries of the small queue; `set_queue(slot, flags)`
    writes new flags and a fresh queue tick (the entry goes to the tail of its queue, after
    every entry already there, so a queue is: the old entries by tick, then the moved ones).
    """
    first, rest = _expired_first(fields, now)
    nblocks = fields["nblocks"]
    for pos in first.tolist():
        slot = int(slots[pos])
        if not get_flags(slot) & F_S3_MAIN:
            small_blocks -= int(nblocks[pos])
        yield slot
    main = (fields["flags"][rest] & F_S3_MAIN).astype(bool)
    small_pos, main_pos = rest[~main], rest[main]
    small_iter = lazy_order(small_pos, (fields["itick"][small_pos],))
    main_old = lazy_order(main_pos, (fields["itick"][main_pos],))
    main_new: deque[tuple[int, int]] = deque()
    n_small, n_main = len(small_pos), len(main_pos)
    threshold = S3_SMALL_RATIO * total_blocks

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
            flags = get_flags(slot)
            small_blocks -= nb
            if (flags & F_S3_FREQ_MASK) >> F_S3_FREQ_SHIFT >= 1:  # read while on probation: keep it
                set_queue(slot, (flags | F_S3_MAIN) & ~F_S3_FREQ_MASK)
                main_new.append((slot, nb))
                n_main += 1
                continue
            yield slot
        else:
            slot, nb = pop_main()
            n_main -= 1
            flags = get_flags(slot)
            freq = (flags & F_S3_FREQ_MASK) >> F_S3_FREQ_SHIFT
            if freq > 0:
                set_queue(slot, (flags & ~F_S3_FREQ_MASK) | ((freq - 1) << F_S3_FREQ_SHIFT))
                main_new.append((slot, nb))
                n_main += 1
                continue
            yield slot
