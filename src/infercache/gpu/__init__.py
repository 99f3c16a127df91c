"""GPU targets, local GPU detection and entry/GPU compatibility (used by the catalog and the vault)."""

from infercache.gpu.compat import Verdict, check_compatible, compatible_with_any, installed_triton_version
from infercache.gpu.detect import LocalGpu, detect_gpus
from infercache.gpu.targets import GpuTarget

__all__ = [
    "GpuTarget",
    "LocalGpu",
    "Verdict",
    "check_compatible",
    "compatible_with_any",
    "detect_gpus",
    "installed_triton_version",
]
