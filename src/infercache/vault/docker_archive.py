"""The `docker-archive:FILE[:NAME:TAG]` transport (the `docker save` / `docker load` tar format).

The archive holds `manifest.json` (`[{"Config", "RepoTags", "Layers"}]`), the
config as `<hex>.json` and each layer as an UNCOMPRESSED tar `<diff-id hex>.tar`,
as `docker save` and skopeo write it. No registry manifest is stored, so reading
synthesises a Docker schema 2 manifest whose layer digests are the diff IDs; a
compressed layer given to the writer is therefore decompressed on the way in
(its compressed digest verified first) so the archive stays loadable everywhere.

Hand-written: no maintained Python library reads or writes this format without a daemon.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import tempfile
from typing import Any, BinaryIO

from infercache.errors import BadInputError, InfercacheError
from infercache.vault.archive import (
    GZIP_MAGIC,
    ImageArchive,
    is_compressed,
    open_decompressed,
)
from infercache.vault.image import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_LAYER_TAR,
    MAX_DOCUMENT_BYTES,
    OCI_CONFIG,
    VerifyingReader,
    build_manifest,
    canonical_json,
    parse_document,
    parse_manifest,
    sha256_digest,
)
from infercache.vault.reference import (
    DEFAULT_TAG,
    Descriptor,
    ImageReference,
    RegistryOptions,
    familiar_name,
)

logger = logging.getLogger(__name__)
_CHUNK = 1 << 20
_CONFIG_TYPES = (OCI_CONFIG, DOCKER_CONFIG)


def _repo_tag(reference: ImageReference) -> str | None:
    """`name:tag` from the reference (`name` alone gets `:latest`), or None when absent."""
    if not reference.tag:
        return None
    name, _, tag = reference.tag.rpartition(":") if ":" in reference.tag else (reference.tag, "", "")
    if not name:
        raise BadInputError(f"bad docker-archive name in {reference}: expected FILE:NAME:TAG")
    return f"{name}:{tag or DEFAULT_TAG}"


class DockerArchiveSource:
    """Reads one image from a docker-archive tar without extracting it."""

    def __init__(self, reference: ImageReference, options: RegistryOptions | None = None) -> None:
        self.reference = reference
        self._path = reference.local_path()
        self._archive = ImageArchive(self._path, str(reference))
        self._members = self._archive.members
        self._blobs: dict[str, str] = {}  # digest → member name
        self._manifest: tuple[bytes, str] | None = None

    def _read_member(self, name: str) -> bytes:
        member = self._members.get(name)
        if member is not None and member.size > MAX_DOCUMENT_BYTES:
            raise BadInputError(f"{self.reference}: {name} is too large")
        return self._archive.open(name).read()

    def _hash_member(self, name: str) -> str:
        handle = self._archive.open(name)
        digest = hashlib.sha256()
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
        return "sha256:" + digest.hexdigest()

    def get_manifest(self) -> tuple[bytes, str]:
        if self._manifest is not None:
            return self._manifest
        entries = parse_document(self._read_member("manifest.json"), f"{self.reference}: manifest.json")
        if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
            raise BadInputError(f"{self.reference}: manifest.json holds no image")
        wanted = _repo_tag(self.reference)
        if wanted:
            chosen = [e for e in entries
                      if familiar_name(wanted) in {familiar_name(str(t)) for t in (e.get("RepoTags") or [])}]
            if not chosen:
                raise BadInputError(f"{self.reference}: no image named {wanted}")
            entry = chosen[0]
        elif len(entries) == 1:
            entry = entries[0]
        else:
            raise BadInputError(f"{self.reference}: the archive holds {len(entries)} images; name one with :NAME:TAG")
        config_name = str(entry.get("Config", ""))
        layers = entry.get("Layers")
        if config_name not in self._members or not isinstance(layers, list):
            raise BadInputError(f"{self.reference}: manifest.json names a missing config or no layers")
        config_raw = self._read_member(config_name)
        config_digest = sha256_digest(config_raw)
        self._blobs[config_digest] = config_name
        try:
            config = json.loads(config_raw)
            diff_ids = list(config.get("rootfs", {}).get("diff_ids", []))
        except (ValueError, AttributeError, UnicodeDecodeError):
            diff_ids = []
        descriptors = []
        for i, layer_name in enumerate(layers):
            layer_name = str(layer_name)
            if layer_name not in self._members:
                raise BadInputError(f"{self.reference}: layer {layer_name} is missing from the archive")
            member = self._members[layer_name]
            head = self._archive.open(layer_name).read(4)
            # An uncompressed layer's digest is its diff ID; it is verified whenever it is read.
            if not is_compressed(head) and i < len(diff_ids) and isinstance(diff_ids[i], str):
                digest = diff_ids[i]
            else:
                digest = self._hash_member(layer_name)
            self._blobs[digest] = layer_name
            media_type = DOCKER_LAYER_GZIP if head.startswith(GZIP_MAGIC) else DOCKER_LAYER_TAR
            descriptors.append(Descriptor(media_type, digest, member.size))
        raw, media_type = build_manifest(
            Descriptor(DOCKER_CONFIG, config_digest, len(config_raw)), descriptors, "docker"
        )
        self._manifest = (raw, media_type)
        return self._manifest

    def open_blob(self, descriptor: Descriptor) -> BinaryIO:
        if not self._blobs:
            self.get_manifest()
        name = self._blobs.get(descriptor.digest)
        if name is None:
            raise InfercacheError(f"{self.reference}: no blob {descriptor.digest} in the archive")
        return self._archive.open(name)

    def close(self) -> None:
        self._archive.close()


class DockerArchiveDestination:
    """Writes one image as a docker-archive tar: appended to a temp file, renamed in close()."""

    def __init__(self, reference: ImageReference, options: RegistryOptions | None = None) -> None:
        self.reference = reference
        self._target = reference.local_path()
        self._repo_tag = _repo_tag(reference)
        if not self._target.parent.is_dir():
            raise BadInputError(f"{self._target.parent}: no such directory")
        if self._target.is_dir():
            raise BadInputError(f"{self._target} is a directory, expected an archive file name")
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self._target.name}.", suffix=".part", dir=self._target.parent)
        self._file = os.fdopen(fd, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self._written: dict[str, str] = {}  # blob digest (as given) → member name
        self._committed = False
        self._closed = False

    def _add(self, name: str, size: int, stream: BinaryIO) -> None:
        info = tarfile.TarInfo(name)
        info.size = size
        info.mode = 0o644
        info.mtime = 0
        self._tar.addfile(info, stream)

    def has_blob(self, descriptor: Descriptor) -> bool:
        return descriptor.digest in self._written

    def put_blob(self, descriptor: Descriptor, stream: BinaryIO) -> None:
        reader = VerifyingReader(stream, descriptor)
        if descriptor.media_type in _CONFIG_TYPES or descriptor.media_type.endswith("config.v1+json"):
            data = reader.read()
            reader.verify_to_end()
            name = descriptor.digest.split(":", 1)[1] + ".json"
            self._add(name, len(data), io.BytesIO(data))
            self._written[descriptor.digest] = name
            return
        # A layer: spool the decompressed tar (size unknown up front), hashing it for its diff ID.
        spool = tempfile.TemporaryFile(dir=self._target.parent)
        try:
            plain = open_decompressed(reader)  # type: ignore[arg-type]
            diff = hashlib.sha256()
            size = 0
            while chunk := plain.read(_CHUNK):
                diff.update(chunk)
                spool.write(chunk)
                size += len(chunk)
            reader.verify_to_end()
            spool.seek(0)
            name = diff.hexdigest() + ".tar"
            self._add(name, size, spool)  # type: ignore[arg-type]
            self._written[descriptor.digest] = name
        finally:
            spool.close()

    def put_manifest(self, manifest: bytes, media_type: str) -> str:
        parsed = parse_manifest(manifest, media_type)
        missing = [d.digest for d in (parsed.config, *parsed.layers) if d.digest not in self._written]
        if missing:
            raise InfercacheError(f"{self.reference}: manifest refers to blobs never written: {', '.join(missing)}")
        entry: dict[str, Any] = {
            "Config": self._written[parsed.config.digest],
            "RepoTags": [self._repo_tag] if self._repo_tag else [],
            "Layers": [self._written[d.digest] for d in parsed.layers],
        }
        data = canonical_json([entry])
        self._add("manifest.json", len(data), io.BytesIO(data))
        if self._repo_tag:
            name, _, tag = self._repo_tag.rpartition(":")
            layer_id = self._written[parsed.layers[-1].digest].split(".")[0] if parsed.layers else ""
            repos = canonical_json({name: {tag: layer_id}})
            self._add("repositories", len(repos), io.BytesIO(repos))
        self._committed = True
        return parsed.digest

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            if self._committed:
                os.chmod(self._tmp, 0o644)
                os.replace(self._tmp, self._target)
                logger.info("wrote %s", self.reference)
        finally:
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)

