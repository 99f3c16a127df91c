"""Remote tier: Redis or Redis Cluster through redis-py.

Two keys per chunk that share a hash tag (same cluster slot): ``ickv:{KEY}:d`` the payload
(optionally zstd) and ``ickv:{KEY}:m`` the 64-byte chunk header (shape, dtype, crc32). Puts
and gets are pipelined; a TTL is ``SET ... EX``. The engine accounts for the bytes it put and
evicts its own keys (policy order) to stay under `remote_size`.

A restarted engine accounts for what its model (key prefix) put in earlier runs: a background
thread SCANs its own keys once Redis answers (bounded: ADOPT_MAX_KEYS) and books them by their
header records as older than anything put since, so `remote_size` holds across restarts.

A Redis that is down or goes away never breaks the caller: every failure is counted, logged
once per outage, and the tier answers "miss" until a backoff (0.5 s doubling to 30 s) has
passed; then the next call tries again (redis-py reconnects) and the outage ends on success.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import unquote

from infercache.errors import BadInputError
from infercache.kv.tiers.base import F_ZSTD, ChunkHeader, Sink, Tier, Tracker

log = logging.getLogger(__name__)
T = TypeVar("T")
BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0
ADOPT_MAX_KEYS = 262144  # chunks of earlier runs accounted for at most (a SCAN of a huge Redis stays bounded)
ADOPT_BATCH = 1000  # keys per SCAN step and per pipelined read of header records


def scan_pattern(prefix: str) -> str:
    """SCAN MATCH pattern of the header records of chunk keys starting with `prefix` (glob characters escaped)."""
    return "ickv:{" + re.sub(r"([\\*?\[\]])", r"\\\1", prefix) + "*}:m"


def make_client(url: str, connect_timeout: float = 1.0, timeout: float = 5.0) -> Any:
    """A redis-py client for redis://, rediss:// (TLS, verified), unix:// or redis-cluster://h:p,h:p."""
    import redis

    scheme = url.split("://", 1)[0].lower()
    if scheme in ("redis", "rediss", "unix"):
        return redis.Redis.from_url(url, socket_connect_timeout=connect_timeout, socket_timeout=timeout)
    if scheme != "redis-cluster":
        raise BadInputError(f"unsupported remote_url scheme {scheme!r}")
    from redis.cluster import ClusterNode, RedisCluster

    netloc = url.split("://", 1)[1].split("/", 1)[0]
    auth, _, hosts = netloc.rpartition("@")
    username = password = None
    if auth:
        user, _, pw = auth.partition(":")
        username, password = (unquote(user) or None), (unquote(pw) or None)
    nodes = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise BadInputError(f"redis-cluster:// needs HOST:PORT[,HOST:PORT...], got {item!r}")
        nodes.append(ClusterNode(host.strip("[]"), int(port)))
    return RedisCluster(
        startup_nodes=nodes, username=username, password=password,
        socket_connect_timeout=connect_timeout, socket_timeout=timeout,
    )  # fmt: skip


