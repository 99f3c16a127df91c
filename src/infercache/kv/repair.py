"""Check and repair a pool: every invariant verified, derived state rebuilt from the entry table.

The entry table is the source of truth; the allocator, key index, free-slot stack and
counters are derived from it, so a repair (or the automatic recovery after a process died
inside an update) rebuilds them from the records it can trust. Runs under the exclusive lock.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from infercache.kv.codec import checksum, key_hash
from infercache.kv.layout import (
    HDR_ENTRIES, HDR_FREE_TOP, HDR_HWM, HDR_REPAIRS, HDR_VALUE_BYTES, KEY_MAX, ST_FREE, ST_PUBLISHED, ST_WRITING,
)  # fmt: skip
from infercache.kv.procs import pid_alive
from infercache.kv.results import ResultMixin

if TYPE_CHECKING:
    from infercache.kv.state import PoolState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckReport(ResultMixin):
    """Result of `Pool.check`: `ok` is the verdict after any repair.

    `problems`: inconsistencies found; `repaired`: what a repair rebuilt (empty when none);
    `recovered`: routine crash recovery done on the way (reclaimed unpublished reservations
    of dead writers, a rebuild after a writer died inside an update): not problems.
    """

    ok: bool
    problems: tuple[str, ...]
    repaired: tuple[str, ...] = ()
    recovered: tuple[str, ...] = ()


_BAD_KEY, _BAD_DATA = "key hash mismatch", "checksum mismatch: record or data damaged"


def _damage(st: "PoolState", e: int) -> str | None:
    """_BAD_KEY or _BAD_DATA when published entry `e`'s key or value cannot be trusted, else None."""
    table = st.table
    kb = table.key_of(e)
    h = table.hash(e)
    if not kb or key_hash(kb) != h:
        return _BAD_KEY
    data = table.data(e)
    try:
        return _BAD_DATA if checksum(h, table.size(e), data) != table.stored_checksum(e) else None
    finally:
        data.release()


def problems(st: "PoolState") -> list[str]:
    """Every broken invariant, as one line each (empty when consistent)."""
    import numpy as np

    found: list[str] = []
    hq = st.hq
    table = st.table
    cap = st.capacity
    hwm = hq[HDR_HWM]
    if hwm > cap:
        found.append(f"slot high-water mark {hwm} exceeds the table capacity {cap}")
        hwm = cap
    states = table.states(table.rows(cap))
    beyond = np.flatnonzero(states[hwm:] != ST_FREE)
    if len(beyond):
        found.append(f"{len(beyond)} entries lie above the slot high-water mark {hwm}")
    states = states[:hwm]
    bad_state = np.flatnonzero((states != ST_FREE) & (states != ST_WRITING) & (states != ST_PUBLISHED))
    if len(bad_state):
        found.append(f"{len(bad_state)} entries have an unknown state (slots {bad_state[:5].tolist()})")
    published = np.flatnonzero(states == ST_PUBLISHED)
    writing = np.flatnonzero(states == ST_WRITING)
    used: list[tuple[int, int]] = []
    keys: dict[bytes, int] = {}
    value_bytes = 0
    for e in published.tolist() + writing.tolist():
        start, nb = table.extent(e)
        size = table.size(e)
        if nb != table.blocks_needed(e) or start + nb > st.n_blocks:
            found.append(f"entry {e}: blocks {start}+{nb} do not fit a {size}-byte value in the pool")
            continue
        used.append((start, nb))
        if table.state(e) != ST_PUBLISHED:
            continue
        value_bytes += size
        damage = _damage(st, e)
        kb = table.key_of(e)
        if damage == _BAD_KEY:
            found.append(f"entry {e}: stored key hash does not match its key {kb!r}")
            continue
        if kb in keys:
            found.append(f"key {kb!r} is published twice (entries {keys[kb]} and {e})")
        keys[kb] = e
        if damage:
            found.append(f"entry {e} ({kb!r}): checksum mismatch (record or data damaged)")
        if st.index.find(kb, table.hash(e)) != e:
            found.append(f"entry {e} ({kb!r}): not reachable through the key index")
    members = st.index.members()
    if len(members) != len(published):
        found.append(f"key index holds {len(members)} entries, the table {len(published)} published ones")
    stray = [m for m in members if m >= cap or table.state(m) != ST_PUBLISHED]
    if stray:
        found.append(f"key index points at {len(stray)} unpublished slots ({stray[:5]})")
    if hq[HDR_ENTRIES] != len(published):
        found.append(f"entry counter {hq[HDR_ENTRIES]} != {len(published)} published entries")
    if hq[HDR_VALUE_BYTES] != value_bytes:
        found.append(f"value byte counter {hq[HDR_VALUE_BYTES]} != {value_bytes}")
    top = hq[HDR_FREE_TOP]
    free_slots = set(np.flatnonzero(states == ST_FREE).tolist())
    if top > cap:
        found.append(f"free-slot stack depth {top} exceeds the capacity {cap}")
    else:
        stack = np.frombuffer(st.free_stack, dtype=np.int32)[:top].tolist()
        if len(set(stack)) != len(stack) or set(stack) != free_slots:
            found.append(f"free-slot stack ({len(stack)} slots) disagrees with the {len(free_slots)} free table slots")
    found.extend(st.alloc.check(used))
    return found


