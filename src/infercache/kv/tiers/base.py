"""The storage-tier interface, the chunk record every tier stores, and in-process eviction order.

A stored chunk is one record: a 64-byte header (magic, dtype, kind, shape, expiry, crc32 of
the payload, key length, payload length) followed, on disk and in the pool, by the raw KV
bytes ``[2, layers, tokens, hidden]``. Every tier stores the same record, so moving a chunk
between tiers never re-encodes it.
"""

from __future__ import annotations

import heapq
import struct
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from infercache.errors import BadInputError

if TYPE_CHECKING:
    import numpy as np

MAGIC = b"ICKVCHK1"
HEADER = struct.Struct("<8sBBBB4IdIIQQ4x")
HEADER_BYTES = HEADER.size
assert HEADER_BYTES == 64
F_CRC = 1  # crc holds crc32 of the payload
F_ZSTD = 2  # remote value is zstd-compressed (the header describes the raw payload)
KIND_NUMPY, KIND_TORCH = 0, 1
# code -> (name, numpy storage dtype, itemsize); torch-only dtypes are stored as raw unsigned ints
DTYPES: dict[int, tuple[str, str]] = {
    1: ("float16", "<f2"),
    2: ("float32", "<f4"),
    3: ("float64", "<f8"),
    4: ("bfloat16", "<u2"),
    5: ("float8_e4m3fn", "u1"),
    6: ("float8_e5m2", "u1"),
}
DTYPE_CODES = {name: code for code, (name, _) in DTYPES.items()}


@dataclass(frozen=True)
class ChunkHeader:
    """What a tier knows about a chunk without reading its payload."""

    dtype: int
    kind: int
    shape: tuple[int, int, int, int]
    nbytes: int
    expires: float = 0.0
    crc: int | None = None
    flags: int = 0
    stored_len: int = 0

    def pack(self, key: bytes) -> bytes:
        flags = self.flags | (F_CRC if self.crc is not None else 0)
        return HEADER.pack(MAGIC, self.dtype, self.kind, flags, 0, *self.shape, self.expires, self.crc or 0,
                           len(key), self.nbytes, self.stored_len or self.nbytes)  # fmt: skip

    @classmethod
    def unpack(cls, raw: Any) -> tuple["ChunkHeader", int]:
        """(header, key length); ValueError for a record that is not ours."""
        magic, dtype, kind, flags, _, s0, s1, s2, s3, expires, crc, key_len, nbytes, stored = HEADER.unpack_from(raw)
        if magic != MAGIC or dtype not in DTYPES or kind not in (KIND_NUMPY, KIND_TORCH):
            raise ValueError("not a KV chunk record")
        if s0 * s1 * s2 * s3 * _itemsize(dtype) != nbytes:
            raise ValueError("chunk record shape and length disagree")
        head = cls(dtype, kind, (s0, s1, s2, s3), nbytes, expires, crc if flags & F_CRC else None,
                   flags & ~F_CRC, stored)  # fmt: skip
        return head, key_len

    def storage_dtype(self) -> str:
        return DTYPES[self.dtype][1]

    def expired(self, now: float | None = None) -> bool:
        return bool(self.expires) and self.expires <= (time.time() if now is None else now)


def _itemsize(code: int) -> int:
    return int(DTYPES[code][1][-1])


def as_storage(kv: Any) -> tuple["np.ndarray", int, int]:
    """(numpy view of kv's raw values, dtype code, kind); ValueError naming shape/dtype when unusable."""
    import numpy as np

    if type(kv).__module__.startswith("torch"):
        import torch

        if kv.device.type != "cpu":
            raise BadInputError(f"kv must be a CPU tensor, got device {kv.device}")
        name = str(kv.dtype).removeprefix("torch.")
        if name not in DTYPE_CODES:
            raise BadInputError(f"unsupported kv dtype torch.{name} (use fp16, bf16, fp32, fp64 or fp8)")
        code = DTYPE_CODES[name]
        raw = {1: torch.uint8, 2: torch.uint16}.get(_itemsize(code))
        t = kv.detach()
        arr = t.view(raw).numpy() if raw is not None and code >= 4 else t.numpy()
        if code >= 4:
            arr = arr.view(DTYPES[code][1])
        kind = KIND_TORCH
    else:
        arr = np.asarray(kv)
        name = arr.dtype.name
        if name not in DTYPE_CODES or DTYPE_CODES[name] >= 4:
            raise BadInputError(f"unsupported kv dtype {arr.dtype} (numpy: float16, float32 or float64)")
        code = DTYPE_CODES[name]
        kind = KIND_NUMPY
    if arr.ndim != 4 or arr.shape[0] != 2:
        raise BadInputError(f"kv must have shape [2, num_layers, num_tokens, hidden], got {tuple(arr.shape)}")
    return arr, code, kind