class RemoteTier(Tier):
    name = "remote"

    def __init__(self, url: str, size: int | None, policy: str, serde: str = "none", own_prefix: str | None = None) -> None:
        """`own_prefix`: the key prefix of this engine's model (world size, worker): keys under it
        that an earlier run put are accounted for (see the module docstring); None: none are."""
        super().__init__()
        self.url = url
        self.capacity = size
        self.serde = serde
        self.own_prefix = own_prefix
        self.book = Tracker(policy)
        self._client: Any = None
        self._client_lock = threading.Lock()
        if not url.lower().startswith("redis-cluster://"):
            self._client = make_client(url)  # no connection yet; bad URLs fail here
        self._lock = threading.RLock()
        self._down_until = 0.0
        self._backoff = 0.0
        self._in_outage = False
        self._staging: Any = None
        #: set once the chunks of earlier runs are accounted for (at once when there is no own_prefix)
        self.adopted = threading.Event()
        self._adopt_state = "pending" if own_prefix is not None else "done"
        self._adopt_lock = threading.Lock()
        self._dropped: set[str] | None = None  # keys deleted while an adoption runs: not booked by it
        self._closing = threading.Event()
        self._adopter: threading.Thread | None = None
        if own_prefix is None:
            self.adopted.set()
        elif self._client is not None:  # a cluster client connects when made: after its first good round trip
            self._start_adoption()

    @property
    def client(self) -> Any:
        """The redis-py client; a cluster client is made on first use (it connects at creation,
        and an unreachable cluster must not stop the engine from starting)."""
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    self._client = make_client(self.url)
        return self._client

    # --------------------------------------------------------------- chunks of earlier runs
    def _start_adoption(self) -> None:
        """Start the background adoption unless it ran, runs, or the tier is closing."""
        with self._adopt_lock:
            if self._adopt_state != "pending" or self._closing.is_set():
                return
            self._adopt_state = "running"
        with self._lock:
            self._dropped = set()
        self._adopter = threading.Thread(target=self._adopt_in_background, name="kv-remote-adopt", daemon=True)
        self._adopter.start()

    def _adopt_in_background(self) -> None:
        try:
            self.adopt()
        except Exception as exc:  # noqa: BLE001 - Redis not there yet: tried again after the next good round trip
            log.debug("remote tier: accounting for earlier chunks failed (%s); will retry", exc)
            with self._lock:
                self._dropped = None
            with self._adopt_lock:
                self._adopt_state = "pending"
            return
        with self._adopt_lock:
            self._adopt_state = "done"
        self.adopted.set()

    def adopt(self) -> tuple[int, int]:
        """Book the chunks under `own_prefix` that Redis holds and this engine does not know:
        (chunks, bytes) added. Their header records give the sizes and expiries; keys deleted
        meanwhile, expired or not ours are skipped. Then evicts down to `remote_size`. Raises on
        Redis errors (the caller retries)."""
        if self.own_prefix is None:
            return 0, 0
        chunks = nbytes = seen = 0
        batch: list[str] = []
        for name in self.client.scan_iter(match=scan_pattern(self.own_prefix), count=ADOPT_BATCH):
            text = name.decode() if isinstance(name, bytes) else name
            batch.append(text[len("ickv:{") : -len("}:m")])
            seen += 1
            if len(batch) >= ADOPT_BATCH or seen >= ADOPT_MAX_KEYS:
                added, size = self._adopt_batch(batch)
                chunks, nbytes, batch = chunks + added, nbytes + size, []
            if seen >= ADOPT_MAX_KEYS:
                log.warning("remote tier: more than %d chunks under %r; accounting for the first %d only",
                            ADOPT_MAX_KEYS, self.own_prefix, ADOPT_MAX_KEYS)  # fmt: skip
                break
            if self._closing.is_set():
                break
        added, size = self._adopt_batch(batch)
        chunks, nbytes = chunks + added, nbytes + size
        with self._lock:
            self._dropped = None
        if chunks:
            log.info("remote tier: accounting for %d chunk(s), %d bytes, put by an earlier run", chunks, nbytes)
        self._make_room(0, set())
        return chunks, nbytes

    def _adopt_batch(self, keys: list[str]) -> tuple[int, int]:
        if not keys:
            return 0, 0
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.get(self._names(key)[1])
        metas = pipe.execute()
        added = total = 0
        now = time.time()
        with self._lock:
            dropped = self._dropped or set()
            for key, meta in zip(keys, metas):
                if meta is None or key in self.book.entries or key in dropped:
                    continue
                try:
                    head, key_len = ChunkHeader.unpack(meta)
                except Exception:  # noqa: BLE001 - not a chunk record of ours: not booked
                    continue
                if meta[64 : 64 + key_len] != key.encode() or head.expired(now):
                    continue
                self.book.add(key, head.stored_len + 64, head.expires, oldest=True)
                added, total = added + 1, total + head.stored_len + 64
        return added, total

    # --------------------------------------------------------------- failure handling
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _guard(self, what: str, fn: Callable[[], T], default: T) -> T:
        if not self.available():
            return default
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - redis errors, sockets, cluster failover: all are misses
            self.counters.errors += 1
            self._backoff = min(BACKOFF_MAX, self._backoff * 2 if self._backoff else BACKOFF_MIN)
            self._down_until = time.monotonic() + self._backoff
            if not self._in_outage:
                self._in_outage = True
                log.warning("remote tier unavailable (%s failed: %s); serving from local tiers, retrying with backoff",
                            what, type(exc).__name__)  # fmt: skip
            else:
                log.debug("remote tier: %s failed: %s", what, exc)
            return default
        if self._in_outage:
            self._in_outage = False
            log.warning("remote tier is back")
        self._backoff = 0.0
        if self._adopt_state == "pending":  # Redis answers now: account for earlier runs' chunks
            self._start_adoption()
        return result

    @staticmethod
    def _names(key: str) -> tuple[str, str]:
        return f"ickv:{{{key}}}:d", f"ickv:{{{key}}}:m"

    # --------------------------------------------------------------- interface
    def contains(self, key: str) -> bool:
        return self.contains_many([key])[0]

    def contains_many(self, keys: list[str]) -> list[bool]:
        if not keys:
            return []

        def run() -> list[bool]:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(*self._names(key))
            return [n == 2 for n in pipe.execute()]

        return self._guard("exists", run, [False] * len(keys))

    def put(self, key: str, head: ChunkHeader, payload: Any, ttl: float | None = None) -> bool:
        return self.put_many([(key, head, payload, ttl)])[0]

    def put_many(self, items: list[tuple[str, ChunkHeader, Any, float | None]]) -> list[bool]:
        """Store chunks in one pipelined round trip (value + header per chunk, `SET EX` for TTLs)."""
        if not items:
            return []
        with self._lock:
            encoded = [self._encode(key, head, payload, ttl, reuse=len(items) == 1) for key, head, payload, ttl in items]
            fits = [e is not None for e in encoded]
            self._make_room(sum(e[2] for e in encoded if e is not None), {k for k, *_ in items})

            def run() -> bool:
                pipe = self.client.pipeline(transaction=False)
                for (key, *_), e in zip(items, encoded):
                    if e is not None:
                        data, meta, _, _, ex = e
                        d, m = self._names(key)
                        pipe.set(d, data, ex=ex)
                        pipe.set(m, meta, ex=ex)
                pipe.execute()
                return True

            if not any(fits) or not self._guard("put", run, False):
                return [False] * len(items)
            for (key, *_), e in zip(items, encoded):
                if e is not None:
                    self.book.add(key, e[2], e[3])
                    self.counters.stores += 1
            if self.book.tick % 1024 < len(items):  # Redis dropped expired keys itself: forget them here
                now = time.time()
                for gone in [k for k, e in self.book.entries.items() if e.expires and e.expires <= now]:
                    self.book.remove(gone)
            return fits

    def _contiguous(self, payload: Any, reuse: bool) -> Any:
        """The payload's bytes, contiguous: strided arrays are copied (into a reused buffer for one)."""
        import numpy as np

        if isinstance(payload, np.ndarray) and not payload.flags.c_contiguous:
            if not reuse:
                return memoryview(np.ascontiguousarray(payload)).cast("B")
            if self._staging is None or self._staging.nbytes < payload.nbytes:
                self._staging = np.empty(payload.nbytes, dtype=np.uint8)
            body = self._staging[: payload.nbytes]
            body.view(payload.dtype).reshape(payload.shape)[...] = payload
            return memoryview(body)
        return memoryview(payload).cast("B")

    def _encode(self, key: str, head: ChunkHeader, payload: Any, ttl: float | None, reuse: bool) -> Any:
        """(value, header record, accounted size, expiry, EX seconds), or None when it can never fit."""
        data = self._contiguous(payload, reuse)
        crc = head.crc if head.crc is not None else zlib.crc32(data)
        flags = head.flags & ~F_ZSTD
        if self.serde == "zstd":
            import zstandard

            data = zstandard.ZstdCompressor(level=1).compress(data)
            flags |= F_ZSTD
        expires = time.time() + ttl if ttl else 0.0
        record = ChunkHeader(head.dtype, head.kind, head.shape, head.nbytes, expires, crc, flags, len(data))
        kb = key.encode()
        size = len(data) + 64
        if self.capacity is not None and size > self.capacity:
            return None
        return data, record.pack(kb) + kb, size, expires, (max(1, math.ceil(ttl)) if ttl else None)

    def read(self, key: str, sink: Sink, expired_ok: bool = False) -> tuple[bool, Any]:
        return self.read_many([(key, sink)])[0]

    def read_many(self, items: list[tuple[str, Sink]]) -> list[tuple[bool, Any]]:
        """Fetch chunks in one pipelined round trip; each checked (key, length, crc32) and handed to its sink."""
        if not items:
            return []

        def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for key, _ in items:
                d, m = self._names(key)
                pipe.get(m)
                pipe.get(d)
            return pipe.execute()

        raw = self._guard("get", run, None)
        if raw is None:
            return [(False, None)] * len(items)
        out: list[tuple[bool, Any]] = []
        for n, (key, sink) in enumerate(items):
            meta, data = raw[2 * n], raw[2 * n + 1]
            raw[2 * n] = raw[2 * n + 1] = None  # let each value go once used
            if meta is None or data is None:
                out.append((False, None))
                continue
            try:
                head, key_len = ChunkHeader.unpack(meta)
                if meta[64 : 64 + key_len] != key.encode() or len(data) != head.stored_len:
                    raise ValueError("record does not match its key")
                if head.flags & F_ZSTD:
                    import zstandard

                    data = zstandard.ZstdDecompressor().decompress(data, max_output_size=head.nbytes)
                if len(data) != head.nbytes or (head.crc is not None and zlib.crc32(data) != head.crc):
                    raise ValueError("checksum mismatch")
            except Exception as exc:  # noqa: BLE001 - a bad record is a miss, removed and counted
                self.counters.errors += 1
                log.warning("remote tier: dropping bad chunk record (%s)", exc)
                self.delete(key)
                out.append((False, None))
                continue
            with self._lock:
                self.book.touch(key)
            try:
                out.append((True, sink(head, data)))
            except ValueError as exc:  # the record does not fit the request (another geometry)
                self.counters.errors += 1
                log.debug("remote tier: chunk %s refused: %s", key, exc)
                out.append((False, None))
        return out

    def delete(self, key: str) -> bool:
        with self._lock:
            self.book.remove(key)
            if self._dropped is not None:
                self._dropped.add(key)
        return bool(self._guard("delete", lambda: self.client.delete(*self._names(key)), 0))

    def delete_many(self, keys: list[str]) -> int:
        with self._lock:
            for key in keys:
                self.book.remove(key)
            if self._dropped is not None:
                self._dropped.update(keys)

        def run() -> int:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.delete(*self._names(key))
            return sum(1 for n in pipe.execute() if n)

        return self._guard("delete", run, 0) if keys else 0

    def keys(self, prefix: str = "") -> list[str]:
        """Chunk keys starting with `prefix` in Redis (every node of a cluster), plus what this engine put."""
        pattern = scan_pattern(prefix)

        def run() -> list[str]:
            out = []
            for name in self.client.scan_iter(match=pattern, count=1000):
                text = name.decode() if isinstance(name, bytes) else name
                out.append(text[len("ickv:{") : -len("}:m")])
            return out

        with self._lock:
            known = [k for k in self.book.entries if k.startswith(prefix)]
        found = self._guard("scan", run, None)
        return sorted(set(known) | set(found or ()))

    def pin(self, key: str, timeout: float | None = None, renew: bool = False) -> bool:
        # in-process book: the engine's own pin_timeout_s releases it, and it dies with the process
        with self._lock:
            entry = self.book.entries.get(key)
            if entry is not None:
                entry.pins += 0 if renew and entry.pins else 1
                return True
        return False

    def unpin(self, key: str) -> bool:
        with self._lock:
            entry = self.book.entries.get(key)
            if entry is not None:
                entry.pins = max(0, entry.pins - 1)
                return True
        return False

    def bytes_used(self) -> int:
        return self.book.total

    def close(self) -> None:
        self._closing.set()  # a running adoption stops after its current SCAN step
        try:
            if self._client is not None:
                self._client.close()
        except Exception:  # noqa: BLE001
            pass
        if self._adopter is not None and self._adopter is not threading.current_thread():
            self._adopter.join(timeout=5)

    def _make_room(self, size: int, incoming: set[str]) -> None:
        if self.capacity is None:
            return
        with self._lock:
            victims = self.book.pick(self.book.total + size - self.capacity, incoming)
        if not victims:
            return
        self.delete_many(victims)
        self.counters.evictions += len(victims)
