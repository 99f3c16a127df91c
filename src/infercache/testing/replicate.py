"""Copy a real Triton entry under a new key, consistently (benchmarks and tests).

Why: big caches for benchmarks (10,000 entries) and duplicate kernels for
`prune --deduplicate` are made from genuine entries; a copy must look like
something Triton wrote: directory name = base32 of the metadata `hash`, group
file paths pointing into the new directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from infercache.kernels.triton_entry import GROUP_PREFIX, group_children, group_file_bytes, key_for_hash



def replicate_entry(entry: Path, dest_parent: Path, salt: str, link: bool = False) -> Path:
    """Copy `entry` into `dest_parent` under a new hash derived from `salt`; returns the new dir.

    `link=True` hard-links the unchanged files instead of copying them (same sizes, far
    faster for 10,000 replicas; only the metadata and group files are new).
    """
    entry = Path(entry)
    group = next(entry.glob(f"{GROUP_PREFIX}*.json"))
    meta_name = group.name[len(GROUP_PREFIX):]
    meta = json.loads((entry / meta_name).read_bytes())
    digest = hashlib.sha256(f"{meta.get('hash', '')}:{salt}".encode()).hexdigest()
    target = Path(dest_parent) / key_for_hash(digest)
    target.mkdir(parents=True)
    children = group_children(json.loads(group.read_bytes()))
    for child in os.listdir(entry):
        if child == meta_name or child == group.name:
            continue
        src = entry / child
        if src.is_file() and not src.is_symlink():
            if link:
                os.link(src, target / child)
            else:
                shutil.copyfile(src, target / child)
    meta["hash"] = digest
    (target / meta_name).write_text(json.dumps(meta))
    # Plain write, no fsync: the copy is brand new (nothing to tear) and benchmarks make 10,000.
    (target / group.name).write_bytes(group_file_bytes(children, target))
    return target
