"""Which classes read and write each transport: the one table, and the two functions that use it.

A new transport is one new module (its source and destination classes, both built as
``Class(reference, options)``) and one row in :data:`TRANSPORT_CLASSES`. The
vocabulary the transports share lives in :mod:`infercache.vault.reference`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from infercache.vault.docker_archive import DockerArchiveDestination, DockerArchiveSource
from infercache.vault.layout import OciLayoutDestination, OciLayoutSource
from infercache.vault.oci_archive import OciArchiveDestination, OciArchiveSource
from infercache.vault.reference import (
    TRANSPORTS,
    Descriptor,
    ImageDestination,
    ImageReference,
    ImageSource,
    RegistryOptions,
    as_reference,
)
from infercache.vault.registry import RegistryDestination, RegistrySource

__all__ = [
    "TRANSPORTS", "TRANSPORT_CLASSES", "Descriptor", "ImageDestination", "ImageReference", "ImageSource",
    "RegistryOptions", "TransportClasses", "open_destination", "open_source",
]


@dataclass(frozen=True)
class TransportClasses:
    """How to read and how to write one transport."""

    source: Callable[[ImageReference, RegistryOptions], ImageSource]
    destination: Callable[[ImageReference, RegistryOptions], ImageDestination]


TRANSPORT_CLASSES: Mapping[str, TransportClasses] = {
    "oci": TransportClasses(OciLayoutSource, OciLayoutDestination),
    "oci-archive": TransportClasses(OciArchiveSource, OciArchiveDestination),
    "docker-archive": TransportClasses(DockerArchiveSource, DockerArchiveDestination),
    "docker": TransportClasses(RegistrySource, RegistryDestination),
}


def _classes(reference: ImageReference | str, options: RegistryOptions | None) -> tuple[
    TransportClasses, ImageReference, RegistryOptions
]:
    ref = as_reference(reference)
    return TRANSPORT_CLASSES[ref.transport], ref, options or RegistryOptions()


def open_source(reference: ImageReference | str, options: RegistryOptions | None = None) -> ImageSource:
    """The reader for the reference's transport."""
    classes, ref, opts = _classes(reference, options)
    return classes.source(ref, opts)


def open_destination(reference: ImageReference | str, options: RegistryOptions | None = None) -> ImageDestination:
    """The writer for the reference's transport (nothing visible there until its put_manifest)."""
    classes, ref, opts = _classes(reference, options)
    return classes.destination(ref, opts)
