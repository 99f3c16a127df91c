"""`Engine`: KV tensors stored in chunks keyed by token prefix, served from the fastest tier that has them.

LMCache's engine semantics (store / lookup / retrieve / prefetch / pin / clear, masks
``F...FT...T``), with tiers hot (the shared-memory `Pool`: every engine of a model on a host
shares it), disk and Redis, and the seed's TTL placement:

- lookup and retrieve walk the chunks in order across tiers and stop at the first chunk that
  no tier has (a suffix without its prefix is useless);
- a store writes suffix chunks first so that a prefix is always more recent than its suffixes:
  LRU/FIFO eviction then takes suffixes before their prefixes; retrieve reads in reverse too;
- a hit in a lower tier is promoted to hot; `write_back` demotes what hot (then disk) evicts;
  `write_through` writes every tier on store;
- a store with metadata goes to `select_backend`'s tier for `compute_ttl` seconds, then moves
  one tier down (again for the same TTL), and is dropped below the last tier;
- tier failures (Redis down, disk full, bad checksums) are counted and logged, never raised.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from infercache.errors import BadInputError
from infercache.kv.config import EngineConfig
from infercache.kv.placement import AccessLog, compute_ttl, normalize_location, select_backend
from infercache.kv.tiers.base import (
    DTYPES, KIND_NUMPY, KIND_TORCH, ChunkHeader, Tier, as_storage, from_storage, payload_view,
)  # fmt: skip
from infercache.kv.tiers.disk import DiskTier
from infercache.kv.tiers.hot import HotTier, default_pool_name
from infercache.kv.tiers.remote import RemoteTier
from infercache.kv.tokens import Chunk, TokenDatabase, mask_start, to_token_array

log = logging.getLogger(__name__)
_ACCESS_CAP = 65536
_SWEEP_MAX_WAIT = 5.0
_REMOTE_BATCH = 16  # chunks per pipelined Redis round trip


@dataclass(frozen=True)
class TierStats:
    hits: int
    misses: int
    stores: int
    bytes: int
    evictions: int
    errors: int

    def to_json(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class EngineStats:
    """Per-tier counters: hits/misses count chunks served by retrieve; bytes is what the tier holds."""

    instance_id: str
    chunk_size: int
    tiers: dict[str, TierStats]

    def to_json(self) -> dict[str, Any]:
        return {"instance_id": self.instance_id, "chunk_size": self.chunk_size,
                "tiers": {name: t.to_json() for name, t in self.tiers.items()}}  # fmt: skip


def _demotion_lead(ttl: float) -> float:
    """How long before its TTL runs out a chunk is moved down (past the TTL it is a miss)."""
    return min(2.0, 0.05 * ttl)


class Engine:
    """Prefix-keyed KV chunk store over hot / disk / remote tiers; see the module docstring."""

    def __init__(self, config: EngineConfig | None = None, **kwargs: Any) -> None:
        if config is None:
            config = EngineConfig(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        self.config = config
        self.instance_id = config.default_instance_id
        self.db = TokenDatabase(config.chunk_size, config.model_name, config.world_size, config.worker_id,
                                config.kv_dtype, config.tags, config.save_unfull_chunk)  # fmt: skip
        self._lock = threading.RLock()
        self._closed = False
        self._tiers: dict[str, Tier] = {}
        try:
            self._build_tiers()
        except BaseException:
            for tier in self._tiers.values():
                tier.close()
            raise
        self._order = list(self._tiers.values())
        self._expiry: list[tuple[float, int, str, str, float]] = []  # (when, seq, key, tier, ttl)
        self._ttl: dict[tuple[str, str], tuple[int, float, float]] = {}  # (key, tier) -> (live heap seq, expires, ttl)
        self._seq = itertools.count()
        self._pins: dict[tuple[str, str], float] = {}  # (key, tier) -> unpin deadline
        self._access = AccessLog(_ACCESS_CAP)  # per request (its last chunk's key)
        self._geometry: tuple[int, int, int, int] | None = None  # (dtype, kind, layers, hidden)
        self._wake = threading.Event()
        for name, tier in self._tiers.items():
            for key, expires in tier.expiries():  # found at restart: what is left of the TTL carries down
                self._schedule(key, name, expires, max(1.0, expires - time.time()))
        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-prefetch")
        self._sweeper = threading.Thread(target=self._sweep_loop, name="kv-sweeper", daemon=True)
        self._sweeper.start()

    def _build_tiers(self) -> None:
        cfg = self.config
        write_back = cfg.write_policy == "write_back"
        pool_name = cfg.pool_name or default_pool_name(cfg.model_name, cfg.world_size, cfg.worker_id)
        self._tiers["hot"] = HotTier(pool_name, int(cfg.local_cpu_size), cfg.cache_policy, cfg.data_dir, write_back)
        if cfg.local_disk:
            self._tiers["disk"] = DiskTier(cfg.local_disk, int(cfg.local_disk_size), cfg.cache_policy,
                                           cfg.disk_writers, cfg.disk_queue)  # fmt: skip
        if cfg.remote_url:
            self._tiers["remote"] = RemoteTier(cfg.remote_url, cfg.remote_size, cfg.cache_policy, cfg.remote_serde,
                                               own_prefix=self.db.key_prefix)  # fmt: skip
        if write_back:
            tiers = list(self._tiers.values())
            for upper, lower in zip(tiers, tiers[1:]):
                upper.evict_hook = lambda key, head, payload, t=lower: self._demoted(t, key, head, payload)

    def _demoted(self, lower: Tier, key: str, head: ChunkHeader, payload: Any) -> None:
        if not lower.contains(key):
            lower.put(key, head, payload)

    # ------------------------------------------------------------------ properties
    @property
    def locations(self) -> tuple[str, ...]:
        """The tiers this engine has, fastest first."""
        return tuple(self._tiers)

    @property
    def pool(self) -> Any:
        """The shared-memory `Pool` behind the hot tier."""
        return self._tiers["hot"].pool  # type: ignore[attr-defined]

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Engine({self.instance_id!r}, tiers={list(self._tiers)})"

    # ------------------------------------------------------------------ helpers
    def _tier(self, location: str) -> Tier:
        name = normalize_location(location)
        if name not in self._tiers:
            raise BadInputError(f"location {name!r} is not configured on this engine (it has: {', '.join(self._tiers)})")
        return self._tiers[name]

    def _check_open(self) -> None:
        if self._closed:
            raise BadInputError("engine is closed")

    def _locate(self, chunks: list[Chunk]) -> list[Tier]:
        """The fastest tier holding each chunk, stopping at the first chunk no tier has.

        The hot tier answers for all chunks in one locked pool section, Redis in one round trip."""
        if not chunks:
            return []
        hot, *lower = [t for t in self._order if t.name != "remote"]
        remote = self._tiers.get("remote")
        keys = [c.key for c in chunks]
        in_hot = hot.contains_many(keys)

        def local(i: int) -> Tier | None:
            return hot if in_hot[i] else next((t for t in lower if t.contains(keys[i])), None)

        found: list[Tier] = []
        for i in range(len(keys)):
            tier = local(i)
            if tier is None:
                if remote is None:
                    return found
                # later chunks: the fastest tier holding each (a local-only one does not end the walk)
                for j, here in enumerate(remote.contains_many(keys[i:]), i):
                    if (tier := local(j) or (remote if here else None)) is None:
                        break
                    found.append(tier)
                return found
            found.append(tier)
        return found

    def _schedule(self, key: str, tier: str, expires: float, ttl: float) -> None:
        seq = next(self._seq)
        self._ttl[(key, tier)] = (seq, expires, ttl)
        heapq.heappush(self._expiry, (expires - _demotion_lead(ttl), seq, key, tier, ttl))
        if len(self._expiry) > 4 * len(self._ttl) + 1024:  # re-stored chunks leave stale entries: compact
            self._expiry = [e for e in self._expiry if self._ttl.get((e[2], e[3]), (-1,))[0] == e[1]]
            heapq.heapify(self._expiry)
        self._wake.set()

    def _placement(self, chunks: list[Chunk], metadata: Any) -> tuple[int, float | None]:
        """(index of the target tier, TTL) for a store; hot and no TTL without metadata."""
        if metadata is None:
            return 0, None
        if not isinstance(metadata, dict):
            raise BadInputError(f"metadata must be a dict, got {type(metadata).__name__}")
        _, md = self._access.annotate(chunks[-1].key, metadata)
        cfg = self.config
        ttl = compute_ttl(md, base_ttl=cfg.base_ttl, min_ttl=cfg.min_ttl, max_ttl=cfg.max_ttl)
        wanted = ("hot", "disk", "remote").index(normalize_location(select_backend(md)))
        have = [("hot", "disk", "remote").index(n) for n in self._tiers]
        # the configured tier nearest to the wanted one (ties: the lower tier)
        best = min(range(len(have)), key=lambda i: (abs(have[i] - wanted), -have[i]))
        return best, ttl

    # ------------------------------------------------------------------ verbs
    def store(self, tokens: Any, kv: Any, mask: Any = None, metadata: dict[str, Any] | None = None) -> int:
        """Store the KV of `tokens` (masked-out prefix skipped); returns the tokens now cached.

        kv: ``[2, num_layers, len(tokens), hidden]`` numpy array or CPU torch tensor. Chunks
        already in their target tier are not written again (a store with metadata rewrites them: new TTL).
        """
        self._check_open()
        arr = to_token_array(tokens)
        storage, code, kind = as_storage(kv)
        if storage.shape[2] != len(arr):
            raise BadInputError(
                f"kv has {storage.shape[2]} tokens (shape {tuple(storage.shape)}) but tokens has {len(arr)} "
                f"(shape ({len(arr)},))"
            )
        if self.config.kv_dtype != "auto" and DTYPES[code][0] != self.config.kv_dtype:
            raise BadInputError(f"kv dtype {DTYPES[code][0]} differs from the engine's kv_dtype {self.config.kv_dtype}")
        start = mask_start(mask, len(arr), self.config.chunk_size)
        chunks = self.db.chunks(arr, start)
        if not chunks:
            return 0
        with self._lock:
            target, ttl = self._placement(chunks, metadata)
            if metadata is None:
                self._access.note(chunks[-1].key)
            self._geometry = (code, kind, storage.shape[1], storage.shape[3])
            order = self._order
            writes = order[target:] if self.config.write_policy == "write_through" else order[target : target + 1]
            remote = self._tiers.get("remote")
            if remote in writes and not (ttl and writes[0] is remote):  # one round trip: what Redis has
                in_remote = dict(zip([c.key for c in chunks], remote.contains_many([c.key for c in chunks])))
            else:
                in_remote = {}
            placed: dict[str, bool] = {}
            batch: list[tuple[Chunk, ChunkHeader, Any, float | None]] = []
            for chunk in reversed(chunks):  # suffixes first: prefixes end up most recent
                payload = storage[:, :, chunk.start : chunk.end, :]
                head = ChunkHeader(code, kind, payload.shape, payload.nbytes)
                placed[chunk.key] = False
                for i, tier in enumerate(writes):
                    tier_ttl = ttl if i == 0 else None
                    present = in_remote.get(chunk.key, False) if tier is remote else tier.contains(chunk.key)
                    if not tier_ttl and present:  # a TTL store rewrites: the TTL is refreshed
                        placed[chunk.key] = True
                    elif tier is remote:  # Redis writes go in pipelined batches
                        batch.append((chunk, head, payload, tier_ttl))
                        if len(batch) >= _REMOTE_BATCH:
                            self._flush_remote(batch, placed)
                    elif tier.put(chunk.key, head, payload, tier_ttl):
                        placed[chunk.key] = True
                        if tier_ttl:
                            self._schedule(chunk.key, tier.name, time.time() + tier_ttl, tier_ttl)
            self._flush_remote(batch, placed)
            stored = 0
            for chunk in chunks:
                if not placed[chunk.key]:  # every tier refused (remote down, too big): the nearest tier above
                    payload = storage[:, :, chunk.start : chunk.end, :]
                    head = ChunkHeader(code, kind, payload.shape, payload.nbytes)
                    for tier in reversed(order[:target]):
                        if tier.contains(chunk.key) or tier.put(chunk.key, head, payload, ttl):
                            if ttl:
                                self._schedule(chunk.key, tier.name, time.time() + ttl, ttl)
                            placed[chunk.key] = True
                            break
                stored += (chunk.end - chunk.start) if placed[chunk.key] else 0
            return stored

    def _flush_remote(self, batch: list[tuple[Chunk, ChunkHeader, Any, float | None]], placed: dict[str, bool]) -> None:
        if batch:
            results = self._tiers["remote"].put_many([(c.key, head, payload, ttl) for c, head, payload, ttl in batch])
            for (chunk, *_), ok in zip(batch, results):
                placed[chunk.key] = placed[chunk.key] or ok
            batch.clear()

    def lookup(self, tokens: Any) -> int:
        """Length of the cached token prefix (any tier), stopping at the first missing chunk."""
        self._check_open()
        chunks = self.db.chunks(to_token_array(tokens))
        with self._lock:
            found = self._locate(chunks)
        return chunks[len(found) - 1].end if found else 0

    def locate(self, tokens: Any) -> list[str]:
        """Per cached prefix chunk, the fastest location holding it (stops at the first gap)."""
        self._check_open()
        chunks = self.db.chunks(to_token_array(tokens))
        with self._lock:
            return [t.name for t in self._locate(chunks)]

    def retrieve(self, tokens: Any, mask: Any = None) -> tuple[Any, Any]:
        """(mask of retrieved tokens, kv ``[2, layers, n_retrieved, hidden]``) for the cached prefix.

        Chunks come from the fastest tier holding them; a hit in a lower tier is promoted to hot.
        """
        import numpy as np

        self._check_open()
        arr = to_token_array(tokens)
        n = len(arr)
        start = mask_start(mask, n, self.config.chunk_size)
        chunks = self.db.chunks(arr, start)
        torch_tokens = type(tokens).__module__.startswith("torch")
        with self._lock:
            where = self._locate(chunks)
            state: dict[str, Any] = {"out": None}
            valid = len(where)
            served: list[tuple[int, Tier]] = []
            remote = self._tiers.get("remote")
            from_remote = [i for i in range(len(where)) if where[i] is remote]
            for b in range(0, len(from_remote), _REMOTE_BATCH):  # pipelined batches
                part = from_remote[b : b + _REMOTE_BATCH]
                sinks = [(chunks[i].key, self._sink(state, chunks[i], start, chunks, len(where))) for i in part]
                for i, (ok, _) in zip(part, remote.read_many(sinks)):  # type: ignore[union-attr]
                    if ok:
                        served.append((i, remote))  # type: ignore[arg-type]
                    else:
                        valid = min(valid, i)
            for i in reversed(range(len(where))):  # suffixes first: prefixes end up most recent
                chunk = chunks[i]
                if where[i] is remote:
                    continue
                tiers = self._order[self._order.index(where[i]) :]
                for tier in tiers:
                    ok, _ = tier.read(chunk.key, self._sink(state, chunk, start, chunks, len(where)))
                    if ok:
                        served.append((i, tier))
                        break
                else:
                    valid = min(valid, i)  # lost meanwhile (evicted, bad checksum, Redis gone): the prefix ends here
            served = [(i, t) for i, t in served if i < valid]
            for i, tier in served:
                tier.counters.hits += 1
                for above in self._order[: self._order.index(tier)]:
                    above.counters.misses += 1
            if valid < len(chunks):
                for tier in self._order:
                    tier.counters.misses += 1
            out = state["out"]
            n_ret = chunks[valid - 1].end - start if valid else 0
            hot = self._order[0]
            for i, tier in served:  # promotion (after all reads: no tier buffer is still lent out)
                if tier is not hot:
                    c = chunks[i]
                    part = out[:, :, c.start - start : c.end - start, :]
                    hot.put(c.key, ChunkHeader(state["code"], state["kind"], part.shape, part.nbytes), part)
            if valid:
                self._access.note(chunks[-1].key)
        result_mask = np.zeros(n, dtype=bool)
        result_mask[start : start + n_ret] = True
        if out is None:
            code, kind, layers, hidden = self._geometry or (1, KIND_TORCH if torch_tokens else KIND_NUMPY, 0, 0)
            out = np.empty((2, layers, 0, hidden), dtype=DTYPES[code][1])
        else:
            code, kind = state["code"], state["kind"]
            if out.shape[2] != n_ret:
                out = np.ascontiguousarray(out[:, :, :n_ret, :])
        kv = from_storage(out, code, kind)
        if torch_tokens or kind == KIND_TORCH:
            import torch

            return torch.from_numpy(result_mask), kv
        return result_mask, kv

    def _sink(self, state: dict[str, Any], chunk: Chunk, start: int, chunks: list[Chunk], count: int) -> Any:
        return lambda head, buf: self._fill(state, head, buf, chunk, start, chunks, count)

    def _fill(self, state: dict[str, Any], head: ChunkHeader, buf: Any, chunk: Chunk, start: int,
              chunks: list[Chunk], count: int) -> None:  # fmt: skip
        """Sink: copy one chunk's payload from the tier's buffer into the output array."""
        import numpy as np

        if state["out"] is None:
            total = chunks[count - 1].end - start
            state["out"] = np.empty((2, head.shape[1], total, head.shape[3]), dtype=head.storage_dtype())
            state["code"], state["kind"] = head.dtype, head.kind
        out = state["out"]
        if head.dtype != state["code"] or head.shape != (
            2, out.shape[1], chunk.end - chunk.start, out.shape[3],
        ):  # fmt: skip
            raise ValueError(f"chunk {chunk.key} has shape {head.shape}, expected the request's geometry")
        src = payload_view(head, buf)
        try:
            out[:, :, chunk.start - start : chunk.end - start, :] = src
        finally:
            del src

    def move(self, tokens: Any, src: str, dst: str, copy: bool = False) -> int:
        """Move (or copy) the token prefix's chunks from `src` to `dst`; tokens whose chunks now sit in dst."""
        self._check_open()
        source, target = self._tier(src), self._tier(dst)
        chunks = self.db.chunks(to_token_array(tokens))
        with self._lock:
            return self._move(chunks, source, target, copy)

    def _move(self, chunks: list[Chunk], source: Tier, target: Tier, copy: bool) -> int:
        done = 0
        for chunk in chunks:
            _, expires, ttl = self._ttl.get((chunk.key, source.name), (0, 0.0, 0.0)) if not copy else (0, 0.0, 0.0)
            left = max(1.0, expires - time.time()) if expires else None  # a moved chunk keeps what is left of its TTL
            if not target.contains(chunk.key):
                if source is target or not source.contains(chunk.key):
                    break
                ok, stored = source.read(chunk.key, lambda head, buf, k=chunk.key, d=left: target.put(k, head, buf, d))
                if not ok or not stored:
                    break
            if not copy and source is not target:
                source.delete(chunk.key)
                self._ttl.pop((chunk.key, source.name), None)
                if left and target.name != "remote":  # Redis expires its own keys
                    self._schedule(chunk.key, target.name, time.time() + left, ttl)
            done = chunk.end
        return done

    def prefetch(self, tokens: Any) -> "Future[int]":
        """Load the cached prefix into the hot tier in the background; the future gives the tokens now hot."""
        self._check_open()
        chunks = self.db.chunks(to_token_array(tokens))

        def run() -> int:
            with self._lock:
                if self._closed:
                    return 0
                where = self._locate(chunks)
                hot = self._order[0]
                done = 0
                for chunk, tier in zip(chunks, where):
                    if tier is not hot and not self._move([chunk], tier, hot, copy=True):
                        break
                    done = chunk.end
                return done

        return self._prefetcher.submit(run)

    def pin(self, tokens: Any, location: str | None = None) -> int:
        """Protect the cached prefix from eviction for `pin_timeout_s` (in `location`, else where each
        chunk is fastest; the hot tier's pool keeps the deadline, so a killed engine's pins lapse too)."""
        self._check_open()
        chunks = self.db.chunks(to_token_array(tokens))
        with self._lock:
            tiers = [self._tier(location)] * len(chunks) if location else self._locate(chunks)
            deadline = time.time() + self.config.pin_timeout_s
            done = 0
            for chunk, tier in zip(chunks, tiers):
                held = (chunk.key, tier.name) in self._pins  # again: the deadline moves, the count stays
                if not tier.pin(chunk.key, self.config.pin_timeout_s, held):
                    self._pins.pop((chunk.key, tier.name), None)
                    break
                self._pins[(chunk.key, tier.name)] = deadline
                done = chunk.end
            self._wake.set()
            return done

    def unpin(self, tokens: Any) -> int:
        """Undo `pin` for the prefix's chunks (every location); tokens unpinned."""
        self._check_open()
        chunks = self.db.chunks(to_token_array(tokens))
        with self._lock:
            done = 0
            for chunk in chunks:
                hit = False
                for name, tier in self._tiers.items():
                    if self._pins.pop((chunk.key, name), None) is not None:
                        tier.unpin(chunk.key)
                        hit = True
                if not hit:
                    break
                done = chunk.end
            return done

    def clear(self, location: str | None = None) -> int:
        """Remove this model's chunks from one tier or all (disk included); chunks removed."""
        self._check_open()
        tiers = [self._tier(location)] if location else list(self._order)
        removed = 0
        with self._lock:
            prefix = self.db.key_prefix
            for tier in tiers:
                tier.flush()
                keys = [k for k in (tier.keys(prefix) if tier is self._tiers.get("remote") else tier.keys())
                        if k.startswith(prefix)]  # fmt: skip
                if hasattr(tier, "delete_many"):
                    tier.delete_many(keys)  # type: ignore[attr-defined]
                else:
                    for key in keys:
                        tier.delete(key)
                for key in keys:
                    self._ttl.pop((key, tier.name), None)
                    self._pins.pop((key, tier.name), None)
                removed += len(keys)
        return removed

    def stats(self) -> EngineStats:
        tiers = {}
        for name, tier in self._tiers.items():
            c = tier.counters
            tiers[name] = TierStats(c.hits, c.misses, c.stores, tier.bytes_used(), tier.eviction_count(), c.errors)
        return EngineStats(self.instance_id, self.config.chunk_size, tiers)

    def flush(self) -> None:
        """Wait until queued disk writes are on disk."""
        for tier in self._order:
            tier.flush()

    # ------------------------------------------------------------------ TTL and pin expiry
    def expire(self, now: float | None = None) -> int:
        """Move chunks whose TTL has run out (by `now`) one tier down, or drop them below the last
        tier, and release pins past their timeout; chunks moved or dropped.

        The sweeper thread calls this; `now` lets a simulation or a test advance the clock.
        """
        now = time.time() if now is None else now
        moved = 0
        with self._lock:
            for key_tier, deadline in list(self._pins.items()):
                if deadline <= now:
                    del self._pins[key_tier]
                    tier = self._tiers.get(key_tier[1])
                    if tier is not None:
                        tier.unpin(key_tier[0])
            while self._expiry and self._expiry[0][0] <= now:
                _, seq, key, name, ttl = heapq.heappop(self._expiry)
                if self._ttl.get((key, name), (-1,))[0] != seq:  # cancelled or rescheduled since
                    continue
                del self._ttl[(key, name)]
                tier = self._tiers[name]
                if (key, name) in self._pins:  # pinned: stays until unpinned or its pin times out, TTL kept
                    self._schedule(key, name, now + self.config.pin_timeout_s, ttl)
                    continue
                below = self._order[self._order.index(tier) + 1 :]
                if below:
                    lower = below[0]
                    if not lower.contains(key):
                        tier.read(key, lambda head, buf, k=key, t=lower, d=ttl: t.put(k, head, buf, d or None), True)
                    if ttl and lower.name != "remote" and lower.contains(key):
                        self._schedule(key, lower.name, now + ttl, ttl)
                tier.delete(key)
                tier.counters.evictions += 1
                moved += 1
        return moved

    def _sweep_loop(self) -> None:
        while not self._closed:
            with self._lock:
                times = ([self._expiry[0][0]] if self._expiry else []) + ([min(self._pins.values())] if self._pins else [])
                nxt = min(times) if times else None
            wait = _SWEEP_MAX_WAIT if nxt is None else max(0.0, min(_SWEEP_MAX_WAIT, nxt - time.time()))
            self._wake.wait(wait)
            self._wake.clear()
            if self._closed:
                return
            try:
                self.expire()
            except Exception as exc:  # noqa: BLE001 - the sweeper must survive a failing tier
                log.warning("kv engine %s: expiry sweep failed: %s", self.instance_id, exc)

    # ------------------------------------------------------------------ close
    def close(self) -> None:
        """Drain async disk writes, release pins and detach from every tier (idempotent)."""
        if self._closed:
            return
        with self._lock:
            self._closed = True
        self._wake.set()
        self._prefetcher.shutdown(wait=True)
        if self._sweeper is not threading.current_thread():
            self._sweeper.join(timeout=10)
        with self._lock:
            for (key, name) in list(self._pins):
                self._tiers[name].unpin(key)
            self._pins.clear()
            for tier in self._order:
                try:
                    tier.close()
                except Exception as exc:  # noqa: BLE001
                    log.warning("kv engine %s: closing tier %s failed: %s", self.instance_id, tier.name, exc)
