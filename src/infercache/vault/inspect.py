"""`vault inspect`: what an image holds, from its manifest and config only (no layer is read)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from infercache.errors import BadInputError
from infercache.gpu.targets import GpuTarget
from infercache.vault.image import ImageManifest, config_labels, load_image
from infercache.vault.labels import LABEL_COMPONENTS, LABEL_ENTRY_COUNT, LABEL_SIZE, LABEL_TYPE, summary_targets
from infercache.vault.reference import ImageReference, RegistryOptions
from infercache.vault.transport import open_source


@dataclass(frozen=True)
class ImageDocuments:
    """An image's manifest and config, and the labels in it: all that inspect and check read."""

    reference: str
    manifest: ImageManifest
    config: dict[str, Any]
    labels: dict[str, str]


def read_image_documents(reference: str | ImageReference, options: RegistryOptions | None = None) -> ImageDocuments:
    """Open the image, read its manifest and config (verified; no layer is read), close it."""
    source = open_source(reference, options)
    try:
        manifest, config = load_image(source)
    finally:
        source.close()
    return ImageDocuments(str(source.reference), manifest, config, config_labels(config))


def inspect_image(reference: str | ImageReference, options: RegistryOptions | None = None) -> dict[str, Any]:
    """The spec's inspect document: reference, digest, media_type, labels, annotations, summary, layers."""
    docs = read_image_documents(reference, options)
    manifest, config, labels = docs.manifest, docs.config, docs.labels

    def _int(key: str) -> int | None:
        try:
            return int(labels[key])
        except (KeyError, ValueError):
            return None

    return {
        "reference": docs.reference,
        "digest": manifest.digest,
        "media_type": manifest.media_type,
        "config": {"digest": manifest.config.digest, "size": manifest.config.size,
                   "media_type": manifest.config.media_type},
        "created": config.get("created"),
        "architecture": config.get("architecture"),
        "os": config.get("os"),
        "type": labels.get(LABEL_TYPE),
        "components": labels.get(LABEL_COMPONENTS),
        "entry_count": _int(LABEL_ENTRY_COUNT),
        "cache_size_bytes": _int(LABEL_SIZE),
        "labels": labels,
        "annotations": dict(manifest.annotations),
        "summary": {"targets": summary_targets(labels)},
        "layers": [{"digest": d.digest, "size": d.size, "media_type": d.media_type} for d in manifest.layers],
    }


def image_targets(reference: str | ImageReference, options: RegistryOptions | None = None) -> list[GpuTarget]:
    """The GPU targets an image's summary label lists (distinct by backend, arch and warp size, in order);
    BadInputError when it lists none."""
    summary = inspect_image(reference, options)["summary"]
    found = [GpuTarget.from_entry(t) for t in summary.get("targets", []) if t.get("backend") and t.get("arch")]
    if not found:
        raise BadInputError(f"{reference} lists no targets in its summary label")
    distinct: dict[tuple[str, str, int], GpuTarget] = {}
    for target in found:
        distinct.setdefault(target.key, target)
    return list(distinct.values())
