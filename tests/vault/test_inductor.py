"""`vault pack --mode inductor`: torch.compile caches shipped in images, checked and unpacked warm.

The caches are real ``torch.compile`` (Inductor, CPU) caches made once per session
(tests/torchcache.py). Faked, because it cannot exist here: another compile host (other
CPU ISA, other Python) is `host_facts` patched while packing; an entry compiled by another
torch is a real entry whose ``# torch version:`` text was changed in place (same length, so
the pickle stays well-formed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import tarfile
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from infercache.cli.app import app
from infercache.errors import InfercacheError
from infercache.vault import inductor
from infercache.vault.check import check_image
from infercache.vault.pack import pack
from infercache.vault.unpack import unpack
from tests.torchcache import TorchCache, run_fresh
from tests.vault.imagekit import Member, build_image, read_layer, tar_bytes

runner = CliRunner()
TORCH = metadata.version("torch")
OTHER_TORCH = TORCH.replace(TORCH.split(".")[1], str(int(TORCH.split(".")[1]) - 1), 1)  # same length: 2.12.0+cpu
S = "cache.inductor.image/summary"


def _pack(cache: Path, tmp_path: Path, name: str = "img") -> str:
    ref = f"oci:{tmp_path / name}:v1"
    pack(cache, ref, mode="inductor")
    return ref


def _labels(ref: str) -> dict[str, str]:
    r = runner.invoke(app, ["vault", "inspect", ref, "--format", "json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)["labels"]


def _retag_torch(path: Path, old: str, new: str) -> None:
    data = path.read_bytes()
    assert f"# torch version: {old}".encode() in data and len(old) == len(new)
    path.write_bytes(data.replace(f"# torch version: {old}".encode(), f"# torch version: {new}".encode()))


def test_pack_records_artifacts_manifest_and_host_facts(torch_cache_master: TorchCache, tmp_path: Path) -> None:
    ref = f"oci:{tmp_path / 'img'}:v1"
    result = pack(torch_cache_master.root, ref)  # auto-detected as an Inductor cache
    labels = _labels(ref)
    assert labels["model.cache.image/type"] == "inductor"
    assert json.loads(labels["model.cache.image/components"]) == ["inductor"]
    summary = json.loads(labels[S])
    here = inductor.host_facts()
    assert summary == {**here.to_json(), "torch_versions": [TORCH], "targets": []}
    assert summary["torch_version"] == TORCH and summary["cpu_isa"] == inductor.cpu_isa()
    layer = read_layer(ref)
    manifest = json.loads(layer["io.inductor.manifest/manifest.json"][1] or b"")
    assert manifest["schema"] == 1 and manifest["host"] == here.to_json()
    records = manifest["inductor"]
    assert int(labels["cache.inductor.image/entry-count"]) == len(records) == result.entries
    kinds = {r["kind"] for r in records}
    assert kinds == {"fxgraph", "aotautograd", "module"}
    assert all(r["torch_version"] == TORCH for r in records if r["kind"] in ("fxgraph", "aotautograd"))
    shipped = {n for n, (info, _) in layer.items() if info.isfile() and n.startswith("io.inductor.cache/")}
    listed = {f"io.inductor.cache/{r['path']}/{f['name']}" for r in records for f in r["files"]}
    assert shipped == listed and not any("/locks/" in n or n.endswith(".lock") for n in shipped)
    for r in records:
        for f in r["files"]:
            data = layer[f"io.inductor.cache/{r['path']}/{f['name']}"][1] or b""
            assert f["size"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()
    assert int(labels["cache.inductor.image/cache-size-bytes"]) == sum(f["size"] for r in records for f in r["files"])


@pytest.mark.slow
def test_unpacked_at_a_new_place_is_warm(torch_cache_master: TorchCache, tmp_path: Path) -> None:
    ref = _pack(torch_cache_master.root, tmp_path)
    check = check_image(ref)
    assert check.compatible and check.to_json()["inductor"]["compatible"]  # no GPU needed for a CPU cache
    dest = tmp_path / "elsewhere" / "inductor"
    report = unpack(ref, dest)
    assert len(report.extracted) == int(_labels(ref)["cache.inductor.image/entry-count"])
    assert not report.skipped_incompatible
    again = unpack(ref, dest)
    assert not again.extracted and len(again.already_present) == len(report.extracted)
    warm = run_fresh(dest)
    assert warm["compile_work"] == 0, warm["build_targets"]
    assert warm["counters"].get("fxgraph_cache_hit") == 3
    assert warm["checksum"] == torch_cache_master.cold["checksum"]


def test_check_and_unpack_refuse_another_compile_host(torch_cache_master: TorchCache, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    here = inductor.host_facts()
    other = dataclasses.replace(here, cpu_isa="avx512 avx512_vnni amx_tile +amx_fp16", python_version="3.9.18")
    with monkeypatch.context() as m:
        m.setattr(inductor, "host_facts", lambda: other)
        ref = _pack(torch_cache_master.root, tmp_path)
    result = check_image(ref)
    assert not result.compatible
    reasons = " ".join(result.to_json()["inductor"]["reasons"])
    assert "amx_tile" in reasons and "CPython 3.9" in reasons
    r = runner.invoke(app, ["vault", "check", ref])
    assert r.exit_code == 1 and "NOT compatible" in r.stdout
    dest = tmp_path / "dest"
    with pytest.raises(InfercacheError, match="amx_tile"):
        unpack(ref, dest)
    assert not dest.exists()  # refused before anything was written
    forced = unpack(ref, dest, force=True)
    assert forced.forced and forced.extracted


def test_entries_of_another_torch_are_skipped_one_by_one(torch_cache_master: TorchCache, tmp_path: Path) -> None:
    cache = torch_cache_master.copy(tmp_path / "inductor")
    fx = sorted((cache / "fxgraph").glob("*/*/*"))
    _retag_torch(fx[0], TORCH, OTHER_TORCH)
    ref = _pack(cache, tmp_path)
    summary = json.loads(_labels(ref)[S])
    assert summary["torch_versions"] == sorted([TORCH, OTHER_TORCH])
    result = check_image(ref)
    assert result.compatible and any(OTHER_TORCH in w for w in result.to_json()["inductor"]["warnings"])
    report = unpack(ref, tmp_path / "dest")
    skipped = set(report.skipped_incompatible)
    assert str(fx[0].parent.relative_to(cache)) in skipped
    assert any(s.startswith("aotautograd/") for s in skipped)  # its AOTAutograd entry names that FX graph
    assert any(OTHER_TORCH in w for w in report.warnings)
    assert not (tmp_path / "dest" / fx[0].parent.relative_to(cache)).exists()
    assert all((tmp_path / "dest" / f.parent.relative_to(cache)).is_dir() for f in fx[1:])
    # Every entry from another torch: nothing can hit, refused with the reason.
    for f in fx[1:]:
        _retag_torch(f, TORCH, OTHER_TORCH)
    ref2 = _pack(cache, tmp_path, "img2")
    assert not check_image(ref2).compatible
    with pytest.raises(InfercacheError, match=re.escape(f"compiled by torch {OTHER_TORCH}")):
        unpack(ref2, tmp_path / "dest2")


def test_manifest_must_match_the_layer() -> None:
    def info(data: bytes) -> SimpleNamespace:
        return SimpleNamespace(size=len(data), sha256=hashlib.sha256(data).hexdigest())

    rec = {"kind": "module", "key": "cab", "path": "ab", "unit": "files",
           "files": [{"name": "cab.so", "size": 3, "sha256": hashlib.sha256(b"elf").hexdigest()}]}
    ok = {"io.inductor.cache/ab/cab.so": info(b"elf")}
    assert inductor.verify("io.inductor.cache", [rec], ok)[0]["path"] == "ab"
    cases = [
        ([rec], {**ok, "io.inductor.cache/ab/extra.so": info(b"x")}, "not listed"),
        ([rec], {"io.inductor.cache/ab/cab.so": info(b"elf!")}, "bytes"),
        ([rec], {"io.inductor.cache/ab/cab.so": info(b"ELF")}, "sha256 of ab/cab.so"),
        ([rec], {}, "does not hold"),
        ([{**rec, "path": "../etc"}], ok, "unsafe"),
        ([{**rec, "files": [{"name": "../x", "size": 1}]}], ok, "malformed"),
        ([{**rec, "files": []}], ok, "lists no files"),
    ]
    for records, extracted, message in cases:
        with pytest.raises(inductor.ManifestMismatch, match=message):
            inductor.verify("io.inductor.cache", records, extracted)


def test_unpack_refuses_an_image_whose_manifest_lies(tmp_path: Path) -> None:
    here = inductor.host_facts()
    so = b"\x7fELF fake module"
    manifest = {"schema": 1, "triton": [], "vllm": [], "host": here.to_json(), "inductor": [
        {"kind": "module", "key": "cab", "path": "ab", "unit": "files", "torch_version": None,
         "files": [{"name": "cab.so", "size": len(so), "sha256": hashlib.sha256(b"other").hexdigest()}]}]}
    layer = tar_bytes([Member("io.inductor.cache/ab/cab.so", data=so),
                       Member("io.inductor.manifest/manifest.json", data=json.dumps(manifest).encode())])
    ref = build_image(tmp_path / "img", layer, summary=json.dumps({"targets": []}))
    # build_image writes triton-typed labels; give it the inductor ones pack would write.
    _relabel(tmp_path / "img", {"model.cache.image/type": "inductor", "model.cache.image/components": '["inductor"]',
                                S: json.dumps({**here.to_json(), "torch_versions": [], "targets": []})})
    with pytest.raises(InfercacheError, match="sha256"):
        unpack(ref, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def _relabel(layout: Path, labels: dict[str, str]) -> None:
    """Rewrite the single image's config labels (and the digests that name it) in an OCI layout."""
    index = json.loads((layout / "index.json").read_text())
    blobs = layout / "blobs" / "sha256"
    mdesc = index["manifests"][0]
    manifest = json.loads((blobs / mdesc["digest"].split(":")[1]).read_text())
    config = json.loads((blobs / manifest["config"]["digest"].split(":")[1]).read_text())
    config["config"]["Labels"].update(labels)
    raw = json.dumps(config).encode()
    digest = hashlib.sha256(raw).hexdigest()
    (blobs / digest).write_bytes(raw)
    manifest["config"].update(digest="sha256:" + digest, size=len(raw))
    mraw = json.dumps(manifest).encode()
    mdigest = hashlib.sha256(mraw).hexdigest()
    (blobs / mdigest).write_bytes(mraw)
    mdesc.update(digest="sha256:" + mdigest, size=len(mraw))
    (layout / "index.json").write_text(json.dumps(index))


