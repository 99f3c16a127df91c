"""The `oci-archive:` transport: an OCI image layout inside one tar file.

Reading never extracts the archive: blobs are streamed straight out of the tar.
Writing stages a layout directory beside the target (same filesystem), then tars
it into a temp file that is renamed over the target in `close()`, after success only.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import BinaryIO

from infercache.errors import BadInputError
from infercache.fsutil import atomic_file
from infercache.vault.archive import ImageArchive
from infercache.vault.layout import LayoutReader, OciLayoutDestination
from infercache.vault.reference import ImageReference, RegistryOptions


class OciArchiveSource(LayoutReader):
    """Reads an image from an `oci-archive:` tar without extracting it."""

    def __init__(self, reference: ImageReference, options: RegistryOptions | None = None) -> None:
        self.reference = reference
        self._archive = ImageArchive(reference.local_path(), str(reference))

    def _open(self, relpath: str) -> BinaryIO:
        return self._archive.open(relpath)

    def close(self) -> None:
        self._archive.close()


class OciArchiveDestination(OciLayoutDestination):
    """Writes an `oci-archive:` tar: a staged layout, tarred in close() after a commit."""

    def _make_root(self, reference: ImageReference) -> Path:
        self._target = reference.local_path()
        parent = self._target.parent
        if not parent.is_dir():
            raise BadInputError(f"{parent}: no such directory")
        if self._target.is_dir():
            raise BadInputError(f"{self._target} is a directory, expected an archive file name")
        return Path(tempfile.mkdtemp(prefix=f".{self._target.name}.", suffix=".tmp", dir=parent))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._committed:
                _write_tar_of_dir(self._root, self._target)
        finally:
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
