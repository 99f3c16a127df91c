"""Unpack: per-entry selection, Triton cache hits at the new place, keep/overwrite, refusals, cleanup."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from infercache.errors import BadInputError, InfercacheError
from infercache.vault.unpack import STAGING_PREFIX, unpack


def _leftover_staging(dest: Path) -> list[str]:
    return [p.name for p in dest.iterdir() if p.name.startswith(STAGING_PREFIX)] if dest.exists() else []


def test_acceptance_only_cuda90_extracted_and_triton_hits(oci_image: str, cuda90_keys: set[str], tmp_path: Path) -> None:
    """Real 4-target cache → oci: → unpack --target cuda:90 elsewhere → Triton hits for every kernel there."""
    from infercache.testing.samples import SAMPLE_KERNELS, compile_sample

    dest = tmp_path / "elsewhere" / "cache"
    report = unpack(oci_image, dest, ["cuda:90"])
    assert set(report.extracted) == cuda90_keys
    assert len(report.skipped_incompatible) == 18 and report.already_present == ()
    assert {p.name for p in dest.iterdir()} == cuda90_keys  # nothing else, no staging left
    for key in cuda90_keys:
        group = next((dest / key).glob("__grp__*.json"))
        paths = json.loads(group.read_text())["child_paths"]
        assert all(Path(p) == dest.resolve() / key / name for name, p in paths.items())
    for kernel in SAMPLE_KERNELS:
        for warps in (4, 8):
            result = compile_sample(dest, kernel, "cuda:90", num_warps=warps)
            assert result.cache_hit, f"{kernel} num_warps={warps} recompiled"
            assert result.key in cuda90_keys
    assert {p.name for p in dest.iterdir()} == cuda90_keys  # hits wrote no new entry


def test_several_targets_and_hip(oci_image: str, tmp_path: Path) -> None:
    report = unpack(oci_image, tmp_path / "d", ["cuda:80", "rocm:gfx942"])
    assert len(report.extracted) == 12 and len(report.skipped_incompatible) == 12


def test_existing_entries_kept_unless_overwrite(oci_image: str, tmp_path: Path) -> None:
    dest = tmp_path / "d"
    first = unpack(oci_image, dest, ["hip:gfx90a"])
    key = first.extracted[0]
    meta = next(p for p in (dest / key).iterdir() if p.suffix == ".json" and not p.name.startswith("__grp__"))
    original = meta.read_bytes()
    meta.write_bytes(b"{}")
    again = unpack(oci_image, dest, ["hip:gfx90a"])
    assert again.extracted == () and set(again.already_present) == set(first.extracted)
    assert meta.read_bytes() == b"{}"
    forced = unpack(oci_image, dest, ["hip:gfx90a"], overwrite=True)
    assert set(forced.replaced) == set(first.extracted)
    assert meta.read_bytes() == original
    assert _leftover_staging(dest) == []


def test_incompatible_image_refused_unless_force(oci_image: str, tmp_path: Path) -> None:
    dest = tmp_path / "d"
    with pytest.raises(InfercacheError, match="not compatible") as info:
        unpack(oci_image, dest, ["hip:gfx1100:32"])
    assert "--force" in str(info.value)
    assert not dest.exists()
    forced = unpack(oci_image, dest, ["hip:gfx1100:32"], force=True)
    assert forced.extracted == () and len(forced.skipped_incompatible) == 24 and forced.forced


def test_no_gpu_and_no_target_is_an_error(oci_image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Detection is forced to find nothing (this test must also hold on a machine that has a GPU)."""
    import infercache.gpu.detect as detect

    monkeypatch.setattr(detect, "detect_gpus", lambda *a, **k: [])
    with pytest.raises(InfercacheError, match="no GPU detected"):
        unpack(oci_image, tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_default_dest_is_triton_cache_dir(oci_image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "tcd"))
    report = unpack(oci_image, None, ["cuda:80"])
    assert report.dest == (tmp_path / "tcd").resolve() and len(list((tmp_path / "tcd").iterdir())) == 6


def test_bad_target_is_bad_input(oci_image: str, tmp_path: Path) -> None:
    with pytest.raises(BadInputError):
        unpack(oci_image, tmp_path / "d", ["cuda"])
    with pytest.raises(BadInputError):
        unpack(f"oci:{tmp_path / 'missing'}", tmp_path / "d", ["cuda:90"])


def test_corrupt_layer_leaves_existing_dest_untouched(oci_image: str, tmp_path: Path) -> None:
    import shutil

    layout = tmp_path / "copy"
    shutil.copytree(oci_image.split(":")[1], layout)
    manifest = json.loads((layout / "blobs" / "sha256" / json.loads((layout / "index.json").read_text())
                           ["manifests"][0]["digest"][7:]).read_text())
    blob = layout / "blobs" / "sha256" / manifest["layers"][0]["digest"][7:]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(InfercacheError):
        unpack(f"oci:{layout}:v1", dest, ["cuda:90"])
    assert sorted(os.listdir(dest)) == ["keep.txt"]


def test_failure_while_installing_rolls_back_everything(
    oci_image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection (the only way to fail half-way through the renames): the compatibility
    check raises on the 4th entry, after 3 were moved into place; all must be undone, and an
    entry that --overwrite had replaced must be back."""
    import infercache.gpu.compat as compat

    dest = tmp_path / "d"
    first = unpack(oci_image, dest, ["cuda:90"])
    keep = sorted(first.extracted)[0]
    (dest / keep / "marker").write_text("old")
    for key in sorted(first.extracted)[1:]:
        import shutil

        shutil.rmtree(dest / key)
    real = compat.compatible_with_any
    calls = {"n": 0}

    def flaky(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(compat, "compatible_with_any", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        unpack(oci_image, dest, ["cuda:80", "cuda:90", "hip:gfx90a", "hip:gfx942"], overwrite=True)
    assert sorted(os.listdir(dest)) == [keep]
    assert (dest / keep / "marker").read_text() == "old"


def test_progress_reaches_the_layer_size(oci_image: str, tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    unpack(oci_image, tmp_path / "d", ["cuda:90"], progress=lambda done, total: calls.append((done, total)))
    assert calls and calls[-1][0] == calls[-1][1] > 0
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))
