"""The `oci:` transport: an OCI image layout directory (`oci_archive` is the same layout as a tar).

No maintained Python library writes OCI image layouts (see the OCI reference
notes), so this is ours; it follows the image-layout spec: `oci-layout`,
`index.json` with `org.opencontainers.image.ref.name` tags, `blobs/sha256/<hex>`.

Writes are crash-safe: each blob lands under a temp name and is renamed after its
digest checks out; `index.json` is replaced atomically (the commit point).
"""

from __future__ import annotations

import io
import logging
import os
import shutil
from pathlib import Path
from typing import Any, BinaryIO

from infercache.errors import BadInputError, InfercacheError
from infercache.fsutil import atomic_file, atomic_write_bytes
from infercache.vault.image import (
    INDEX_TYPES,
    MAX_DOCUMENT_BYTES,
    OCI_INDEX,
    OCI_MANIFEST,
    REF_NAME_ANNOTATION,
    VerifyingReader,
    canonical_json,
    parse_document,
    read_blob_bytes,
    sha256_digest,
)
from infercache.vault.reference import DEFAULT_TAG, Descriptor, ImageReference, RegistryOptions

logger = logging.getLogger(__name__)

OCI_LAYOUT_FILE = "oci-layout"
OCI_LAYOUT_CONTENT = b'{"imageLayoutVersion":"1.0.0"}'
_COPY_CHUNK = 1 << 20


def blob_relpath(digest: str) -> str:
    """Where a layout keeps a blob: `blobs/<algorithm>/<hex>`."""
    algo, _, hexpart = digest.partition(":")
    return f"blobs/{algo}/{hexpart}"


def select_manifest(index: Any, tag: str | None, where: str) -> Descriptor:
    """Pick the manifest descriptor for `tag` from an index.json document (skopeo's rules)."""
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise BadInputError(f"{where}: index.json has no manifests list")
    descriptors = [m for m in index["manifests"] if isinstance(m, dict)]
    if tag:
        matches = [m for m in descriptors if (m.get("annotations") or {}).get(REF_NAME_ANNOTATION) == tag]
        if not matches:
            tags = sorted({str((m.get("annotations") or {}).get(REF_NAME_ANNOTATION)) for m in descriptors} - {"None"})
            raise BadInputError(f"{where}: no image tagged {tag!r} (tags: {', '.join(tags) or 'none'})")
        return Descriptor.from_json(matches[0])
    if len(descriptors) == 1:
        return Descriptor.from_json(descriptors[0])
    latest = [m for m in descriptors if (m.get("annotations") or {}).get(REF_NAME_ANNOTATION) == DEFAULT_TAG]
    if latest:
        return Descriptor.from_json(latest[0])
    if not descriptors:
        raise BadInputError(f"{where}: the layout holds no image")
    raise BadInputError(f"{where}: the layout holds {len(descriptors)} images; name one with :TAG")


class LayoutReader:
    """What both layout sources share: index.json → (nested index →) one image manifest, blobs by path.

    Subclasses say how a path inside the layout is opened (a file, or a tar member).
    """

    reference: ImageReference

    def _open(self, relpath: str) -> BinaryIO:
        raise NotImplementedError

    def get_manifest(self) -> tuple[bytes, str]:
        where = str(self.reference)
        with self._open("index.json") as handle:
            index = parse_document(handle.read(MAX_DOCUMENT_BYTES + 1), f"{where}: index.json")
        desc = select_manifest(index, self.reference.tag, where)
        for _ in range(4):  # nested indexes: follow the first image manifest
            raw = read_blob_bytes(self, desc, "manifest")
            if desc.media_type in INDEX_TYPES or (not desc.media_type and b'"manifests"' in raw):
                desc = select_manifest(parse_document(raw, f"{where}: nested index"), None, where)
                continue
            doc = parse_document(raw, f"{where}: manifest")
            media_type = desc.media_type or (doc.get("mediaType") if isinstance(doc, dict) else None) or OCI_MANIFEST
            return raw, str(media_type)
        raise BadInputError(f"{where}: indexes nested too deeply")

    def open_blob(self, descriptor: Descriptor) -> BinaryIO:
        return self._open(blob_relpath(descriptor.digest))


class OciLayoutSource(LayoutReader):
    """Reads an image from an OCI layout directory."""

    def __init__(self, reference: ImageReference, options: RegistryOptions | None = None) -> None:
        self.reference = reference
        self._path = reference.local_path()
        if not (self._path / "index.json").is_file():
            raise BadInputError(f"{self._path} is not an OCI image layout (no index.json)")

    def _open(self, relpath: str) -> BinaryIO:
        path = self._path / relpath
        if path.is_symlink() or not path.is_file():
            raise InfercacheError(f"{self.reference}: {relpath} is missing")
        return open(path, "rb")

    def close(self) -> None:
        pass


