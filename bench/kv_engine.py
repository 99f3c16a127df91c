"""KV engine: lookup cost, chunk bandwidth per tier and cache-policy hit ratios, each next to a baseline.

    .venv/bin/python bench/kv_engine.py [--quick] [--only lookup|bandwidth|replay|lmcache]
    (INFERCACHE_BENCH_QUICK=1 = --quick)

Figures (baselines measured in the same run, on the same bytes):
- lookup of a fully cached 128k-token prompt (512 chunks of 256): the whole `Engine.lookup`
  (target < 2 ms; repeated, and a first lookup whose chunk keys are not remembered yet);
  `Pool.contains_many` of the 512 keys next to 512 `Pool.contains` calls (one lock each);
  the chained chunk hashing alone, next to sha256 over the raw token bytes once;
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
        self.results: dict[str, Any] = {}
        self.lmcache_python: str | None = None

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
        first = median_time(lambda: engine.lookup(tokens), rounds, engine.db.forget)
        as_list = tokens.tolist()
        whole_list = median_time(lambda: engine.lookup(as_list), max(3, rounds // 3))
        keys = engine.db.keys(arr)
        batched = median_time(lambda: engine.pool.contains_many(keys), rounds)
        one_by_one = median_time(lambda: [engine.pool.contains(k) for k in keys], rounds)
        chain = median_time(lambda: engine.db.chunk_hashes(arr), rounds)
        raw = median_time(lambda: hashlib.sha256(arr.tobytes()).digest(), rounds)
        print(f"  Engine.lookup (numpy tokens)          {whole * 1e3:7.2f} ms   (target < 2 ms)")
        print(f"  Engine.lookup, keys not remembered    {first * 1e3:7.2f} ms   (a prompt's first lookup)")
        print(f"  Engine.lookup (list of ints)          {whole_list * 1e3:7.2f} ms")
        print(f"  Pool.contains_many (512 keys)         {batched * 1e3:7.2f} ms   (one locked section)")
        print(f"  baseline: 512 x Pool.contains         {one_by_one * 1e3:7.2f} ms   -> {one_by_one / batched:.1f}x")
        print(f"  chained chunk hashing alone (sha256)  {chain * 1e3:7.2f} ms")
        print(f"  baseline: sha256 of the raw bytes once {raw * 1e3:6.2f} ms   -> chain/raw {chain / raw:.2f}x")
        self.results["chain_ms"] = chain * 1e3

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
        self.results["disk_ms"] = (d_store * 1e3, d_read * 1e3)

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
            return hit / total, engine.stats().tiers["hot"].evictions

        ceiling, dropped = run("lru", distinct * chunk_bytes * 4)
        assert dropped == 0, "the baseline cache must be big enough to keep everything"
        print(f"  {'policy':<10} hit ratio  evictions")
        for policy in POLICIES:
            ratio, evictions = run(policy, capacity)
            print(f"  {policy:<10} {ratio:8.3f}  {evictions:9d}")
        print(f"  {'baseline':<10} {ceiling:8.3f}  {0:9d}   (a cache that never evicts: every reusable token)")

    # ------------------------------------------------------------------ LMCache
    def lmcache(self) -> None:
        print("\n== LMCache 0.5.6 on the same data (ChunkedTokenDatabase, LocalDiskBackend)")
        python = self.lmcache_python or sys.executable
        probe = subprocess.run([python, "-c", "import lmcache.v1.token_database"], capture_output=True,
                               env={**os.environ, "LMCACHE_TRACK_USAGE": "false"})  # fmt: skip
        if probe.returncode:
            print("  skipped: lmcache is not importable (install it in its own venv: `pip install --no-deps "
                  "lmcache==0.5.6` plus its pure-Python needs, then --lmcache-python VENV/bin/python)")  # fmt: skip
            return
        if "chain_ms" not in self.results or "disk_ms" not in self.results:
            print("  skipped: run it together with the lookup and bandwidth parts (our side of the ratios)")
            return
        rounds = 3 if self.quick else 5
        done = subprocess.run([python, __file__, "--lmcache-worker", str(rounds), str(self.tmp / "lmc-disk")],
                              capture_output=True, text=True, timeout=600,
                              env={**os.environ, "LMCACHE_TRACK_USAGE": "false"})  # fmt: skip
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        if done.returncode or not lines:
            print(f"  failed: {done.stderr.strip().splitlines()[-1:] or done.returncode}")
            return
        import json

        theirs = json.loads(lines[-1])
        chain = self.results["chain_ms"]
        print(f"  chunk keys, 128k tokens: ours {chain:6.2f} ms (sha256 chain) | LMCache process_tokens "
              f"{theirs['process_tokens_ms']:6.2f} ms (builtin hash) | ours {theirs['process_tokens_ms'] / chain:5.1f}x faster")
        ours_put, ours_get = self.results["disk_ms"]
        print(f"  disk 32 MiB put+drain: ours {ours_put:6.1f} ms | LMCache {theirs['disk_put_ms']:6.1f} ms"
              f" | ratio {theirs['disk_put_ms'] / ours_put:4.2f}x")
        print(f"  disk 32 MiB get:       ours {ours_get:6.1f} ms | LMCache {theirs['disk_get_ms']:6.1f} ms"
              f" | ratio {theirs['disk_get_ms'] / ours_get:4.2f}x")


def lmcache_worker(rounds: int, directory: str) -> None:
    """Runs inside an interpreter with lmcache 0.5.6: its token database and disk backend, JSON out."""
    import asyncio
    import json
    import logging
    import threading

    import torch

    logging.disable(logging.WARNING)
    from lmcache.utils import CacheEngineKey
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.memory_allocators.tensor_memory_allocator import TensorMemoryAllocator
    from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend
    from lmcache.v1.storage_backend.local_disk_backend import LocalDiskBackend
    from lmcache.v1.token_database import ChunkedTokenDatabase

    tokens = torch.from_numpy(np.random.default_rng(0).integers(0, 128000, 131072).astype(np.int64))
    db = ChunkedTokenDatabase()
    tdb = median_time(lambda: list(db.process_tokens(tokens=tokens, make_key=False)), rounds * 3)
    cfg = LMCacheEngineConfig.from_defaults(chunk_size=256, local_cpu=False, max_local_cpu_size=0.5,
                                            local_disk=directory + "/", max_local_disk_size=4)  # fmt: skip
    alloc = TensorMemoryAllocator(torch.empty(256 * MiB, dtype=torch.uint8))
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    disk = LocalDiskBackend(cfg, loop, LocalCPUBackend(cfg, memory_allocator=alloc))
    kvn = np.random.default_rng(1).standard_normal((2, 32, 256, 1024), dtype=np.float32).astype(np.float16)
    kv = torch.from_numpy(kvn)
    puts, gets = [], []
    for i in range(rounds):
        key = CacheEngineKey("bench", 1, 0, i, torch.float16)
        t = time.perf_counter()
        obj = alloc.allocate(kv.shape, torch.float16)  # LMCache's put path: a memory object, then a disk task
        obj.tensor.copy_(kv)
        disk.submit_put_task(key, obj)
        while disk.exists_in_put_tasks(key) or not disk.contains(key):
            time.sleep(0.0005)
        puts.append(time.perf_counter() - t)
        t = time.perf_counter()
        got = disk.get_blocking(key)
        out = np.empty_like(kvn)
        out[...] = got.tensor.view(torch.float16).reshape(kv.shape).numpy()
        gets.append(time.perf_counter() - t)
        assert np.array_equal(out, kvn)
        got.ref_count_down()
    print(json.dumps({"process_tokens_ms": tdb * 1e3, "disk_put_ms": statistics.median(puts) * 1e3,
                      "disk_get_ms": statistics.median(gets) * 1e3}))  # fmt: skip
    os._exit(0)  # LMCache's executor threads never exit on their own


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", default=os.environ.get("INFERCACHE_BENCH_QUICK") == "1")
    parser.add_argument("--only", choices=("lookup", "bandwidth", "replay", "lmcache"))
    parser.add_argument("--lmcache-python", default=os.environ.get("INFERCACHE_LMCACHE_PYTHON"),
                        help="an interpreter where lmcache 0.5.6 imports (its own venv)")  # fmt: skip
    parser.add_argument("--lmcache-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.lmcache_worker:
        lmcache_worker(int(args.lmcache_worker[0]), args.lmcache_worker[1])
        return 0
    bench = Bench(args.quick)
    bench.lmcache_python = args.lmcache_python
    try:
        for part in ("lookup", "bandwidth", "replay", "lmcache"):
            if args.only in (None, part):
                getattr(bench, part)()
    finally:
        bench.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
