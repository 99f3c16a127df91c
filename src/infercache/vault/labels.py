"""The cache image schema: content paths, `manifest.json` records, config labels and their summary.

Kept in one place because pack writes it and inspect/check/unpack read it; the
names follow the spec (MCV-compatible paths, the seed's label schema, which MCV
itself never fully emitted).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterable, Mapping

from infercache import __version__

logger = logging.getLogger(__name__)

COMPONENTS: tuple[str, ...] = ("triton", "vllm", "inductor")
CACHE_DIRS: Mapping[str, str] = {"triton": "io.triton.cache", "vllm": "io.vllm.cache", "inductor": "io.inductor.cache"}
MANIFEST_DIRS: Mapping[str, str] = {"triton": "io.triton.manifest", "vllm": "io.vllm.manifest",
                                    "inductor": "io.inductor.manifest"}
MANIFEST_NAME = "manifest.json"
#: The only top-level directories a cache image layer may hold.
TOP_LEVEL_DIRS: frozenset[str] = frozenset((*CACHE_DIRS.values(), *MANIFEST_DIRS.values()))
MANIFEST_SCHEMA = 1

LABEL_TYPE = "model.cache.image/type"
LABEL_COMPONENTS = "model.cache.image/components"
LABEL_ENTRY_COUNT = "model.cache.image/entry-count"
LABEL_SIZE = "model.cache.image/cache-size-bytes"
LABEL_SUMMARY = "model.cache.image/summary"

ANNOTATION_TITLE = "org.opencontainers.image.title"
ANNOTATION_CREATED = "org.opencontainers.image.created"
ANNOTATION_VERSION = "org.opencontainers.image.version"

_TARGET_KEYS = ("backend", "arch", "warp_size", "ptx_version", "triton_version")


def component_label(component: str, what: str) -> str:
    """`cache.<component>.image/<what>` (entry-count, cache-size-bytes, summary)."""
    return f"cache.{component}.image/{what}"


def target_of(record: Mapping[str, Any]) -> dict[str, Any]:
    """The summary target of one manifest record: backend, arch, warp_size and, where known, versions."""
    target: dict[str, Any] = {
        "backend": record.get("backend"),
        "arch": None if record.get("arch") is None else str(record.get("arch")),
        "warp_size": record.get("warp_size"),
    }
    for key in ("ptx_version", "triton_version"):
        if record.get(key) is not None:
            target[key] = record[key]
    return target


def summarize(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """`{"targets": [...]}`: the distinct targets, sorted so the label is reproducible."""
    seen: dict[str, dict[str, Any]] = {}
    for record in records:
        if not record.get("backend"):  # an Inductor artifact, not a kernel: no GPU target
            continue
        target = target_of(record)
        seen.setdefault(json.dumps(target, sort_keys=True), target)
    return {"targets": [seen[k] for k in sorted(seen)]}


def build_labels(records: Mapping[str, list[dict[str, Any]]], sizes: Mapping[str, int],
                 extra_summaries: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, str]:
    """Config labels for the components present (`records`/`sizes` keyed by component).

    `extra_summaries`: fields added to a component's summary (the inductor host facts).
    """
    present = [c for c in COMPONENTS if records.get(c) or (c in records and sizes.get(c))] or [
        c for c in COMPONENTS if c in records][:1]
    primary = "vllm" if "vllm" in present else (present[0] if present else "triton")
    all_records = [r for c in present for r in records[c]]
    labels = {
        LABEL_TYPE: primary,
        LABEL_COMPONENTS: json.dumps(present),
        LABEL_ENTRY_COUNT: str(len(all_records)),
        LABEL_SIZE: str(sum(sizes.get(c, 0) for c in present)),
        LABEL_SUMMARY: json.dumps(summarize(all_records), sort_keys=True, separators=(",", ":")),
    }
    for component in present:
        labels[component_label(component, "entry-count")] = str(len(records[component]))
        labels[component_label(component, "cache-size-bytes")] = str(sizes.get(component, 0))
        labels[component_label(component, "summary")] = json.dumps(
            {**(extra_summaries or {}).get(component, {}), **summarize(records[component])},
            sort_keys=True, separators=(",", ":"),
        )
    return labels


def annotations(title: str, created: str) -> dict[str, str]:
    return {ANNOTATION_TITLE: title, ANNOTATION_CREATED: created, ANNOTATION_VERSION: __version__}


def summary_targets(labels: Mapping[str, str]) -> list[dict[str, Any]]:
    """Targets from the summary label; falls back to the per-component labels (MCV images have only those).

    Malformed summaries become a warning and an empty list: the caller decides what
    an image with no declared targets means.
    """
    candidates = [LABEL_SUMMARY] + [component_label(c, "summary") for c in COMPONENTS]
    targets: list[dict[str, Any]] = []
    found = False
    for key in candidates:
        raw = labels.get(key)
        if raw is None:
            continue
        try:
            data = json.loads(raw)
        except ValueError:
            logger.warning("label %s is not valid JSON; ignored", key)
            continue
        items = data.get("targets") if isinstance(data, dict) else None
        if not isinstance(items, list):
            logger.warning("label %s has no targets list; ignored", key)
            continue
        for item in items:
            if isinstance(item, dict) and item.get("backend") and item.get("arch") is not None:
                target = {k: item.get(k) for k in _TARGET_KEYS if item.get(k) is not None}
                target["arch"] = str(target["arch"])
                if target not in targets:
                    targets.append(target)
        found = True
        if key == LABEL_SUMMARY:
            break
    return targets if found else []


def manifest_records(manifest: Mapping[str, Any], component: str) -> list[dict[str, Any]]:
    """Records of one component from a parsed `manifest.json` (non-dicts dropped)."""
    items = manifest.get(component) if isinstance(manifest, Mapping) else None
    return [dict(item) for item in items if isinstance(item, dict)] if isinstance(items, list) else []
