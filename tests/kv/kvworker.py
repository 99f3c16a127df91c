"""Worker processes for the multi-process pool tests, run as `python -m tests.kv.kvworker ROLE ...`.

Each is a separate interpreter that attaches to the pool by name (never a thread, never a
forked copy of the parent's state), so these tests exercise real cross-process sharing.

Values are self-describing so a reader can verify any value it gets without talking to
the writer: MAGIC | key length | key | writer id | generation | payload length |
sha256(payload) | payload, where the payload comes from a generator seeded by
(key, writer, generation). A torn, stale-offset or mixed-up value fails one of the checks.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
import sys
import time
import zlib
from pathlib import Path

MAGIC = b"KVT1"
_HEAD = struct.Struct("<4sH")
_TAIL = struct.Struct("<HII32s")


@functools.lru_cache(maxsize=32)
def payload_for(writer: int, generation: int, length: int) -> tuple[bytes, bytes]:
    """(payload, sha256): deterministic pseudo-random bytes for (writer, generation, length).

    Cached, so a streaming writer spends its time in `put`, not in making values; the key
    is in the value's header, so two keys sharing a payload still cannot be mixed up.
    """
    import numpy as np

    seed = zlib.crc32(f"{writer}|{generation}|{length}".encode())
    payload = np.random.default_rng(seed).integers(0, 256, size=length, dtype=np.uint8).tobytes()
    return payload, hashlib.sha256(payload).digest()


def length_for(key: str, small: int, large: int) -> int:
    """A per-key length in [small, large], so values have mixed sizes and odd block tails."""
    return small + zlib.crc32(key.encode()) % (large - small + 1)


def make_value(key: str, writer: int, generation: int, length: int) -> bytes:
    payload, digest = payload_for(writer, generation, length)
    kb = key.encode()
    return _HEAD.pack(MAGIC, len(kb)) + kb + _TAIL.pack(writer, generation, len(payload), digest) + payload


def verify_value(key: str, value: bytes | memoryview) -> tuple[int, int]:
    """(writer, generation) of a well-formed value for `key`; AssertionError otherwise."""
    value = bytes(value)
    magic, klen = _HEAD.unpack_from(value, 0)
    assert magic == MAGIC, f"{key}: bad magic {magic!r}"
    got_key = value[_HEAD.size : _HEAD.size + klen].decode(errors="replace")
    assert got_key == key, f"{key}: value belongs to {got_key!r}"
    off = _HEAD.size + klen
    writer, generation, plen, digest = _TAIL.unpack_from(value, off)
    payload = value[off + _TAIL.size :]
    assert len(payload) == plen, f"{key}: payload {len(payload)} bytes, header says {plen}"
    assert hashlib.sha256(payload).digest() == digest, f"{key}: checksum mismatch (torn value?)"
    assert payload == payload_for(writer, generation, plen)[0], f"{key}: payload differs from its seed"
    return writer, generation


def _open(name: str):
    from infercache.kv import Pool

    return Pool.open(name, data_dir=os.environ.get("INFERCACHE_DATA_DIR"))


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def writer(name: str, writer_id: int, count: int, small: int, large: int, shared: int, rounds: int) -> None:
    """Put `count` own keys and `shared` keys both writers overwrite, `rounds` times each."""
    pool = _open(name)
    failed = 0
    puts = 0
    for generation in range(rounds):
        for i in range(count):
            key = f"w{writer_id}-k{i}"
            ok = pool.put(key, make_value(key, writer_id, generation, length_for(key, small, large)))
            failed += not ok
            puts += 1
        for i in range(shared):
            key = f"shared-k{i}"
            ok = pool.put(key, make_value(key, writer_id, generation, length_for(key, small, large)))
            failed += not ok
            puts += 1
    pool.close()
    _emit({"role": "writer", "id": writer_id, "puts": puts, "failed": failed})


def reader(name: str, reader_id: int, keys: list[str], stop_file: str, min_hits: int, max_loops: int) -> None:
    """Read keys round and round until the stop file exists and `min_hits` values were verified.

    Every value seen is verified; half the reads go through the zero-copy view when available.
    """
    pool = _open(name)
    hits = misses = views = loops = early_hits = 0
    use_view = hasattr(pool, "view")
    Path(f"{stop_file}.ready{reader_id}").touch()  # attached: the parent starts the writers now
    while loops < max_loops:
        loops += 1
        for i, key in enumerate(keys):
            if use_view and (i + loops) % 2 == 0:
                with pool.view(key) as view:
                    if view is None:
                        misses += 1
                        continue
                    verify_value(key, view)
                    views += 1
                    hits += 1
                continue
            value = pool.get(key)
            if value is None:
                misses += 1
                continue
            verify_value(key, value)
            hits += 1
        if os.path.exists(stop_file):
            if hits >= min_hits:
                break
        else:
            early_hits = hits  # values verified while the writers were still writing
        if hits == 0:
            time.sleep(0.01)  # nothing written yet: don't spin the shared CPU
    pool.close()
    _emit({"role": "reader", "id": reader_id, "hits": hits, "early_hits": early_hits, "misses": misses,
           "views": views, "loops": loops})  # fmt: skip


def stream(name: str, writer_id: int, small: int, large: int, limit: int) -> None:
    """Put distinct keys until killed (or `limit`), announcing each put's start and end.

    The parent SIGKILLs this process at an arbitrary moment, usually inside a put; every
    key announced as done must stay readable and intact, the one in flight may be missing
    but never torn. Four value lengths between `small` and `large`, payloads cached.
    """
    pool = _open(name)
    lengths = [small, (small + large) // 2 + 7, large, small + 4093]
    for length in lengths:
        payload_for(writer_id, 0, length)
    _emit({"ready": True})
    for i in range(limit):
        key = f"s{writer_id}-k{i}"
        value = make_value(key, writer_id, 0, lengths[i % 4])
        _emit({"start": key})
        ok = pool.put(key, value)
        _emit({"done": key, "ok": bool(ok)})
    pool.close()


def survivor(name: str, writer_id: int, small: int, large: int, count: int, go_file: str, max_wait: float) -> None:
    """Put and read back its own keys while another process is killed beside it, then after it."""
    pool = _open(name)
    done = 0
    started = time.monotonic()
    for i in range(count):
        key = f"v{writer_id}-k{i}"
        value = make_value(key, writer_id, 0, length_for(key, small, large))
        if not pool.put(key, value):
            raise AssertionError(f"survivor put of {key} failed")
        got = pool.get(key)
        assert got is not None, f"survivor lost {key} right after putting it"
        verify_value(key, got)
        done += 1
        # keep going until the parent says the kills are over, so we run across them
        if i == count // 2:
            while not os.path.exists(go_file) and time.monotonic() - started < max_wait:
                key2 = f"v{writer_id}-spin"
                pool.put(key2, make_value(key2, writer_id, 0, small))
                verify_value(key2, pool.get(key2))
    pool.close()
    _emit({"role": "survivor", "id": writer_id, "done": done})


def main(argv: list[str]) -> None:
    role = argv[0]
    if role == "writer":
        name, wid, count, small, large, shared, rounds = argv[1:8]
        writer(name, int(wid), int(count), int(small), int(large), int(shared), int(rounds))
    elif role == "reader":
        name, rid, keys_file, stop_file, min_hits, max_loops = argv[1:7]
        keys = json.loads(Path(keys_file).read_text())
        reader(name, int(rid), keys, stop_file, int(min_hits), int(max_loops))
    elif role == "stream":
        name, wid, small, large, limit = argv[1:6]
        stream(name, int(wid), int(small), int(large), int(limit))
    elif role == "survivor":
        name, wid, small, large, count, go_file, max_wait = argv[1:8]
        survivor(name, int(wid), int(small), int(large), int(count), go_file, float(max_wait))
    elif role == "put":  # put KEY=FILE pairs given as a JSON object {key: hex-free path}
        name, spec_file = argv[1:3]
        pool = _open(name)
        for key, path in json.loads(Path(spec_file).read_text()).items():
            if not pool.put(key, Path(path).read_bytes()):
                raise SystemExit(f"put {key} failed")
        pool.close()
    elif role == "get":  # write each key's value to DIR/<key>.bin; missing keys listed on stdout
        name, out_dir, *keys = argv[1:]
        pool = _open(name)
        missing = []
        for key in keys:
            value = pool.get(key)
            if value is None:
                missing.append(key)
            else:
                Path(out_dir, f"{key}.bin").write_bytes(value)
        pool.close()
        _emit({"missing": missing})
    else:
        raise SystemExit(f"unknown role {role}")


if __name__ == "__main__":
    main(sys.argv[1:])
