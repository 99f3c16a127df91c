"""Hand-built OCI layouts for tests: written here byte by byte, independent of the code under test,
so a malicious image can hold exactly what an attacker would put in it."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

CUDA90_SUMMARY = json.dumps({"targets": [{"backend": "cuda", "arch": "90", "warp_size": 32}]})
KEY = "A" * 52


@dataclass
class Member:
    """One tar member: name, type (tarfile constant), data, link target, or a declared size."""

    name: str
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    linkname: str = ""
    size: int | None = None

    def info(self) -> tarfile.TarInfo:
        info = tarfile.TarInfo(self.name)
        info.type = self.type
        info.linkname = self.linkname
        info.size = len(self.data) if self.type == tarfile.REGTYPE else 0
        info.mode = 0o755 if self.type == tarfile.DIRTYPE else 0o644
        if self.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            info.devmajor, info.devminor = 1, 3
        return info


def tar_bytes(members: list[Member]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for m in members:
            tar.addfile(m.info(), io.BytesIO(m.data) if m.type == tarfile.REGTYPE else None)
    return buf.getvalue()


def _put(layout: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (blobs / digest).write_bytes(data)
    return "sha256:" + digest, len(data)


def valid_entry(key: str = KEY, name: str = "k", manifest_override: Callable[[dict], None] | None = None,
                extra: list[Member] | None = None) -> list[Member]:
    """A minimal well-formed cuda:90 entry plus its manifest.json (which a test may make lie)."""
    files = {
        f"{name}.json": json.dumps({"name": name, "target": {"backend": "cuda", "arch": 90, "warp_size": 32}}).encode(),
        f"{name}.cubin": b"\x7fELF" + b"\x00" * 60,
        f"__grp__{name}.json": json.dumps({"child_paths": {f"{name}.json": f"{name}.json",
                                                          f"{name}.cubin": f"{name}.cubin"}}).encode(),
    }
    record = {
        "key": key, "name": name, "backend": "cuda", "arch": "90", "warp_size": 32, "num_warps": 4,
        "num_stages": 3, "ptx_version": None, "triton_version": None,
        "files": [{"name": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in sorted(files.items())],
    }
    manifest = {"schema": 1, "triton": [record], "vllm": []}
    if manifest_override:
        manifest_override(manifest)
    members = [Member("io.triton.cache/", tarfile.DIRTYPE), Member(f"io.triton.cache/{key}/", tarfile.DIRTYPE)]
    members += [Member(f"io.triton.cache/{key}/{n}", data=d) for n, d in sorted(files.items())]
    members += extra or []
    members += [Member("io.triton.manifest/", tarfile.DIRTYPE),
                Member("io.triton.manifest/manifest.json", data=json.dumps(manifest).encode())]
    return members


def build_image(layout: Path, layer: bytes, *, compression: str = "gzip", tag: str = "v1",
                summary: str = CUDA90_SUMMARY, tamper: Callable[[Path, str], None] | None = None) -> str:
    """Write an OCI layout with one layer (given as a plain tar) and return its `oci:` reference.

    `tamper(blob_path, digest)` may change the layer blob after its descriptor was written
    (digest mismatch, truncation).
    """
    if compression == "gzip":
        blob = gzip.compress(layer, mtime=0)
        media = "application/vnd.oci.image.layer.v1.tar+gzip"
    else:
        blob = layer
        media = "application/vnd.oci.image.layer.v1.tar"
    layer_digest, layer_size = _put(layout, blob)
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Labels": {"model.cache.image/type": "triton", "model.cache.image/summary": summary}},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]},
    }).encode()
    config_digest, config_size = _put(layout, config)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": media, "digest": layer_digest, "size": layer_size}],
    }).encode()
    manifest_digest, manifest_size = _put(layout, manifest)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_text(json.dumps({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
                       "size": manifest_size, "annotations": {"org.opencontainers.image.ref.name": tag}}],
    }))
    if tamper:
        tamper(layout / "blobs" / "sha256" / layer_digest.split(":")[1], layer_digest)
    return f"oci:{layout}:{tag}"


def read_layer(ref: str) -> dict[str, tuple[tarfile.TarInfo, bytes | None]]:
    """Every member of the image's single layer (decompressed by sniffing), via our own source."""
    from infercache.vault.archive import open_decompressed
    from infercache.vault.image import load_image
    from infercache.vault.transport import open_source

    source = open_source(ref)
    try:
        manifest, _ = load_image(source)
        assert len(manifest.layers) == 1
        out: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}
        with open_decompressed(source.open_blob(manifest.layers[0])) as plain:
            data = plain.read()
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar.getmembers():
                handle = tar.extractfile(member) if member.isfile() else None
                out[member.name] = (member, handle.read() if handle else None)
        return out
    finally:
        source.close()
