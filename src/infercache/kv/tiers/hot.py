"""Hot tier: the shared-memory `Pool`, so every engine of a model on a host shares one hot tier.

Reads copy straight from the shared mapping into the caller's output (`Pool.view`): no
intermediate bytes object. A TTL is in the chunk record (past it, a read is a miss in every
process) and, plus a grace period, in the pool entry (the pool then drops it by itself); the
engine moves a chunk down shortly before its TTL runs out, and can still read it in the grace
period if its sweeper was late.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

from infercache.errors import BadInputError, InfercacheError
from infercache.kv.pool import Pool
from infercache.kv.tiers.base import HEADER_BYTES, ChunkHeader, Sink, Tier, Tracker

log = logging.getLogger(__name__)


def open_or_create_pool(name: str, size: int, policy: str, data_dir: str | None) -> tuple[Any, bool]:
    """(pool, created): attach to `name`, creating it first when missing (two racing creators:
    one creates, the other opens)."""
    for attempt in range(50):
        try:
            return Pool.open(name, data_dir=data_dir), False
        except BadInputError as exc:
            if "unknown pool" not in str(exc) and "is gone" not in str(exc):
                raise
            if "is gone" in str(exc):  # stale registration: drop it, then create
                try:
                    Pool.destroy(name, data_dir=data_dir)
                except InfercacheError:
                    pass
        try:
            return Pool.create(name, size=size, policy=policy, data_dir=data_dir), True
        except BadInputError as exc:
            if "already" not in str(exc) and "exists" not in str(exc):
                raise
        time.sleep(0.02 * (attempt + 1))  # the other creator is linking its pool into place
    raise InfercacheError(f"could not create or open pool {name!r}")


class HotTier(Tier):
    """A chunk record (header ‖ key ‖ payload) per pool entry, keyed by the chunk key."""

    name = "hot"

    def __init__(self, pool_name: str, size: int, policy: str, data_dir: str | None, write_back: bool) -> None:
        super().__init__()
        self.pool, self.created = open_or_create_pool(pool_name, size, policy, data_dir)
        self.write_back = write_back
        self.book = Tracker(policy)
        self._staging: Any = None
        self._pool_evictions_at_open = self._pool_evictions()

    def _pool_evictions(self) -> int:
        try:
            return int(self.pool.stats()["evictions"])
        except Exception:  # noqa: BLE001
            return 0

    def eviction_count(self) -> int:
        """Chunks this engine demoted plus entries the shared pool evicted by itself since we attached."""
        return self.counters.evictions + self._pool_evictions() - self._pool_evictions_at_open

    # --------------------------------------------------------------- interface
    def contains(self, key: str) -> bool:
        try:
            return self.pool.contains(key)
        except Exception as exc:  # noqa: BLE001 - a tier never raises to the caller
            self._error("contains", exc)
            return False

    def contains_many(self, keys: list[str]) -> list[bool]:
        """One locked pool section for all keys (a 512-chunk lookup: ~0.4 ms instead of ~1.4 ms)."""
        try:
            return self.pool.contains_many(keys)
        except Exception as exc:  # noqa: BLE001
            self._error("contains", exc)
            return [False] * len(keys)

    def put(self, key: str, head: ChunkHeader, payload: Any, ttl: float | None = None) -> bool:
        head = replace(head, expires=time.time() + ttl if ttl else 0.0)
        record = self._record(key, head, payload)
        return self.put_record(key, record, head.nbytes, ttl)

    def put_record(self, key: str, record: Any, nbytes: int, ttl: float | None = None) -> bool:
        """Store a ready record (header ‖ key ‖ payload)."""
        pool = self.pool
        try:
            if self.write_back and self.evict_hook is not None:
                self._make_room(len(record), key)
            ok = pool.put(key, record, ttl=ttl + _grace(ttl)) if ttl else pool.put(key, record)
        except BadInputError as exc:  # larger than the whole pool
            self._error("put", exc)
            return False
        except Exception as exc:  # noqa: BLE001
            self._error("put", exc)
            return False
        if ok:
            self.counters.stores += 1
            if self.write_back:  # the book only serves write_back's own victim choice
                self.book.add(key, nbytes, time.time() + ttl if ttl else 0.0)
                if len(self.book.entries) > 2 * self.pool.capacity_entries:
                    self._prune_book()
        return ok

    def _prune_book(self) -> None:
        """Forget chunks the pool dropped by itself (its own eviction, expiry, other processes)."""
        keys = list(self.book.entries)
        for key, present in zip(keys, self.pool.contains_many(keys)):
            if not present:
                self.book.remove(key)

    def read(self, key: str, sink: Sink, expired_ok: bool = False) -> tuple[bool, Any]:
        try:
            with self.pool.view(key) as view:
                if view is None:
                    return False, None
                head, key_len = ChunkHeader.unpack(view)
                if head.expired() and not expired_ok:  # past its TTL: a miss in every process
                    return False, None
                start = HEADER_BYTES + key_len
                if bytes(view[HEADER_BYTES:start]) != key.encode():
                    raise ValueError("record key mismatch")
                result = sink(head, view[start : start + head.nbytes])
        except ValueError as exc:  # not a chunk record of ours, or torn: a counted miss, removed
            self._error("read", exc)
            self.delete(key)
            return False, None
        except Exception as exc:  # noqa: BLE001
            self._error("read", exc)
            return False, None
        if self.write_back:
            self.book.touch(key)
        return True, result

    def delete(self, key: str) -> bool:
        self.book.remove(key)
        try:
            return self.pool.delete(key)
        except Exception as exc:  # noqa: BLE001
            self._error("delete", exc)
            return False

    def keys(self) -> list[str]:
        try:
            return [k for k in self.pool.keys() if isinstance(k, str)]
        except Exception as exc:  # noqa: BLE001
            self._error("keys", exc)
            return []

    def pin(self, key: str, timeout: float | None = None, renew: bool = False) -> bool:
        # the deadline lives in the shared pool: a SIGKILLed engine's pins lapse after `timeout`
        return bool(self.pool.pin(key, timeout, renew))

    def unpin(self, key: str) -> bool:
        return bool(self.pool.unpin(key))

    def bytes_used(self) -> int:
        try:
            return int(self.pool.stats()["value_bytes"])
        except Exception:  # noqa: BLE001
            return 0

    def close(self) -> None:
        self.pool.close()

    # --------------------------------------------------------------- helpers
    def _record(self, key: str, head: ChunkHeader, payload: Any) -> Any:
        """header ‖ key ‖ payload in a reused staging buffer (one copy: the pool copies it again)."""
        import numpy as np

        kb = key.encode()
        size = HEADER_BYTES + len(kb) + head.nbytes
        if self._staging is None or self._staging.nbytes < size:
            self._staging = np.empty(size, dtype=np.uint8)
        buf = self._staging[:size]
        buf[:HEADER_BYTES] = np.frombuffer(head.pack(kb), dtype=np.uint8)
        buf[HEADER_BYTES : HEADER_BYTES + len(kb)] = np.frombuffer(kb, dtype=np.uint8)
        body = buf[HEADER_BYTES + len(kb) :]
        if isinstance(payload, np.ndarray):
            body.view(payload.dtype).reshape(payload.shape)[...] = payload
        else:
            body[:] = np.frombuffer(payload, dtype=np.uint8)
        return buf

    def _make_room(self, size: int, incoming: str) -> None:
        """write_back: demote this engine's own entries (policy order, suffixes first) until
        `size` bytes fit without the pool evicting on its own."""
        bs = self.pool.block_size
        room = -(-size // bs) * bs
        if self.pool.stats().largest_free_bytes >= room:  # the common case: no victim order needed
            return
        for victim in self.book.victims():
            if self.pool.stats().largest_free_bytes >= room:
                return
            if victim == incoming:
                continue
            self.read(victim, lambda head, payload, v=victim: self._demote(v, head, payload))
            self.counters.evictions += 1
            self.delete(victim)

    def _demote(self, key: str, head: ChunkHeader, payload: Any) -> None:
        if self.evict_hook is not None:
            self.evict_hook(key, head, payload)

    def _error(self, what: str, exc: BaseException) -> None:
        self.counters.errors += 1
        if self.counters.errors == 1:
            log.warning("hot tier (pool %s): %s failed: %s", getattr(self.pool, "name", "?"), what, exc)
        else:
            log.debug("hot tier: %s failed: %s", what, exc)


def _grace(ttl: float) -> float:
    """How long the pool keeps an entry past its TTL: the record's own expiry already makes it a
    miss, and the engine can still read it to move it down if its sweeper runs late."""
    return min(300.0, max(5.0, 0.1 * ttl))


def default_pool_name(model_name: str, world_size: int, worker_id: int) -> str:
    """A pool name shared by engines of one model/world size/worker on this host."""
    import re

    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", model_name).strip("-._") or "model"
    return f"kv-{safe[:96]}-w{world_size}-r{worker_id}"
