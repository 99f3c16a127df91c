"""Helpers shared by the catalog tests."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from infercache.kernels.catalog import Catalog
from infercache.kernels.indexer import IndexSummary, index
from infercache.kernels.triton_entry import TritonEntry, parse_entry

#: The session cache: 3 kernels x 4 targets x num_warps 4/8.
SAMPLE_ENTRIES = 24


def do_index(catalog: Catalog, *dirs: Path, mode: str = "auto", rescan: bool = False) -> IndexSummary:
    return index(catalog, list(dirs), mode=mode, rescan=rescan)


def entries(cache: Path) -> list[TritonEntry]:
    """All kernel entries of a Triton cache dir, parsed."""
    out = [parse_entry(p) for p in sorted(cache.iterdir())]
    return [e for e in out if isinstance(e, TritonEntry)]


def add_bad_content(cache: Path, es: list[TritonEntry], tmp_path: Path) -> Path:
    """Spoil entries 0 (corrupt metadata) and 1 (a binary missing), and add a symlink loop, a link to a
    copy of entry 2 outside the cache, a `tmp.pid_*` leftover and a launcher module; the outside copy."""
    (es[0].path / f"{es[0].name}.json").write_text("{not json")
    binary = next(f for f in es[1].files if f.type in ("cubin", "hsaco"))
    (es[1].path / binary.name).unlink()
    (cache / ("L" * 52)).symlink_to(cache / ("L" * 52))  # loop
    outside = tmp_path / "outside-entry"
    shutil.copytree(es[2].path, outside)
    (cache / ("O" * 52)).symlink_to(outside)
    (cache / "tmp.pid_1_abc").mkdir()
    launcher = cache / ("f" * 64)
    launcher.mkdir()
    (launcher / "__triton_launcher.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF")
    return outside


def set_age(entry: Path, seconds_ago: float) -> None:
    """Make an entry look `seconds_ago` old (its files' mtimes; Triton entries are never rewritten)."""
    ts = time.time() - seconds_ago
    for child in entry.iterdir():
        os.utime(child, (ts, ts), follow_symlinks=False)


def du(path: Path) -> int:
    """Bytes of regular files under `path` (not following links)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                total += os.lstat(p).st_size
    return total


def group_of(entry: Path) -> dict:
    return json.loads(next(entry.glob("__grp__*.json")).read_text())
