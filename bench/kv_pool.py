"""Shared-memory KV pool: bandwidth, small-op rate and allocator scaling, each next to a baseline.

    .venv/bin/python bench/kv_pool.py [--quick]      (or INFERCACHE_BENCH_QUICK=1)

Figures (baselines measured in the same run, on the same bytes):
- put / get bandwidth for 256 KiB, 4 MiB, 32 MiB values vs a plain numpy copy
  (`np.copyto` into a warm buffer; `tobytes()` too, since `get` returns new bytes);
  target: put and get >= 0.7x memcpy for values >= 4 MiB;
- 1 KiB put+get ops/s, one process and two processes, vs a Python dict doing the same copies;
- allocator alloc+free pairs/s at 90% fill, 1 GiB pool vs 64 GiB pool (disk tier, sparse
  file under /tmp): target within 2x of each other.
Every pool is destroyed at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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

from infercache.units import format_size  # noqa: E402

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


class Bench:
    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.tmp = Path(tempfile.mkdtemp(prefix="kvbench-"))
        self.data_dir = self.tmp / "data"
        self.data_dir.mkdir()
        os.environ["INFERCACHE_DATA_DIR"] = str(self.data_dir)  # workers inherit it
        self.pools: list[str] = []
        self.misses: list[str] = []

    # ------------------------------------------------------------ helpers
    def create(self, size: int, **kwargs: Any):
        from infercache.kv import Pool

        name = f"bench-{uuid.uuid4().hex[:8]}"
        self.pools.append(name)
        return Pool.create(name, size=size, data_dir=self.data_dir, **kwargs)

    def destroy(self, name: str) -> None:
        from infercache.kv import Pool

        Pool.destroy(name, data_dir=self.data_dir)
        self.pools.remove(name)

    def cleanup(self) -> None:
        from infercache.kv import Pool

        for name in self.pools:
            try:
                Pool.destroy(name, data_dir=self.data_dir)
            except Exception as exc:  # keep cleaning the others
                print(f"warning: could not destroy pool {name}: {exc}", file=sys.stderr)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ------------------------------------------------------------ bandwidth
    def bandwidth(self) -> None:
        """Cache-cold copies: each size rotates through 128 MiB of sources and destinations.

        KV values arrive from elsewhere, not from a cache-hot buffer, and a 4 MiB memcpy that
        stays in the 32 MiB L3 would make any baseline meaningless; so the baseline and the
        pool both walk a working set 4x the L3. Baselines: `np.copyto` into a warm buffer
        (for put and get_into) and `tobytes()` (a new bytes object, which is what get returns).
        """
        working_set = (32 if self.quick else 128) * MiB
        print(f"\n== put / get bandwidth, GB/s (1e9 B/s), best op after a warm-up pass, {format_size(working_set)} "
              "working set per size (cache-cold)")
        print(f"{'value':>9} | {'memcpy':>7} {'put':>7} {'x':>5} | {'get_into':>8} {'x':>5} | "
              f"{'tobytes':>7} {'get':>7} {'x':>5} | {'view+copy':>9} {'x':>5}")  # fmt: skip
        pool = self.create(working_set + 64 * MiB, policy="lru")
        try:
            for size in (256 * KiB, 4 * MiB, 32 * MiB):
                n = max(2, working_set // size)
                rounds = 2 if size >= 32 * MiB else 1
                rng = np.random.default_rng(size)
                srcs = [rng.integers(0, 256, size=size, dtype=np.uint8) for _ in range(n)]
                dsts = [np.empty_like(srcs[0]) for _ in range(n)]
                keys = [f"bw-{size}-{i}" for i in range(n)]
                for src, dst, key in zip(srcs, dsts, keys):  # first touch of every page, untimed
                    np.copyto(dst, src)
                    assert pool.put(key, src)
                t = {name: [] for name in ("memcpy", "put", "get_into", "tobytes", "get", "view")}

                def timed(name: str, func: Callable[[], Any]) -> Any:
                    start = time.perf_counter()
                    result = func()
                    t[name].append(time.perf_counter() - start)
                    return result

                def view_copy(key: str, dst: np.ndarray) -> None:
                    with pool.view(key) as view:
                        np.copyto(dst, np.frombuffer(view, dtype=np.uint8))

                # One pass per operation over the whole working set, baseline and pool passes
                # alternating: every op starts with cold source and destination (a pass reads
                # 4x the L3 between two touches of the same buffer).
                for _ in range(rounds + 1):
                    for i in range(n):
                        timed("memcpy", lambda: np.copyto(dsts[i], srcs[i]))
                    for i in range(n):
                        pool.delete(keys[i])
                        assert timed("put", lambda: pool.put(keys[i], srcs[i]))
                    got: Any = None  # both loops keep the previous result alive while making the next
                    for i in range(n):
                        got = timed("tobytes", srcs[i].tobytes)
                    for i in range(n):
                        got = timed("get", lambda: pool.get(keys[i]))
                    for i in range(n):
                        timed("get_into", lambda: pool.get_into(keys[i], dsts[i]))
                    for i in range(n):
                        timed("view", lambda: view_copy(keys[i], dsts[i]))
                    assert got is not None and len(got) == size and got[:4096] == srcs[-1][:4096].tobytes()
                # best of the timed ops (the first pass is warm-up): on a shared 2-core machine most
                # medians include other processes' time slices; the best op is what the copy costs
                gb = {name: _gbps(size, min(times[n:] if len(times) > n else times)) for name, times in t.items()}
                print(
                    f"{format_size(size):>9} | {gb['memcpy']:7.2f} {gb['put']:7.2f} {gb['put'] / gb['memcpy']:5.2f} | "
                    f"{gb['get_into']:8.2f} {gb['get_into'] / gb['memcpy']:5.2f} | "
                    f"{gb['tobytes']:7.2f} {gb['get']:7.2f} {gb['get'] / gb['tobytes']:5.2f} | "
                    f"{gb['view']:9.2f} {gb['view'] / gb['memcpy']:5.2f}"
                )
                if size >= 4 * MiB:
                    for what, base in (("put", "memcpy"), ("get_into", "memcpy"), ("get", "tobytes")):
                        ratio = gb[what] / gb[base]
                        if ratio < 0.7:
                            self.misses.append(
                                f"{what} {format_size(size)}: {gb[what]:.2f} GB/s = {ratio:.2f}x {base} (target 0.7x)"
                            )
                for key in keys:
                    pool.delete(key)
                del srcs, dsts
        finally:
            pool.close()
        print("   x = pool / baseline on its left; get returns new bytes, so its baseline is tobytes()")

    # ------------------------------------------------------------ small ops
    def small_ops(self) -> None:
        n = 5000 if self.quick else 20000
        print(f"\n== 1 KiB put+get ops/s ({n} put+get pairs per process; 1 op = one put or one get)")
        pool = self.create(64 * MiB, policy="lru")
        name = pool.stats()["name"]
        pool.close()

        one = _small_worker(name, 0, n, "pool", None)
        base = _small_worker(name, 0, n, "dict", None)
        floor = _flock_pairs_per_s(self.tmp / "flock-probe", n)
        print(f"{'1 process':>12}: pool {one:12,.0f} ops/s | baseline dict+copy {base:12,.0f} ops/s "
              f"| {one / base:.2f}x | (an flock lock+unlock pair alone: {floor:,.0f}/s)")  # fmt: skip
        two = self._two_procs(name, n, "pool")
        base2 = self._two_procs(name, n, "dict")
        print(f"{'2 processes':>12}: pool {two:12,.0f} ops/s | baseline dict+copy {base2:12,.0f} ops/s "
              f"| {two / base2:.2f}x | pool scaling 1->2 procs {two / one:.2f}x")  # fmt: skip

    def _two_procs(self, name: str, n: int, mode: str) -> float:
        go = self.tmp / f"go-{uuid.uuid4().hex[:6]}"
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, "--small-worker", name, str(i), str(n), mode, str(go)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in (1, 2)
        ]
        try:
            for proc in procs:  # wait until both are attached and warmed up
                assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            go.touch()
            results = []
            for proc in procs:
                out, _ = proc.communicate(timeout=300)
                if proc.returncode != 0:
                    raise RuntimeError(f"small-op worker exited {proc.returncode}")
                results.append(json.loads(out.strip().splitlines()[-1]))
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
        start = min(r["start"] for r in results)
        end = max(r["end"] for r in results)
        return sum(r["ops"] for r in results) / (end - start)

    # ------------------------------------------------------------ allocator
    def allocator(self) -> None:
        pairs = 20000 if self.quick else 100000
        print(f"\n== allocator: alloc+free pairs/s at 90% fill ({pairs} pairs of 1-128 blocks, 4 KiB blocks)")
        print("   baseline: first-fit scan of a block bitmap (the replaced tool's method), numpy-vectorised")
        figures = {}
        sparse_dir = Path(tempfile.mkdtemp(prefix="kvbench-sparse-", dir="/tmp"))
        try:
            for label, size, tier in (("1 GiB", GiB, "cpu"), ("64 GiB", 64 * GiB, "disk")):
                kwargs: dict[str, Any] = {"tier": tier, "policy": "lru"}
                if tier == "disk":
                    kwargs["path"] = str(sparse_dir / "pool-64g.bin")
                pool = self.create(size, **kwargs)
                try:
                    alloc = _allocator_of(pool)
                    n_blocks = alloc.n_blocks
                    fill_s, rate = _churn(alloc, 0.9, pairs)
                finally:
                    del alloc
                    pool.close()
                    self.destroy(pool.name)
                base = _bitmap_first_fit(n_blocks, 0.9, 20 if self.quick else 50)
                figures[label] = rate
                print(f"{label:>7} pool ({tier}, {n_blocks:,} blocks, filled in {fill_s:.1f} s): "
                      f"{rate:12,.0f} pairs/s | baseline bitmap first-fit {base:10,.1f} pairs/s")  # fmt: skip
        finally:
            shutil.rmtree(sparse_dir, ignore_errors=True)
        ratio = max(figures.values()) / min(figures.values())
        print(f"spread between the two pool sizes: {ratio:.2f}x (target <= 2x)")
        if ratio > 2:
            self.misses.append(f"allocator spread {ratio:.2f}x between 1 GiB and 64 GiB pools (target 2x)")


def _allocator_of(pool: Any) -> Any:
    """The pool's own allocator object (over the shared mapping), found by type."""
    from infercache.kv.allocator import Allocator

    for value in vars(pool).values() if hasattr(pool, "__dict__") else ():
        if isinstance(value, Allocator):
            return value
    for name in getattr(type(pool), "__slots__", ()):
        value = getattr(pool, name, None)
        if isinstance(value, Allocator):
            return value
    raise RuntimeError("cannot find the pool's allocator")


