"""The docker:// transport against a real docker-registry, with skopeo for interop.

Images here are hand-made minimal layouts (conftest.make_tiny_layout) so the
transport is tested on its own; images made by our packer are pushed in
test_roundtrip.py.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from infercache.errors import InfercacheError
from infercache.vault.image import OCI_INDEX
from infercache.vault.reference import Descriptor, ImageReference
from infercache.vault.registry import RegistryDestination, RegistrySource
from infercache.vault.registry_http import RegistryError
from tests.registry.conftest import Registry, make_tiny_layout, skopeo



def push_layout(layout: Path, tag: str, ref: str, **kw: object) -> tuple[RegistryDestination, str]:
    """Push a hand-made layout through RegistryDestination (blobs, then manifest)."""
    index = json.loads((layout / "index.json").read_text())
    entry = next(m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == tag)
    manifest_bytes = (layout / "blobs" / "sha256" / entry["digest"].split(":")[1]).read_bytes()
    manifest = json.loads(manifest_bytes)
    dest = RegistryDestination(ImageReference.parse(ref), **kw)  # type: ignore[arg-type]
    for item in [manifest["config"], *manifest["layers"]]:
        desc = Descriptor.from_json(item)
        if not dest.has_blob(desc):
            with open(layout / "blobs" / "sha256" / desc.digest.split(":")[1], "rb") as fh:
                dest.put_blob(desc, fh)
    digest = dest.put_manifest(manifest_bytes, entry["mediaType"])
    dest.close()
    return dest, digest


def pull_all(ref: str, **kw: object) -> tuple[dict, dict[str, bytes]]:
    src = RegistrySource(ImageReference.parse(ref), **kw)  # type: ignore[arg-type]
    raw, _media = src.get_manifest()
    manifest = json.loads(raw)
    blobs = {}
    for item in [manifest["config"], *manifest["layers"]]:
        desc = Descriptor.from_json(item)
        with src.open_blob(desc) as stream:
            blobs[desc.digest] = stream.read()
    src.close()
    return manifest, blobs


def test_we_push_and_skopeo_sees_labels(registry: Registry, tmp_path: Path) -> None:
    layout = make_tiny_layout(tmp_path / "img", labels={"model.cache.image/type": "triton", "x": "y"})
    _dest, digest = push_layout(layout, "v1", registry.ref("ours/tiny", "v1"))
    info = json.loads(skopeo("inspect", "--tls-verify=false", registry.ref("ours/tiny", "v1")).stdout)
    assert info["Labels"] == {"model.cache.image/type": "triton", "x": "y"}
    assert info["Digest"] == digest


def test_docker_media_types_push(registry: Registry, tmp_path: Path) -> None:
    layout = make_tiny_layout(tmp_path / "img", docker=True)
    push_layout(layout, "v1", registry.ref("ours/docker", "v1"))
    raw = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", registry.ref("ours/docker", "v1")).stdout)
    assert raw["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"


def test_we_pull_what_skopeo_pushed(registry: Registry, tmp_path: Path) -> None:
    layout = make_tiny_layout(tmp_path / "img", payload=b"from skopeo")
    skopeo("copy", "--dest-tls-verify=false", f"oci:{layout}:v1", registry.ref("skopeo/pushed", "t"))
    manifest, blobs = pull_all(registry.ref("skopeo/pushed", "t"))
    layer = blobs[manifest["layers"][0]["digest"]]
    import gzip
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer))) as tar:
        member = tar.extractfile("io.triton.cache/hello.txt")
        assert member is not None and member.read() == b"from skopeo"


def test_repush_skips_present_blobs(registry: Registry, tmp_path: Path) -> None:
    layout = make_tiny_layout(tmp_path / "img", payload=b"skip me")
    first, _ = push_layout(layout, "v1", registry.ref("ours/skip", "a"))
    assert first.client.stats.blobs_uploaded == 2 and first.client.stats.blobs_present == 0
    second, _ = push_layout(layout, "v1", registry.ref("ours/skip", "b"))
    assert second.client.stats.blobs_uploaded == 0 and second.client.stats.blobs_present == 2
    assert "POST" not in second.client.stats.by_method


def test_chunked_upload(registry: Registry, tmp_path: Path) -> None:
    payload = __import__("random").Random(0).randbytes(6000)  # incompressible: several 1 KiB chunks
    layout = make_tiny_layout(tmp_path / "img", payload=payload)
    dest, _ = push_layout(layout, "v1", registry.ref("ours/chunked", "v1"), chunk_size=1024)
    assert dest.client.stats.by_method.get("PATCH", 0) >= 2
    manifest, blobs = pull_all(registry.ref("ours/chunked", "v1"))
    assert len(blobs[manifest["layers"][0]["digest"]]) == manifest["layers"][0]["size"]


def test_put_blob_refuses_wrong_digest(registry: Registry) -> None:
    dest = RegistryDestination(ImageReference.parse(registry.ref("ours/bad", "v1")))
    desc = Descriptor("application/octet-stream", "sha256:" + "0" * 64, 5)
    with pytest.raises(InfercacheError, match="digest mismatch"):
        dest.put_blob(desc, io.BytesIO(b"hello"))
    assert "POST" not in dest.client.stats.by_method  # refused before the registry saw a byte
    with pytest.raises(InfercacheError, match="truncated"):
        dest.put_blob(Descriptor("x", "sha256:" + "0" * 64, 50), io.BytesIO(b"hello"))


def test_non_seekable_stream_is_spooled(registry: Registry, tmp_path: Path, fresh_blob_memory: None) -> None:
    """A network-like stream (not seekable) uploads too, and a pull→push copy works."""
    layout = make_tiny_layout(tmp_path / "img", payload=b"copy between registries")
    push_layout(layout, "v1", registry.ref("ours/src", "v1"))
    src = RegistrySource(ImageReference.parse(registry.ref("ours/src", "v1")))
    dest = RegistryDestination(ImageReference.parse(registry.ref("ours/dst", "v1")))
    raw, media = src.get_manifest()
    import infercache.vault.registry_client as client

    client._SEEN_BLOBS.clear()  # no cross-repo mount: this test is about streaming the bytes
    manifest = json.loads(raw)
    for item in [manifest["config"], *manifest["layers"]]:
        desc = Descriptor.from_json(item)
        assert not dest.has_blob(desc)
        with src.open_blob(desc) as stream:
            assert not stream.seekable()
            dest.put_blob(desc, stream)
    dest.put_manifest(raw, media)
    assert json.loads(skopeo("inspect", "--tls-verify=false", registry.ref("ours/dst", "v1")).stdout)["Digest"]


def test_index_resolves_to_image_manifest(registry: Registry, tmp_path: Path) -> None:
    layout = make_tiny_layout(tmp_path / "img")
    _dest, digest = push_layout(layout, "v1", registry.ref("ours/indexed", "img"))
    man_size = len((layout / "blobs" / "sha256" / digest.split(":")[1]).read_bytes())
    index = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": man_size,
                       "platform": {"architecture": "amd64", "os": "linux"}}],
    }).encode()
    dest = RegistryDestination(ImageReference.parse(registry.ref("ours/indexed", "idx")))
    dest.put_manifest(index, OCI_INDEX)
    src = RegistrySource(ImageReference.parse(registry.ref("ours/indexed", "idx")))
    raw, media = src.get_manifest()
    assert media == "application/vnd.oci.image.manifest.v1+json"
    assert src.digest == digest


def test_pull_by_digest_and_missing_image(registry: Registry, tmp_path: Path) -> None:
    layout = make_tiny_layout(tmp_path / "img")
    _dest, digest = push_layout(layout, "v1", registry.ref("ours/bydigest", "v1"))
    manifest, _ = pull_all(f"docker://{registry.host}/ours/bydigest@{digest}")
    assert manifest["schemaVersion"] == 2
    with pytest.raises(RegistryError, match="not found"):
        RegistrySource(ImageReference.parse(registry.ref("ours/bydigest", "nope"))).get_manifest()


def test_tampered_blob_in_registry_storage_is_detected(registry: Registry, tmp_path: Path) -> None:
    """Corrupt the blob inside the real registry's storage: the pull must fail on digest."""
    layout = make_tiny_layout(tmp_path / "img", payload=b"tamper target " * 50)
    push_layout(layout, "v1", registry.ref("ours/tamper", "v1"))
    src = RegistrySource(ImageReference.parse(registry.ref("ours/tamper", "v1")))
    manifest = json.loads(src.get_manifest()[0])
    layer = Descriptor.from_json(manifest["layers"][0])
    hexd = layer.digest.split(":")[1]
    data_file = registry.root / "data" / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"
    original = data_file.read_bytes()
    try:
        data_file.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
        with pytest.raises(InfercacheError, match="digest mismatch"):
            with src.open_blob(layer) as stream:
                stream.read()
        data_file.write_bytes(original[:-5])
        with pytest.raises(InfercacheError, match="truncated|digest"):
            with src.open_blob(layer) as stream:
                stream.read()
    finally:
        data_file.write_bytes(original)


