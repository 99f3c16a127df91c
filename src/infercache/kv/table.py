"""`EntryTable`: the one owner of an entry record's layout (layout.py says where the words are).

Every read or write of a record field, and the packing of the state word (low 8 bits: state,
the 56 bits above: a generation bumped on every reuse of the slot), goes through this class,
so a record's shape is spelled out once. Methods are small on purpose: they run on the hot
path (a few per put or get), where a call costs less than the bugs of 41 hand-written offsets.
Callers hold the pool lock; this class knows nothing about locking.
"""

from __future__ import annotations

import mmap
import struct
import time
from typing import TYPE_CHECKING, Any, Callable

from infercache.kv.codec import decode_key

from infercache.kv.results import EntryInfo
from infercache.kv.layout import (
    E_ATICK, E_ATIME, E_CHECK, E_COUNT, E_CREATED, E_EXPIRY, E_FLAGS, E_HASH, E_ITICK, E_NBLOCKS, E_PINS, E_PREFIX,
    E_PIN_DEADLINE, E_PRIORITY, E_SIZE, E_START, ENTRY_BYTES, ENTRY_WORDS, F_HAS_PREFIX, F_KEY_IN_DATA, KEY_INLINE, KEY_OFFSET, ST_FREE, entry_dtype,
)  # fmt: skip

if TYPE_CHECKING:
    import numpy as np

STATE_MASK = 0xFF
_GEN_MASK = (1 << 56) - 1
LOW32 = 0xFFFFFFFF
# Words E_HASH..E_PIN_DEADLINE of a record, written by one pack_into (a reservation writes all of
# them; one C call instead of 16 memoryview stores, a third of a small put's locked work).
_RECORD = struct.Struct("<QQQQQdddQqQQQQQd")
assert (E_HASH, E_START, E_NBLOCKS, E_SIZE, E_CHECK, E_CREATED, E_ATIME, E_EXPIRY, E_COUNT, E_PRIORITY, E_PINS,
        E_FLAGS, E_PREFIX, E_ITICK, E_ATICK, E_PIN_DEADLINE) == tuple(range(1, 17))  # fmt: skip


