"""KV engine: lookup cost, chunk bandwidth per tier and cache-policy hit ratios, each next to a baseline.

    .venv/bin/python bench/kv_engine.py [--quick] [--only lookup|bandwidth|replay|lmcache]
    (INFERCACHE_BENCH_QUICK=1 = --quick)

Figures (baselines measured in the same run, on the same bytes):
- lookup of a fully cached 128k-token prompt (512 chunks of 256): the whole `Engine.lookup`
  (target < 2 ms) and the chained chunk hashing alone, next to sha256 over the raw token
  bytes once;
- store + retrieve of a 7B-like chunk (32 layers x 2 x 256 tokens x 1024 hidden, fp16 =
  32 MiB): hot tier through the engine vs a dict of numpy copies (target >= 0.6x); disk tier
  vs a plain file write + read of the same bytes (>= 0.7x); Redis tier vs raw redis-py
  SET/GET of the same bytes (>= 0.8x); medians;
- a multi-round chat replay (shared system prompt, growing histories, Zipf users) through
  the engine with each cache policy: hit ratio per policy next to an unbounded cache;
- LMCache 0.5.6's ChunkedTokenDatabase and LocalDiskBackend on the same data, only when
  `lmcache` imports (it is not a dependency).
Pools, files and the redis-server this starts are removed at the end, also on error.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from infercache.kv import Engine, Pool  # noqa: E402
from infercache.kv.tiers.base import ChunkHeader, as_storage, payload_view  # noqa: E402

MiB = 1 << 20
POLICIES = ("lru", "lfu", "fifo", "priority", "ttl", "s3fifo")


def median_time(fn: Callable[[], Any], rounds: int, setup: Callable[[], Any] | None = None) -> float:
    times = []
    for _ in range(rounds):
        if setup is not None:
            setup()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class Bench:
    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.tmp = Path(tempfile.mkdtemp(prefix="kvengine-bench-"))
        self.data_dir = str(self.tmp / "data")
        os.environ["INFERCACHE_DATA_DIR"] = self.data_dir
        self.engines: list[Engine] = []
        self.redis: subprocess.Popen[bytes] | None = None
        self.redis_url: str | None = None

    def engine(self, **kwargs: Any) -> Engine:
        kwargs.setdefault("pool_name", f"bench-eng-{uuid.uuid4().hex[:8]}")
        kwargs.setdefault("data_dir", self.data_dir)
        engine = Engine(**kwargs)
        self.engines.append(engine)
        return engine

    def start_redis(self) -> str | None:
        binary = shutil.which("redis-server")
        if binary is None:
            return None
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.redis = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                       "--appendonly", "no", "--dir", str(self.tmp)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        import redis

        client = redis.Redis(port=port)
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        return self.redis_url

    def close(self) -> None:
        for engine in self.engines:
            name = engine.pool.name
            engine.close()
            try:
                Pool.destroy(name, data_dir=self.data_dir)
            except Exception:  # noqa: BLE001 - shared by two engines: destroyed already
                pass
        if self.redis is not None:
            self.redis.kill()
            self.redis.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ------------------------------------------------------------------ lookup
    def lookup(self) -> None:
        print("\n== lookup: fully cached 128k-token prompt (512 chunks of 256)")
        engine = self.engine(chunk_size=256, local_cpu_size="64M")
        tokens = np.random.default_rng(0).integers(0, 128000, 131072).astype(np.int64)
        engine.store(tokens, np.zeros((2, 1, len(tokens), 1), dtype=np.float16))
        assert engine.lookup(tokens) == len(tokens)
        rounds = 10 if self.quick else 30
        arr = tokens.astype("<u4")
        whole = median_time(lambda: engine.lookup(tokens), rounds)
        as_list = tokens.tolist()
        whole_list = median_time(lambda: engine.lookup(as_list), max(3, rounds // 3))
        chain = median_time(lambda: engine.db.chunk_hashes(arr), rounds)
        raw = median_time(lambda: hashlib.sha256(arr.tobytes()).digest(), rounds)
        print(f"  Engine.lookup (numpy tokens)          {whole * 1e3:7.2f} ms   (target < 2 ms)")
        print(f"  Engine.lookup (list of ints)          {whole_list * 1e3:7.2f} ms")
        print(f"  chained chunk hashing alone (sha256)  {chain * 1e3:7.2f} ms")
        print(f"  baseline: sha256 of the raw bytes once {raw * 1e3:6.2f} ms   -> chain/raw {chain / raw:.2f}x")
        self.results["lookup_ms"] = whole * 1e3

    # ------------------------------------------------------------------ bandwidth
    def bandwidth(self) -> None:
        print("\n== store + retrieve of one 7B-like chunk (2 x 32 layers x 256 tokens x 1024 hidden fp16 = 32 MiB)")
        rng = np.random.default_rng(1)
        kv = rng.standard_normal((2, 32, 256, 1024), dtype=np.float32).astype(np.float16)
        nbytes = kv.nbytes
        rounds = 3 if self.quick else 7

        def line(name: str, ours: tuple[float, float], base: tuple[float, float], target: float) -> None:
            o = 2 * nbytes / sum(ours) / 1e9
            b = 2 * nbytes / sum(base) / 1e9
            print(f"  {name:<7} ours store {ours[0] * 1e3:6.1f} ms + retrieve {ours[1] * 1e3:6.1f} ms = {o:5.2f} GB/s"
                  f" | baseline {base[0] * 1e3:6.1f} + {base[1] * 1e3:6.1f} ms = {b:5.2f} GB/s"
                  f" | ratio {o / b:4.2f}x (target >= {target}x)")  # fmt: skip

        # hot: the engine end to end vs a dict of numpy copies
        engine = self.engine(chunk_size=256, local_cpu_size="160M")
        counter = iter(range(10**6))
        state: dict[str, Any] = {}

        def new_tokens() -> None:
            engine.clear()
            state["tokens"] = np.arange(256) + 1000 * next(counter)

        store = median_time(lambda: engine.store(state["tokens"], kv), rounds, new_tokens)
        engine.store(state["tokens"], kv)
        retrieve = median_time(lambda: engine.retrieve(state["tokens"]), rounds)
        assert np.array_equal(engine.retrieve(state["tokens"])[1], kv)
        cache: dict[int, np.ndarray] = {}
        b_store = median_time(lambda: cache.__setitem__(0, kv.copy()), rounds)
        b_retrieve = median_time(lambda: cache[0].copy(), rounds)
        line("hot", (store, retrieve), (b_store, b_retrieve), 0.6)

        # disk: the tier (async write + drain, checked read) vs plain file write + read
        from infercache.kv.tiers.disk import DiskTier

        disk_dir = self.tmp / "disk"
        tier = DiskTier(disk_dir, 1 << 30, "lru")
        storage, code, kind = as_storage(kv)
        head = ChunkHeader(code, kind, storage.shape, storage.nbytes)

        def disk_put() -> None:
            tier.put("bench@1@0@x@float16", head, storage)
            tier.flush()

        def disk_read() -> None:
            out = np.empty_like(storage)

            def sink(h: ChunkHeader, buf: Any) -> None:
                out[...] = payload_view(h, buf)

            assert tier.read("bench@1@0@x@float16", sink)[0]

        d_store = median_time(disk_put, rounds, lambda: tier.delete("bench@1@0@x@float16"))
        d_read = median_time(disk_read, rounds)
        tier.close()
        plain = disk_dir / "plain.bin"

        def plain_write() -> None:
            with open(plain, "wb") as handle:
                handle.write(memoryview(kv).cast("B"))

        def plain_read() -> None:
            with open(plain, "rb") as handle:
                np.frombuffer(handle.read(), dtype=np.float16).reshape(kv.shape)

        p_write = median_time(plain_write, rounds, lambda: plain.unlink(missing_ok=True))
        p_read = median_time(plain_read, rounds)
        line("disk", (d_store, d_read), (p_write, p_read), 0.7)

        # Redis: the tier (pipelined value + header, crc32 checked) vs raw SET/GET
        url = self.start_redis()
        if url is None:
            print("  redis   skipped: redis-server not installed")
            return
        from infercache.kv.tiers.remote import RemoteTier, make_client

        remote = RemoteTier(url, None, "lru")

        def remote_read() -> None:
            out = np.empty_like(storage)

            def sink(h: ChunkHeader, buf: Any) -> None:
                out[...] = payload_view(h, buf)

            assert remote.read("bench@1@0@r@float16", sink)[0]

        r_store = median_time(lambda: remote.put("bench@1@0@r@float16", head, storage), rounds)
        r_read = median_time(remote_read, rounds)
        remote.close()
        client = make_client(url)
        raw_set = median_time(lambda: client.set("raw", memoryview(kv).cast("B")), rounds)
        raw_get = median_time(lambda: np.frombuffer(client.get("raw"), dtype=np.float16).reshape(kv.shape), rounds)
        client.close()
        line("redis", (r_store, r_read), (raw_set, raw_get), 0.8)

    # ------------------------------------------------------------------ replay
    def replay(self) -> None:
        print("\n== multi-round chat replay (shared system prompt, growing histories, Zipf users): hit ratio")
        rng = np.random.default_rng(2)
        users, requests = (40, 400) if self.quick else (60, 1200)
        system = list(range(1, 65))  # 64 tokens, 4 chunks of 16
        turn = 32
        picks = np.minimum(rng.zipf(1.3, requests), users) - 1
        histories: dict[int, list[int]] = {}
        trace = []
        for u in picks.tolist():
            history = histories.setdefault(u, [])
            question = rng.integers(100, 30000, turn).tolist()
            prompt = system + history + question
            trace.append(prompt)
            history.extend(question + rng.integers(100, 30000, turn).tolist())  # question + answer
        kv = np.zeros((2, 2, max(len(p) for p in trace), 24), dtype=np.float16)  # 3 KiB per 16-token chunk
        chunk_bytes = 4096
        distinct = len({tuple(p[: i + 16]) for p in trace for i in range(0, len(p) - 15, 16)})
        capacity = max(64, distinct // 5) * chunk_bytes  # a fifth of the working set
        print(f"  {requests} requests, {users} users, {distinct} distinct chunks, hot tier {capacity // MiB} MiB "
              f"(~{capacity // chunk_bytes} chunks)")  # fmt: skip

        def run(policy: str, size: int) -> tuple[float, int]:
            engine = self.engine(chunk_size=16, local_cpu_size=size, cache_policy=policy, model_name=f"chat-{policy}")
            hit = total = 0
            for prompt in trace:  # what a serving engine does: reuse the cached prefix, store the rest
                arr = np.asarray(prompt)
                mask, _ = engine.retrieve(arr)
                hit += int(mask.sum())
                total += len(prompt)
                engine.store(arr, kv[:, :, : len(prompt)])
            return hit / total, engine.stats().tiers["hot"].evictions + engine.pool.stats()["evictions"]

        ceiling, dropped = run("lru", distinct * chunk_bytes * 4)
        assert dropped == 0, "the baseline cache must be big enough to keep everything"
        print(f"  {'policy':<10} hit ratio  evictions")
        for policy in POLICIES:
            ratio, evictions = run(policy, capacity)
            print(f"  {policy:<10} {ratio:8.3f}  {evictions:9d}")
        print(f"  {'baseline':<10} {ceiling:8.3f}  {0:9d}   (a cache that never evicts: every reusable token)")

    # ------------------------------------------------------------------ LMCache
    def lmcache(self) -> None:
        print("\n== LMCache 0.5.6 on the same data")
        try:
            import lmcache  # noqa: F401
            from lmcache.experimental.token_database import ChunkedTokenDatabase  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - optional peer
            print(f"  skipped: lmcache is not importable here ({type(exc).__name__}); "
                  "`pip install --no-deps lmcache==0.5.6` in a separate venv to compare")  # fmt: skip
            return
        print("  lmcache imports, but its comparison is not wired in this version of the bench")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", default=os.environ.get("INFERCACHE_BENCH_QUICK") == "1")
    parser.add_argument("--only", choices=("lookup", "bandwidth", "replay", "lmcache"))
    args = parser.parse_args()
    bench = Bench(args.quick)
    bench.results = {}  # type: ignore[attr-defined]
    try:
        for part in ("lookup", "bandwidth", "replay", "lmcache"):
            if args.only in (None, part):
                getattr(bench, part)()
    finally:
        bench.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
