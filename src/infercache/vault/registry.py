"""The ``docker://`` transport: read or push one image through :class:`RegistryClient`.

Push: ``HEAD`` each blob and skip what the registry has (or mount it from a sibling
repository), upload the rest, then ``PUT`` the manifest. Pull: ``GET`` the manifest
with an ``Accept`` for OCI and Docker types (an index is resolved to one image
manifest), stream blobs and verify digest and size.
"""

from __future__ import annotations

import json
import logging
from typing import Any, BinaryIO

from infercache.vault.image import INDEX_TYPES, MANIFEST_TYPES, REF_NAME_ANNOTATION
from infercache.vault.reference import Descriptor, ImageReference, RegistryOptions
from infercache.vault.registry_client import RegistryClient, remember_blob
from infercache.vault.registry_http import RegistryError

log = logging.getLogger(__name__)


def choose_from_index(index: bytes, tag: str | None) -> Descriptor:
    """The image manifest an index points at: the one tagged `tag`, else the first real image.

    Attestation manifests (buildkit's ``unknown/unknown`` platform) are skipped.
    """
    try:
        data = json.loads(index)
        entries = [e for e in data.get("manifests", []) if isinstance(e, dict)]
    except (ValueError, AttributeError):
        raise RegistryError("image index is not valid JSON") from None
    images = [e for e in entries if e.get("mediaType") in MANIFEST_TYPES]
    if tag:
        for entry in images:
            if (entry.get("annotations") or {}).get(REF_NAME_ANNOTATION) == tag:
                return Descriptor.from_json(entry)
    for entry in images:
        platform = entry.get("platform") or {}
        attest = (entry.get("annotations") or {}).get("vnd.docker.reference.type") == "attestation-manifest"
        if not attest and platform.get("os") != "unknown":
            return Descriptor.from_json(entry)
    if images:
        return Descriptor.from_json(images[0])
    raise RegistryError("image index holds no image manifest")


class RegistrySource:
    """Reads one image from a registry (``docker://``)."""

    def __init__(self, reference: ImageReference, options: RegistryOptions | None = None, **client_kw: Any) -> None:
        self.reference = reference
        self.client = RegistryClient(reference, options, **client_kw)
        self.digest: str | None = None  # of the image manifest, once read

    def get_manifest(self) -> tuple[bytes, str]:
        body, media_type, digest = self.client.get_manifest()
        for _ in range(2):  # an index of indexes is resolved one more level at most
            if media_type not in INDEX_TYPES:
                break
            chosen = choose_from_index(body, self.reference.tag)
            body, media_type, digest = self.client.get_manifest(chosen.digest)
            if len(body) != chosen.size:
                raise RegistryError(f"manifest {chosen.digest} is {len(body)} bytes, index says {chosen.size}")
        if media_type not in MANIFEST_TYPES:
            raise RegistryError(f"unsupported manifest type {media_type!r} for {self.reference}")
        self.digest = digest
        self._remember_blobs(body)
        return body, media_type

    def _remember_blobs(self, manifest: bytes) -> None:
        """The registry only accepts a manifest whose blobs the repository holds: note them for mounts."""
        try:
            data = json.loads(manifest)
            items = [data.get("config") or {}, *(data.get("layers") or [])]
        except (ValueError, AttributeError, TypeError):
            return
        for item in items:
            if isinstance(item, dict) and isinstance(item.get("digest"), str):
                remember_blob(item["digest"], self.reference.registry or "", self.reference.repository or "")

    def open_blob(self, descriptor: Descriptor) -> BinaryIO:
        return self.client.open_blob(descriptor)

    def close(self) -> None:
        self.client.close()


class RegistryDestination:
    """Pushes one image to a registry: blobs first, the manifest (the commit point) last.

    Blobs pushed before a failure stay unreferenced in the registry, which its
    garbage collector removes; no tag ever points at a partial image.
    """

    def __init__(self, reference: ImageReference, options: RegistryOptions | None = None, **client_kw: Any) -> None:
        self.reference = reference
        self.client = RegistryClient(reference, options, **client_kw)
        self.digest: str | None = None

    def has_blob(self, descriptor: Descriptor) -> bool:
        """True when the repository has the blob, or it could be mounted from a sibling repository."""
        present = self.client.has_blob(descriptor, scope=self.client.push_scope)
        if present:
            self.client.stats.blobs_present += 1
            log.info("blob %s already in %s, skipping", descriptor.digest, self.reference.repository)
            return True
        if self.client.mount_blob(descriptor):
            self.client.stats.blobs_mounted += 1
            return True
        return False

    def put_blob(self, descriptor: Descriptor, stream: BinaryIO) -> None:
        self.client.put_blob(descriptor, stream)

    def put_manifest(self, manifest: bytes, media_type: str) -> str:
        self.digest = self.client.put_manifest(manifest, media_type)
        return self.digest

    def close(self) -> None:
        self.client.close()