def _churn(alloc: Any, fill: float, pairs: int) -> tuple[float, float]:
    """Fill `alloc` to `fill` with random 1-128 block extents, punch holes, then time churn.

    One pair = alloc of a random size + free of a random live extent, so the fill level and
    the fragmentation stay steady while it runs. Returns (seconds to fill, pairs/s).
    """
    import random

    rng = random.Random(90)
    total = alloc.n_blocks
    live: list[tuple[int, int]] = []
    start = time.perf_counter()
    target = int(total * (fill + 0.05))
    used = 0
    while used < target:
        n = rng.randint(1, 128)
        s = alloc.alloc(n)
        if s < 0:
            break
        live.append((s, n))
        used += n
    rng.shuffle(live)  # free random extents down to the fill level: holes everywhere
    while used > total * fill and live:
        s, n = live.pop()
        alloc.free(s, n)
        used -= n
    fill_s = time.perf_counter() - start
    sizes = [rng.randint(1, 128) for _ in range(pairs)]
    picks = [rng.random() for _ in range(pairs)]
    t0 = time.perf_counter()
    for n, pick in zip(sizes, picks):
        s = alloc.alloc(n)
        if s < 0:
            raise RuntimeError("allocator full at 90% fill")
        i = int(pick * len(live))
        vs, vn = live[i]
        live[i] = (s, n)
        alloc.free(vs, vn)
    rate = pairs / (time.perf_counter() - t0)
    for s, n in live:  # leave the pool empty again
        alloc.free(s, n)
    return fill_s, rate


