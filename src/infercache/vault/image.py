"""OCI / Docker image documents: media types, manifests, configs, and digest-checked blob reading.

Everything read from a source is untrusted: manifests and configs are size-capped
before parsing and every blob is read through :class:`VerifyingReader`, which
fails on a wrong size or digest instead of handing back unverified bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Mapping

from infercache.errors import BadInputError, InfercacheError
from infercache.vault.reference import Descriptor, ImageSource

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"

#: Manifests, indexes and configs are small JSON; anything bigger is hostile or not an image.
#: 4 MiB is what registries themselves accept for a manifest, so a bigger one could never be pushed.
MAX_DOCUMENT_BYTES = 4 << 20


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_media_type(fmt: str, compression: str) -> str:
    """The layer media type for an image format ("oci"|"docker") and a compression."""
    if fmt == "docker":
        if compression != "gzip":
            raise BadInputError("docker format layers are gzip only (use --format oci for zstd or none)")
        return DOCKER_LAYER_GZIP
    return {"gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD, "none": OCI_LAYER_TAR}[compression]


def compression_of(media_type: str) -> str | None:
    """"gzip" | "zstd" | "none" from a layer media type; None when the type says nothing."""
    if media_type.endswith("+zstd") or media_type.endswith(".zstd"):
        return "zstd"
    if media_type.endswith("+gzip") or media_type.endswith(".gzip"):
        return "gzip"
    if media_type.endswith(".tar") or media_type.endswith("diff.tar"):
        return "none"
    return None


@dataclass(frozen=True)
class ImageManifest:
    """One parsed image manifest (OCI or Docker schema 2) with its raw bytes and digest."""

    raw: bytes
    media_type: str
    digest: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def is_docker(self) -> bool:
        return self.media_type == DOCKER_MANIFEST


def parse_document(raw: bytes, what: str) -> Any:
    """A small JSON document (manifest, index, config) read from an untrusted source: size-capped, then parsed."""
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise BadInputError(f"{what} is too large ({len(raw)} bytes > {MAX_DOCUMENT_BYTES})")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{what} is not valid JSON: {exc}") from None


def parse_object(raw: bytes, what: str) -> dict[str, Any]:
    """:func:`parse_document` for documents that must be a JSON object."""
    data = parse_document(raw, what)
    if not isinstance(data, dict):
        raise BadInputError(f"{what} is not a JSON object")
    return data


def parse_manifest(raw: bytes, media_type: str | None = None) -> ImageManifest:
    """Parse an image manifest; an index or anything else is a clear error."""
    data = parse_object(raw, "image manifest")
    mt = str(data.get("mediaType") or media_type or OCI_MANIFEST)
    if mt in INDEX_TYPES:
        raise BadInputError(f"expected an image manifest, got an index ({mt})")
    if mt not in MANIFEST_TYPES:
        raise BadInputError(f"unsupported manifest media type {mt!r}")
    if data.get("schemaVersion") != 2:
        raise BadInputError(f"unsupported manifest schemaVersion {data.get('schemaVersion')!r}")
    config = data.get("config")
    layers = data.get("layers")
    if not isinstance(config, dict) or not isinstance(layers, list):
        raise BadInputError("image manifest lacks config or layers")
    annotations = data.get("annotations") if isinstance(data.get("annotations"), dict) else {}
    return ImageManifest(
        raw=raw,
        media_type=mt,
        digest=sha256_digest(raw),
        config=Descriptor.from_json(config),
        layers=tuple(Descriptor.from_json(layer) for layer in layers if isinstance(layer, dict)),
        annotations={str(k): str(v) for k, v in annotations.items()},
    )


def build_manifest(
    config: Descriptor, layers: list[Descriptor], fmt: str, annotations: Mapping[str, str] | None = None
) -> tuple[bytes, str]:
    """Serialise a manifest deterministically (sorted keys, no whitespace) → (bytes, media type)."""
    media_type = DOCKER_MANIFEST if fmt == "docker" else OCI_MANIFEST
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": config.to_json(),
        "layers": [layer.to_json() for layer in layers],
    }
    if annotations and fmt != "docker":  # Docker schema 2 has no annotations
        doc["annotations"] = dict(annotations)
    return canonical_json(doc), media_type


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes (the digest of what we write must not depend on dict order)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def to_oci_manifest(manifest: ImageManifest) -> tuple[bytes, str]:
    """Re-express a Docker schema 2 manifest with OCI media types (blobs unchanged)."""
    if not manifest.is_docker:
        return manifest.raw, manifest.media_type
    config = Descriptor(OCI_CONFIG, manifest.config.digest, manifest.config.size)
    layers = []
    for layer in manifest.layers:
        comp = compression_of(layer.media_type) or "gzip"
        layers.append(Descriptor(layer_media_type("oci", comp), layer.digest, layer.size, layer.annotations))
    return build_manifest(config, layers, "oci", manifest.annotations)


class VerifyingReader(io.RawIOBase):
    """Reads a blob stream and fails unless it is exactly ``descriptor.size`` bytes with the right digest.

    The check happens when the stream is exhausted, so a consumer must read to the
    end (and may not trust what it read before EOF: it stages it, then commits).
    """

    def __init__(self, stream: BinaryIO, descriptor: Descriptor, what: str = "blob", *, owns_stream: bool = True) -> None:
        super().__init__()
        self._stream = stream
        self._owns_stream = owns_stream  # False: closing (or collecting) the reader leaves `stream` open
        self._desc = descriptor
        self._what = what
        self._hash = hashlib.sha256()
        self._read = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._done:
            return 0
        remaining = self._desc.size - self._read
        want = min(len(view), remaining + 1)  # one extra byte reveals an over-long blob
        if want <= 0:
            want = 1
        data = self._stream.read(want)
        if not data:
            self._finish()
            return 0
        self._read += len(data)
        if self._read > self._desc.size:
            raise InfercacheError(
                f"{self._what} {self._desc.digest} is longer than its declared size {self._desc.size}"
            )
        self._hash.update(data)
        n = len(data)
        view[:n] = data
        if self._read == self._desc.size:
            self._finish()
        return n

    def _finish(self) -> None:
        if self._done:
            return
        if self._read != self._desc.size:
            raise InfercacheError(
                f"{self._what} {self._desc.digest} is truncated: got {self._read} of {self._desc.size} bytes"
            )
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self._desc.digest:
            raise InfercacheError(f"{self._what} digest mismatch: expected {self._desc.digest}, got {actual}")
        # A stream longer than declared must not pass silently either.
        if self._stream.read(1):
            raise InfercacheError(
                f"{self._what} {self._desc.digest} is longer than its declared size {self._desc.size}"
            )
        self._done = True

    def verify_to_end(self) -> None:
        """Drain the rest of the stream (discarding it) so the digest is checked."""
        while self.read(1 << 20):
            pass
        self._finish()

    def close(self) -> None:
        try:
            if self._owns_stream:
                self._stream.close()
        finally:
            super().close()


def read_blob_bytes(source: ImageSource, descriptor: Descriptor, what: str) -> bytes:
    """A small blob (manifest, config) read whole and verified: the one reader for documents by digest."""
    if descriptor.size > MAX_DOCUMENT_BYTES:
        raise BadInputError(f"{what} {descriptor.digest} is too large ({descriptor.size} bytes > {MAX_DOCUMENT_BYTES})")
    reader = VerifyingReader(source.open_blob(descriptor), descriptor, what)
    try:
        data = reader.read()
        reader.verify_to_end()
    finally:
        reader.close()
    return data


def read_config(source: ImageSource, manifest: ImageManifest) -> dict[str, Any]:
    """The image config JSON (verified against the manifest's descriptor)."""
    return parse_object(read_blob_bytes(source, manifest.config, "config"), "image config")


def config_labels(config: Mapping[str, Any]) -> dict[str, str]:
    """`config.Labels` (Docker also accepts `container_config.Labels`; we only read `config`)."""
    inner = config.get("config")
    labels = inner.get("Labels") if isinstance(inner, Mapping) else None
    if not isinstance(labels, Mapping):
        return {}
    return {str(k): str(v) for k, v in labels.items()}


def load_image(source: ImageSource) -> tuple[ImageManifest, dict[str, Any]]:
    """Manifest and config of the source's image: the cheap part (no layer is read)."""
    raw, media_type = source.get_manifest()
    manifest = parse_manifest(raw, media_type)
    return manifest, read_config(source, manifest)
