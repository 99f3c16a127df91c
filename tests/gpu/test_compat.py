"""Compatibility rules: each failing rule gives a human reason; Triton version only warns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infercache.gpu.compat import Verdict, check_compatible, compatible_with_any, installed_triton_version
from infercache.gpu.detect import LocalGpu
from infercache.gpu.targets import GpuTarget

T = GpuTarget.parse


def _h100(cuda: str | None = "12.4", max_ptx: int | None = 84) -> LocalGpu:
    return LocalGpu(0, "NVIDIA H100 80GB HBM3", T("cuda:90"), "550.54.15", cuda, max_ptx, "nvml")


def test_same_target_is_compatible() -> None:
    assert check_compatible(T("cuda:90"), T("cuda:90")) == Verdict(True, (), ())
    assert check_compatible(T("rocm:gfx942"), T("hip:gfx942")).compatible
    assert check_compatible(T("cuda:90"), _h100()).compatible


def test_backend_mismatch() -> None:
    verdict = check_compatible(T("hip:gfx942"), _h100())
    assert not verdict.compatible
    assert any("backend hip" in r and "cuda" in r for r in verdict.reasons)


def test_arch_mismatch_reasons() -> None:
    across_major = check_compatible(T("cuda:80"), T("cuda:90"))
    assert not across_major.compatible
    assert "not portable across major" in across_major.reasons[0]
    same_major = check_compatible(T("cuda:80"), T("cuda:86"))
    assert not same_major.compatible and "exact compute capability" in same_major.reasons[0]
    hip = check_compatible(T("hip:gfx90a"), T("hip:gfx942"))
    assert not hip.compatible and "gfx90a" in hip.reasons[0] and "gfx942" in hip.reasons[0]


def test_arch_specific_cuda_entry_needs_exactly_its_capability() -> None:
    assert check_compatible(T("cuda:90a"), T("cuda:90")).compatible
    verdict = check_compatible(T("cuda:90a"), T("cuda:100"))
    assert not verdict.compatible
    assert "9.0 exactly" in verdict.reasons[0]


def test_warp_size_mismatch() -> None:
    verdict = check_compatible(T("hip:gfx1100:64"), T("hip:gfx1100"))
    assert not verdict.compatible
    assert verdict.reasons == ("warp size 64 ≠ GPU's 32: the code assumes 64-wide warps",)


def test_ptx_checked_against_driver_max_ptx_not_driver_version() -> None:
    """MCV compared the driver version (550.x) with the PTX version and rejected every CUDA cache."""
    ok = check_compatible(GpuTarget.make("cuda", 90, 32, 84), _h100())
    assert ok.compatible and ok.warnings == ()
    older = check_compatible(GpuTarget.make("cuda", 90, 32, 80), _h100())
    assert older.compatible
    too_new = check_compatible(GpuTarget.make("cuda", 90, 32, 87), _h100())
    assert not too_new.compatible
    assert too_new.reasons == (
        "entry needs PTX ISA 8.7 but the driver (CUDA 12.4) supports up to 8.4: update the GPU driver",
    )
    assert "550" not in too_new.reasons[0]


def test_ptx_unknown_on_either_side() -> None:
    unknown_driver = check_compatible(GpuTarget.make("cuda", 90, 32, 87), _h100(cuda=None, max_ptx=None))
    assert unknown_driver.compatible
    assert "unknown" in unknown_driver.warnings[0]
    assert check_compatible(T("cuda:90"), _h100(max_ptx=70)).compatible  # entry's PTX unknown: not checked
    # A --target with a ptx_version stands for a GPU supporting up to that ISA.
    assert not check_compatible(GpuTarget.make("cuda", 90, 32, 88), GpuTarget.make("cuda", 90, 32, 85)).compatible


def test_triton_version_difference_is_a_warning() -> None:
    entry = GpuTarget.make("cuda", 90, 32, None, "3.3.1")
    verdict = check_compatible(entry, _h100(), local_triton_version="3.9.0")
    assert verdict.compatible
    assert verdict.warnings == ("built by Triton 3.3.1, local Triton is 3.9.0: the entry cannot be a cache hit here",)
    assert check_compatible(entry, _h100(), local_triton_version="3.3.1").warnings == ()
    assert check_compatible(entry, GpuTarget.make("cuda", 90, 32, None, "3.4.0")).warnings != ()


def test_several_reasons_at_once() -> None:
    verdict = check_compatible(GpuTarget.make("hip", "gfx90a", 64, None, "3.2.0"), T("cuda:90"), "3.9.0")
    assert not verdict.compatible
    assert len(verdict.reasons) == 2  # backend, warp size
    assert len(verdict.warnings) == 1
    assert verdict.to_json() == {"compatible": False, "reasons": list(verdict.reasons),
                                 "warnings": list(verdict.warnings)}


def test_real_cache_entries_against_targets(sample_cache_master: Path) -> None:
    """Real Triton 3.9 entries: exactly the 6 cuda:90 ones suit an H100, the 6 gfx942 ones an MI300X."""
    metas = [json.loads(p.read_text()) for p in sorted(sample_cache_master.glob("*/*.json"))
             if not p.name.startswith("__grp__")]
    local = installed_triton_version()
    assert local == "3.9.0"
    h100 = [m for m in metas if check_compatible(GpuTarget.from_entry(m), _h100(), local).compatible]
    assert len(h100) == 6 and {m["target"]["arch"] for m in h100} == {90}
    mi300 = LocalGpu(0, "AMD Instinct MI300X", T("hip:gfx942"), "6.7.0", None, None, "amd-smi")
    gfx942 = [m for m in metas if check_compatible(GpuTarget.from_entry(m), mi300, local).compatible]
    assert len(gfx942) == 6 and {m["target"]["arch"] for m in gfx942} == {"gfx942"}
    for m in metas:
        assert check_compatible(GpuTarget.from_entry(m), _h100(), local).warnings == ()
    both = [T("cuda:80"), T("hip:gfx90a")]
    assert sum(compatible_with_any(GpuTarget.from_entry(m), both) for m in metas) == 12


def test_installed_triton_version_finds_pytorch_triton_rocm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ROCm PyTorch install ships Triton as `pytorch-triton-rocm`: `stats` and `unpack` must both see it.

    The package is a real dist-info on sys.path; PyPI's `triton`, which this venv has, is hidden
    (a machine with only the ROCm build cannot exist here).
    """
    from importlib import metadata

    import infercache.gpu.compat as compat
    from infercache.kernels import stats

    dist = tmp_path / "pytorch_triton_rocm-3.4.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: pytorch-triton-rocm\nVersion: 3.4.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    real_version = metadata.version

    def without_pypi_triton(name: str) -> str:
        if name == "triton":
            raise metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(metadata, "version", without_pypi_triton)
    assert compat.installed_triton_version() == "3.4.0"
    assert stats.installed_triton_version is compat.installed_triton_version  # one answer for stats and unpack