def footprint(size: int, key_len: int, block_size: int) -> tuple[int, int]:
    """(blocks, F_KEY_IN_DATA or 0) for a value of `size` bytes under a key of `key_len` bytes:
    keys over KEY_INLINE bytes do not fit the record and live at the start of the value's blocks."""
    extra = key_len if key_len > KEY_INLINE else 0
    return -(-(size + extra) // block_size), F_KEY_IN_DATA if extra else 0


def next_state(word: int, state: int) -> int:
    """The state word for slot reuse: generation + 1 (wrapping in 56 bits), new `state`."""
    return ((word >> 8) + 1 & _GEN_MASK) << 8 | state


class EntryTable:
    """The entry records of one mapping, plus where their keys and values live."""

    __slots__ = ("q", "d", "_mm", "_mv", "_off", "_data_off", "_bs", "capacity")

    def __init__(self, mm: mmap.mmap, mv: memoryview, table_off: int, capacity: int, data_off: int, block_size: int):
        table = mv[table_off : table_off + capacity * ENTRY_BYTES]
        self.q = table.cast("Q")  # uint64 words (numpy scans use rows())
        self.d = table.cast("d")  # the same words as float64 (times)
        table.release()
        self._mm = mm
        self._mv = mv
        self._off = table_off
        self._data_off = data_off
        self._bs = block_size
        self.capacity = capacity

    def release(self) -> None:
        self.q.release()
        self.d.release()

    # ------------------------------------------------------------ state word
    def state(self, e: int) -> int:
        return self.q[e * ENTRY_WORDS] & STATE_MASK

    def stamp(self, e: int) -> int:
        """The whole state word: generation and state (tells one use of a slot from the next)."""
        return self.q[e * ENTRY_WORDS]

    def set_state(self, e: int, state: int) -> None:
        """Change the state, keeping the generation."""
        w = e * ENTRY_WORDS
        self.q[w] = self.q[w] >> 8 << 8 | state

    def release_slot(self, e: int) -> None:
        """Mark slot `e` free, bumping its generation (a reservation stamp taken before no longer matches)."""
        w = e * ENTRY_WORDS
        self.q[w] = next_state(self.q[w], ST_FREE)

    # ------------------------------------------------------------ fields
    def hash(self, e: int) -> int:
        return self.q[e * ENTRY_WORDS + E_HASH]

    def start(self, e: int) -> int:
        return self.q[e * ENTRY_WORDS + E_START]

    def nblocks(self, e: int) -> int:
        return self.q[e * ENTRY_WORDS + E_NBLOCKS]

    def extent(self, e: int) -> tuple[int, int]:
        """(first block, block count)."""
        w = e * ENTRY_WORDS
        return self.q[w + E_START], self.q[w + E_NBLOCKS]

    def size(self, e: int) -> int:
        return self.q[e * ENTRY_WORDS + E_SIZE]

    def key_len(self, e: int) -> int:
        return (self.q[e * ENTRY_WORDS + E_CHECK] >> 32) & 0xFFFF

    def stored_checksum(self, e: int) -> int:
        return self.q[e * ENTRY_WORDS + E_CHECK] & LOW32

    def set_checksum(self, e: int, key_len: int, check: int) -> None:
        self.q[e * ENTRY_WORDS + E_CHECK] = key_len << 32 | check

    def flags(self, e: int) -> int:
        """The F_* flags (low 32 bits of the flags word)."""
        return self.q[e * ENTRY_WORDS + E_FLAGS] & LOW32

    def set_flags(self, e: int, flags: int) -> None:
        """Replace the F_* flags, keeping the writer pid above them."""
        w = e * ENTRY_WORDS + E_FLAGS
        self.q[w] = (self.q[w] & ~LOW32) | flags

    def writer(self, e: int) -> int:
        """Pid of the process copying into a WRITING entry (0 once published)."""
        return self.q[e * ENTRY_WORDS + E_FLAGS] >> 32

    def clear_writer(self, e: int) -> None:
        self.q[e * ENTRY_WORDS + E_FLAGS] &= LOW32

    def pins(self, e: int) -> int:
        """The pin count as stored (pins past their deadline included: see `live_pins`)."""
        return self.q[e * ENTRY_WORDS + E_PINS]

    def pin_deadline(self, e: int) -> float:
        """When the pins stop protecting the entry (the latest timed pin's deadline); 0 = never."""
        return self.d[e * ENTRY_WORDS + E_PIN_DEADLINE]

    def live_pins(self, e: int, now: float) -> int:
        """The pins that still protect the entry: 0 once their deadline has passed."""
        w = e * ENTRY_WORDS
        pins = self.q[w + E_PINS]
        if pins:
            deadline = self.d[w + E_PIN_DEADLINE]
            if deadline and deadline <= now:
                return 0
        return pins

    def pin_state(self, e: int) -> tuple[int, float]:
        """(live pins, their deadline): (0, 0.0) once the deadline has passed (put carries them over)."""
        w = e * ENTRY_WORDS
        pins = self.q[w + E_PINS]
        if not pins:
            return 0, 0.0
        deadline = self.d[w + E_PIN_DEADLINE]
        return (0, 0.0) if deadline and deadline <= time.time() else (pins, deadline)

    def set_pins(self, e: int, pins: int, deadline: float) -> None:
        """Pin count and deadline (0 = never); no pins means no deadline."""
        w = e * ENTRY_WORDS
        pins = max(0, pins)
        self.q[w + E_PINS] = pins
        self.d[w + E_PIN_DEADLINE] = deadline if pins else 0.0

    def add_pin(self, e: int, deadline: float | None, now: float, renew: bool = False) -> None:
        """One more pin (`renew`: the caller's own pin again, the count kept) until `deadline`
        (None: never). Pins already past their deadline are dropped first; the entry keeps the
        latest deadline of its live pins, and one pin without a deadline makes it "never"."""
        pins = self.live_pins(e, now)
        old = self.pin_deadline(e) if pins else None  # None: no live pin yet
        if deadline is None or old == 0.0:
            new = 0.0
        else:
            new = deadline if old is None else max(old, deadline)
        self.set_pins(e, max(pins, 1) if renew else pins + 1, new)

    def drop_pin(self, e: int, now: float) -> None:
        """Undo one pin (pins past their deadline are already gone)."""
        pins = self.live_pins(e, now)
        self.set_pins(e, pins - 1, self.pin_deadline(e))

    def expiry(self, e: int) -> float:
        return self.d[e * ENTRY_WORDS + E_EXPIRY]

    def itick(self, e: int) -> int:
        return self.q[e * ENTRY_WORDS + E_ITICK]

    def requeue(self, e: int, flags: int, tick: int) -> None:
        """New F_* flags and insertion tick: the entry goes to the tail of its (S3-FIFO) queue."""
        self.set_flags(e, flags)
        self.q[e * ENTRY_WORDS + E_ITICK] = tick

    def touch(self, e: int, tick: int, now: float) -> None:
        """Record a read: access tick, access time, access count."""
        w = e * ENTRY_WORDS
        q = self.q
        q[w + E_ATICK] = tick
        self.d[w + E_ATIME] = now
        q[w + E_COUNT] += 1

    def fields(self, e: int) -> tuple[Any, ...]:
        """(hash, start, nblocks, size, check, created, atime, expiry, count, priority, pins, flags word,
        prefix, itick, atick, pin deadline): the record in one unpack (info, persist)."""
        return _RECORD.unpack_from(self._mm, self._off + e * ENTRY_BYTES + 8)

    def info(self, e: int, describe: Callable[[int], dict[str, Any]] | None, now: float) -> EntryInfo:
        """The record as `Pool.info` shows it (pins past their deadline count as none);
        `describe`: the policy's extra fields for its flags."""
        (_, _, nblocks, size, _, created, atime, expiry, count, priority, pins, word, _, itick,
         atick, pin_deadline) = self.fields(e)  # fmt: skip
        if pin_deadline and pin_deadline <= now:
            pins = 0
        flags = word & LOW32
        return EntryInfo(
            key=decode_key(self.key_of(e), flags), size=size, blocks=nblocks, created=created, last_access=atime,
            expires=expiry or None, access_count=count, priority=priority, pins=pins,
            pin_deadline=(pin_deadline or None) if pins else None, has_prefix=bool(flags & F_HAS_PREFIX),
            insert_tick=itick, access_tick=atick,
            **(describe(flags) if describe else {}),
        )  # fmt: skip

    def write(
        self, e: int, h: int, start: int, nblocks: int, size: int, key_len: int, check: int, created: float,
        atime: float, expiry: float, count: int, priority: int, pins: int, flags: int, prefix: int, itick: int,
        atick: int, pin_deadline: float,
    ) -> None:  # fmt: skip
        """Write every word but the state (which the caller sets last, when the record is complete)."""
        _RECORD.pack_into(
            self._mm, self._off + e * ENTRY_BYTES + 8, h, start, nblocks, size, key_len << 32 | check, created, atime,
            expiry, count, priority, pins, flags, prefix, itick, atick, pin_deadline,
        )  # fmt: skip

    # ------------------------------------------------------------ keys and values
    def _key_base(self, e: int, start: int, flags: int) -> int:
        if flags & F_KEY_IN_DATA:  # a long key lives at the start of the entry's blocks
            return self._data_off + start * self._bs
        return self._off + e * ENTRY_BYTES + KEY_OFFSET

    def write_key(self, e: int, kb: bytes, start: int, flags: int) -> None:
        base = self._key_base(e, start, flags)
        self._mm[base : base + len(kb)] = kb

    def key_of(self, e: int) -> bytes:
        w = e * ENTRY_WORDS
        base = self._key_base(e, self.q[w + E_START], self.q[w + E_FLAGS])
        return self._mm[base : base + ((self.q[w + E_CHECK] >> 32) & 0xFFFF)]

    def matches(self, e: int, h: int, kb: bytes) -> bool:
        """Entry `e` holds key `kb` (hash `h`): hash, length, then the bytes in the mapping."""
        q = self.q
        w = e * ENTRY_WORDS
        if q[w + E_HASH] != h or (q[w + E_CHECK] >> 32) & 0xFFFF != len(kb):
            return False
        base = self._key_base(e, q[w + E_START], q[w + E_FLAGS])
        return self._mm[base : base + len(kb)] == kb

    def value_offset(self, e: int) -> int:
        """Where the value starts in the mapping (after a long key stored with the data)."""
        q = self.q
        w = e * ENTRY_WORDS
        off = self._data_off + q[w + E_START] * self._bs
        if q[w + E_FLAGS] & F_KEY_IN_DATA:
            off += (q[w + E_CHECK] >> 32) & 0xFFFF
        return off

    def data(self, e: int) -> memoryview:
        """A writable view of the value's bytes (release it when done)."""
        off = self.value_offset(e)
        return self._mv[off : off + self.q[e * ENTRY_WORDS + E_SIZE]]

    def value(self, e: int) -> bytes:
        off = self.value_offset(e)
        return self._mm[off : off + self.q[e * ENTRY_WORDS + E_SIZE]]

    def blocks_needed(self, e: int) -> int:
        """Blocks entry `e` must own for its value (and its key, when stored with the data)."""
        return footprint(self.size(e), self.key_len(e), self._bs)[0]

    # ------------------------------------------------------------ vectorised scans
    def rows(self, count: int) -> "np.ndarray":
        """The first `count` records as a numpy structured array (a view: writes go to the pool)."""
        import numpy as np

        return np.frombuffer(self._mv, dtype=entry_dtype(), count=count, offset=self._off)

    @staticmethod
    def states(rows: "np.ndarray") -> "np.ndarray":
        return rows["state"] & STATE_MASK

    @staticmethod
    def unpinned(rows: "np.ndarray", now: float) -> "np.ndarray":
        """Mask of records no live pin protects (no pins, or their deadline has passed). Pinned
        records are few, so only their deadlines are read (the eviction scan stays about as fast)."""
        import numpy as np

        free = rows["pins"] == 0
        if not free.all():
            held = np.flatnonzero(~free)
            deadline = rows["pin_deadline"][held]
            free[held[(deadline > 0) & (deadline <= now)]] = True
        return free

    @staticmethod
    def stale_pins(rows: "np.ndarray", now: float) -> "np.ndarray":
        """Mask of records whose pins are past their deadline but not cleared yet."""
        deadline = rows["pin_deadline"]
        return (rows["pins"] != 0) & (deadline > 0) & (deadline <= now)
