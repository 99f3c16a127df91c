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

import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO

from infercache.errors import BadInputError
from infercache.kv.layout import KEY_MAX, NAME_MAX

MAGIC = b"ICKVSNAP"
END_MAGIC = b"ICKVEND1"
VERSION = 1
PREAMBLE = struct.Struct("<8sII")
HEADER = struct.Struct(f"<QQQQQQQQQQQQQQdH{NAME_MAX}s")
RECORD = struct.Struct("<HQdddQqQQQQQ")  # followed by the key's bytes
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

    def file_size(self) -> int:
        return (PREAMBLE.size + HEADER.size + CRC.size + self.n_entries * RECORD.size + self.keys_bytes + CRC.size
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

    def pack(self) -> bytes:
        return RECORD.pack(len(self.key), self.size, self.created, self.atime, self.expiry, self.count,
                           self.priority, self.pins, self.flags, self.prefix, self.itick, self.atick) + self.key  # fmt: skip


def write_preamble(handle: BinaryIO, header: SnapshotHeader) -> int:
    data = PREAMBLE.pack(MAGIC, VERSION, HEADER.size) + header.pack()
    handle.write(data)
    return len(data)


def _read_exact(handle: BinaryIO, n: int, what: str) -> bytes:
    data = handle.read(n)
    if len(data) != n:
        raise BadInputError(f"snapshot truncated in the {what} ({len(data)} of {n} bytes)")
    return data


def read_header(handle: BinaryIO, file_size: int) -> SnapshotHeader:
    """Parse and verify the preamble and header; BadInputError on anything unexpected."""
    magic, version, header_len = PREAMBLE.unpack(_read_exact(handle, PREAMBLE.size, "preamble"))
    if magic != MAGIC:
        raise BadInputError("not an infercache KV snapshot (bad magic)")
    if version != VERSION or header_len != HEADER.size:
        raise BadInputError(f"unsupported snapshot version {version} (this infercache reads version {VERSION})")
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
    expected = header.file_size()
    if file_size != expected:
        raise BadInputError(
            f"snapshot is {file_size} bytes but its header describes {expected} bytes (truncated or corrupt)"
        )
    return header


def read_records(handle: BinaryIO, header: SnapshotHeader) -> list[Record]:
    """All entry records, verified against their section checksum and the header's totals."""
    crc = 0
    records = []
    total = 0
    capacity = header.n_blocks * header.block_size
    keys = 0
    for _ in range(header.n_entries):
        raw = _read_exact(handle, RECORD.size, "entry records")
        f = RECORD.unpack(raw)
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