def _bitmap_first_fit(n_blocks: int, fill: float, pairs: int) -> float:
    """alloc+free pairs/s of a first-fit scan over a used-block bitmap at the same fill."""
    rng = np.random.default_rng(90)
    used = rng.random(n_blocks) < fill  # scattered fill: the scan must walk the bitmap
    pad = np.empty(n_blocks + 2, dtype=np.int8)
    t0 = time.perf_counter()
    for n in rng.integers(1, 129, size=pairs):
        pad[0] = pad[-1] = 1
        pad[1:-1] = used
        edges = np.diff(pad)
        starts = np.flatnonzero(edges == -1)
        ends = np.flatnonzero(edges == 1)
        fits = np.flatnonzero(ends - starts >= n)
        s = int(starts[fits[0]]) if len(fits) else int(np.argmin(used))
        used[s : s + n] = True
        used[s : s + n] = False  # and free it again
    return pairs / (time.perf_counter() - t0)


def _flock_pairs_per_s(path: Path, n: int) -> float:
    """Rate of bare flock LOCK_EX/LOCK_UN pairs: the floor any cross-process op pays for its lock."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        start = time.perf_counter()
        for _ in range(n):
            fcntl.flock(fd, fcntl.LOCK_EX)
            fcntl.flock(fd, fcntl.LOCK_UN)
        return n / (time.perf_counter() - start)
    finally:
        os.close(fd)


def _small_worker(name: str, wid: int, n: int, mode: str, go: str | None) -> float:
    """n put+get pairs of 1 KiB values on 1000 rotating keys; returns ops/s (2 ops per pair)."""
    value = np.random.default_rng(wid).integers(0, 256, size=1024, dtype=np.uint8).tobytes()
    keys = [f"small-{wid}-{i}" for i in range(1000)]
    if mode == "pool":
        from infercache.kv import Pool

        pool = Pool.open(name)
        put, get = pool.put, pool.get
    else:
        store: dict[str, bytes] = {}

        def put(key: str, val: bytes) -> bool:
            store[key] = bytes(bytearray(val))  # a copy in, as the pool makes
            return True

        def get(key: str) -> bytes | None:
            found = store.get(key)
            return None if found is None else bytes(bytearray(found))  # and a copy out

    for key in keys:  # warm up: every key exists, so the timed loop replaces values
        put(key, value)
    if go is not None:
        print("ready", flush=True)
        while not os.path.exists(go):
            time.sleep(0.001)
    start = time.perf_counter()
    for i in range(n):
        key = keys[i % 1000]
        if not put(key, value):
            raise RuntimeError(f"put {key} failed")
        if get(key) is None:
            raise RuntimeError(f"get {key} missed")
    end = time.perf_counter()
    if mode == "pool":
        pool.close()
    if go is not None:
        print(json.dumps({"ops": 2 * n, "start": start, "end": end}), flush=True)
    return 2 * n / (end - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--small-worker", nargs=5, metavar=("POOL", "ID", "N", "MODE", "GOFILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.small_worker:
        name, wid, n, mode, go = args.small_worker
        _small_worker(name, int(wid), int(n), mode, go)
        return 0
    quick = args.quick or os.environ.get("INFERCACHE_BENCH_QUICK") == "1"
    bench = Bench(quick)
    print(f"kv pool bench ({'quick' if quick else 'full'}); {os.cpu_count()} CPUs; numpy {np.__version__}")
    try:
        bench.bandwidth()
        bench.small_ops()
        bench.allocator()
    finally:
        bench.cleanup()
    if bench.misses:
        print("\nMISSED TARGETS:\n  " + "\n  ".join(bench.misses))
    else:
        print("\nall targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