def test_list_tags(registry: Registry, tmp_path: Path) -> None:
    layout = make_tiny_layout(tmp_path / "img")
    push_layout(layout, "v1", registry.ref("ours/tags", "one"))
    push_layout(layout, "v1", registry.ref("ours/tags", "two"))
    src = RegistrySource(ImageReference.parse(registry.ref("ours/tags", "one")))
    assert sorted(src.client.list_tags()) == ["one", "two"]


def test_large_blob_streams_without_holding_it_in_memory(registry: Registry, tmp_path: Path) -> None:
    """Pull a 48 MiB blob and push it on (non-seekable → spooled): peak Python memory stays far below."""
    import hashlib
    import random
    import tracemalloc

    data = random.Random(7).randbytes(48 << 20)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blob = tmp_path / "big"
    blob.write_bytes(data)
    desc = Descriptor("application/vnd.oci.image.layer.v1.tar", digest, len(data))
    del data
    first = RegistryDestination(ImageReference.parse(registry.ref("big/a", "v1")), chunk_size=16 << 20)
    second = RegistryDestination(ImageReference.parse(registry.ref("big/b", "v1")))
    src = RegistrySource(ImageReference.parse(registry.ref("big/a", "v1")))
    tracemalloc.start()
    try:
        with open(blob, "rb") as fh:
            first.put_blob(desc, fh)  # seekable: hashed in place, 3 PATCH chunks
        with src.open_blob(desc) as stream:
            second.put_blob(desc, stream)  # network stream: spooled to a temp file
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert first.client.stats.by_method.get("PATCH") == 3
    assert second.has_blob(desc)
    assert peak < 24 << 20, f"peak {peak >> 20} MiB for a 48 MiB blob"


def test_manifest_accept_lists_oci_and_docker_types(registry: Registry, tmp_path: Path) -> None:
    from tests.registry.proxy import FaultyProxy

    layout = make_tiny_layout(tmp_path / "img")
    push_layout(layout, "v1", registry.ref("ours/accept", "v1"))
    with FaultyProxy(registry.host, lambda *_: None) as proxy:
        RegistrySource(ImageReference.parse(f"docker://{proxy.host}/ours/accept:v1")).get_manifest()
    accepts = [h.get("Accept", "") for (m, p, _), h in zip(proxy.log, proxy.headers_seen) if "/manifests/" in p]
    assert accepts and all(t in accepts[0] for t in (
        "application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"))
