"""Key -> entry-slot index inside the mapping: open addressing, linear probing, no tombstones.

Every process must find a key in O(1) without a private dict (a dict would go stale the
moment another process puts), so the index is an int32 array in the shared mapping, sized
a power of two >= 2x the entry table (load <= 0.5, ~1.5 probes). Deletion shifts later
members of the probe run back (Knuth's algorithm R) so lookups never degrade. The index is
derived state: `rebuild` recomputes it from the published entries of the table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from infercache.kv.table import EntryTable


class KeyIndex:
    """Slots hold entry+1 (0 = empty); key hashes are read from the entry table."""

    __slots__ = ("_slots", "_table", "_mask", "capacity")

    def __init__(self, slots: memoryview, table: "EntryTable") -> None:
        """`slots`: int32 view of the index region; `table`: the entry records (hashes, keys)."""
        self._slots = slots
        self._table = table
        self.capacity = len(slots)
        self._mask = self.capacity - 1

    def release(self) -> None:
        self._slots.release()

    def find(self, kb: bytes, key_hash: int) -> int:
        """Entry holding key `kb` (hash `key_hash`), or -1 (runs once or twice per put or get)."""
        slots = self._slots
        matches = self._table.matches
        mask = self._mask
        i = key_hash & mask
        for _ in range(self.capacity):
            v = slots[i]
            if not v:
                return -1
            if matches(v - 1, key_hash, kb):
                return v - 1
            i = (i + 1) & mask
        return -1

    def insert(self, key_hash: int, entry: int) -> None:
        """Add `entry` (the caller made sure its key is not present)."""
        slots = self._slots
        mask = self._mask
        i = key_hash & mask
        for _ in range(self.capacity):
            if not slots[i]:
                slots[i] = entry + 1
                return
            i = (i + 1) & mask
        raise RuntimeError("key index full (table capacity exceeds half the index)")

    def remove(self, key_hash: int, entry: int) -> bool:
        """Drop `entry`, shifting the rest of its probe run back; False when it was not there."""
        slots = self._slots
        table = self._table
        mask = self._mask
        i = key_hash & mask
        target = entry + 1
        for _ in range(self.capacity):
            v = slots[i]
            if not v:
                return False
            if v == target:
                break
            i = (i + 1) & mask
        else:
            return False
        j = i
        while True:
            j = (j + 1) & mask
            v = slots[j]
            if not v:
                break
            home = table.hash(v - 1) & mask
            # v may move into the hole at i unless its home lies cyclically in (i, j]
            if (i < j and (home <= i or home > j)) or (i > j and home <= i and home > j):
                slots[i] = v
                i = j
        slots[i] = 0
        return True

    def members(self) -> list[int]:
        """Every entry referenced by the index (for check)."""
        import numpy as np

        arr = np.frombuffer(self._slots, dtype=np.int32)
        return [int(v) - 1 for v in arr[arr != 0]]

    def rebuild(self, entries: Iterable[tuple[int, int]]) -> None:
        """Recompute from (key_hash, entry) pairs."""
        import numpy as np

        np.frombuffer(self._slots, dtype=np.int32)[:] = 0
        for key_hash, entry in entries:
            self.insert(key_hash, entry)