def test_cpu_isa_follows_inductors_rules() -> None:
    flags = "flags\t: fpu sse avx2 fma avx512f avx512dq avx512vl avx512bw avx512_vnni avx512_bf16 amx_tile amx_fp16\n"
    assert inductor.cpu_isa(flags, "x86_64", {}) == "avx512 avx512_vnni amx_tile +avx512_bf16 +amx_fp16"
    assert inductor.cpu_isa(flags.replace(" amx_tile", ""), "x86_64", {}) == "avx512 avx512_vnni"
    assert inductor.cpu_isa("flags : avx2 fma avx512f avx512dq avx512vl avx512bw avx512_bf16", "x86_64",
                            {}) == "avx512 +avx512_bf16"
    assert inductor.cpu_isa(flags, "x86_64", {"ATEN_CPU_CAPABILITY": "avx2"}) == "avx2"
    assert inductor.cpu_isa(flags, "x86_64", {"ATEN_CPU_CAPABILITY": "default"}) == "none"
    assert inductor.cpu_isa("flags : sse2", "x86_64", {}) == "none"
    assert inductor.cpu_isa("Features : fp asimd sve", "aarch64", {}) == "sve256"
    assert inductor.cpu_isa("Features : fp asimd", "aarch64", {}) == "neon"
    here = inductor.host_facts()
    assert inductor.host_reasons(here, here) == []
    lacking = dataclasses.replace(here, cpu_isa="avx512 avx512_vnni amx_tile")
    assert "lacks" in inductor.host_reasons(lacking, dataclasses.replace(here, cpu_isa="avx2"))[0]
    assert "keys differ" in inductor.host_reasons(dataclasses.replace(here, cpu_isa="avx2"),
                                                  dataclasses.replace(here, cpu_isa="avx512"))[0]


