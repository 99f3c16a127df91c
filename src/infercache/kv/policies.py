"""Eviction policies: which published, unpinned entries go first when space is needed.

Victim order is computed with numpy over the entry table once per eviction round (the
table is small next to the block count: one record per value) and then consumed lazily
until the request fits, so one put that needs many evictions costs one sort, not one scan
per victim. For every policy, entries whose TTL has passed go first (soonest expiry first):
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


def order(policy: str, rows: "np.ndarray", now: float) -> "np.ndarray":
    """Positions into `rows` (candidate entry records) in eviction order, expired ones first."""
    import numpy as np

    expiry = rows["expiry"]
    expired = (expiry > 0) & (expiry <= now)
    first = np.flatnonzero(expired)
    first = first[np.argsort(expiry[first], kind="stable")]
    rest = np.flatnonzero(~expired)
    r = rows[rest]
    if policy == "lru":
        keys: tuple = (r["atick"],)
    elif policy == "lfu":
        keys = (r["atick"], r["count"])
    elif policy == "fifo":
        keys = (r["itick"],)
    elif policy == "priority":
        keys = (r["atick"], r["priority"])
    elif policy == "ttl":
        exp = np.where(r["expiry"] > 0, r["expiry"], np.inf)
        keys = (r["atick"], exp)
    else:
        raise ValueError(f"policy {policy!r} has no static order")
    return np.concatenate([first, rest[np.lexsort(keys)]]) if len(rest) else first


def s3fifo_victims(
    rows: "np.ndarray",
    slots: "np.ndarray",
    now: float,
    total_blocks: int,
    small_blocks: int,
    get_flags: Callable[[int], int],
    set_queue: Callable[[int, int], None],
) -> Iterator[int]:
    """Entry slots to evict, in S3-FIFO order; moves entries between queues as it goes.

    `rows`/`slots`: candidate records and their slots; `small_blocks`: blocks held by all
    published entries of the small queue; `set_queue(slot, flags)` writes new flags and a
    fresh queue tick (the entry goes to the head of its queue).
    """
    import numpy as np

    expiry = rows["expiry"]
    expired = (expiry > 0) & (expiry <= now)
    for pos in np.flatnonzero(expired)[np.argsort(expiry[expired], kind="stable")]:
        slot = int(slots[pos])
        if not get_flags(slot) & F_S3_MAIN:
            small_blocks -= int(rows["nblocks"][pos])
        yield slot
    live = ~expired
    main = (rows["flags"] & F_S3_MAIN).astype(bool)
    by_tick = np.argsort(rows["itick"], kind="stable")
    small_q = deque((int(slots[p]), int(rows["nblocks"][p])) for p in by_tick if live[p] and not main[p])
    main_q = deque((int(slots[p]), int(rows["nblocks"][p])) for p in by_tick if live[p] and main[p])
    threshold = S3_SMALL_RATIO * total_blocks
    while small_q or main_q:
        if small_q and (small_blocks >= threshold or not main_q):
            slot, nb = small_q.popleft()
            flags = get_flags(slot)
            small_blocks -= nb
            if (flags & F_S3_FREQ_MASK) >> F_S3_FREQ_SHIFT >= 1:  # read while on probation: keep it
                set_queue(slot, (flags | F_S3_MAIN) & ~F_S3_FREQ_MASK)
                main_q.append((slot, nb))
                continue
            yield slot
        else:
            slot, nb = main_q.popleft()
            flags = get_flags(slot)
            freq = (flags & F_S3_FREQ_MASK) >> F_S3_FREQ_SHIFT
            if freq > 0:
                set_queue(slot, (flags & ~F_S3_FREQ_MASK) | ((freq - 1) << F_S3_FREQ_SHIFT))
                main_q.append((slot, nb))
                continue
            yield slot
