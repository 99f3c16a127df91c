"""Does an image suit this machine? The image's summary targets against local GPUs or `--target`s.

Reads only the manifest and config (labels), so it is cheap enough to run before
every pull. The per-target rules live in `infercache.gpu.compat`; this module only
aggregates them per GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

from infercache.errors import BadInputError
from infercache.gpu import detect
from infercache.gpu.compat import check_compatible, installed_triton_version
from infercache.gpu.targets import GpuTarget
from infercache.vault import inductor
from infercache.vault.labels import LABEL_TYPE, component_label, summary_targets
from infercache.vault.reference import ImageReference, RegistryOptions
from infercache.vault.inspect import read_image_documents


@dataclass(frozen=True)
class GpuCheck:
    """The verdict for one local GPU (or one `--target`)."""

    name: str
    backend: str
    arch: str
    warp_size: int
    compatible: bool
    reasons: tuple[str, ...]
    warnings: tuple[str, ...] = ()
    matching: tuple[dict[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "backend": self.backend,
            "arch": self.arch,
            "warp_size": self.warp_size,
            "compatible": self.compatible,
            "reasons": list(self.reasons),
            "warnings": list(self.warnings),
            "matching_targets": list(self.matching),
        }


@dataclass(frozen=True)
class CheckResult:
    """Overall verdict: compatible when at least one GPU can use at least one of the image's targets."""

    reference: str
    compatible: bool
    gpus: tuple[GpuCheck, ...]
    targets: tuple[dict[str, Any], ...]
    message: str | None = None
    source: str = "detected"  # "detected" | "targets"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "reference": self.reference,
            "compatible": self.compatible,
            "gpus": [g.to_json() for g in self.gpus],
            "image_targets": list(self.targets),
            "source": self.source,
        }
        if self.message:
            data["message"] = self.message
        data.update(self.extra)  # "inductor": the torch.compile component's host verdict
        return data


def local_targets(targets: Sequence[str] | None) -> tuple[list[Any], str]:
    """`--target` values parsed (BadInputError on a bad one), else the detected GPUs."""
    if targets:
        return [GpuTarget.parse(t) for t in targets], "targets"
    return list(detect.detect_gpus()), "detected"


def describe(gpu: Any) -> tuple[str, Any]:
    """(display name, GpuTarget) for a LocalGpu or a bare GpuTarget."""
    target = getattr(gpu, "target", gpu)
    name = getattr(gpu, "name", None) or f"--target {target}"
    if hasattr(gpu, "index") and hasattr(gpu, "name"):
        name = f"{gpu.index}: {gpu.name}"
    return name, target


def evaluate(reference: str, image_targets: Sequence[dict[str, Any]], gpus: Sequence[Any], source: str) -> CheckResult:
    """Verdict per GPU: compatible with at least one image target; otherwise every target's reasons."""
    targets = tuple(image_targets)
    if not gpus:
        return CheckResult(reference, False, (), targets,
                           "no GPU detected and no --target given: nothing to check against", source)
    local_triton = installed_triton_version()
    parsed: list[tuple[dict[str, Any], Any]] = []
    for t in targets:
        try:
            parsed.append((t, GpuTarget.from_entry(t)))
        except BadInputError:
            continue
    checks = []
    for gpu in gpus:
        name, target = describe(gpu)
        reasons: list[str] = []
        warnings: list[str] = []
        matching: list[dict[str, Any]] = []
        for raw, image_target in parsed:
            verdict = check_compatible(image_target, gpu, local_triton)
            if verdict.compatible:
                matching.append(raw)
                warnings.extend(verdict.warnings)
            else:
                reasons.extend(f"{image_target}: {r}" for r in verdict.reasons)
        if not parsed:
            reasons.append("the image declares no GPU targets (no summary label)")
        checks.append(
            GpuCheck(
                name=name,
                backend=target.backend,
                arch=target.arch,
                warp_size=target.warp_size,
                compatible=bool(matching),
                reasons=() if matching else tuple(reasons),
                warnings=tuple(dict.fromkeys(warnings)),
                matching=tuple(matching),
            )
        )
    return CheckResult(reference, any(c.compatible for c in checks), tuple(checks), targets, None, source)


def check_image(
    reference: str | ImageReference, targets: Sequence[str] | None = None, options: RegistryOptions | None = None
) -> CheckResult:
    """Check an image (manifest + config only) against `targets` or the local GPUs."""
    gpus, source_kind = local_targets(targets)
    docs = read_image_documents(reference, options)
    labels = docs.labels
    return with_inductor(evaluate(docs.reference, summary_targets(labels), gpus, source_kind), labels)


def with_inductor(result: CheckResult, labels: dict[str, str]) -> CheckResult:
    """Fold in the inductor component's verdict (torch, Python, CPU ISA of the compile host).

    An image with Inductor parts is compatible when this host can hit on them and, if it
    declares GPU targets, a GPU can use one; without GPU targets no GPU is needed.
    """
    raw = labels.get(component_label(inductor.COMPONENT, "summary"))
    if raw is None:
        return result
    try:
        summary = json.loads(raw)
    except ValueError:
        summary = None
    host = inductor.check_summary(summary if isinstance(summary, dict) else None)
    # A torch.compile image is usable without a GPU (its Triton entries then stay out, with a warning).
    cpu_image = labels.get(LABEL_TYPE) == inductor.COMPONENT and not result.gpus
    gpu_ok = result.compatible or not result.targets or cpu_image
    message = result.message if result.targets else None
    if not host.compatible:
        message = "; ".join(host.reasons)
    return replace(result, compatible=host.compatible and gpu_ok, message=message,
                   extra={**result.extra, "inductor": host.to_json()})
