"""Local GPU detection, best source first, with the facts compatibility checks need.

Sources, in order:
1. NVIDIA: NVML through ``nvidia-ml-py`` (``pynvml``): compute capability → arch ("90"),
   warp 32, driver version, the max CUDA version the driver supports → max PTX ISA.
2. AMD: the ``amdsmi`` Python package; else ``amd-smi static --json``; else
   ``rocm-smi --showproductname --json``; else the KFD topology in sysfs. The gfx arch
   always comes from the device (``target_graphics_version`` / ``GFX Version`` /
   ``gfx_target_version``), never from the product name (MCV mapped MI300 wrongly).
3. torch, only if nothing above found a GPU and torch is installed with a GPU build.

No GPU (or no driver, or no tool) is an empty list, never an error: every source
failure is logged at debug level and the next source is tried.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from infercache.errors import BadInputError
from infercache.gpu.targets import GpuTarget, format_ptx_version

logger = logging.getLogger(__name__)

KFD_NODES = Path("/sys/class/kfd/kfd/topology/nodes")
_TOOL_TIMEOUT_S = 15
_ROCM_BIN = Path("/opt/rocm/bin")

#: Highest PTX ISA version each CUDA release supports (Triton's int encoding: 84 = ISA 8.4).
#: From NVIDIA's PTX ISA release notes ("PTX ISA version X.Y ... CUDA X.Y"); note 12.6 kept
#: ISA 8.5. The driver can JIT/load PTX up to the ISA of the CUDA version it reports.
CUDA_TO_MAX_PTX: dict[tuple[int, int], int] = {
    (10, 0): 63, (10, 1): 64, (10, 2): 65,
    (11, 0): 70, (11, 1): 71, (11, 2): 72, (11, 3): 73, (11, 4): 74, (11, 5): 75,
    (11, 6): 76, (11, 7): 77, (11, 8): 78,
    (12, 0): 80, (12, 1): 81, (12, 2): 82, (12, 3): 83, (12, 4): 84, (12, 5): 85,
    (12, 6): 85, (12, 7): 86, (12, 8): 87, (12, 9): 88,
    (13, 0): 90, (13, 1): 91, (13, 2): 92,
}


def max_ptx_for_cuda(cuda_version: str | None) -> int | None:
    """Max PTX ISA a driver supporting `cuda_version` ("12.4") accepts, from the table.

    Releases newer than the table follow Triton's own rule for CUDA >= 13 (ISA 9.0 + 1.0 per
    major + 0.1 per minor); unknown or unparsable → None (the PTX check is then skipped).
    """
    if not cuda_version:
        return None
    match = re.match(r"^(\d+)\.(\d+)", str(cuda_version).strip())
    if not match:
        return None
    major, minor = int(match.group(1)), int(match.group(2))
    if (major, minor) in CUDA_TO_MAX_PTX:
        return CUDA_TO_MAX_PTX[(major, minor)]
    if major >= 13:
        return 90 + (major - 13) * 10 + minor
    return None


@dataclass(frozen=True)
class LocalGpu:
    """One local GPU: its Triton target plus the driver facts compatibility depends on."""

    index: int
    name: str
    target: GpuTarget
    driver_version: str | None
    cuda_version: str | None
    max_ptx_version: int | None
    source: str  # "nvml" | "amdsmi" | "amd-smi" | "rocm-smi" | "kfd" | "torch"

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "backend": self.target.backend,
            "arch": self.target.arch,
            "warp_size": self.target.warp_size,
            "target": str(self.target),
            "driver_version": self.driver_version,
            "cuda_version": self.cuda_version,
            "max_ptx_version": self.max_ptx_version,
            "max_ptx_isa": format_ptx_version(self.max_ptx_version),
            "source": self.source,
        }


# ---------------------------------------------------------------------------- helpers


def _text(value: Any) -> str:
    """NVML/amdsmi return bytes on old versions, str on new."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _hip_gpu(index: int, name: str, gfx: Any, driver: str | None, source: str,
             warp_size: int | None = None) -> LocalGpu | None:
    """LocalGpu for an AMD device, or None when the reported gfx arch is unusable."""
    try:
        target = GpuTarget.make("hip", str(gfx).strip(), warp_size)
    except BadInputError:
        logger.debug("%s: GPU %d reports no usable gfx arch (%r); skipped", source, index, gfx)
        return None
    return LocalGpu(index, name or target.arch, target, driver, None, None, source)


