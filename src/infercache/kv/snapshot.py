"""Binary snapshot format of a pool: streamed out by `persist`, verified by `restore`.

Why binary and streamed: a pool of N GiB must persist as about N GiB (the old tool wrote
hex inside JSON: twice the size, slow) without building the file in memory. Layout, all
little-endian:

    preamble   "ICKVSNAP" u32 version u32 header length
    header     geometry, policy, counters, name            + crc32
    records    one record per published entry (fixed part + key bytes) + crc32 of all records
    data       the values, in record order, nothing else    + crc32 of all data
    trailer    "ICKVEND1" u64 offset of the trailer

Every section has its own checksum, and the exact file length is known from the header and
records, so truncation and corruption are found before (records, header) or while (data)
restoring, and the restore stages into a temporary file that only becomes a pool when all
of it checked out.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from infercache.errors import BadInputError
from infercache.kv.codec import checksum, key_hash
from infercache.kv.layout import (
    F_KEY_IN_DATA, HDR_BYTES_IN, HDR_BYTES_OUT, HDR_CLOCK, HDR_CREATED, HDR_ENTRIES, HDR_EVICTIONS, HDR_HITS,
    HDR_MISSES, HDR_POLICY, HDR_PUTS, HDR_TIER, HDR_VALUE_BYTES, KEY_MAX, NAME_MAX, ST_PUBLISHED,
    Geometry, compute_geometry,
)  # fmt: skip
from infercache.kv.policies import BY_ID
from infercache.kv.table import LOW32, footprint

if TYPE_CHECKING:
    from infercache.kv.state import PoolState

MAGIC = b"ICKVSNAP"
END_MAGIC = b"ICKVEND1"
VERSION = 2  # 2: each record carries its pin deadline (version 1 snapshots still restore: no deadlines)
PREAMBLE = struct.Struct("<8sII")
HEADER = struct.Struct(f"<QQQQQQQQQQQQQQdH{NAME_MAX}s")
RECORD = struct.Struct("<HQdddQqQQQQQd")  # followed by the key's bytes
RECORDS = {1: struct.Struct("<HQdddQqQQQQQ"), 2: RECORD}  # record layout by snapshot version
CRC = struct.Struct("<I")
TRAILER = struct.Struct("<8sQ")


@dataclass(frozen=True)
class SnapshotHeader:
    """What a snapshot says about the pool it came from."""

    block_size: int
    n_blocks: int
    policy_id: int
    tier_id: int
    n_entries: int
    data_bytes: int  # sum of value sizes in the data section
    keys_bytes: int  # sum of key lengths in the records section
    hits: int
    misses: int
    evictions: int
    bytes_in: int
    bytes_out: int
    puts: int
    clock: int
    created: float
    name: str

    def pack(self) -> bytes:
        name = self.name.encode()
        body = HEADER.pack(self.block_size, self.n_blocks, self.policy_id, self.tier_id, self.n_entries,
                           self.data_bytes, self.keys_bytes, self.hits, self.misses, self.evictions, self.bytes_in, self.bytes_out,
                           self.puts, self.clock, self.created, len(name), name)  # fmt: skip
        return body + CRC.pack(zlib.crc32(body))

    def file_size(self, record: struct.Struct = RECORD) -> int:
        return (PREAMBLE.size + HEADER.size + CRC.size + self.n_entries * record.size + self.keys_bytes + CRC.size
                + self.data_bytes
                + CRC.size + TRAILER.size)  # fmt: skip


@dataclass(frozen=True)
class Record:
    """One entry as stored in a snapshot (no offsets: restore allocates afresh)."""

    key: bytes
    size: int
    created: float
    atime: float
    expiry: float
    count: int
    priority: int
    pins: int
    flags: int
    prefix: int
    itick: int
    atick: int
    pin_deadline: float = 0.0  # 0: never (or no pins; version 1 snapshots have none)

    def pack(self) -> bytes:
        return RECORD.pack(len(self.key), self.size, self.created, self.atime, self.expiry, self.count,
                           self.priority, self.pins, self.flags, self.prefix, self.itick, self.atick,
                           self.pin_deadline) + self.key  # fmt: skip


def write_preamble(handle: BinaryIO, header: SnapshotHeader) -> int:
    data = PREAMBLE.pack(MAGIC, VERSION, HEADER.size) + header.pack()
    handle.write(data)
    return len(data)


def _read_exact(handle: BinaryIO, n: int, what: str) -> bytes:
    data = handle.read(n)
    if len(data) != n:
        raise BadInputError(f"snapshot truncated in the {what} ({len(data)} of {n} bytes)")
    return data


def read_header(handle: BinaryIO, file_size: int) -> tuple[SnapshotHeader, struct.Struct]:
    """Parse and verify the preamble and header: (header, the version's record layout);
    BadInputError on anything unexpected."""
    magic, version, header_len = PREAMBLE.unpack(_read_exact(handle, PREAMBLE.size, "preamble"))
    if magic != MAGIC:
        raise BadInputError("not an infercache KV snapshot (bad magic)")
    if version not in RECORDS or header_len != HEADER.size:
        raise BadInputError(f"unsupported snapshot version {version} (this infercache reads versions 1-{VERSION})")
    record = RECORDS[version]
    body = _read_exact(handle, HEADER.size, "header")
    (crc,) = CRC.unpack(_read_exact(handle, CRC.size, "header"))
    if zlib.crc32(body) != crc:
        raise BadInputError("snapshot header checksum mismatch (corrupt file)")
    fields = HEADER.unpack(body)
    name_len = fields[15]
    if name_len > NAME_MAX:
        raise BadInputError("snapshot header: bad name length (corrupt file)")
    header = SnapshotHeader(*fields[:15], name=fields[16][:name_len].decode(errors="replace"))
    if header.block_size <= 0 or header.n_blocks <= 0:
        raise BadInputError("snapshot header: bad geometry (corrupt file)")
    expected = header.file_size(record)
    if file_size != expected:
        raise BadInputError(
            f"snapshot is {file_size} bytes but its header describes {expected} bytes (truncated or corrupt)"
        )
    return header, record


def read_records(handle: BinaryIO, header: SnapshotHeader, record: struct.Struct = RECORD) -> list[Record]:
    """All entry records, verified against their section checksum and the header's totals."""
    crc = 0
    records = []
    total = 0
    capacity = header.n_blocks * header.block_size
    keys = 0
    for _ in range(header.n_entries):
        raw = _read_exact(handle, record.size, "entry records")
        f = record.unpack(raw)
        key_len = f[0]
        if not 0 < key_len <= KEY_MAX or f[1] > capacity:
            raise BadInputError("snapshot entry record out of range (corrupt file)")
        key = _read_exact(handle, key_len, "entry records")
        crc = zlib.crc32(key, zlib.crc32(raw, crc))
        records.append(Record(key, *f[1:]))
        total += f[1]
        keys += key_len
    (stored,) = CRC.unpack(_read_exact(handle, CRC.size, "entry records"))
    if stored != crc:
        raise BadInputError("snapshot entry records checksum mismatch (corrupt file)")
    if total != header.data_bytes or keys != header.keys_bytes:
        raise BadInputError("snapshot records disagree with the header's data size (corrupt file)")
    return records


def check_data_trailer(handle: BinaryIO, data_crc: int, data_end: int) -> None:
    """Verify the data section's checksum and the trailer after the data was streamed in."""
    (stored,) = CRC.unpack(_read_exact(handle, CRC.size, "data section"))
    if stored != data_crc:
        raise BadInputError("snapshot data checksum mismatch (corrupt file)")
    magic, offset = TRAILER.unpack(_read_exact(handle, TRAILER.size, "trailer"))
    if magic != END_MAGIC or offset != data_end + CRC.size:
        raise BadInputError("snapshot trailer missing or wrong (truncated or corrupt file)")


def check_target(path: str | os.PathLike[str]) -> Path:
    """Where `persist` may write: a file name in an existing directory (BadInputError otherwise)."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise BadInputError(f"{target} is a directory; give a file name")
    if not target.parent.is_dir():
        raise BadInputError(f"directory {target.parent} does not exist")
    return target


def check_source(path: str | os.PathLike[str]) -> Path:
    source = Path(path).expanduser()
    if not source.is_file():
        raise BadInputError(f"snapshot {source} does not exist or is not a file")
    return source


def read_verified(handle: BinaryIO) -> tuple[SnapshotHeader, list[Record], str, Geometry]:
    """Header, records, policy name and pool geometry of an open snapshot, all verified; the
    handle is left at the data section."""
    header, record = read_header(handle, os.fstat(handle.fileno()).st_size)
    records = read_records(handle, header, record)
    if header.policy_id not in BY_ID:
        raise BadInputError(f"snapshot names unknown policy id {header.policy_id} (corrupt file)")
    geometry = compute_geometry(header.n_blocks * header.block_size, header.block_size)
    if len(records) > geometry.table_cap:
        raise BadInputError("snapshot holds more entries than its pool geometry allows (corrupt file)")
    return header, records, BY_ID[header.policy_id].name, geometry


# ---------------------------------------------------------------- pool <-> snapshot
def write(st: "PoolState", handle: BinaryIO) -> int:
    """Stream every published entry of `st` (oldest insertion first) to `handle`; bytes written.

    The caller holds the pool's shared lock for the whole stream (a consistent image).
    """
    import numpy as np

    table = st.table
    rows = st.rows()
    slots = np.flatnonzero(table.states(rows) == ST_PUBLISHED)
    slots = slots[np.argsort(rows["itick"][slots], kind="stable")].tolist()
    hq = st.hq
    hits, misses, bytes_out = st.read_counters()
    header = SnapshotHeader(
        block_size=st.block_size, n_blocks=st.n_blocks, policy_id=hq[HDR_POLICY], tier_id=hq[HDR_TIER],
        n_entries=len(slots), data_bytes=sum(table.size(e) for e in slots),
        keys_bytes=sum(table.key_len(e) for e in slots), hits=hits, misses=misses, evictions=hq[HDR_EVICTIONS],
        bytes_in=hq[HDR_BYTES_IN], bytes_out=bytes_out, puts=hq[HDR_PUTS], clock=hq[HDR_CLOCK],
        created=st.hd[HDR_CREATED], name=st.name,
    )  # fmt: skip
    written = write_preamble(handle, header)
    crc = 0
    for e in slots:
        (_, _, _, size, _, created, atime, expiry, count, priority, pins, flags, prefix, itick,
         atick, pin_deadline) = table.fields(e)  # fmt: skip
        raw = Record(key=table.key_of(e), size=size, created=created, atime=atime, expiry=expiry, count=count,
                     priority=priority, pins=pins, flags=flags & LOW32, prefix=prefix, itick=itick,
                     atick=atick, pin_deadline=pin_deadline).pack()  # fmt: skip
        crc = zlib.crc32(raw, crc)
        handle.write(raw)
        written += len(raw)
    handle.write(CRC.pack(crc))
    written += CRC.size
    crc = 0
    for e in slots:
        data = table.data(e)
        crc = zlib.crc32(data, crc)
        handle.write(data)
        written += len(data)
        data.release()
    handle.write(CRC.pack(crc))
    written += CRC.size
    handle.write(TRAILER.pack(END_MAGIC, written))
    return written + TRAILER.size


def load(st: "PoolState", handle: BinaryIO, header: SnapshotHeader, records: list[Record]) -> None:
    """Fill a fresh, unregistered pool from an open snapshot positioned at its data section.

    The caller holds the exclusive lock; BadInputError (and the half-built pool is discarded)
    on anything that does not verify.
    """
    crc = 0
    table = st.table
    hq = st.hq
    max_tick = header.clock
    offset = handle.tell()
    for rec in records:
        klen = len(rec.key)
        nblocks, key_flag = footprint(rec.size, klen, st.block_size)
        flags = rec.flags & LOW32 & ~F_KEY_IN_DATA | key_flag
        e, start = st.pop_slot(), (st.alloc.alloc(nblocks) if nblocks else 0)
        if e < 0 or start < 0:
            raise BadInputError("snapshot entries do not fit its own pool geometry (corrupt file)")
        h = key_hash(rec.key)
        table.write(e, h, start, nblocks, rec.size, klen, 0, rec.created, rec.atime, rec.expiry, rec.count,
                    rec.priority, rec.pins, flags, rec.prefix, rec.itick, rec.atick,
                    rec.pin_deadline if rec.pins else 0.0)  # fmt: skip
        table.write_key(e, rec.key, start, flags)
        data = table.data(e)
        try:
            got = handle.readinto(data) if rec.size else 0
            if got != rec.size:
                raise BadInputError("snapshot truncated in the data section")
            crc = zlib.crc32(data, crc)
            table.set_checksum(e, klen, checksum(h, rec.size, data))
        finally:
            data.release()
        offset += rec.size
        if st.index.find(rec.key, h) >= 0:
            raise BadInputError(f"snapshot holds key {rec.key!r} twice (corrupt file)")
        max_tick = max(max_tick, rec.itick, rec.atick)
        st.index.insert(h, e)
        table.set_state(e, ST_PUBLISHED)
        hq[HDR_ENTRIES] += 1
        hq[HDR_VALUE_BYTES] += rec.size
    check_data_trailer(handle, crc, offset)
    for word, value in ((HDR_HITS, header.hits), (HDR_MISSES, header.misses), (HDR_EVICTIONS, header.evictions),
                        (HDR_BYTES_IN, header.bytes_in), (HDR_BYTES_OUT, header.bytes_out),
                        (HDR_PUTS, header.puts)):  # fmt: skip
        hq[word] = value
    hq[HDR_CLOCK] = max_tick + 1
    st.hd[HDR_CREATED] = header.created
