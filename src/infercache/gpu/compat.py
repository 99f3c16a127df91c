"""Can a cached Triton entry run (and hit) on a given GPU? Rules with human-readable reasons.

Rules (each failure is a reason; the verdict is compatible when there are none):
* backend equal (a HIP code object never runs on CUDA and vice versa);
* arch equal: Triton keys entries by exact arch, CUDA cubins are not portable across
  majors, and arch-specific `sm_90a`-style entries need exactly that capability (90);
* warp size equal (wave64 code on a wave32 RDNA device or the reverse is wrong code);
* PTX ISA: the driver's max supported ISA >= the entry's `ptx_version` where both are
  known. The driver *version* is never compared with a PTX version (MCV's bug: it
  compared "550.54" with 84 and so rejected every CUDA cache);
* Triton version differs from the local one → a warning (the entry cannot hit on another
  Triton build, but is harmless to keep).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from infercache.gpu.detect import LocalGpu
from infercache.gpu.targets import GpuTarget, cuda_arch_base, format_ptx_version, normalize_backend

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    """Outcome of one entry-vs-GPU check: failures in `reasons`, non-fatal notes in `warnings`."""

    compatible: bool
    reasons: tuple[str, ...]
    warnings: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"compatible": self.compatible, "reasons": list(self.reasons), "warnings": list(self.warnings)}


#: The distributions Triton ships as: PyPI's, and PyTorch's nightly / ROCm builds.
TRITON_DISTRIBUTIONS: tuple[str, ...] = ("triton", "pytorch-triton", "pytorch-triton-rocm")


def installed_triton_version() -> str | None:
    """Version of the installed Triton, whichever distribution holds it, read from package metadata
    (no `import triton`, ~1 s saved). The one answer `kernels stats`, `gpu`, `vault check` and `unpack` use."""
    from importlib import metadata  # stdlib, but ~9 ms: only when asked

    for dist in TRITON_DISTRIBUTIONS:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _arch_reason(entry: GpuTarget, gpu: GpuTarget) -> str | None:
    if entry.backend != "cuda":
        if entry.arch != gpu.arch:
            return f"arch {entry.arch} ≠ GPU's {gpu.arch}: AMD code objects run only on the gfx arch they were built for"
        return None
    gpu_arch = cuda_arch_base(gpu.arch)
    entry_base = cuda_arch_base(entry.arch)
    if entry.arch != entry_base and entry_base != gpu_arch:
        return (f"arch sm_{entry.arch} ≠ GPU's sm_{gpu_arch}: arch-specific ({entry.arch[-1]}) "
                f"cubins run only on compute capability {entry_base[:-1]}.{entry_base[-1]} exactly")
    if entry_base == gpu_arch:
        return None
    if entry_base[:-1] != gpu_arch[:-1]:
        return (f"arch sm_{entry.arch} ≠ GPU's sm_{gpu_arch}: cubins are not portable across "
                f"major compute capabilities")
    return (f"arch sm_{entry.arch} ≠ GPU's sm_{gpu_arch}: Triton only loads entries compiled "
            f"for the GPU's exact compute capability")


def check_compatible(
    entry: GpuTarget,
    gpu: LocalGpu | GpuTarget,
    local_triton_version: str | None = None,
) -> Verdict:
    """Verdict for running `entry` on `gpu` (a detected GPU, or a `--target`).

    For a plain GpuTarget standing in for a GPU, its `ptx_version` is read as the max PTX ISA
    it supports and its `triton_version` as the local Triton when `local_triton_version` is None.
    """
    if isinstance(gpu, LocalGpu):
        target, max_ptx, cuda = gpu.target, gpu.max_ptx_version, gpu.cuda_version
    else:
        target, max_ptx, cuda = gpu, gpu.ptx_version, None
        local_triton_version = local_triton_version or gpu.triton_version
    reasons: list[str] = []
    warnings: list[str] = []
    e_backend, g_backend = normalize_backend(entry.backend), normalize_backend(target.backend)
    if e_backend != g_backend:
        reasons.append(f"backend {e_backend} ≠ GPU's {g_backend}: kernels built for one never run on the other")
    else:
        arch = _arch_reason(GpuTarget(e_backend, entry.arch, entry.warp_size),
                            GpuTarget(g_backend, target.arch, target.warp_size))
        if arch:
            reasons.append(arch)
    if entry.warp_size != target.warp_size:
        reasons.append(f"warp size {entry.warp_size} ≠ GPU's {target.warp_size}: the code assumes "
                       f"{entry.warp_size}-wide warps")
    if e_backend == "cuda" and entry.ptx_version is not None:
        if max_ptx is None:
            warnings.append(f"entry uses PTX ISA {format_ptx_version(entry.ptx_version)}; the driver's "
                            f"supported PTX ISA is unknown, not checked")
        elif entry.ptx_version > max_ptx:
            via = f" (CUDA {cuda})" if cuda else ""
            reasons.append(f"entry needs PTX ISA {format_ptx_version(entry.ptx_version)} but the driver{via} "
                           f"supports up to {format_ptx_version(max_ptx)}: update the GPU driver")
    if entry.triton_version and local_triton_version and entry.triton_version != local_triton_version:
        warnings.append(f"built by Triton {entry.triton_version}, local Triton is {local_triton_version}: "
                        f"the entry cannot be a cache hit here")
    return Verdict(not reasons, tuple(reasons), tuple(warnings))


def compatible_with_any(
    entry: GpuTarget, gpus: list[LocalGpu] | list[GpuTarget], local_triton_version: str | None = None
) -> bool:
    """True when `entry` suits at least one of `gpus` (what per-entry unpack filtering asks)."""
    return any(check_compatible(entry, gpu, local_triton_version).compatible for gpu in gpus)
