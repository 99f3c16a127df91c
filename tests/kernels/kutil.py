"""Helpers shared by the catalog tests."""

from __future__ import annotations

import json
import os
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