def _drop_reason(st: "PoolState", e: int, state: int) -> str | None:
    table = st.table
    start, nb = table.extent(e)
    if state not in (ST_WRITING, ST_PUBLISHED):
        return "unknown state"
    if table.key_len(e) > KEY_MAX or nb != table.blocks_needed(e) or start + nb > st.n_blocks:
        return "blocks out of range"
    if state == ST_WRITING and not pid_alive(table.writer(e)):
        return "unpublished, writer gone"
    if state == ST_PUBLISHED:
        return _damage(st, e)
    return None


def repair(st: "PoolState") -> list[str]:
    """Rebuild allocator, key index, free-slot stack and counters from the entry table."""
    import numpy as np

    done: list[str] = []
    table = st.table
    states = table.states(table.rows(st.capacity)).copy()
    keep: list[int] = []
    for e in np.flatnonzero(states != ST_FREE).tolist():
        reason = _drop_reason(st, e, int(states[e]))
        if reason:
            table.release_slot(e)
            done.append(f"dropped entry {e} ({reason})")
        else:
            keep.append(e)
    # overlapping extents: keep the most recently inserted entry of a clash
    keep.sort(key=lambda e: -table.itick(e))
    taken: list[tuple[int, int]] = []
    by_key: dict[bytes, int] = {}
    final: list[int] = []
    for e in keep:
        s, n = table.extent(e)
        clash = False
        if n:
            i = bisect.bisect_left(taken, (s, -1))
            if i < len(taken) and taken[i][0] < s + n:
                clash = True
            if i > 0 and taken[i - 1][0] + taken[i - 1][1] > s:
                clash = True
        if not clash and table.state(e) == ST_PUBLISHED:
            kb = table.key_of(e)
            if kb in by_key:
                clash = True
            else:
                by_key[kb] = e
        if clash:
            table.release_slot(e)
            done.append(f"dropped entry {e} (overlaps or duplicates a newer entry)")
            continue
        if n:
            bisect.insort(taken, (s, n))
        final.append(e)
    st.alloc.rebuild(taken)
    published = [e for e in final if table.state(e) == ST_PUBLISHED]
    st.index.rebuild((table.hash(e), e) for e in published)
    hq = st.hq
    hwm = max(final) + 1 if final else 0
    hq[HDR_HWM] = hwm
    used_slots = set(final)
    free = [e for e in range(hwm - 1, -1, -1) if e not in used_slots]
    for i, e in enumerate(free):
        st.free_stack[i] = e
    hq[HDR_FREE_TOP] = len(free)
    hq[HDR_ENTRIES] = len(published)
    hq[HDR_VALUE_BYTES] = sum(table.size(e) for e in published)
    hq[HDR_REPAIRS] += 1
    done.append(
        f"rebuilt allocator ({len(taken)} used extents), key index ({len(published)} keys), "
        f"free-slot stack ({len(free)}) and counters from the entry table"
    )
    return done


def check_and_repair(st: "PoolState", fix: bool, recovered: list[str]) -> CheckReport:
    """`Pool.check`'s work under the exclusive lock; `recovered`: recovery notes so far."""
    recovered = recovered + st.reclaim_orphans() + st.clear_lapsed_pins()
    found = problems(st)
    repaired: list[str] = []
    ok = not found
    if found and fix:
        repaired = repair(st)
        remaining = problems(st)
        ok = not remaining
        if remaining:
            log.error("pool %s: still inconsistent after repair: %s", st.name, remaining)
    return CheckReport(ok=ok, problems=tuple(found), repaired=tuple(repaired), recovered=tuple(recovered))


def recover(st: "PoolState", reason: str) -> list[str]:
    """Routine recovery after a process died (or failed) inside an update: a full rebuild."""
    log.warning("pool %s: %s; rebuilding derived state from the entry table", st.name, reason)
    return [reason, *repair(st)]
