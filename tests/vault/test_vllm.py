"""vLLM caches: packed under io.vllm.cache/ with vLLM labels; unpacked per entry into the vLLM root."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infercache.vault.pack import pack
from infercache.vault.unpack import unpack
from tests.kernels.layouts import make_vllm_legacy, make_vllm_new
from tests.vault.imagekit import read_layer


@pytest.fixture()
def vllm_root(sample_cache_master: Path, tmp_path: Path) -> tuple[Path, int]:
    root = tmp_path / "vllm"
    legacy = make_vllm_legacy(root, sample_cache_master)
    new = make_vllm_new(root, sample_cache_master)
    return root, legacy.entry_count + new.entry_count


def test_pack_vllm_cache_labels_and_layout(vllm_root: tuple[Path, int], tmp_path: Path) -> None:
    root, count = vllm_root
    ref = f"oci:{tmp_path / 'img'}"
    result = pack(root, ref)
    labels = result.labels
    assert result.entries == count + int(labels["cache.inductor.image/entry-count"]) and count == 48
    assert labels["model.cache.image/type"] == "vllm"
    # Its Inductor caches (inductor_cache/, unpacked artifacts) ship as the inductor component.
    assert json.loads(labels["model.cache.image/components"]) == ["vllm", "inductor"]
    assert labels["cache.vllm.image/entry-count"] == "48"
    assert len(json.loads(labels["cache.vllm.image/summary"])["targets"]) == 4
    members = read_layer(ref)
    assert all(n.split("/")[0] in ("io.vllm.cache", "io.vllm.manifest", "io.inductor.cache", "io.inductor.manifest")
               for n in members)
    inductor_manifest = json.loads(members["io.inductor.manifest/manifest.json"][1])
    assert {(r["kind"], r["vllm_hash"]) for r in inductor_manifest["inductor"]} >= {("fxgraph", "0a1b2c3d4e")}
    assert not any(n.startswith("io.vllm.cache/") and "/fxgraph/" in n for n in members)
    assert "io.vllm.cache/torch_compile_cache/0a1b2c3d4e/rank_0_0/vllm_compile_cache.py" in members
    manifest = json.loads(members["io.vllm.manifest/manifest.json"][1])
    assert manifest["triton"] == [] and len(manifest["vllm"]) == 48
    ranks = {(r["vllm_hash"], r["rank"]) for r in manifest["vllm"]}
    assert ("0a1b2c3d4e", "rank_0_0") in ranks
    for record in manifest["vllm"]:
        assert f"io.vllm.cache/{record['path']}/{record['files'][0]['name']}" in members


def test_unpack_vllm_into_vllm_root_per_entry(
    vllm_root: tuple[Path, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from infercache.testing.samples import compile_sample

    root, _ = vllm_root
    ref = f"oci:{tmp_path / 'img'}"
    pack(root, ref)
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "node-vllm"))
    report = unpack(ref, None, ["cuda:90"])
    dest = (tmp_path / "node-vllm").resolve()
    assert report.dest == dest
    kernels = [e for e in report.extracted if len(e.rsplit("/", 1)[-1]) == 52]  # the rest: Inductor artifacts
    assert len(kernels) == 12 and len(report.skipped_incompatible) == 36
    assert (dest / "torch_compile_cache" / "0a1b2c3d4e" / "rank_0_0" / "inductor_cache" / "fxgraph" / "ab"
            / "fabcdef0123").is_dir()
    assert report.other_files > 0
    assert (dest / "torch_compile_cache" / "0a1b2c3d4e" / "rank_0_0" / "vllm_compile_cache.py").is_file()
    triton_cache = dest / "torch_compile_cache" / "0a1b2c3d4e" / "rank_0_0" / "triton_cache"
    assert len(list(triton_cache.iterdir())) == 6
    hit = compile_sample(triton_cache, "add_kernel", "cuda:90", num_warps=4)
    assert hit.cache_hit
