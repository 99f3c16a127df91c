"""torch.compile caches: time to the first compiled call in a fresh process, and artifact indexing.

Warm starts (three small models, torch.compile on CPU, tests/torchcache.py; each run is a NEW
interpreter, timed from its start to the first model's first output, torch import included):

* cold        empty TORCHINDUCTOR_CACHE_DIR (the baseline every other figure is next to)
* warm        the same cache dir again (in place)
* unpacked    `vault pack --mode inductor` to an oci: image, `vault unpack` at a new place
* pruned      a copy after the default `kernels prune --artifacts` (sources, locks, temps gone)
* mega-cache  empty dir + torch.compiler.load_cache_artifacts() of the mega-cache saved by the cold run

Indexing: a cache of N artifacts (real ones replicated under new keys, hard-linked) indexed into
a fresh catalog, and re-indexed unchanged, next to a plain os.walk + lstat of every file.

    .venv/bin/python bench/inductor_cache.py            # 3 rounds, 5,000 artifacts
    .venv/bin/python bench/inductor_cache.py --quick    # 1 round, 1,000 artifacts
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))


def first_call(cache: Path, **kw: object) -> dict:
    from tests.torchcache import run_fresh

    return run_fresh(cache, **kw)  # type: ignore[arg-type]


def prune_default(cache: Path, data: Path) -> int:
    from infercache.kernels.artifact_prune import plan_artifact_prune
    from infercache.kernels.catalog import Catalog
    from infercache.kernels.indexer import index
    from infercache.kernels.query import KernelFilter

    with Catalog(data / "catalog.db") as catalog:
        index(catalog, [cache], mode="inductor")
        plan = plan_artifact_prune(catalog, KernelFilter.build(cache_dirs=[cache]), min_age=0)
        return plan.execute(catalog).bytes_freed


def warm_starts(work: Path, rounds: int) -> None:
    from infercache.vault.pack import pack
    from infercache.vault.unpack import unpack

    figures: dict[str, list[float]] = {k: [] for k in ("cold", "warm", "unpacked", "pruned", "mega-cache")}
    work_done: dict[str, int] = {}
    for i in range(rounds):
        base = work / f"round{i}"
        cold_dir, mega = base / "cold", base / "mega.bin"
        cold = first_call(cold_dir, save_mega=mega)
        figures["cold"].append(cold["first_call_s"])
        work_done["cold"] = cold["compile_work"]
        warm = first_call(cold_dir)
        figures["warm"].append(warm["first_call_s"])
        work_done["warm"] = warm["compile_work"]
        ref = f"oci:{base / 'image'}:v1"
        pack(cold_dir, ref, mode="inductor")
        unpacked = base / "elsewhere" / "inductor"
        unpack(ref, unpacked)
        r = first_call(unpacked)
        figures["unpacked"].append(r["first_call_s"])
        work_done["unpacked"] = r["compile_work"]
        pruned = base / "pruned"
        shutil.copytree(cold_dir, pruned)
        freed = prune_default(pruned, base)
        r = first_call(pruned)
        figures["pruned"].append(r["first_call_s"])
        work_done["pruned"] = r["compile_work"]
        r = first_call(base / "mega-dest", load_mega=mega)
        figures["mega-cache"].append(r["first_call_s"])
        work_done["mega-cache"] = r["compile_work"]
        print(f"round {i + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in figures.items())
              + f"; default prune freed {freed} bytes", flush=True)
    med = {k: statistics.median(v) for k, v in figures.items()}
    print(f"\ntime to first compiled call in a fresh process (median of {rounds}; torch import included)")
    for name in figures:
        note = ""
        if name in ("unpacked", "pruned"):
            note = (f"  {med[name] / med['warm']:.2f}x warm (target <= 1.2x), "
                    f"{med[name] / med['mega-cache']:.2f}x mega-cache (target <= 1x)")
        print(f"  {name:<11} {med[name]:6.2f} s  = {med[name] / med['cold']:.2f}x cold   "
              f"compile work: {work_done[name]:>2} builds{note}")


def replicate(seed: Path, dest: Path, total: int) -> int:
    """A cache of about `total` artifacts: the seed's artifacts under new keys (files hard-linked)."""
    from infercache.kernels.inductor import scan_root

    rows = scan_root(seed, "inductor").rows
    made = 0
    i = 0
    while made < total:
        for row in rows:
            if made >= total:
                break
            tag = f"{i:06x}"
            src = Path(row.path)
            if row.kind in ("fxgraph", "aotautograd"):
                rel = src.relative_to(seed)
                target = dest / rel.parent / (src.name[:-6] + tag)
                target.mkdir(parents=True, exist_ok=True)
                for name in row.files:
                    os.link(src / name, target / name)
            else:
                key = row.key[:-6] + tag
                target_dir = dest / key[1:3]
                target_dir.mkdir(parents=True, exist_ok=True)
                for name in row.files:
                    os.link(src.parent / name, target_dir / (key + name[len(row.key):]))
            made += 1
        i += 1
    return made


def walk_baseline(cache: Path) -> float:
    t0 = time.perf_counter()
    n = 0
    for dirpath, _dirs, files in os.walk(cache):
        for name in files:
            os.lstat(os.path.join(dirpath, name))
            n += 1
    return time.perf_counter() - t0


def index_figures(work: Path, seed: Path, total: int, rounds: int) -> None:
    from infercache.kernels.catalog import Catalog
    from infercache.kernels.indexer import index

    cache = work / "big"
    t0 = time.perf_counter()
    made = replicate(seed, cache, total)
    print(f"\nbuilt {made} artifacts (hard links of real ones) in {time.perf_counter() - t0:.1f}s")
    base, full, again = [], [], []
    for i in range(max(rounds, 3)):
        base.append(walk_baseline(cache))
        with Catalog(work / f"cat{i}.db") as catalog:
            t0 = time.perf_counter()
            s = index(catalog, [cache], mode="inductor")
            full.append(time.perf_counter() - t0)
            assert s.artifacts == made, s.line()
            t0 = time.perf_counter()
            index(catalog, [cache], mode="inductor")
            again.append(time.perf_counter() - t0)
    b, f, a = statistics.median(base), statistics.median(full), statistics.median(again)
    print(f"baseline  os.walk + lstat of every file: {b * 1000:8.1f} ms  (median of {len(base)})")
    print(f"full index (reads FX graph / AOTAutograd entries): {f * 1000:8.1f} ms = {f / b:5.2f}x baseline")
    print(f"re-index, nothing changed:  {a * 1000:8.1f} ms = {a / b:5.2f}x baseline")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round, 1,000 artifacts")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--artifacts", type=int, default=None)
    parser.add_argument("--index-only", type=Path, default=None, metavar="SEED",
                        help="only the indexing figures, replicating the Inductor cache SEED")
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    total = args.artifacts or (1000 if args.quick else 5000)
    with tempfile.TemporaryDirectory(prefix="bench-inductor-") as tmp:
        work = Path(tmp)
        if args.index_only:
            index_figures(work, args.index_only.resolve(), total, rounds)
            return
        warm_starts(work, rounds)
        index_figures(work, work / "round0" / "cold", total, rounds)


if __name__ == "__main__":
    main()
