"""Image tars and layer streams: open an archive in place, undo a layer's compression.

Both oci-archive and docker-archive images are read straight out of their tar
(never extracted), and every layer reader (unpack, docker-archive's writer) goes
through :func:`open_decompressed`, which sniffs the compression instead of
trusting a media type.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path
from typing import BinaryIO

from infercache.errors import BadInputError, InfercacheError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_READ_CHUNK = 1 << 20


def is_compressed(head: bytes) -> bool:
    """True when a stream's first bytes are a gzip or zstd header."""
    return head.startswith(GZIP_MAGIC) or head[:4] == ZSTD_MAGIC


def open_decompressed(stream: BinaryIO) -> BinaryIO:
    """A reader of the plain tar inside `stream`, whatever the compression (sniffed, not trusted)."""
    buffered = stream if isinstance(stream, io.BufferedReader) else io.BufferedReader(stream, _READ_CHUNK)  # type: ignore[arg-type]
    head = buffered.peek(4)[:4]
    if head.startswith(GZIP_MAGIC):
        try:
            from isal import igzip  # several times zlib's speed (a dependency; zlib where its wheel is missing)
        except ImportError:
            return gzip.GzipFile(fileobj=buffered, mode="rb")  # type: ignore[return-value]
        return igzip.IGzipFile(fileobj=buffered, mode="rb")  # type: ignore[return-value]
    if head == ZSTD_MAGIC:
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(buffered, read_across_frames=True)  # type: ignore[return-value]
    return buffered  # type: ignore[return-value]


class ImageArchive:
    """An image tar opened in place (see :func:`open_archive`): what both archive sources read from."""

    def __init__(self, path: Path, label: str) -> None:
        self.label = label
        self.tar, self.members = open_archive(path)

    def open(self, name: str) -> BinaryIO:
        """A reader of one file of the archive; InfercacheError naming it when it is not there."""
        member = self.members.get(name)
        if member is None:
            raise InfercacheError(f"{self.label}: {name} is missing from the archive")
        handle = self.tar.extractfile(member)
        assert handle is not None
        return handle  # type: ignore[return-value]

    def close(self) -> None:
        self.tar.close()


def open_archive(path: Path) -> tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]:
    """Open an image archive (oci-archive or docker-archive) in place, with its regular files
    indexed by name ("./" stripped): blobs are then read straight out of the tar, never extracted."""
    if not path.is_file():
        raise BadInputError(f"{path}: no such archive")
    try:
        tar = tarfile.open(path, "r:")
    except (tarfile.TarError, OSError) as exc:
        raise BadInputError(f"{path} is not a tar archive: {exc}") from None
    members: dict[str, tarfile.TarInfo] = {}
    for member in tar.getmembers():
        name = member.name
        while name.startswith("./"):
            name = name[2:]
        if member.isfile():
            members[name] = member
    return tar, members
