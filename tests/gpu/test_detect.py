"""GPU detection from each source, fed with recorded tool outputs.

There is no GPU, driver, NVML library, ROCm install or GPU torch on the test machines,
so this is the one place fakes are used: a fake NVML module (same function names and
return types as nvidia-ml-py's ``pynvml``), a fake ``amdsmi`` module (same names and dict
keys as ROCm's binding), recorded ``amd-smi static --json`` / ``rocm-smi --json`` outputs
(data/), a KFD sysfs tree written to tmp_path, and a fake torch.
"""

from __future__ import annotations

import ctypes.util
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from infercache.gpu.detect import (
    LocalGpu,
    Sources,
    detect_gpus,
    from_amdsmi,
    from_kfd_topology,
    from_nvml,
    from_torch,
    gfx_from_target_version,
    max_ptx_for_cuda,
    parse_amd_smi_static,
    parse_rocm_smi,
    run_tool,
)
from infercache.gpu.targets import GpuTarget

DATA = Path(__file__).parent / "data"


class NVMLError(Exception):
    pass


class FakeNVML:
    """Stands in for ``pynvml``: same function names, str results (nvidia-ml-py >= 11.5)."""

    NVMLError = NVMLError

    def __init__(self, devices: list[tuple[str, tuple[int, int]]], driver: str = "550.54.15",
                 cuda: int = 12040, init_error: bool = False) -> None:
        self.devices = devices
        self.driver = driver
        self.cuda = cuda
        self.init_error = init_error
        self.shutdown_called = False

    def nvmlInit(self) -> None:
        if self.init_error:
            raise NVMLError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        self.shutdown_called = True

    def nvmlSystemGetDriverVersion(self) -> str:
        return self.driver

    def nvmlSystemGetCudaDriverVersion_v2(self) -> int:
        return self.cuda

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if index >= len(self.devices):
            raise NVMLError("Invalid Argument")
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return self.devices[handle][0].encode()  # old bindings return bytes

    def nvmlDeviceGetCudaComputeCapability(self, handle: int) -> tuple[int, int]:
        return self.devices[handle][1]


class FakeAmdSmi:
    """Stands in for ROCm's ``amdsmi`` Python package (dict keys as amdsmi_interface returns them)."""

    class AmdSmiInitFlags:
        INIT_AMD_GPUS = 2

    def __init__(self, asics: list[dict[str, Any]], fail: bool = False) -> None:
        self.asics = asics
        self.fail = fail
        self.init_flags: Any = None

    def amdsmi_init(self, flags: Any = None) -> None:
        if self.fail:
            raise RuntimeError("AMDSMI_STATUS_DRIVER_NOT_LOADED")
        self.init_flags = flags

    def amdsmi_shut_down(self) -> None:
        pass

    def amdsmi_get_processor_handles(self) -> list[int]:
        return list(range(len(self.asics)))

    def amdsmi_get_gpu_asic_info(self, handle: int) -> dict[str, Any]:
        return self.asics[handle]

    def amdsmi_get_gpu_driver_info(self, handle: int) -> dict[str, str]:
        return {"driver_name": "amdgpu", "driver_version": "6.8.5", "driver_date": "2024/09/01 00:00"}


def _no_tools(_argv: list[str]) -> str | None:
    return None


def _sources(**kw: Any) -> Sources:
    base: dict[str, Any] = dict(nvml=lambda: None, amdsmi=lambda: None, run=_no_tools,
                                kfd_nodes=Path("/nonexistent/kfd"), torch=lambda: None)
    base.update(kw)
    return Sources(**base)


# ----------------------------------------------------------------------------- NVIDIA


def test_nvml_h100_and_a100() -> None:
    nvml = FakeNVML([("NVIDIA H100 80GB HBM3", (9, 0)), ("NVIDIA A100-SXM4-80GB", (8, 0))])
    gpus = from_nvml(nvml)
    assert gpus == [
        LocalGpu(0, "NVIDIA H100 80GB HBM3", GpuTarget("cuda", "90", 32), "550.54.15", "12.4", 84, "nvml"),
        LocalGpu(1, "NVIDIA A100-SXM4-80GB", GpuTarget("cuda", "80", 32), "550.54.15", "12.4", 84, "nvml"),
    ]
    assert nvml.shutdown_called


