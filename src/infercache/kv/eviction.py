"""Eviction as a plan, then its execution (`kv evict --dry-run` prints the plan).

A plan lists the victims in the policy's order with the exact bytes each frees, plus the
S3-FIFO queue moves made while ranking them; executing it (under the exclusive lock)
removes each victim that is still the same entry (same slot generation, still published,
unpinned: pins past their deadline count as none) and applies the moves. `Pool.evict` plans and executes in one locked section.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from infercache.errors import BadInputError
from infercache.kv.codec import decode_key
from infercache.kv.layout import HDR_EVICTIONS, HDR_EXPIRED, ST_PUBLISHED
from infercache.kv.policies import PlannedQueues
from infercache.kv.results import EvictionPlan, EvictionResult, PlannedEviction
from infercache.units import parse_size

if TYPE_CHECKING:
    from infercache.kv.state import PoolState


def target(percent: float | None, nbytes: int | str | None, expired: bool) -> tuple[str, int]:
    """(mode, target bytes) of an eviction request; BadInputError unless exactly one is given."""
    if (percent is not None) + (nbytes is not None) + bool(expired) != 1:
        raise BadInputError("give exactly one of percent, bytes or expired")
    if percent is not None:
        if not 0 < float(percent) <= 100:
            raise BadInputError(f"percent must be in (0, 100], got {percent}")
        return "percent", 0
    if nbytes is not None:
        wanted = parse_size(nbytes)
        if wanted <= 0:
            raise BadInputError(f"bytes must be positive, got {nbytes!r}")
        return "bytes", wanted
    return "expired", 0


def plan(st: "PoolState", mode: str, percent: float | None, wanted: int) -> EvictionPlan:
    """The victims of a request (see `target`), changing nothing (the shared lock is enough)."""
    import numpy as np

    table = st.table
    bs = st.block_size
    queues = PlannedQueues(table)
    if mode == "expired":
        rows = st.rows()
        expiry = rows["expiry"]
        now = time.time()
        mask = (table.states(rows) == ST_PUBLISHED) & table.unpinned(rows, now) & (expiry > 0)
        chosen = np.flatnonzero(mask & (expiry <= now)).tolist()
    else:
        if mode == "percent":
            wanted = math.ceil(float(percent or 0) / 100 * st.used_bytes())
        chosen, freed = [], 0
        for e in st.victims(queues):
            if freed >= wanted:
                break
            freed += table.nblocks(e) * bs
            chosen.append(e)
    victims = tuple(
        PlannedEviction(key=decode_key(table.key_of(e), table.flags(e)), size=table.size(e),
                        bytes=table.nblocks(e) * bs, slot=e, stamp=table.stamp(e))
        for e in chosen
    )  # fmt: skip
    moves = tuple((slot, table.stamp(slot), flags) for slot, flags in queues.moves)
    return EvictionPlan(st.name, mode, wanted, victims, moves)


def execute(st: "PoolState", plan: EvictionPlan) -> EvictionResult:
    """Carry out `plan` under the exclusive lock; entries changed since planning are skipped."""
    table, hq, now = st.table, st.hq, time.time()
    for slot, stamp, flags in plan.moves:
        if table.stamp(slot) == stamp:
            table.requeue(slot, flags, st.tick())
    evicted = skipped = freed = 0
    for v in plan.victims:
        if table.stamp(v.slot) != v.stamp or table.state(v.slot) != ST_PUBLISHED or table.live_pins(v.slot, now):
            skipped += 1
            continue
        if plan.mode == "expired":
            st.remove(v.slot)
            hq[HDR_EXPIRED] += 1
            hq[HDR_EVICTIONS] += 1
        else:
            st.evict(v.slot)
        evicted += 1
        freed += v.bytes
    return EvictionResult(st.name, evicted, freed, skipped)
