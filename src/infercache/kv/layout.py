"""Byte layout of a pool's mapping: header words, entry records, region offsets.

Everything a process needs to use a pool lives in the one mapped file, so the layout is
fixed and versioned here (one place) and every other module addresses the mapping through
these constants. All integers are little-endian 64-bit words unless said otherwise.

    [0, 4096)                   header (HDR_* word indexes below)
    [alloc_off, +alloc_bytes)   allocator metadata (see allocator.py)
    [table_off, +cap*256)       entry table, ENTRY_BYTES per record
    [index_off, +icap*4)        key index: open-addressed int32 slots (entry+1, 0 = empty)
    [free_off, +cap*4)          stack of free entry slots (int32)
    [ghost_off, +gcap*8)        S3-FIFO ghost ring (key hashes)
    [data_off, +n_blocks*bs)    data blocks (aligned to the block size)
"""

from __future__ import annotations

from dataclasses import dataclass

from infercache.kv.allocator import Allocator

MAGIC = int.from_bytes(b"ICKVPOOL", "little")
LAYOUT_VERSION = 2  # 2: pin deadline word (E_PIN_DEADLINE); keys inline up to 120 bytes
HEADER_BYTES = 4096

# ---- header words (index into a uint64 view of [0, 4096)) ----
HDR_MAGIC = 0
HDR_VERSION = 1
HDR_BLOCK_SIZE = 2
HDR_N_BLOCKS = 3
HDR_TABLE_CAP = 4
HDR_INDEX_CAP = 5
HDR_GHOST_CAP = 6
HDR_ALLOC_OFF = 7
HDR_TABLE_OFF = 8
HDR_INDEX_OFF = 9
HDR_FREE_OFF = 10
HDR_GHOST_OFF = 11
HDR_DATA_OFF = 12
HDR_FILE_SIZE = 13
HDR_POLICY = 14
HDR_CREATED = 15  # float64 bits
HDR_DIRTY = 16  # pid inside a mutation section, 0 when clean
HDR_CLOCK = 17  # logical clock: ticks for recency / insertion order
HDR_ENTRIES = 18
HDR_HWM = 19  # entry slots [0, hwm) have ever been used
HDR_FREE_TOP = 20  # number of slots on the free-slot stack
HDR_HITS = 21
HDR_MISSES = 22
HDR_EVICTIONS = 23
HDR_BYTES_IN = 24
HDR_BYTES_OUT = 25
HDR_PUTS = 26
HDR_EXPIRED = 27
HDR_GHOST_POS = 28
HDR_VALUE_BYTES = 29  # sum of published value sizes
HDR_TIER = 30  # 0 cpu, 1 disk
HDR_REPAIRS = 31
# Per-process read counters: readers share the lock, so each process counts hits, misses
# and bytes out in a slot of its own (no lost updates) and stats() sums the slots.
SLOT_BASE = 64  # header word of slot 0
N_SLOTS = 64
SLOT_WORDS = 4  # pid, hits, misses, bytes out
NAME_OFFSET = 3072  # u16 length + utf-8 name (<= 255 bytes) inside the header page
NAME_MAX = 255

TIERS = ("cpu", "disk")

# ---- entry records ----
ENTRY_BYTES = 256
ENTRY_WORDS = ENTRY_BYTES // 8
KEY_OFFSET = 136  # key bytes live after the 17 words of the record
KEY_INLINE = ENTRY_BYTES - KEY_OFFSET  # keys up to 120 bytes live in the record
KEY_MAX = 1024  # longer keys live at the start of the entry's blocks (flag F_KEY_IN_DATA)

E_STATE = 0  # low 8 bits: state; high bits: generation (bumped on every reuse of the slot)
E_HASH = 1
E_START = 2
E_NBLOCKS = 3
E_SIZE = 4
E_CHECK = 5  # low 32 bits: checksum; bits 32..47: key length
E_CREATED = 6  # float64
E_ATIME = 7  # float64
E_EXPIRY = 8  # float64, 0 = never
E_COUNT = 9
E_PRIORITY = 10  # int64
E_PINS = 11
E_FLAGS = 12  # low 32 bits: F_* flags; high 32 bits: writer pid while WRITING
E_PREFIX = 13
E_ITICK = 14  # insertion (queue) tick
E_ATICK = 15  # last access tick
E_PIN_DEADLINE = 16  # float64: when the pins (E_PINS) stop protecting the entry; 0 = never

ST_FREE = 0
ST_WRITING = 1  # reserved by a writer that copies data outside the lock; not visible to readers
ST_PUBLISHED = 2

F_HAS_PREFIX = 1
F_KEY_STR = 2
F_S3_MAIN = 4
F_S3_FREQ_SHIFT = 3  # 2 bits
F_S3_FREQ_MASK = 3 << F_S3_FREQ_SHIFT
F_KEY_IN_DATA = 32

DTYPE_FIELDS = [
    ("state", "<u8"),
    ("hash", "<u8"),
    ("start", "<u8"),
    ("nblocks", "<u8"),
    ("size", "<u8"),
    ("check", "<u8"),
    ("created", "<f8"),
    ("atime", "<f8"),
    ("expiry", "<f8"),
    ("count", "<u8"),
    ("priority", "<i8"),
    ("pins", "<u8"),
    ("flags", "<u8"),
    ("prefix", "<u8"),
    ("itick", "<u8"),
    ("atick", "<u8"),
    ("pin_deadline", "<f8"),
    ("key", f"V{KEY_INLINE}"),
]


def entry_dtype():  # numpy imported lazily: the CLI imports this module for help texts
    """numpy structured dtype of one entry record (for vectorised scans)."""
    import numpy as np

    return np.dtype(DTYPE_FIELDS)


def _align(value: int, to: int) -> int:
    return (value + to - 1) // to * to


@dataclass(frozen=True)
class Geometry:
    """Where each region lives for a pool of `n_blocks` blocks of `block_size` bytes."""

    block_size: int
    n_blocks: int
    table_cap: int
    index_cap: int
    ghost_cap: int
    alloc_off: int
    table_off: int
    index_off: int
    free_off: int
    ghost_off: int
    data_off: int
    file_size: int

    @property
    def data_bytes(self) -> int:
        return self.n_blocks * self.block_size


def table_capacity(n_blocks: int) -> int:
    """Entries a pool can hold: every block for small pools, a quarter of them for big ones.

    Each entry takes at least one block, so n_blocks is the most that can ever be used;
    large pools hold KV chunks of many blocks, and a quarter keeps the table (256 B per
    entry) under 1% of the pool at 4 KiB blocks.
    """
    return max(1, min(n_blocks, max(1024, n_blocks // 4)))


def compute_geometry(data_bytes: int, block_size: int) -> Geometry:
    """Geometry of a pool whose data region holds `data_bytes` (rounded down to blocks)."""
    n_blocks = data_bytes // block_size
    cap = table_capacity(n_blocks)
    icap = 1 << max(4, (2 * cap - 1).bit_length())
    gcap = min(cap, 4096)
    alloc_off = HEADER_BYTES
    table_off = _align(alloc_off + Allocator.metadata_bytes(n_blocks), 4096)
    index_off = _align(table_off + cap * ENTRY_BYTES, 4096)
    free_off = _align(index_off + icap * 4, 4096)
    ghost_off = _align(free_off + cap * 4, 4096)
    data_off = _align(ghost_off + gcap * 8, max(4096, block_size))
    file_size = data_off + n_blocks * block_size
    return Geometry(block_size, n_blocks, cap, icap, gcap, alloc_off, table_off, index_off, free_off, ghost_off,
                    data_off, file_size)  # fmt: skip
