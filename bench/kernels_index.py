"""Catalog benchmark: index / re-index / query a 10,000-entry real Triton cache.

The cache is made from genuine Triton 3.x entries (compiled for cuda:80/90 and
hip:gfx90a/gfx942 without a GPU) replicated into new directories with a new
metadata `hash`, a matching base32 directory name and group files rewritten to
the copy. Every figure is printed next to the same run's baseline: walking the
tree and parsing every metadata JSON once (the least any indexer must do).

    .venv/bin/python bench/kernels_index.py            # 10,000 entries (a few minutes)
    .venv/bin/python bench/kernels_index.py --quick    # 2,000 entries
    INFERCACHE_BENCH_QUICK=1 make bench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def baseline(cache: Path) -> tuple[float, int]:
    """Walk the tree and parse every metadata JSON once (no catalog)."""
    t0 = time.perf_counter()
    n = 0
    for dirpath, _dirs, files in os.walk(cache):
        for name in files:
            if name.endswith(".json") and not name.startswith("__grp__") and not name.endswith(".autotune.json"):
                with open(os.path.join(dirpath, name), "rb") as handle:
                    json.loads(handle.read())
                n += 1
    return time.perf_counter() - t0, n


def warm(cache: Path) -> None:
    """Read every file once so no run below pays for cold disk reads the others skip."""
    for dirpath, _dirs, files in os.walk(cache):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as handle:
                handle.read()


def build(cache: Path, total: int) -> int:
    from infercache.testing.replicate import replicate_entry
    from infercache.testing.samples import build_sample_cache
    from infercache.kernels.triton_entry import TritonEntry, parse_entry

    seed = cache.parent / "seed"
    build_sample_cache(seed)
    originals = [p for p in sorted(seed.iterdir()) if isinstance(parse_entry(p), TritonEntry)]
    cache.mkdir()
    made = 0
    i = 0
    while made < total:
        for entry in originals:
            if made >= total:
                break
            replicate_entry(entry, cache, f"bench{i}", link=True)
            made += 1
        i += 1
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=None, help="cache size (default 10000, --quick 2000)")
    parser.add_argument("--quick", action="store_true", default=bool(os.environ.get("INFERCACHE_BENCH_QUICK")))
    parser.add_argument("--dir", type=Path, default=None, help="where to build the cache (default: a temp dir)")
    parser.add_argument("--build-only", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    total = args.entries or (2000 if args.quick else 10000)
    if args.build_only:
        print(build(args.build_only, total))
        return

    from infercache.kernels.catalog import Catalog
    from infercache.kernels.indexer import default_workers, index
    from infercache.kernels.query import KernelFilter, query

    work = Path(tempfile.mkdtemp(prefix="infercache-bench-", dir=args.dir))
    try:
        cache = work / "cache"
        t0 = time.perf_counter()
        # Built in a child process: Triton's compiler leaves ~200 MiB behind, which this
        # process (like `infercache kernels index`, which never imports Triton) should not carry.
        made = int(subprocess.run(
            [sys.executable, __file__, "--build-only", str(cache), "--entries", str(total)],
            check=True, capture_output=True, text=True,
        ).stdout.split()[-1])
        print(f"built {made} real Triton entries in {time.perf_counter() - t0:.1f}s under {cache}")

        # Flush the build's own writes first: their writeback would otherwise steal a CPU from
        # whichever runs happen to overlap it (the parallel index most). Then warm the page
        # cache for everything either side reads (this VM reclaims idle pages quickly), and
        # interleave baseline and full-index runs so both see the same conditions.
        os.sync()
        warm(cache)
        data = work / "data"
        base_runs, full_runs, serial_runs = [], [], []
        rounds = 3 if args.quick else 5
        for i in range(rounds):
            base_runs.append(baseline(cache)[0])
            for runs, workers in ((full_runs, None), (serial_runs, 1)):
                shutil.rmtree(data, ignore_errors=True)
                with Catalog.open(data) as cat:
                    t0 = time.perf_counter()
                    s = index(cat, [cache], mode="triton", workers=workers)
                    runs.append(time.perf_counter() - t0)
                    assert s.new == made, s.line()
        base = statistics.median(base_runs)
        full = statistics.median(full_runs)
        serial = statistics.median(serial_runs)
        print(f"baseline  walk + parse every metadata JSON once: {base * 1000:8.1f} ms  (median of {rounds})")
        print(f"full index:                {full * 1000:8.1f} ms  = {full / base:5.2f}x baseline  (target <= 2x; "
              f"{default_workers()} parsing workers on {os.cpu_count()} CPUs)")
        print(f"full index, one process:   {serial * 1000:8.1f} ms  = {serial / base:5.2f}x baseline  (--workers 1)")
        # Full index last, so the catalog below is the one it wrote.
        shutil.rmtree(data, ignore_errors=True)
        with Catalog.open(data) as cat:
            index(cat, [cache], mode="triton")

        with Catalog.open(data) as cat:
            reruns = []
            for _ in range(3):
                t0 = time.perf_counter()
                s = index(cat, [cache], mode="triton")
                reruns.append(time.perf_counter() - t0)
                assert s.unchanged == made and s.new == s.updated == 0, s.line()
            again = statistics.median(reruns)
            print(f"re-index, nothing changed: {again * 1000:8.1f} ms  = {again / base:5.2f}x baseline  (target <= 0.2x)")

            flt = KernelFilter.build(backend="cuda", arch="90")
            times = []
            for _ in range(7):
                t0 = time.perf_counter()
                rows = query(cat, flt)
                times.append(time.perf_counter() - t0)
            q = statistics.median(times)
            print(f"query --backend cuda --arch 90 ({len(rows)} of {made} rows, in-process): "
                  f"{q * 1000:6.1f} ms = {q / base:5.3f}x baseline  (target < 50 ms)")

        env = {**os.environ, "INFERCACHE_DATA_DIR": str(data)}
        cmd = [sys.executable, "-m", "infercache.cli.app", "kernels", "list", "--format", "json"]
        startup = [sys.executable, "-c", "pass"]
        walls, bare = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, env=env, check=True)
            walls.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            subprocess.run(startup, check=True)
            bare.append(time.perf_counter() - t0)
        n = len(json.loads(out.stdout))
        assert n == made
        wall = statistics.median(walls)
        print(f"`infercache kernels list --format json` ({n} entries): {wall * 1000:7.1f} ms wall "
              f"= {wall / base:5.2f}x baseline  (python start-up alone: {statistics.median(bare) * 1000:.0f} ms)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