def test_nvml_blackwell_and_new_cuda() -> None:
    gpus = from_nvml(FakeNVML([("NVIDIA B200", (10, 0)), ("NVIDIA RTX PRO 6000", (12, 0))],
                              driver="580.65.06", cuda=13000))
    assert [g.target.arch for g in gpus] == ["100", "120"]
    assert {(g.cuda_version, g.max_ptx_version) for g in gpus} == {("13.0", 90)}


def test_nvml_failure_is_no_gpu() -> None:
    assert from_nvml(FakeNVML([("x", (9, 0))], init_error=True)) == []


def test_real_pynvml_without_driver_is_no_gpu() -> None:
    """The real nvidia-ml-py binding on a machine without libnvidia-ml: [] and no exception."""
    if ctypes.util.find_library("nvidia-ml"):
        pytest.skip("this machine has an NVIDIA driver")
    import pynvml

    assert from_nvml(pynvml) == []


@pytest.mark.parametrize(("cuda", "ptx"), [("12.4", 84), ("12.6", 85), ("12.8", 87), ("11.8", 78),
                                           ("13.0", 90), ("13.4", 94), ("9.2", None), (None, None),
                                           ("garbage", None)])
def test_max_ptx_table(cuda: str | None, ptx: int | None) -> None:
    assert max_ptx_for_cuda(cuda) == ptx


def test_max_ptx_matches_triton_rule() -> None:
    """Our table agrees with Triton's own CUDA → PTX mapping for every CUDA 11/12/13 release."""
    from triton.backends.nvidia.compiler import ptx_get_version

    for version in [f"11.{m}" for m in range(9)] + [f"12.{m}" for m in range(10)] + ["13.0", "13.1"]:
        assert max_ptx_for_cuda(version) == ptx_get_version(version), version


# ----------------------------------------------------------------------------- AMD


def test_amd_smi_static_list_form_mi300x() -> None:
    gpus = parse_amd_smi_static((DATA / "amd_smi_static_mi300x.json").read_text())
    assert [(g.index, g.name, str(g.target), g.driver_version, g.source) for g in gpus] == [
        (0, "AMD Instinct MI300X", "hip:gfx942", "6.7.0", "amd-smi"),
        (1, "AMD Instinct MI300X", "hip:gfx942", "6.7.0", "amd-smi"),
    ]
    assert all(g.target.warp_size == 64 and g.max_ptx_version is None for g in gpus)


def test_amd_smi_static_gpu_data_form_arch_from_device() -> None:
    """gfx comes from target_graphics_version: an 'N/A' name still gets its arch, and a device
    without a gfx version is skipped rather than guessed from its product name."""
    gpus = parse_amd_smi_static((DATA / "amd_smi_static_gpu_data.json").read_text())
    assert [(g.index, g.target) for g in gpus] == [
        (0, GpuTarget("hip", "gfx1100", 32)),  # RDNA3: wave32
        (1, GpuTarget("hip", "gfx90a", 64)),
    ]
    assert gpus[0].driver_version == "6.10.5"


def test_rocm_smi_with_warning_preamble() -> None:
    gpus = parse_rocm_smi((DATA / "rocm_smi_productname_mi210.txt").read_text())
    assert [(g.index, g.name, str(g.target), g.driver_version) for g in gpus] == [
        (0, "AMD Instinct MI210", "hip:gfx90a", "6.3.6"),
        (1, "AMD Instinct MI210", "hip:gfx90a", "6.3.6"),
    ]


def test_amdsmi_module() -> None:
    fake = FakeAmdSmi([
        {"market_name": "AMD Instinct MI300X", "vendor_id": "0x1002", "device_id": "0x74a1",
         "num_compute_units": 304, "target_graphics_version": "gfx942"},
        {"market_name": "AMD Radeon PRO W7900", "device_id": "0x7448", "target_graphics_version": "gfx1100"},
    ])
    gpus = from_amdsmi(fake)
    assert [(str(g.target), g.driver_version, g.source) for g in gpus] == [
        ("hip:gfx942", "6.8.5", "amdsmi"), ("hip:gfx1100", "6.8.5", "amdsmi")]
    assert fake.init_flags == FakeAmdSmi.AmdSmiInitFlags.INIT_AMD_GPUS
    assert from_amdsmi(FakeAmdSmi([], fail=True)) == []