class OciLayoutDestination:
    """Writes an image into an OCI layout directory (a subclass stages an archive in one)."""

    def __init__(self, reference: ImageReference, options: RegistryOptions | None = None) -> None:
        self.reference = reference
        self._tag = reference.tag or DEFAULT_TAG
        self._committed = False
        self._closed = False
        self._new_blobs: list[Path] = []
        self._created_dir = False
        self._root = self._make_root(reference)
        (self._root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)

    def _make_root(self, reference: ImageReference) -> Path:
        """The layout directory to write into, checked (and created when new)."""
        root = reference.local_path()
        if root.exists() and not root.is_dir():
            raise BadInputError(f"{root} exists and is not a directory")
        if root.is_dir() and any(root.iterdir()) and not (root / OCI_LAYOUT_FILE).is_file():
            raise BadInputError(f"{root} is a non-empty directory that is not an OCI layout")
        if not root.exists():
            root.mkdir(parents=True)
            self._created_dir = True
        return root

    def _blob_path(self, digest: str) -> Path:
        return self._root / blob_relpath(digest)

    def has_blob(self, descriptor: Descriptor) -> bool:
        path = self._blob_path(descriptor.digest)
        try:
            return path.is_file() and not path.is_symlink() and path.stat().st_size == descriptor.size
        except OSError:
            return False

    def put_blob(self, descriptor: Descriptor, stream: BinaryIO) -> None:
        final = self._blob_path(descriptor.digest)
        existed = final.exists()
        reader = VerifyingReader(stream, descriptor)
        with atomic_file(final, mode=0o644, fsync=False) as out:
            while True:
                chunk = reader.read(_COPY_CHUNK)
                if not chunk:
                    break
                out.write(chunk)
            reader.verify_to_end()
        if not existed:
            self._new_blobs.append(final)

    def spool_dir(self) -> Path:
        """Where a writer may build a blob that :meth:`adopt_blob` then takes by rename."""
        return self._root / "blobs" / "sha256"

    def adopt_blob(self, descriptor: Descriptor, path: Path) -> None:
        """Take a finished blob file (in :meth:`spool_dir`) whose digest the caller computed while writing it.

        An extension of the transport interface for local packing: it saves a full copy of the
        layer; callers without a trusted digest use put_blob, which verifies.
        """
        final = self._blob_path(descriptor.digest)
        if Path(path).parent.resolve() != final.parent.resolve():
            raise InfercacheError(f"adopt_blob: {path} is not in {final.parent}")
        if Path(path).stat().st_size != descriptor.size:
            raise InfercacheError(f"adopt_blob: {path} does not hold {descriptor.size} bytes")
        os.chmod(path, 0o644)
        existed = final.exists()
        os.replace(path, final)
        if not existed:
            self._new_blobs.append(final)

    def put_manifest(self, manifest: bytes, media_type: str) -> str:
        digest = sha256_digest(manifest)
        desc = Descriptor(media_type, digest, len(manifest))
        if not self.has_blob(desc):
            self.put_blob(desc, io.BytesIO(manifest))
        index_path = self._root / "index.json"
        index: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
        if index_path.is_file():
            existing = parse_document(index_path.read_bytes(), f"{index_path}")
            if isinstance(existing, dict) and isinstance(existing.get("manifests"), list):
                index = existing
        kept = [
            m
            for m in index["manifests"]
            if not (isinstance(m, dict) and (m.get("annotations") or {}).get(REF_NAME_ANNOTATION) == self._tag)
        ]
        kept.append({**desc.to_json(), "annotations": {REF_NAME_ANNOTATION: self._tag}})
        index["manifests"] = kept
        index.setdefault("mediaType", OCI_INDEX)
        if not (self._root / OCI_LAYOUT_FILE).is_file():
            atomic_write_bytes(self._root / OCI_LAYOUT_FILE, OCI_LAYOUT_CONTENT, mode=0o644)
        atomic_write_bytes(index_path, canonical_json(index), mode=0o644)
        self._committed = True
        logger.info("wrote %s (%s)", self.reference, digest)
        return digest

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._committed:
            for blob in self._new_blobs:
                try:
                    blob.unlink()
                except FileNotFoundError:
                    pass
            if self._created_dir:
                shutil.rmtree(self._root, ignore_errors=True)
