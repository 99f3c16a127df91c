"""Key and value encoding for a pool: key bytes and hashes, prefix tags, value views, checksums.

Every process hashes keys the same way (never Python's salted `hash()`), so any process finds
an entry another one wrote; one home for these rules keeps put, get, check, repair and
restore agreeing on them.
"""

from __future__ import annotations

import functools
import hashlib
import struct
import zlib
from typing import Any

from infercache.errors import BadInputError
from infercache.kv.layout import F_KEY_STR, KEY_MAX

SAMPLE = 256  # bytes at each end of a value covered by the entry checksum
_CHECK_HEAD = struct.Struct("<QQ")
_KEY_CACHE = 4096  # keys whose bytes and hash are remembered (see key_info)


def key_hash(kb: bytes) -> int:
    """Deterministic across processes (never Python's salted hash())."""
    return int.from_bytes(hashlib.blake2b(kb, digest_size=8).digest(), "little")


def key_bytes(key: str | bytes) -> tuple[bytes, int]:
    """(key bytes, F_KEY_STR for a str key else 0); BadInputError for an empty, too long or non-key."""
    if isinstance(key, str):
        kb, flag = key.encode(), F_KEY_STR
    elif isinstance(key, (bytes, bytearray, memoryview)):
        kb, flag = bytes(key), 0
    else:
        raise BadInputError(f"key must be str or bytes, got {type(key).__name__}")
    if not kb:
        raise BadInputError("key must not be empty")
    if len(kb) > KEY_MAX:
        raise BadInputError(f"key is {len(kb)} bytes; at most {KEY_MAX} (hash longer keys first)")
    return kb, flag


@functools.lru_cache(maxsize=_KEY_CACHE)
def _cached_key_info(key: str | bytes) -> tuple[bytes, int, int]:
    kb, flag = key_bytes(key)
    return kb, flag, key_hash(kb)


def key_info(key: Any) -> tuple[bytes, int, int]:
    """(key bytes, F_KEY_STR or 0, key hash). str and bytes keys go through a small LRU cache:
    encoding and blake2b cost ~1.5 us, a fifth of a small get, and callers repeat keys (put
    then get, readers in a loop). Bad keys raise every time (exceptions are not cached)."""
    cls = type(key)
    if cls is str or cls is bytes:
        return _cached_key_info(key)
    kb, flag = key_bytes(key)
    return kb, flag, key_hash(kb)


def key_infos(keys: Any) -> list[tuple[bytes, int, int]]:
    """`key_info` of many keys, computed directly: a batch of fresh keys (a new prompt's chunks)
    would pay the LRU cache's miss overhead on each and flush the keys callers repeat."""
    out = []
    blake2b, from_bytes = hashlib.blake2b, int.from_bytes
    for key in keys:
        if type(key) is str and 0 < len(key) and len(kb := key.encode()) <= KEY_MAX:
            flag = F_KEY_STR
        else:  # bytes-likes, and the checks that raise
            kb, flag = key_bytes(key)
        out.append((kb, flag, from_bytes(blake2b(kb, digest_size=8).digest(), "little")))
    return out


def decode_key(kb: bytes, flags: int) -> str | bytes:
    """The key as the caller gave it: str when it was put as str."""
    return kb.decode(errors="replace") if flags & F_KEY_STR else kb


def prefix_hash(prefix: Any) -> int:
    """Hash of a `find_by_prefix` tag; str, bytes and int tags never collide with each other."""
    if isinstance(prefix, str):
        raw = b"s" + prefix.encode()
    elif isinstance(prefix, (bytes, bytearray, memoryview)):
        raw = b"b" + bytes(prefix)
    elif isinstance(prefix, int):
        raw = b"i" + prefix.to_bytes(16, "little", signed=True)
    else:
        raise BadInputError(f"prefix must be str, bytes or int, got {type(prefix).__name__}")
    return key_hash(raw)


def value_view(value: Any) -> memoryview:
    """A flat byte view of a bytes-like object, numpy array or CPU torch tensor (no copy if contiguous)."""
    if type(value) is bytes:  # the common small-value case: flat, contiguous, format "B"
        return memoryview(value)
    module = type(value).__module__
    if module.startswith("torch"):
        value = value.detach().cpu().numpy()
        module = "numpy"
    if module.startswith("numpy") and hasattr(value, "dtype"):
        import numpy as np

        arr = np.ascontiguousarray(value)
        return memoryview(arr.reshape(-1).view(np.uint8))
    try:
        view = memoryview(value)
    except TypeError:
        raise BadInputError(f"value must be bytes-like or a numpy array, got {type(value).__name__}") from None
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def checksum(key_hash: int, size: int, data: memoryview) -> int:
    """crc32 of key hash, size and the first/last SAMPLE bytes of the value.

    Trade-off: a full crc32 runs at ~1-3 GB/s and would halve put/get bandwidth for large
    values; the sample catches torn publication, wrong offsets and damaged records (what a
    crash or a bug produces) at a constant cost. Snapshots carry full checksums.
    """
    crc = zlib.crc32(_CHECK_HEAD.pack(key_hash, size))
    if size <= 2 * SAMPLE:
        return zlib.crc32(data, crc)
    crc = zlib.crc32(data[:SAMPLE], crc)
    return zlib.crc32(data[size - SAMPLE :], crc)