def _extract_json(text: str) -> Any:
    """JSON from a tool's stdout, skipping warning lines some ROCm tools print before it."""
    decoder = json.JSONDecoder()
    offset = 0
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith(("{", "[")):
            try:
                return decoder.raw_decode(text[offset + len(line) - len(line.lstrip()):])[0]
            except json.JSONDecodeError:
                pass  # e.g. a "[WARNING] ..." line: keep looking
        offset += len(line)
    raise ValueError("no JSON document in the output")


def _version_from_nvml_int(value: int) -> str:
    """NVML's 12040 → '12.4'."""
    return f"{value // 1000}.{(value % 1000) // 10}"


# ---------------------------------------------------------------------------- NVIDIA


def _query_library(
    name: str, init: Callable[[], Any], shutdown: Callable[[], Any], read: Callable[[list[LocalGpu]], None]
) -> list[LocalGpu]:
    """One session with a GPU library binding: init (failing = no GPU of that kind, not an error),
    `read` appending what it finds, shutdown whatever happened. A failure midway keeps what was read."""
    try:
        init()
    except Exception as exc:  # library not found, driver not loaded...: the binding's own error types
        logger.debug("%s unavailable: %s", name, exc)
        return []
    gpus: list[LocalGpu] = []
    try:
        read(gpus)
    except Exception as exc:
        logger.warning("%s query failed: %s", name, exc)
    finally:
        try:
            shutdown()
        except Exception:
            pass
    return gpus


def from_nvml(nvml: Any) -> list[LocalGpu]:
    """GPUs through an NVML binding (the ``pynvml`` module of nvidia-ml-py); [] when NVML fails."""

    def read(gpus: list[LocalGpu]) -> None:
        try:
            driver: str | None = _text(nvml.nvmlSystemGetDriverVersion())
        except Exception:
            driver = None
        cuda: str | None = None
        for getter in ("nvmlSystemGetCudaDriverVersion_v2", "nvmlSystemGetCudaDriverVersion"):
            if hasattr(nvml, getter):
                try:
                    cuda = _version_from_nvml_int(int(getattr(nvml, getter)()))
                    break
                except Exception:
                    continue
        for index in range(int(nvml.nvmlDeviceGetCount())):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
                name = _text(nvml.nvmlDeviceGetName(handle))
            except Exception as exc:
                logger.warning("NVML: cannot read GPU %d: %s", index, exc)
                continue
            target = GpuTarget.make("cuda", f"{int(major)}{int(minor)}", 32)
            gpus.append(LocalGpu(index, name, target, driver, cuda, max_ptx_for_cuda(cuda), "nvml"))

    return _query_library("NVML", lambda: nvml.nvmlInit(), lambda: nvml.nvmlShutdown(), read)


# ---------------------------------------------------------------------------- AMD


def from_amdsmi(amdsmi: Any) -> list[LocalGpu]:
    """GPUs through the ``amdsmi`` Python package (ROCm's library binding); [] when it fails."""

    def init() -> None:
        flags = getattr(getattr(amdsmi, "AmdSmiInitFlags", None), "INIT_AMD_GPUS", None)
        amdsmi.amdsmi_init(flags) if flags is not None else amdsmi.amdsmi_init()

    def read(gpus: list[LocalGpu]) -> None:
        for index, handle in enumerate(amdsmi.amdsmi_get_processor_handles()):
            try:
                asic = amdsmi.amdsmi_get_gpu_asic_info(handle)
            except Exception as exc:
                logger.warning("amdsmi: cannot read GPU %d: %s", index, exc)
                continue
            try:
                driver = _text(amdsmi.amdsmi_get_gpu_driver_info(handle).get("driver_version"))
            except Exception:
                driver = None
            gpu = _hip_gpu(index, _text(asic.get("market_name", "")), asic.get("target_graphics_version"),
                           driver, "amdsmi")
            if gpu:
                gpus.append(gpu)

    return _query_library("amdsmi", init, lambda: amdsmi.amdsmi_shut_down(), read)