def from_storage(arr: "np.ndarray", code: int, kind: int) -> Any:
    """The user-facing array (numpy, or torch with the stored dtype) over `arr`, without copying."""
    if kind == KIND_NUMPY:
        return arr
    import torch

    t = torch.from_numpy(arr)
    if code >= 4:
        t = t.view(getattr(torch, DTYPES[code][0]))
    return t


def payload_view(head: ChunkHeader, buf: Any) -> "np.ndarray":
    """The payload bytes as an array of the chunk's storage dtype and shape (no copy)."""
    import numpy as np

    return np.frombuffer(buf, dtype=head.storage_dtype(), count=head.nbytes // _itemsize(head.dtype)).reshape(head.shape)


# A sink receives (header, payload buffer) while the tier holds the bytes; the buffer is only
# valid during the call (the hot tier lends a view into shared memory under its lock).
Sink = Callable[[ChunkHeader, Any], Any]
# Called with (key, header, payload) for each chunk a tier evicts (write_back demotion).
EvictHook = Callable[[str, ChunkHeader, Any], None]


@dataclass
class TierCounters:
    hits: int = 0
    misses: int = 0
    stores: int = 0
    evictions: int = 0
    errors: int = 0


class Tier(ABC):
    """One storage tier. The engine talks to every tier through these methods only.

    Failures inside a tier are counted (`counters.errors`) and reported as a miss / False,
    never raised: a broken tier must not break the caller.
    """

    name: str = ""

    def __init__(self) -> None:
        self.counters = TierCounters()
        self.evict_hook: EvictHook | None = None

    @abstractmethod
    def contains(self, key: str) -> bool: ...

    def contains_many(self, keys: list[str]) -> list[bool]:
        """Presence of each key (tiers with round trips batch this)."""
        return [self.contains(k) for k in keys]

    @abstractmethod
    def put(self, key: str, head: ChunkHeader, payload: Any, ttl: float | None = None) -> bool:
        """Store a chunk (copying `payload`); False when it cannot be stored."""

    @abstractmethod
    def read(self, key: str, sink: Sink, expired_ok: bool = False) -> tuple[bool, Any]:
        """(True, sink(header, payload)) on a hit; (False, None) on a miss, expiry or bad record.

        `expired_ok`: the engine reads a chunk whose TTL ran out to move it one tier down."""

    def put_many(self, items: list[tuple[str, ChunkHeader, Any, float | None]]) -> list[bool]:
        """Several puts (tiers with round trips batch them)."""
        return [self.put(key, head, payload, ttl) for key, head, payload, ttl in items]

    def read_many(self, items: list[tuple[str, Sink]]) -> list[tuple[bool, Any]]:
        """Several reads (tiers with round trips batch them)."""
        return [self.read(key, sink) for key, sink in items]

    @abstractmethod
    def delete(self, key: str) -> bool: ...

    @abstractmethod
    def keys(self) -> list[str]:
        """Chunk keys this tier holds that this engine may manage (clear, pin)."""

    def pin(self, key: str, timeout: float | None = None, renew: bool = False) -> bool:
        """Protect `key` from eviction; `timeout`: a deadline the tier itself enforces (the hot tier's
        shared pool, so a crashed engine's pins lapse); `renew`: this engine's pin again (no new count)."""
        return self.contains(key)

    def unpin(self, key: str) -> bool:
        return self.contains(key)

    def expiries(self) -> Iterator[tuple[str, float]]:
        """(key, expiry) of chunks with a TTL that this tier knows about (disk after restart)."""
        return iter(())

    @abstractmethod
    def bytes_used(self) -> int: ...

    def eviction_count(self) -> int:
        return self.counters.evictions

    def flush(self) -> None:
        """Wait for queued writes."""

    def close(self) -> None:
        self.flush()


@dataclass
class _Entry:
    size: int
    itick: int
    atick: int
    count: int = 0
    expires: float = 0.0
    pins: int = 0
    extra: Any = None
    seq: int = 0  # first insertion: ties in the policy order keep insertion order
    item: Any = None  # this entry's live item in Tracker._heap (older ones are stale)
    xitem: Any = None  # ... and in Tracker._xheap


@dataclass
class Tracker:
    """In-process book of the chunks a tier holds: sizes, recency, counts, pins; victims by policy.

    The hot pool orders its own entries; this book lets the engine pick victims itself when it
    must demote them (write_back) and gives disk and remote tiers eviction at all. Victims come
    from a heap on the policy's order key (stale items skipped, compacted when they pile up), so
    picking the first few victims of a full tier costs O(k log n), not a sort of the whole book.
    """

    policy: str = "lru"
    entries: dict[str, _Entry] = field(default_factory=dict)
    total: int = 0
    tick: int = 0
    _heap: list[tuple[Any, ...]] = field(default_factory=list, repr=False)
    _xheap: list[tuple[float, int, str]] = field(default_factory=list, repr=False)
    _seq: int = 0
    _gen: int = 0  # bumped when the heaps are rebuilt

    def add(self, key: str, size: int, expires: float = 0.0, extra: Any = None, oldest: bool = False) -> None:
        """Record a chunk as just written; `oldest`: as older than every chunk written so far
        (a chunk found from an earlier run: first to go under LRU and FIFO)."""
        self.tick += 1
        tick = 0 if oldest else self.tick
        old = self.entries.get(key)
        if old is not None:
            self.total -= old.size
            seq = old.seq
        else:
            self._seq += 1
            seq = self._seq
        e = self.entries[key] = _Entry(size, tick, tick, 0, expires, old.pins if old else 0, extra, seq)
        self.total += size
        self._push(key, e)
        if expires:
            e.xitem = (expires, seq, key)
            heapq.heappush(self._xheap, e.xitem)

    def touch(self, key: str) -> None:
        e = self.entries.get(key)
        if e is not None:
            self.tick += 1
            e.atick = self.tick
            e.count += 1
            if self.policy != "fifo":  # FIFO's order ignores access
                self._push(key, e)

    def remove(self, key: str) -> _Entry | None:
        e = self.entries.pop(key, None)
        if e is not None:
            self.total -= e.size
        return e

    def _order(self, e: _Entry) -> tuple[float, float, int]:
        """The policy's order key for an unexpired entry (insertion order breaks ties)."""
        if self.policy == "fifo":
            return (e.itick, 0, e.seq)
        if self.policy in ("lfu", "s3fifo"):
            return (min(e.count, 3) if self.policy == "s3fifo" else e.count, e.atick, e.seq)
        if self.policy == "ttl":
            return (e.expires or float("inf"), e.atick, e.seq)
        return (e.atick, 0, e.seq)

    def _push(self, key: str, e: _Entry) -> None:
        e.item = (*self._order(e), key)
        heapq.heappush(self._heap, e.item)
        if len(self._heap) > 2 * len(self.entries) + 64 or len(self._xheap) > 2 * len(self.entries) + 64:
            self._heap = [x.item for x in self.entries.values() if x.item is not None]
            self._xheap = [x.xitem for x in self.entries.values() if x.xitem is not None]
            heapq.heapify(self._heap)
            heapq.heapify(self._xheap)
            self._gen += 1

    def _live(self, key: str, item: Any, attr: str) -> _Entry | None:
        e = self.entries.get(key)
        return e if e is not None and getattr(e, attr) is item else None

    def victims(self) -> Iterator[str]:
        """Unpinned keys, first to evict first (expired first for every policy), lazily: stop
        early and only the victims taken were paid for."""
        now, gen = time.time(), self._gen
        taken: list[tuple[Any, ...]] = []
        xtaken: list[tuple[float, int, str]] = []
        seen: set[str] = set()
        try:
            expired = []
            while self._xheap and self._xheap[0][0] <= now:
                xitem = heapq.heappop(self._xheap)
                e = self._live(xitem[2], xitem, "xitem")
                if e is not None:
                    xtaken.append(xitem)
                    expired.append((self._order(e), xitem[2]))
            for _, key in sorted(expired):
                seen.add(key)
                e = self.entries.get(key)
                if e is not None and not e.pins:
                    yield key
            while self._heap:
                item = heapq.heappop(self._heap)
                key = item[-1]
                e = self._live(key, item, "item")
                if e is None:
                    continue  # stale: removed or reordered since
                taken.append(item)
                if key in seen or e.pins:
                    continue
                seen.add(key)
                yield key
        finally:  # put back what is still live (a rebuild meanwhile already holds it)
            if self._gen == gen:
                for item in taken:
                    if self._live(item[-1], item, "item") is not None:
                        heapq.heappush(self._heap, item)
                for xitem in xtaken:
                    if self._live(xitem[2], xitem, "xitem") is not None:
                        heapq.heappush(self._xheap, xitem)

    def pick(self, excess: int, skip: Container[str] = ()) -> list[str]:
        """Victims in policy order, except `skip`, until their sizes add up to `excess` bytes."""
        out: list[str] = []
        if excess <= 0:
            return out
        it = self.victims()
        try:
            for key in it:
                if key not in skip:
                    out.append(key)
                    excess -= self.entries[key].size
                    if excess <= 0:
                        break
        finally:
            it.close()
        return out
