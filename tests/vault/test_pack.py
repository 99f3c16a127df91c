"""Pack: layout, content and labels per the spec, garbage left out, reproducibility, formats."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tracemalloc
from pathlib import Path

import pytest

from infercache.errors import BadInputError
from infercache.kernels.triton_entry import TritonEntry, parse_entry
from infercache.vault.image import DOCKER_CONFIG, build_manifest, layer_media_type, load_image
from infercache.vault.pack import pack
from infercache.vault.reference import Descriptor
from infercache.vault.transport import open_source
from tests.vault.imagekit import read_layer


def _entries(cache: Path) -> list[TritonEntry]:
    found = [parse_entry(p) for p in sorted(cache.iterdir())]
    return [e for e in found if isinstance(e, TritonEntry)]


def _image(ref: str) -> tuple[dict, dict, dict]:
    source = open_source(ref)
    try:
        manifest, config = load_image(source)
    finally:
        source.close()
    return json.loads(manifest.raw), config, config["config"]["Labels"]


def test_oci_layout_labels_and_annotations(oci_image: str, sample_cache_master: Path) -> None:
    layout = Path(oci_image.split(":")[1])
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout / "index.json").read_text())
    assert [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]] == ["v1"]
    for blob in (layout / "blobs" / "sha256").iterdir():  # content-addressed for real
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name

    manifest, config, labels = _image(oci_image)
    entries = _entries(sample_cache_master)
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    assert [l["mediaType"] for l in manifest["layers"]] == ["application/vnd.oci.image.layer.v1.tar+gzip"]
    assert labels["model.cache.image/type"] == "triton"
    assert json.loads(labels["model.cache.image/components"]) == ["triton"]
    assert labels["model.cache.image/entry-count"] == str(len(entries)) == "24"
    assert labels["cache.triton.image/entry-count"] == "24"
    assert int(labels["model.cache.image/cache-size-bytes"]) > 0
    assert labels["cache.triton.image/cache-size-bytes"] == labels["model.cache.image/cache-size-bytes"]
    targets = json.loads(labels["model.cache.image/summary"])["targets"]
    assert {(t["backend"], t["arch"], t["warp_size"]) for t in targets} == {
        ("cuda", "80", 32), ("cuda", "90", 32), ("hip", "gfx90a", 64), ("hip", "gfx942", 64)}
    assert len(targets) == 4  # distinct
    assert all(t["triton_version"] == entries[0].triton_version for t in targets)
    assert json.loads(labels["cache.triton.image/summary"]) == json.loads(labels["model.cache.image/summary"])
    notes = manifest["annotations"]
    assert notes["org.opencontainers.image.title"] == "triton kernel cache"
    assert notes["org.opencontainers.image.version"] == __import__("infercache").__version__
    assert notes["org.opencontainers.image.created"] == config["created"]
    assert config["rootfs"]["diff_ids"][0].startswith("sha256:")


def test_layer_content_relative_groups_and_manifest(oci_image: str, sample_cache_master: Path) -> None:
    members = read_layer(oci_image)
    names = set(members)
    assert all(n.split("/")[0] in ("io.triton.cache", "io.triton.manifest") for n in names)
    manifest = json.loads(members["io.triton.manifest/manifest.json"][1])
    assert manifest["schema"] == 1 and manifest["vllm"] == []
    by_key = {r["key"]: r for r in manifest["triton"]}
    entries = {e.key: e for e in _entries(sample_cache_master)}
    assert set(by_key) == set(entries)
    for key, entry in entries.items():
        record = by_key[key]
        assert (record["name"], record["backend"], record["arch"], record["warp_size"], record["num_warps"],
                record["num_stages"]) == (entry.name, entry.backend, entry.arch, entry.warp_size, entry.num_warps,
                                          entry.num_stages)
        assert {f["name"] for f in record["files"]} == {f.name for f in entry.files}
        for f in record["files"]:
            info, data = members[f"io.triton.cache/{key}/{f['name']}"]
            assert info.size == f["size"] and hashlib.sha256(data).hexdigest() == f["sha256"]
            assert (info.uid, info.gid, info.uname, info.gname, info.mtime) == (0, 0, "", "", 0)
            if f["name"].startswith("__grp__"):
                children = json.loads(data)["child_paths"]
                assert children and all(k == v and "/" not in v for k, v in children.items())
            else:  # every other file is byte-identical to the cache
                assert data == (entry.path / f["name"]).read_bytes()


def test_garbage_and_non_kernels_left_out(triton_cache: Path, tmp_path: Path) -> None:
    (triton_cache / "tmp.pid_42_deadbeef").mkdir()
    (triton_cache / "tmp.pid_42_deadbeef" / "x.cubin").write_bytes(b"partial")
    launcher = triton_cache / ("L" * 52)
    launcher.mkdir()
    (launcher / "cuda_utils.so").write_bytes(b"\x7fELF")
    broken = triton_cache / ("B" * 52)
    broken.mkdir()
    (broken / "__grp__k.json").write_text("{not json")
    (broken / "k.json").write_text("{}")
    ref = f"oci:{tmp_path / 'img'}"
    result = pack(triton_cache, ref)
    assert result.entries == 24 and result.skipped >= 3
    names = set(read_layer(ref))
    assert not any("tmp.pid_" in n or "L" * 52 in n or "B" * 52 in n for n in names)


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_reproducible_digest(sample_cache_master: Path, tmp_path: Path, compression: str) -> None:
    a = pack(sample_cache_master, f"oci:{tmp_path / 'a'}:t", compression=compression)
    b = pack(sample_cache_master, f"oci-archive:{tmp_path / 'b.tar'}:t", compression=compression)
    assert a.digest == b.digest and a.layer.digest == b.layer.digest


def test_reproducible_across_copies_with_source_date_epoch(
    sample_cache_master: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy of the cache (new mtimes, new path) gives the same image once `created` is pinned."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    copy = tmp_path / "copy"
    shutil.copytree(sample_cache_master, copy)
    a = pack(sample_cache_master, f"oci:{tmp_path / 'a'}")
    b = pack(copy, f"oci:{tmp_path / 'b'}")
    assert a.digest == b.digest
    _, config, _ = _image(f"oci:{tmp_path / 'a'}")
    assert config["created"] == "2023-11-14T22:13:20Z"


def test_compression_media_types_and_docker_format(sample_cache_master: Path, tmp_path: Path) -> None:
    z = pack(sample_cache_master, f"oci:{tmp_path / 'z'}", compression="zstd")
    assert z.layer.media_type == "application/vnd.oci.image.layer.v1.tar+zstd"
    assert (Path(tmp_path / "z" / "blobs" / "sha256" / z.layer.digest[7:]).read_bytes()[:4]) == b"\x28\xb5\x2f\xfd"
    n = pack(sample_cache_master, f"oci:{tmp_path / 'n'}", compression="none")
    assert n.layer.media_type == "application/vnd.oci.image.layer.v1.tar" and n.layer.digest == n.diff_id
    # Docker schema 2 documents, as pushed to docker:// (tests/registry pushes them for real).
    config = Descriptor(DOCKER_CONFIG, "sha256:" + "1" * 64, 10)
    layer = Descriptor(layer_media_type("docker", "gzip"), "sha256:" + "2" * 64, 20)
    raw, media_type = build_manifest(config, [layer], "docker", {"org.opencontainers.image.title": "t"})
    doc = json.loads(raw)
    assert media_type == doc["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert doc["layers"][0]["mediaType"] == "application/vnd.docker.image.rootfs.diff.tar.gzip"
    assert "annotations" not in doc  # not part of Docker schema 2: pack carries them as labels instead
    # An OCI layout only indexes OCI manifests (skopeo finds nothing else): docker format is converted.
    d = pack(sample_cache_master, f"oci:{tmp_path / 'd'}", fmt="docker")
    manifest, _, labels = _image(f"oci:{tmp_path / 'd'}")
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json" and d.entries == 24
    assert labels["model.cache.image/entry-count"] == "24"
    with pytest.raises(BadInputError, match="gzip only"):
        pack(sample_cache_master, f"oci:{tmp_path / 'dz'}", fmt="docker", compression="zstd")
    assert not (tmp_path / "dz").exists()


def test_bad_inputs(tmp_path: Path, sample_cache_master: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BadInputError, match="no kernel cache entries"):
        pack(empty, f"oci:{tmp_path / 'x'}")
    with pytest.raises(BadInputError, match="no such cache directory"):
        pack(tmp_path / "missing", f"oci:{tmp_path / 'x'}")
    with pytest.raises(BadInputError, match="bad image reference"):
        pack(sample_cache_master, "nonsense:foo")
    with pytest.raises(BadInputError, match="compression"):
        pack(sample_cache_master, f"oci:{tmp_path / 'x'}", compression="lz4")
    assert not (tmp_path / "x").exists()


def test_streams_large_files_and_reports_progress(triton_cache: Path, tmp_path: Path) -> None:
    """A 96 MiB binary packs with a small, bounded Python heap: the cache is streamed, not loaded."""
    entry = _entries(triton_cache)[0]
    binary = next(f.name for f in entry.files if f.type in ("cubin", "hsaco"))
    with open(entry.path / binary, "ab") as handle:
        for _ in range(96):
            handle.write(os.urandom(1 << 20))
    calls: list[tuple[int, int]] = []
    tracemalloc.start()
    try:
        result = pack(triton_cache, f"oci:{tmp_path / 'big'}", compression="none",
                      progress=lambda done, total: calls.append((done, total)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.cache_size > 96 << 20
    assert peak < 40 << 20, f"peak Python heap {peak} bytes while packing"
    assert calls[-1][0] == calls[-1][1] == result.cache_size
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))