def parse_amd_smi_static(output: str) -> list[LocalGpu]:
    """GPUs from ``amd-smi static --json`` (a list of GPUs in ROCm 6.0-6.3, ``{"gpu_data": [...]}`` later)."""
    data = _extract_json(output)
    records = data.get("gpu_data", []) if isinstance(data, dict) else data
    gpus: list[LocalGpu] = []
    for pos, record in enumerate(records if isinstance(records, list) else []):
        if not isinstance(record, dict):
            continue
        asic = record.get("asic") or {}
        driver_info = record.get("driver") or {}
        driver = driver_info.get("version") if isinstance(driver_info, dict) else None
        index = record.get("gpu", pos)
        gpu = _hip_gpu(int(index) if str(index).isdigit() else pos, str(asic.get("market_name", "")),
                       asic.get("target_graphics_version"), driver, "amd-smi")
        if gpu:
            gpus.append(gpu)
    return gpus


def parse_rocm_smi(output: str) -> list[LocalGpu]:
    """GPUs from ``rocm-smi --showproductname --showdriverversion --json`` (``{"card0": {...}, "system": {...}}``)."""
    data = _extract_json(output)
    if not isinstance(data, dict):
        return []
    system = data.get("system") or {}
    driver = system.get("Driver version") if isinstance(system, dict) else None
    gpus: list[LocalGpu] = []
    for card, info in data.items():
        match = re.fullmatch(r"card(\d+)", card)
        if not match or not isinstance(info, dict):
            continue
        name = str(info.get("Card Series") or info.get("Card series") or info.get("Card Model") or "")
        gfx = info.get("GFX Version") or info.get("GFX version")
        gpu = _hip_gpu(int(match.group(1)), name, gfx, driver, "rocm-smi")
        if gpu:
            gpus.append(gpu)
    return sorted(gpus, key=lambda g: g.index)


def gfx_from_target_version(value: int) -> str | None:
    """KFD ``gfx_target_version`` (major*10000 + minor*100 + stepping) → 'gfx942' (90402), 'gfx90a' (90010)."""
    if value <= 0:
        return None
    major, minor, stepping = value // 10000, (value // 100) % 100, value % 100
    return f"gfx{major}{minor:x}{stepping:x}"


