"""Cache discovery: finding Triton cache dirs in a big vLLM tree, next to a full-walk baseline.

    .venv/bin/python bench/discovery.py [--quick]      (or INFERCACHE_BENCH_QUICK=1)

Builds a vLLM cache (legacy triton_cache/ per rank, newer unpacked + binary artifacts,
AOT inductor_cache) holding ~10,000 Triton entries (2,000 with --quick): one real entry
compiled by Triton's AOT compiler, hard-linked into new key directories. Figures:
- `discover()` over the tree vs the baseline `os.walk` of the whole tree (what a scanner that
  looks for group files everywhere does); target: at most 0.1x the baseline, since discovery
  never lists inside entries or Inductor's generated-code dirs;
- `detect_mode()` on a flat Triton cache of the same size vs one `os.scandir` of its root;
  target: at most 2x (it stops at the first entry-looking child).
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from infercache.kernels.discovery import detect_mode, discover  # noqa: E402


def _median(func: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _key(i: int) -> str:
    return base64.b32encode(i.to_bytes(32, "big")).decode().rstrip("=")


def _replicate(entry: Path, dest: Path, start: int, count: int) -> int:
    """`count` copies of `entry` (hard links) under `dest` with fresh keys."""
    dest.mkdir(parents=True, exist_ok=True)
    files = [p for p in entry.iterdir() if p.is_file()]
    for i in range(start, start + count):
        d = dest / _key(i)
        d.mkdir()
        for f in files:
            os.link(f, d / f.name)
    return start + count


def _noise(inductor: Path, n: int) -> None:
    for i in range(n):
        sub = inductor / f"c{i % 64:02x}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"c{i:06x}.py").write_text("# generated\n")
    (inductor / "fxgraph" / "ab" / "fkey").mkdir(parents=True, exist_ok=True)
    (inductor / "fxgraph" / "ab" / "fkey" / "0").write_bytes(b"x" * 64)


def build(root: Path, entry: Path, total: int) -> int:
    ranks = 8
    per = total // (ranks * 3)
    n = 0
    tcc = root / "torch_compile_cache"
    for r in range(ranks):
        rank = tcc / "0a1b2c3d4e" / f"rank_{r}_0"
        n = _replicate(entry, rank / "triton_cache", n, per)
        _noise(rank / "inductor_cache", 200)
        new = tcc / "f0e1d2c3b4" / f"rank_{r}_0" / "backbone"
        new.mkdir(parents=True)
        (new / "cache_key_factors.json").write_text("{}")
        for a in range(4):
            art = new / f"artifact_compile_range_1_8192_subgraph_{a}"
            n = _replicate(entry, art / "triton" / "0", n, per // 4)
            _noise(art, 50)
        for a in range(4, 8):
            (new / f"artifact_compile_range_1_8192_subgraph_{a}").write_bytes(b"\0" * 4096)
        aot = tcc / "torch_aot_compile" / ("5f" * 32)
        (aot / f"rank_{r}_0").mkdir(parents=True)
        (aot / f"rank_{r}_0" / "model").write_bytes(b"\0" * 4096)
    n = _replicate(entry, tcc / "torch_aot_compile" / ("5f" * 32) / "inductor_cache" / "triton" / "0", n, per * ranks)
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", default=os.environ.get("INFERCACHE_BENCH_QUICK") == "1")
    args = parser.parse_args()
    total = 2_000 if args.quick else 10_000
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    from infercache.testing.samples import compile_sample

    work = Path(tempfile.mkdtemp(prefix="bench-discovery-"))
    try:
        seed = compile_sample(work / "seed", "add_kernel", "cuda:90").entry_dir
        root = work / "vllm"
        entries = build(root, seed, total)
        dirs = list(discover(root))
        listed = sum(len(os.listdir(d.path)) for d in dirs)
        assert listed == entries, (listed, entries)
        files = sum(len(fs) for _, _, fs in os.walk(root))
        print(f"vLLM tree: {entries} Triton entries, {files} files; {len(dirs)} cache dirs found")

        base = _median(lambda: sum(1 for _ in os.walk(root)), 3)
        ours = _median(lambda: list(discover(root)), 3)
        print(f"discover(vllm tree)        {ours * 1e3:8.1f} ms   baseline os.walk of the tree {base * 1e3:8.1f} ms"
              f"   ratio {ours / base:.3f}x (target <= 0.1x)")

        flat = work / "triton"
        _replicate(seed, flat, 0, total)
        base = _median(lambda: list(os.scandir(flat)), 5)
        ours = _median(lambda: detect_mode(flat), 5)
        print(f"detect_mode(triton cache)  {ours * 1e3:8.2f} ms   baseline one scandir of the root {base * 1e3:8.2f} ms"
              f"   ratio {ours / base:.2f}x (target <= 2x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