def test_layer_tar_is_what_extract_accepts(torch_cache_master: TorchCache, tmp_path: Path) -> None:
    """The inductor top-level dirs are allowed by unpack's extraction rules (no 'unexpected top-level dir')."""
    from infercache.vault.labels import TOP_LEVEL_DIRS

    ref = _pack(torch_cache_master.root, tmp_path)
    tops = {name.split("/")[0] for name in read_layer(ref)}
    assert tops == {"io.inductor.cache", "io.inductor.manifest"} and tops <= TOP_LEVEL_DIRS


@pytest.mark.slow
def test_vllm_cache_ships_its_inductor_parts_warm(torch_cache_master: TorchCache, tmp_path: Path) -> None:
    """A legacy vLLM tree whose rank dir holds the real Inductor cache: --mode vllm packs it as the inductor
    component (with vLLM hash/rank), and after unpacking into another vLLM root it is still warm."""
    rank = tmp_path / "vllm" / "torch_compile_cache" / "a1b2c3d4e5" / "rank_0_0"
    torch_cache_master.copy(rank / "inductor_cache")
    (rank / "vllm_compile_cache.py").write_text("{}\n")
    ref = f"oci:{tmp_path / 'img'}:v1"
    result = pack(tmp_path / "vllm", ref, mode="vllm")
    labels = result.labels
    assert json.loads(labels["model.cache.image/components"]) == ["vllm", "inductor"]
    records = json.loads(read_layer(ref)["io.inductor.manifest/manifest.json"][1] or b"")["inductor"]
    assert {(r["vllm_hash"], r["rank"]) for r in records} == {("a1b2c3d4e5", "rank_0_0")}
    assert all(r["path"].startswith("torch_compile_cache/a1b2c3d4e5/rank_0_0/inductor_cache") for r in records)
    dest = tmp_path / "node"
    report = unpack(ref, dest, ["cuda:90"])
    assert report.other_files == 1  # vllm_compile_cache.py
    cache = dest / "torch_compile_cache" / "a1b2c3d4e5" / "rank_0_0" / "inductor_cache"
    assert not (cache / "locks").exists()
    warm = run_fresh(cache)
    assert warm["compile_work"] == 0, warm["build_targets"]