def from_kfd_topology(nodes: Path = KFD_NODES) -> list[LocalGpu]:
    """GPUs from the amdgpu driver's KFD topology (``nodes/*/properties``): works without ROCm tools.

    CPU nodes have ``gfx_target_version 0`` and are skipped.
    """
    if not nodes.is_dir():
        return []
    gpus: list[LocalGpu] = []
    node_dirs = sorted((p for p in nodes.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    for node in node_dirs:
        try:
            props = dict(
                line.split(None, 1) for line in (node / "properties").read_text().splitlines() if " " in line
            )
        except OSError as exc:
            logger.debug("KFD node %s unreadable: %s", node, exc)
            continue
        try:
            gfx = gfx_from_target_version(int(props.get("gfx_target_version", "0")))
        except ValueError:
            gfx = None
        if not gfx:
            continue
        try:
            name = (node / "name").read_text().strip()
        except OSError:
            name = ""
        gpu = _hip_gpu(len(gpus), name, gfx, None, "kfd")
        if gpu:
            gpus.append(gpu)
    return gpus


# ---------------------------------------------------------------------------- torch


def from_torch(torch: Any) -> list[LocalGpu]:
    """GPUs through a torch GPU build (CUDA or ROCm); [] for CPU-only torch."""
    try:
        if not torch.cuda.is_available():
            return []
        hip = getattr(torch.version, "hip", None)
        gpus: list[LocalGpu] = []
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            name = _text(getattr(props, "name", ""))
            warp = getattr(props, "warp_size", None)
            if hip:
                gpu = _hip_gpu(index, name, getattr(props, "gcnArchName", ""), None, "torch", warp)
                if gpu:
                    gpus.append(gpu)
            else:
                major, minor = torch.cuda.get_device_capability(index)
                target = GpuTarget.make("cuda", f"{major}{minor}", warp or 32)
                # torch.version.cuda is the runtime torch was built with, not the driver's limit.
                gpus.append(LocalGpu(index, name, target, None, None, None, "torch"))
        return gpus
    except Exception as exc:
        logger.debug("torch GPU query failed: %s", exc)
        return []


# ---------------------------------------------------------------------------- orchestration


def _import_optional(name: str) -> Any | None:
    if importlib.util.find_spec(name) is None:
        return None
    try:
        return importlib.import_module(name)
    except Exception as exc:  # broken install: no GPU info from it, not a crash
        logger.debug("cannot import %s: %s", name, exc)
        return None


def run_tool(argv: list[str]) -> str | None:
    """stdout of a GPU tool (PATH, then /opt/rocm/bin), or None if absent/failing."""
    exe = shutil.which(argv[0]) or (str(_ROCM_BIN / argv[0]) if (_ROCM_BIN / argv[0]).exists() else None)
    if exe is None:
        return None
    try:
        proc = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, timeout=_TOOL_TIMEOUT_S,
                              env={**os.environ, "LC_ALL": "C"})
    except (OSError, subprocess.SubprocessError) as exc:
        logger.debug("%s failed: %s", argv[0], exc)
        return None
    if proc.returncode != 0:
        logger.debug("%s exited %d: %s", argv[0], proc.returncode, proc.stderr.strip()[:200])
        return None
    return proc.stdout


@dataclass(frozen=True)
class Sources:
    """Where detection looks. The defaults are the real machine; tests pass recorded outputs."""

    nvml: Callable[[], Any | None] = field(default=lambda: _import_optional("pynvml"))
    amdsmi: Callable[[], Any | None] = field(default=lambda: _import_optional("amdsmi"))
    run: Callable[[list[str]], str | None] = run_tool
    kfd_nodes: Path = KFD_NODES
    torch: Callable[[], Any | None] = field(default=lambda: _import_optional("torch"))


def _amd_from_tools(sources: Sources) -> Iterable[tuple[str, Callable[[], list[LocalGpu]]]]:
    def module() -> list[LocalGpu]:
        mod = sources.amdsmi()
        return from_amdsmi(mod) if mod is not None else []

    def amd_smi() -> list[LocalGpu]:
        out = sources.run(["amd-smi", "static", "--asic", "--driver", "--json"])
        return parse_amd_smi_static(out) if out else []

    def rocm_smi() -> list[LocalGpu]:
        out = sources.run(["rocm-smi", "--showproductname", "--showdriverversion", "--json"])
        return parse_rocm_smi(out) if out else []

    return [("amdsmi", module), ("amd-smi", amd_smi), ("rocm-smi", rocm_smi),
            ("kfd", lambda: from_kfd_topology(sources.kfd_nodes))]


def detect_gpus(sources: Sources | None = None) -> list[LocalGpu]:
    """Local GPUs, NVIDIA then AMD, each from its best working source; torch as a last resort."""
    sources = sources or Sources()
    gpus: list[LocalGpu] = []
    nvml = sources.nvml()
    if nvml is not None:
        gpus.extend(from_nvml(nvml))
    for name, probe in _amd_from_tools(sources):
        try:
            found = probe()
        except (ValueError, TypeError, AttributeError, OSError) as exc:  # malformed tool output
            logger.warning("ignoring unusable %s output: %s", name, exc)
            continue
        if found:
            gpus.extend(found)
            break
    if not gpus:
        torch = sources.torch()
        if torch is not None:
            gpus.extend(from_torch(torch))
    logger.info("detected %d GPU(s)", len(gpus))
    return gpus