def _kfd_node(root: Path, node: int, gfx_target_version: int, name: str) -> None:
    path = root / str(node)
    path.mkdir(parents=True)
    (path / "name").write_text(name + "\n")
    (path / "properties").write_text(
        f"cpu_cores_count {0 if gfx_target_version else 96}\nsimd_count {0 if not gfx_target_version else 1216}\n"
        f"gfx_target_version {gfx_target_version}\nwave_front_size 64\nvendor_id 4098\n"
    )


def test_kfd_topology(tmp_path: Path) -> None:
    _kfd_node(tmp_path, 0, 0, "")  # the CPU node
    _kfd_node(tmp_path, 1, 90402, "ip discovery")
    _kfd_node(tmp_path, 2, 90010, "aldebaran")
    _kfd_node(tmp_path, 10, 110000, "gfx1100")
    gpus = from_kfd_topology(tmp_path)
    assert [(g.index, str(g.target)) for g in gpus] == [(0, "hip:gfx942"), (1, "hip:gfx90a"), (2, "hip:gfx1100")]
    assert from_kfd_topology(tmp_path / "missing") == []


@pytest.mark.parametrize(("value", "gfx"), [(90402, "gfx942"), (90010, "gfx90a"), (110000, "gfx1100"),
                                            (90500, "gfx950"), (120001, "gfx1201"), (0, None)])
def test_gfx_from_target_version(value: int, gfx: str | None) -> None:
    assert gfx_from_target_version(value) == gfx


# ----------------------------------------------------------------------------- torch


def _fake_torch(hip: str | None, props: list[Any], capability: tuple[int, int] = (9, 0)) -> Any:
    cuda = SimpleNamespace(
        is_available=lambda: bool(props),
        device_count=lambda: len(props),
        get_device_properties=lambda i: props[i],
        get_device_capability=lambda i: capability,
    )
    return SimpleNamespace(cuda=cuda, version=SimpleNamespace(hip=hip, cuda=None if hip else "12.4"))


def test_torch_rocm_and_cuda_builds() -> None:
    rocm = _fake_torch("6.2.41133", [SimpleNamespace(name="AMD Instinct MI300X", gcnArchName="gfx942:sramecc+:xnack-",
                                                     warp_size=64)])
    assert [str(g.target) for g in from_torch(rocm)] == ["hip:gfx942"]
    cuda = _fake_torch(None, [SimpleNamespace(name="NVIDIA H100", warp_size=32)])
    (gpu,) = from_torch(cuda)
    assert (gpu.target, gpu.source, gpu.max_ptx_version) == (GpuTarget("cuda", "90", 32), "torch", None)
    assert from_torch(_fake_torch(None, [])) == []  # CPU-only build


# ----------------------------------------------------------------------------- orchestration


def test_nothing_anywhere_is_empty_list() -> None:
    assert detect_gpus(_sources()) == []


def test_nvml_first_then_amd() -> None:
    calls: list[list[str]] = []

    def run(argv: list[str]) -> str | None:
        calls.append(argv)
        return (DATA / "amd_smi_static_mi300x.json").read_text() if argv[0] == "amd-smi" else None

    gpus = detect_gpus(_sources(nvml=lambda: FakeNVML([("NVIDIA H100", (9, 0))]), run=run))
    assert [g.source for g in gpus] == ["nvml", "amd-smi", "amd-smi"]
    assert [c[0] for c in calls] == ["amd-smi"]  # rocm-smi not needed