def test_triton_parts_of_an_inductor_cache_go_per_gpu_target(torch_cache_master: TorchCache,
                                                             sample_cache_master: Path, tmp_path: Path) -> None:
    """An Inductor cache with Triton entries (`triton/0/`, as on a GPU host; here real entries compiled for
    cuda:80/90 and hip:gfx90a/gfx942 without a GPU): their targets label the image and unpack installs the
    ones a --target can run, group files pointing at their new place, so Triton hits there."""
    from infercache.testing.samples import compile_sample
    from tests.helpers import copy_triton_cache

    cache = torch_cache_master.copy(tmp_path / "inductor")
    copy_triton_cache(sample_cache_master, cache / "triton" / "0")
    ref = _pack(cache, tmp_path)
    summary = json.loads(_labels(ref)[S])
    assert {(t["backend"], t["arch"]) for t in summary["targets"]} == {
        ("cuda", "80"), ("cuda", "90"), ("hip", "gfx90a"), ("hip", "gfx942")}
    assert check_image(ref, ["cuda:90"]).compatible and not check_image(ref, ["cuda:70"]).compatible
    report = unpack(ref, tmp_path / "dest", ["cuda:90"])
    kernels = [e for e in report.extracted if e.startswith("triton/")]
    assert len(kernels) == 6 and len([s for s in report.skipped_incompatible if s.startswith("triton/")]) == 18
    assert (tmp_path / "dest" / "fxgraph").is_dir()
    assert compile_sample(tmp_path / "dest" / "triton" / "0", "add_kernel", "cuda:90", num_warps=4).cache_hit
    bare = unpack(ref, tmp_path / "dest2")  # no GPU, no --target: Inductor artifacts only, with a warning
    assert not any(e.startswith("triton/") for e in bare.extracted) and (tmp_path / "dest2" / "fxgraph").is_dir()
    assert any("Triton entries skipped" in w for w in bare.warnings)


@pytest.mark.parametrize("extra", [
    Member("io.inductor.cache/fx/abc/evil", tarfile.SYMTYPE, linkname="../../../io.inductor.cache/fx"),
    Member("io.inductor.cache/fx/abc/sub/evil", tarfile.SYMTYPE, linkname="../../../../io.inductor.cache"),
])
def test_unpack_refuses_unlisted_links_in_a_dir_unit(extra: Member, tmp_path: Path) -> None:
    """A `dir` record is installed as one directory: a link in it that the manifest does not list (one
    that stays in the image's top dir, but leaves the destination once installed) refuses the image."""
    here = inductor.host_facts()
    data = b"fx graph"
    manifest = {"schema": 1, "triton": [], "vllm": [], "host": here.to_json(), "inductor": [
        {"kind": "fxgraph", "key": "abc", "path": "fx/abc", "unit": "dir", "torch_version": None,
         "files": [{"name": "entry", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}]}]}
    layer = tar_bytes([Member("io.inductor.cache/fx/abc/entry", data=data), extra,
                       Member("io.inductor.manifest/manifest.json", data=json.dumps(manifest).encode())])
    ref = build_image(tmp_path / "img", layer, summary=json.dumps({"targets": []}))
    _relabel(tmp_path / "img", {"model.cache.image/type": "inductor", "model.cache.image/components": '["inductor"]',
                                S: json.dumps({**here.to_json(), "torch_versions": [], "targets": []})})
    with pytest.raises(InfercacheError, match="not listed"):
        unpack(ref, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
