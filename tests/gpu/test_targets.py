"""GpuTarget: parsing user targets, reading entries/summaries, JSON and string forms."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infercache.errors import BadInputError
from infercache.gpu.targets import GpuTarget, arch_name, backend_name, normalize_backend


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cuda:90", GpuTarget("cuda", "90", 32)),
        ("cuda:90:32", GpuTarget("cuda", "90", 32)),
        ("cuda:80", GpuTarget("cuda", "80", 32)),
        ("cuda:90a", GpuTarget("cuda", "90a", 32)),
        ("cuda:sm_100", GpuTarget("cuda", "100", 32)),
        ("hip:gfx942", GpuTarget("hip", "gfx942", 64)),
        ("rocm:gfx90a", GpuTarget("hip", "gfx90a", 64)),
        ("ROCM:GFX90A", GpuTarget("hip", "gfx90a", 64)),
        ("hip:gfx1100", GpuTarget("hip", "gfx1100", 32)),  # RDNA: wave32
        ("hip:gfx1100:64", GpuTarget("hip", "gfx1100", 64)),
        (" hip:gfx950 ", GpuTarget("hip", "gfx950", 64)),
    ],
)
def test_parse(text: str, expected: GpuTarget) -> None:
    assert GpuTarget.parse(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "cuda", "cuda:", ":90", "cuda:90:32:1", "tpu:v5", "cuda:gfx942", "hip:90", "cuda:9", "cuda:90:48",
     "cuda:90:x", "hip:gfx", "cuda:9000"],
)
def test_parse_rejects_junk(text: str) -> None:
    with pytest.raises(BadInputError, match="bad GPU target"):
        GpuTarget.parse(text)


def test_str_round_trips() -> None:
    for text in ("cuda:90", "cuda:90a", "hip:gfx942", "hip:gfx1100", "hip:gfx1100:64", "hip:gfx942:32"):
        target = GpuTarget.parse(text)
        assert str(target) == text
        assert GpuTarget.parse(str(target)) == target
    assert str(GpuTarget.parse("rocm:gfx90a:64")) == "hip:gfx90a"


def test_to_json_omits_unknowns() -> None:
    assert GpuTarget.parse("hip:gfx90a").to_json() == {"backend": "hip", "arch": "gfx90a", "warp_size": 64}
    full = GpuTarget.make("cuda", 90, 32, 84, "3.9.0")
    assert full.to_json() == {"backend": "cuda", "arch": "90", "warp_size": 32, "ptx_version": 84,
                              "triton_version": "3.9.0"}
    assert GpuTarget.from_entry(json.loads(json.dumps(full.to_json()))) == full


def test_from_entry_forms() -> None:
    # Catalog/manifest entry, arch as string or int, rocm alias, ptx as "8.4".
    assert GpuTarget.from_entry({"backend": "cuda", "arch": 90, "warp_size": 32}) == GpuTarget("cuda", "90", 32)
    assert GpuTarget.from_entry({"backend": "rocm", "arch": "gfx942"}) == GpuTarget("hip", "gfx942", 64)
    assert GpuTarget.from_entry({"backend": "cuda", "arch": "80", "ptx_version": "8.4"}).ptx_version == 84
    assert GpuTarget.from_entry({"backend": "cuda", "arch": "80", "ptx_version": None}).ptx_version is None
    with pytest.raises(BadInputError, match="lacks backend/arch"):
        GpuTarget.from_entry({"name": "add_kernel"})
    with pytest.raises(BadInputError, match="unknown GPU backend"):
        GpuTarget.from_entry({"backend": "metal", "arch": "m3"})
    with pytest.raises(BadInputError):
        GpuTarget.from_entry({"backend": "cuda", "arch": "90", "ptx_version": "new"})


def _metadata(master: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(master.glob("*/*.json")) if not p.name.startswith("__grp__")]


def test_from_real_triton_metadata(sample_cache_master: Path) -> None:
    """Triton 3.9's own metadata JSON (nested target, top-level arch 'sm90') parses to the right targets."""
    targets = {GpuTarget.from_entry(meta).key for meta in _metadata(sample_cache_master)}
    assert targets == {("cuda", "80", 32), ("cuda", "90", 32), ("hip", "gfx90a", 64), ("hip", "gfx942", 64)}
    versions = {GpuTarget.from_entry(meta).triton_version for meta in _metadata(sample_cache_master)}
    assert versions == {"3.9.0"}


def test_arch_and_backend_names_from_real_metadata(sample_cache_master: Path) -> None:
    """The lenient readers the catalog uses agree with the strict target parser on Triton's own metadata."""
    for meta in _metadata(sample_cache_master):
        target = GpuTarget.from_entry(meta)
        assert backend_name(meta["target"]["backend"]) == target.backend
        assert arch_name(meta["target"]["arch"]) == target.arch
    assert [arch_name(v) for v in (90, "sm90", "SM_90a", "compute_80", "GFX942", "", None)] == [
        "90", "90", "90a", "80", "gfx942", None, None]
    assert [backend_name(v) for v in ("ROCm", "amd", "NVIDIA", "xpu", "", None)] == ["hip", "hip", "cuda", "xpu", None, None]


def test_normalize_backend() -> None:
    assert normalize_backend("ROCm") == "hip"
    assert normalize_backend("cuda") == "cuda"
    with pytest.raises(BadInputError, match="'vulkan'"):
        normalize_backend("vulkan")
