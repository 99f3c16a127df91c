"""MCV's bare-metal check after extraction: re-read each installed entry's own metadata and remove
the entries no local GPU (or `--target`) can use.

Unpack already filters by the image's manifest; this second look trusts only what landed on disk
(what MCV's `-b` did). It is planned first (a value listing what goes), then executed, and never
touches a path outside `dest`.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from infercache.fsutil import is_within
from infercache.gpu.compat import compatible_with_any, installed_triton_version
from infercache.gpu.targets import GpuTarget
from infercache.kernels.triton_entry import TritonEntry, scan_entry
from infercache.vault.check import local_targets

logger = logging.getLogger(__name__)


def _entry_name(key: str) -> bool:
    """An entry is one directory directly in `dest` (never `dest` itself, never a nested path)."""
    return bool(key) and key not in (".", "..") and "/" not in key and "\0" not in key


@dataclass(frozen=True)
class BaremetalPlan:
    """Which installed entries were checked, and which of them no local target can run."""

    dest: Path
    checked: tuple[str, ...]
    incompatible: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"checked": len(self.checked), "removed": list(self.incompatible)}


def plan_baremetal_check(dest: Path, keys: Sequence[str], targets: Sequence[str] | None = None) -> BaremetalPlan:
    """Check the entries `keys` under `dest` against the local GPUs (or `targets`); nothing is removed.

    A link is never checked (execution would not remove it, so the plan must not list it)."""
    gpus, _source = local_targets(targets or None)
    local_triton = installed_triton_version()
    checked: list[str] = []
    incompatible: list[str] = []
    for key in keys:
        path = Path(dest) / key
        if not _entry_name(key) or path.is_symlink() or not is_within(path, dest) or not path.is_dir():
            continue
        entry, _raw = scan_entry(path)
        if not isinstance(entry, TritonEntry):
            continue
        checked.append(key)
        target = GpuTarget.from_entry({"backend": entry.backend, "arch": entry.arch, "warp_size": entry.warp_size,
                                       "ptx_version": entry.ptx_version, "triton_version": entry.triton_version})
        if not compatible_with_any(target, gpus, local_triton):
            incompatible.append(key)
    return BaremetalPlan(Path(dest), tuple(checked), tuple(incompatible))


def execute_baremetal_check(plan: BaremetalPlan) -> BaremetalPlan:
    """Remove the plan's incompatible entries (each re-checked to lie inside `dest`, never followed as a link)."""
    for key in plan.incompatible:
        path = plan.dest / key
        if _entry_name(key) and is_within(path, plan.dest) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
    if plan.incompatible:
        logger.warning("removed %d incompatible entries after extraction", len(plan.incompatible))
    return plan


def baremetal_check(dest: Path, keys: Sequence[str], targets: Sequence[str] | None = None) -> BaremetalPlan:
    """Plan, then remove what no local target can run."""
    return execute_baremetal_check(plan_baremetal_check(dest, keys, targets))
