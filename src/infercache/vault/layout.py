"""The `oci:` (image layout directory) and `oci-archive:` (that directory as a tar) transports.

No maintained Python library writes OCI image layouts (see the OCI reference
notes), so this is ours; it follows the image-layout spec: `oci-layout`,
`index.json` with `org.opencontainers.image.ref.name` tags, `blobs/sha256/<hex>`.

Writes are crash-safe: each blob lands under a temp name and is renamed after its
digest checks out; `index.json` is replaced atomically (the commit point); an
archive is written to a temp file beside the target and renamed in `close()`.
Reading an archive never extracts it: blobs are streamed straight out of the tar.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
import tempfile
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
    open_archive,
    sha256_digest,
)
from infercache.vault.transport import DEFAULT_TAG, Descriptor, ImageReference

logger = logging.getLogger(__name__)

OCI_LAYOUT_FILE = "oci-layout"
OCI_LAYOUT_CONTENT = b'{"imageLayoutVersion":"1.0.0"}'
_COPY_CHUNK = 1 << 20


def _blob_relpath(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    return f"blobs/{algo}/{hexpart}"


def _parse_json_doc(raw: bytes, what: str) -> Any:
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise BadInputError(f"{what} is too large")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{what} is not valid JSON: {exc}") from None


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


class _LayoutReader:
    """Shared logic: resolve index → (possibly nested index →) image manifest."""

    reference: ImageReference

    def _read(self, relpath: str, limit: int | None = None) -> bytes:
        raise NotImplementedError

    def _open(self, relpath: str) -> BinaryIO:
        raise NotImplementedError

    def get_manifest(self) -> tuple[bytes, str]:
        where = str(self.reference)
        index = _parse_json_doc(self._read("index.json", MAX_DOCUMENT_BYTES), f"{where}: index.json")
        desc = select_manifest(index, self.reference.tag, where)
        for _ in range(4):  # nested indexes: follow the first image manifest
            raw = self._read_verified(desc, "manifest")
            if desc.media_type in INDEX_TYPES or (not desc.media_type and b'"manifests"' in raw):
                nested = _parse_json_doc(raw, f"{where}: nested index")
                desc = select_manifest(nested, None, where)
                continue
            doc = _parse_json_doc(raw, f"{where}: manifest")
            media_type = desc.media_type or (doc.get("mediaType") if isinstance(doc, dict) else None) or OCI_MANIFEST
            return raw, str(media_type)
        raise BadInputError(f"{where}: indexes nested too deeply")

    def _read_verified(self, desc: Descriptor, what: str) -> bytes:
        if desc.size > MAX_DOCUMENT_BYTES:
            raise BadInputError(f"{what} {desc.digest} is too large")
        reader = VerifyingReader(self._open(_blob_relpath(desc.digest)), desc, what)
        try:
            data = reader.read()
            reader.verify_to_end()
        finally:
            reader.close()
        return data

    def open_blob(self, descriptor: Descriptor) -> BinaryIO:
        return self._open(_blob_relpath(descriptor.digest))


class OciLayoutSource(_LayoutReader):
    """Reads an image from an OCI layout directory, or from an `oci-archive:` tar without extracting it."""

    def __init__(self, reference: ImageReference) -> None:
        self.reference = reference
        if reference.transport not in ("oci", "oci-archive") or not reference.path:
            raise BadInputError(f"not an oci:/oci-archive: reference: {reference}")
        self._path = Path(reference.path).expanduser()
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        if reference.transport == "oci":
            if not (self._path / "index.json").is_file():
                raise BadInputError(f"{self._path} is not an OCI image layout (no index.json)")
        else:
            self._tar, self._members = open_archive(self._path)

    def _open(self, relpath: str) -> BinaryIO:
        if self._tar is not None:
            member = self._members.get(relpath)
            if member is None:
                raise InfercacheError(f"{self.reference}: {relpath} is missing from the archive")
            handle = self._tar.extractfile(member)
            assert handle is not None
            return handle  # type: ignore[return-value]
        path = self._path / relpath
        if path.is_symlink() or not path.is_file():
            raise InfercacheError(f"{self.reference}: {relpath} is missing")
        return open(path, "rb")

    def _read(self, relpath: str, limit: int | None = None) -> bytes:
        with self._open(relpath) as handle:
            data = handle.read((limit or MAX_DOCUMENT_BYTES) + 1)
        return data

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None


class OciLayoutDestination:
    """Writes an image into an OCI layout directory, or an `oci-archive:` tar (written in close())."""

    def __init__(self, reference: ImageReference) -> None:
        self.reference = reference
        if reference.transport not in ("oci", "oci-archive") or not reference.path:
            raise BadInputError(f"not an oci:/oci-archive: reference: {reference}")
        self._target = Path(reference.path).expanduser()
        self._tag = reference.tag or DEFAULT_TAG
        self._committed = False
        self._closed = False
        self._new_blobs: list[Path] = []
        self._created_dir = False
        if reference.transport == "oci":
            self._root = self._target
            if self._root.exists() and not self._root.is_dir():
                raise BadInputError(f"{self._root} exists and is not a directory")
            if self._root.is_dir() and any(self._root.iterdir()) and not (self._root / OCI_LAYOUT_FILE).is_file():
                raise BadInputError(f"{self._root} is a non-empty directory that is not an OCI layout")
            if not self._root.exists():
                self._root.mkdir(parents=True)
                self._created_dir = True
        else:
            parent = self._target.parent
            if not parent.is_dir():
                raise BadInputError(f"{parent}: no such directory")
            if self._target.is_dir():
                raise BadInputError(f"{self._target} is a directory, expected an archive file name")
            # Staged as a layout beside the target (same filesystem), tarred in close().
            self._root = Path(tempfile.mkdtemp(prefix=f".{self._target.name}.", suffix=".tmp", dir=parent))
        (self._root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)

    def _blob_path(self, digest: str) -> Path:
        return self._root / _blob_relpath(digest)

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
            import io

            self.put_blob(desc, io.BytesIO(manifest))
        index_path = self._root / "index.json"
        index: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
        if index_path.is_file():
            existing = _parse_json_doc(index_path.read_bytes(), f"{index_path}")
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
        if self.reference.transport == "oci-archive":
            try:
                if self._committed:
                    _write_tar_of_dir(self._root, self._target)
            finally:
                shutil.rmtree(self._root, ignore_errors=True)
            return
        if not self._committed:
            for blob in self._new_blobs:
                try:
                    blob.unlink()
                except FileNotFoundError:
                    pass
            if self._created_dir:
                shutil.rmtree(self._root, ignore_errors=True)


def _write_tar_of_dir(root: Path, target: Path) -> None:
    """Tar `root`'s contents (sorted, fixed owners and times) into `target` via temp + rename."""
    with atomic_file(target, mode=0o644, fsync=False) as out:
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames.sort()
                rel_dir = os.path.relpath(dirpath, root)
                if rel_dir != ".":
                    dinfo = tarfile.TarInfo(rel_dir)
                    dinfo.type = tarfile.DIRTYPE
                    dinfo.mode = 0o755
                    dinfo.mtime = 0
                    tar.addfile(dinfo)
                for name in sorted(filenames):
                    full = os.path.join(dirpath, name)
                    arcname = name if rel_dir == "." else f"{rel_dir}/{name}"
                    info = tar.gettarinfo(full, arcname)
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    info.mtime = 0
                    info.mode = 0o644
                    with open(full, "rb") as handle:
                        tar.addfile(info, handle)
