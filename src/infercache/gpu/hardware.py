"""What this machine is: host facts, the installed Triton and the local GPUs (mcv's --hw-info)."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from typing import Any

from infercache.gpu import detect
from infercache.gpu.compat import installed_triton_version


@dataclass(frozen=True)
class HostInfo:
    """The host's name, OS, CPU count and physical memory (None where the OS does not say)."""

    hostname: str
    os: str
    kernel: str
    machine: str
    cpus: int | None
    memory_bytes: int | None

    @classmethod
    def here(cls) -> "HostInfo":
        try:
            memory: int | None = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            memory = None
        return cls(platform.node(), platform.system(), platform.release(), platform.machine(), os.cpu_count(),
                   memory)

    def to_json(self) -> dict[str, Any]:
        return {"hostname": self.hostname, "os": self.os, "kernel": self.kernel, "machine": self.machine,
                "cpus": self.cpus, "memory_bytes": self.memory_bytes}


@dataclass(frozen=True)
class HardwareInfo:
    """Host, local Triton and GPUs: what decides which cached kernels can run here."""

    host: HostInfo
    triton_version: str | None
    gpus: tuple[detect.LocalGpu, ...]

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host.to_json(), "triton_version": self.triton_version,
                "gpus": [gpu.to_json() for gpu in self.gpus]}


def hardware_info(sources: detect.Sources | None = None) -> HardwareInfo:
    """Look at this machine (GPU detection as :func:`detect.detect_gpus` does it)."""
    return HardwareInfo(HostInfo.here(), installed_triton_version(), tuple(detect.detect_gpus(sources)))
