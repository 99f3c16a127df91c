"""Deliberate damage to a pool's derived state, for check/repair tests (run in any process)."""

from __future__ import annotations

from infercache.kv.allocator import A_FREE


def corrupt_allocator(pool) -> None:
    """Leak a free extent from the allocator's lists and skew its free counter (no dirty flag set)."""
    alloc = pool._st.alloc
    with pool._lock.exclusive():
        extents = alloc.free_extents()
        if extents:
            start, length = extents[0]
            alloc._remove(start, length)  # blocks now neither free nor used: a leak check must see
        alloc._h[A_FREE] += 3