def test_amd_falls_through_sources(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []

    def run(argv: list[str]) -> str | None:
        calls.append(argv[0])
        if argv[0] == "amd-smi":
            return "amd-smi: error: unrecognized output\n"  # unusable output: warned, next source
        return (DATA / "rocm_smi_productname_mi210.txt").read_text()

    with caplog.at_level(logging.WARNING):
        gpus = detect_gpus(_sources(run=run, amdsmi=lambda: FakeAmdSmi([], fail=True)))
    assert calls == ["amd-smi", "rocm-smi"]
    assert [(g.source, str(g.target)) for g in gpus] == [("rocm-smi", "hip:gfx90a")] * 2
    assert any("amd-smi" in r.getMessage() for r in caplog.records)

    _kfd_node(tmp_path, 1, 90402, "ip discovery")
    gpus = detect_gpus(_sources(kfd_nodes=tmp_path))
    assert [(g.source, str(g.target)) for g in gpus] == [("kfd", "hip:gfx942")]


def test_amdsmi_module_preferred_over_tools() -> None:
    def run(argv: list[str]) -> str | None:
        raise AssertionError("tools must not run when the amdsmi module answered")

    fake = FakeAmdSmi([{"market_name": "MI300X", "target_graphics_version": "gfx942"}])
    assert [g.source for g in detect_gpus(_sources(amdsmi=lambda: fake, run=run))] == ["amdsmi"]


def test_torch_only_as_last_resort() -> None:
    torch = _fake_torch(None, [SimpleNamespace(name="NVIDIA L4", warp_size=32)], capability=(8, 9))
    assert [str(g.target) for g in detect_gpus(_sources(torch=lambda: torch))] == ["cuda:89"]

    def torch_must_not_load() -> Any:
        raise AssertionError("torch imported although NVML found GPUs")

    gpus = detect_gpus(_sources(nvml=lambda: FakeNVML([("NVIDIA L4", (8, 9))]), torch=torch_must_not_load))
    assert [g.source for g in gpus] == ["nvml"]


def test_default_sources_on_this_machine_do_not_crash() -> None:
    """Real probes (pynvml import, tool lookup, sysfs): a list of LocalGpu, [] on GPU-less CI."""
    gpus = detect_gpus()
    assert all(isinstance(g, LocalGpu) for g in gpus)
    if not ctypes.util.find_library("nvidia-ml") and not Path("/sys/class/kfd").exists():
        assert gpus == []


def test_tool_output_with_bracketed_warning_lines() -> None:
    text = "[WARNING] low-power state\n" + (DATA / "amd_smi_static_mi300x.json").read_text()
    assert len(parse_amd_smi_static(text)) == 2
    with pytest.raises(ValueError, match="no JSON"):
        parse_rocm_smi("ERROR: GPU[0] : Unable to get product name\n")


def _script(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def test_tools_run_from_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real subprocess path: stand-in `amd-smi`/`rocm-smi` executables on PATH print recorded output."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _script(bin_dir, "amd-smi", f'[ "$1" = static ] || exit 3\ncat "{DATA / "amd_smi_static_mi300x.json"}"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    sources = _sources(run=run_tool)
    assert [(g.source, str(g.target)) for g in detect_gpus(sources)] == [("amd-smi", "hip:gfx942")] * 2

    # amd-smi failing (no driver) → rocm-smi is asked next.
    _script(bin_dir, "amd-smi", 'echo "AMDSMI_STATUS_DRIVER_NOT_LOADED" >&2\nexit 1\n')
    _script(bin_dir, "rocm-smi", f'cat "{DATA / "rocm_smi_productname_mi210.txt"}"\n')
    assert [(g.source, str(g.target)) for g in detect_gpus(sources)] == [("rocm-smi", "hip:gfx90a")] * 2
    assert run_tool(["definitely-not-a-gpu-tool"]) is None


class NVMLReplay:
    """Answers exactly what a real NVML answered (a recording in data/), nothing else.

    A call the recording does not hold is noted in `unanswered` (and raises, as a missing
    NVML symbol would), so detection code that starts asking NVML something new fails the
    replay instead of reading an invented value.
    """

    NVMLError = NVMLError

    def __init__(self, recording: dict[str, Any]) -> None:
        self._answers = recording
        self.unanswered: list[str] = []
        self.shutdown_called = False

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        self.shutdown_called = True

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if index >= len(self._answers["devices"]):
            raise NVMLError("Invalid Argument")
        return index

    def __getattr__(self, name: str) -> Any:
        if name in self._answers and name != "devices":
            return lambda: self._answers[name]
        if name.startswith("nvmlDevice") and all(name in d for d in self._answers["devices"]):
            return lambda handle: self._answers["devices"][handle][name]
        self.unanswered.append(name)
        raise AttributeError(name)


def test_replay_of_nvml_recorded_on_an_h100() -> None:
    """A recorded replay, not a live GPU (there is none on the machines that run this suite): NVML's
    answers on an H100 80GB HBM3 (driver 580.159.04, CUDA 13.0) go through detection, and the result
    must be what `infercache gpu --format json` printed on that machine."""
    recording = json.loads((DATA / "nvml_h100_driver580.json").read_text())
    replay = NVMLReplay(recording["nvml"])
    gpus = from_nvml(replay)
    assert replay.unanswered == []
    assert replay.shutdown_called
    assert [gpu.to_json() for gpu in gpus] == recording["printed"]
