"""`vault copy SRC DST`: move an image between any two transports (push and pull are copies).

Blobs are streamed from source to destination through the destination's digest
check, skipped when the destination already has them. The manifest is copied
byte for byte (same digest) except where the destination's format cannot hold
it: a Docker schema 2 manifest going into an OCI layout is re-expressed with OCI
media types, as skopeo does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from infercache.units import ProgressCallback
from infercache.vault.image import parse_manifest, to_oci_manifest
from infercache.vault.reference import ImageReference, RegistryOptions
from infercache.vault.transport import open_destination, open_source

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CopyResult:
    source: str
    destination: str
    digest: str
    blobs_copied: int
    blobs_skipped: int
    bytes_copied: int


def copy_image(
    src: str | ImageReference,
    dst: str | ImageReference,
    *,
    src_options: RegistryOptions | None = None,
    dst_options: RegistryOptions | None = None,
    progress: ProgressCallback | None = None,
) -> CopyResult:
    """Copy one image; the destination is left untouched if anything fails."""
    source = open_source(src, src_options)
    try:
        raw, media_type = source.get_manifest()
        manifest = parse_manifest(raw, media_type)
        destination = open_destination(dst, dst_options)
        try:
            blobs = [*manifest.layers, manifest.config]
            total = sum(b.size for b in blobs)
            done = copied = skipped = moved = 0
            for blob in blobs:
                if destination.has_blob(blob):
                    skipped += 1
                else:
                    stream = source.open_blob(blob)
                    try:
                        destination.put_blob(blob, stream)
                    finally:
                        stream.close()
                    copied += 1
                    moved += blob.size
                done += blob.size
                if progress is not None:
                    progress(done, total)
            if destination.reference.transport in ("oci", "oci-archive"):
                raw, media_type = to_oci_manifest(manifest)
            digest = destination.put_manifest(raw, media_type)
        finally:
            destination.close()
    finally:
        source.close()
    logger.info("copied %s → %s (%d blobs, %d already there)", source.reference, destination.reference, copied, skipped)
    return CopyResult(str(source.reference), str(destination.reference), digest, copied, skipped, moved)
