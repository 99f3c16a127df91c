"""Hit tracking overhead and ahead-of-time warm throughput, each next to its same-run baseline.

1. `TrackingCacheManager.get_group` on a hit vs Triton's plain `FileCacheManager.get_group`
   (10,000 lookups of a real entry, alternating rounds; the tracker's flush thread runs
   as in production, into a temporary catalog). Target: ratio <= 1.2.
2. `kernels warm` of 40 kernel/target pairs (real compiles for cuda:90 and hip:gfx942)
   with `--jobs 2` vs `--jobs 1`, each into a fresh cache.

    .venv/bin/python bench/kernels_tracking.py
    .venv/bin/python bench/kernels_tracking.py --quick     # 2,000 lookups, 8 pairs
    INFERCACHE_BENCH_QUICK=1 make bench
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

KERNELS_PY = '''
import triton
import triton.language as tl


@triton.jit
def bench_add(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=m) + tl.load(y_ptr + offs, mask=m), mask=m)
'''


def lookups(work: Path, n: int, rounds: int) -> None:
    from triton.runtime.cache import FileCacheManager

    from infercache.kernels import tracking
    from infercache.testing.samples import compile_sample

    cache = work / "cache"
    os.environ["INFERCACHE_DATA_DIR"] = str(work / "data")
    result = compile_sample(cache, "add_kernel", "cuda:90")
    os.environ["TRITON_CACHE_DIR"] = str(cache)
    filename = f"{next(result.entry_dir.glob('__grp__*.json')).name[len('__grp__'):]}"
    plain, tracked = FileCacheManager(result.key), tracking.TrackingCacheManager(result.key)
    assert plain.get_group(filename) is not None and tracked.get_group(filename) is not None

    def timed(manager: object, count: int) -> float:
        get = manager.get_group  # type: ignore[attr-defined]
        t0 = time.perf_counter()
        for _ in range(count):
            get(filename)
        return time.perf_counter() - t0

    # Alternate 1,000-lookup chunks so both see the same disk cache and CPU contention.
    chunk = min(1_000, n)
    plain_t, tracked_t = [], []
    for _ in range(rounds):
        p_sum = t_sum = 0.0
        for _ in range(n // chunk):
            p_sum += timed(plain, chunk)
            t_sum += timed(tracked, chunk)
        plain_t.append(p_sum / n)
        tracked_t.append(t_sum / n)
    tracking.flush()
    # The bookkeeping alone (what a hit adds to Triton's lookup), without the filesystem's noise.
    add = tracking._BUFFER.add
    t0 = time.perf_counter()
    for _ in range(n):
        add(result.key, hits=1)
    book = (time.perf_counter() - t0) / n
    tracking.flush()
    p, t = statistics.median(plain_t), statistics.median(tracked_t)
    ratios = sorted(b / a for a, b in zip(plain_t, tracked_t))
    print(f"get_group hit, {n:,} lookups x {rounds} rounds (median of rounds; best round in brackets):")
    print(f"  FileCacheManager (baseline)  {p * 1e6:8.2f} us/lookup  [{min(plain_t) * 1e6:.2f}]")
    print(f"  TrackingCacheManager         {t * 1e6:8.2f} us/lookup  [{min(tracked_t) * 1e6:.2f}]   "
          f"ratio {t / p:.3f} [best rounds {min(tracked_t) / min(plain_t):.3f}] "
          f"(per-round {ratios[0]:.3f}..{ratios[-1]:.3f}; target <= 1.2)")
    print(f"  tracker bookkeeping alone    {book * 1e6:8.2f} us/hit = {book / p * 100:.1f} % of a plain lookup")
    from infercache.kernels.catalog import Catalog

    with Catalog.open(work / "data") as cat:
        hits = cat.conn.execute("SELECT hits FROM usage WHERE key = ?", (result.key,)).fetchone()[0]
    print(f"  hits recorded in the catalog: {hits:,} (expected {n * rounds + 1 + n:,})")


def warm_throughput(work: Path, pairs: int) -> None:
    from infercache.kernels.warm import plan_warm
    from infercache.kernels.warm_spec import load_spec

    (work / "bench_kernels.py").write_text(KERNELS_PY)
    targets = ["cuda:90", "hip:gfx942"]
    # Typical tile sizes: 64..1024 elements x 1..8 warps (20 points, 4 in --quick), for each target.
    variants = pairs // len(targets)
    warps = [1, 2, 4, 8] if variants >= 20 else [4]
    blocks = [64, 128, 256, 512, 1024][: max(1, variants // len(warps))]
    spec = work / "spec.yaml"
    spec.write_text(textwrap.dedent(f"""
        kernels:
          - fn: bench_kernels:bench_add
            signature: {{x_ptr: "*fp32", y_ptr: "*fp32", out_ptr: "*fp32", n: i32}}
            constexprs: {{BLOCK: {blocks}}}
            options: {{num_warps: {warps}}}
    """))
    plan = plan_warm(load_spec(spec), targets)
    tasks = len(plan.tasks)
    times = {}
    for jobs in (1, 2):
        t0 = time.perf_counter()
        report = plan.execute(work / f"cache-jobs{jobs}", jobs=jobs)
        times[jobs] = time.perf_counter() - t0
        assert report.compiled == tasks and not report.failed, report.to_json()
    print(f"kernels warm, {tasks} kernel/target pairs ({', '.join(targets)}), fresh cache each:")
    print(f"  --jobs 1 (baseline)  {times[1]:6.2f} s  {tasks / times[1]:5.1f} compiles/s")
    print(f"  --jobs 2             {times[2]:6.2f} s  {tasks / times[2]:5.1f} compiles/s   "
          f"speedup {times[1] / times[2]:.2f}x (on {os.cpu_count()} CPUs; includes worker start-up)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", default=os.environ.get("INFERCACHE_BENCH_QUICK") == "1",
                        help="fewer lookups and pairs (also INFERCACHE_BENCH_QUICK=1)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="infercache-bench-tracking-") as tmp:
        work = Path(tmp)
        lookups(work, 2_000 if args.quick else 10_000, 7)
        warm_throughput(work, 8 if args.quick else 40)


if __name__ == "__main__":
    main()
