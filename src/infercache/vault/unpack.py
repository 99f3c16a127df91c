"""Unpack a cache image: only the entries this machine can use, installed atomically, never unsafely.

Order of work, so that a bad image never touches the destination:
1. manifest + config (digest-verified); the summary label against the local GPUs
   or `--target` — an incompatible image is refused before any layer is read,
   unless `force`;
2. every layer streamed through a digest/size check into a private `mkdtemp`
   directory inside the destination (same filesystem, so moves are renames),
   with the safety rules of :mod:`infercache.vault.extract`;
3. `manifest.json` checked against what was staged (names, sizes, sha256): an
   image whose manifest lies is refused whole;
4. per entry: compatible with a local GPU/target → group file rewritten to
   absolute paths at the final location, then the entry directory renamed into
   place (existing entries kept unless `overwrite`); the rest is skipped.
Any failure rolls back the entries moved so far and removes the staging dir.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from infercache import paths
from infercache.errors import BadInputError, InfercacheError
from infercache.gpu import compat
from infercache.gpu.targets import GpuTarget
from infercache.kernels.triton_entry import (
    GROUP_PREFIX,
    group_children,
    group_file_bytes,
)
from infercache.units import ProgressCallback
from infercache.vault import inductor
from infercache.vault import labels as L
from infercache.vault.check import CheckResult, evaluate, local_targets, with_inductor
from infercache.vault.extract import (
    ExtractedFile,
    ExtractLimits,
    StagingState,
    UnsafeImageError,
    extract_layer,
)
from infercache.vault.image import VerifyingReader, config_labels, load_image
from infercache.vault.reference import ImageReference, RegistryOptions
from infercache.vault.staged_check import check_file, safe_rel
from infercache.vault.transport import open_source

logger = logging.getLogger(__name__)
_MAX_MANIFEST_JSON = 256 << 20
STAGING_PREFIX = ".infercache-unpack-"


@dataclass(frozen=True)
class UnpackReport:
    """What unpack did, entry keys (or vLLM-relative paths) per outcome."""

    reference: str
    digest: str
    dest: Path
    extracted: tuple[str, ...]
    skipped_incompatible: tuple[str, ...]
    already_present: tuple[str, ...]
    replaced: tuple[str, ...] = ()
    other_files: int = 0
    warnings: tuple[str, ...] = ()
    check: CheckResult | None = None
    forced: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "digest": self.digest,
            "dest": str(self.dest),
            "extracted": len(self.extracted),
            "skipped_incompatible": len(self.skipped_incompatible),
            "already_present": len(self.already_present),
            "replaced": len(self.replaced),
            "other_files": self.other_files,
            "entries": {
                "extracted": list(self.extracted),
                "skipped_incompatible": list(self.skipped_incompatible),
                "already_present": list(self.already_present),
            },
            "warnings": list(self.warnings),
            "forced": self.forced,
        }


def _primary_component(labels: dict[str, str]) -> str:
    kind = labels.get(L.LABEL_TYPE)
    if kind in L.COMPONENTS:
        return kind
    if any(k.startswith("cache.vllm.image/") for k in labels) and not any(
        k.startswith("cache.triton.image/") for k in labels
    ):
        return "vllm"
    return "triton"


def default_dest(component: str) -> Path:
    """The spec's default: Triton cache dir resolution; vLLM caches go to the vLLM root, Inductor's to its dir."""
    if component == inductor.COMPONENT:
        return paths.inductor_cache_dir()
    return paths.vllm_cache_root() if component == "vllm" else paths.triton_cache_dir()


def _load_manifest_json(staging: Path, component: str) -> dict[str, Any]:
    path = staging / L.MANIFEST_DIRS[component] / L.MANIFEST_NAME
    if not path.is_file() or path.is_symlink():
        raise UnsafeImageError(f"image has no {L.MANIFEST_DIRS[component]}/{L.MANIFEST_NAME}: not a cache image")
    if path.stat().st_size > _MAX_MANIFEST_JSON:
        raise UnsafeImageError("manifest.json is unreasonably large")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise UnsafeImageError(f"manifest.json is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UnsafeImageError("manifest.json is not a JSON object")
    return data


def verify_entries(
    staging: Path, component: str, records: list[dict[str, Any]], extracted: dict[str, ExtractedFile]
) -> dict[str, dict[str, Any]]:
    """Map relative entry dir → record, after checking every listed file against what was staged.

    `extracted` ({path under staging: size, sha256}) comes from the extraction itself, so
    nothing is re-read; a listed name that is not in it is a link, a directory or missing.
    """
    top_name = L.CACHE_DIRS[component]
    top = staging / top_name
    by_dir: dict[str, dict[str, Any]] = {}
    for record in records:
        if component == "triton":
            rel = safe_rel(record.get("key"), "entry key", UnsafeImageError)
            if "/" in rel:
                raise UnsafeImageError(f"manifest.json entry key {rel!r} is not a single directory name")
        else:
            rel = safe_rel(record.get("path") or record.get("key"), "entry path", UnsafeImageError)
        if rel in by_dir:
            raise UnsafeImageError(f"manifest.json lists entry {rel} twice")
        entry_dir = top / rel
        if entry_dir.is_symlink() or not entry_dir.is_dir():
            raise UnsafeImageError(f"manifest.json lists entry {rel}, which the layer does not hold")
        listed = record.get("files")
        if not isinstance(listed, list) or not listed:
            raise UnsafeImageError(f"manifest.json entry {rel} lists no files")
        expected: dict[str, dict[str, Any]] = {}
        for f in listed:
            if not isinstance(f, dict) or not isinstance(f.get("name"), str) or "/" in f["name"]:
                raise UnsafeImageError(f"manifest.json entry {rel} has a malformed file record")
            expected[f["name"]] = f
        actual = set(os.listdir(entry_dir))
        extra = sorted(actual - set(expected))
        missing = sorted(set(expected) - actual)
        if extra or missing:
            raise UnsafeImageError(
                f"manifest.json does not match the layer for entry {rel}: "
                + (f"unlisted files {', '.join(extra)}" if extra else "")
                + ("; " if extra and missing else "")
                + (f"missing files {', '.join(missing)}" if missing else "")
            )
        for name, f in expected.items():
            info = extracted.get(f"{top_name}/{rel}/{name}")
            if info is None:
                raise UnsafeImageError(f"entry {rel}/{name} is not a regular file")
            check_file(f"{rel}/{name}", f, info, UnsafeImageError)
        by_dir[rel] = record
    if component == "triton" and top.is_dir():
        unlisted = sorted(p for p in os.listdir(top) if p not in by_dir)
        if unlisted:
            raise UnsafeImageError(
                f"layer holds entries not listed in manifest.json: {', '.join(unlisted[:5])}"
                + (" ..." if len(unlisted) > 5 else "")
            )
    return by_dir


def group_rewriter(component: str, dest: Path) -> Callable[[str], Callable[[bytes], bytes] | None]:
    """For extraction: group files get absolute child paths at their FINAL place as they are written.

    (The manifest's sha256 covers the relative form in the layer; extraction hashes that.)
    """
    top = L.CACHE_DIRS[component] + "/"

    def for_path(rel: str) -> Callable[[bytes], bytes] | None:
        if not rel.startswith(top):
            return None
        entry_rel, _, name = rel[len(top):].rpartition("/")
        if not entry_rel or not name.startswith(GROUP_PREFIX) or not name.endswith(".json"):
            return None
        final_dir = dest / entry_rel

        def rewrite(data: bytes) -> bytes:
            try:
                doc = json.loads(data)
            except (ValueError, UnicodeDecodeError) as exc:
                raise UnsafeImageError(f"group file {rel} is not valid JSON: {exc}") from None
            return group_file_bytes(group_children(doc), final_dir)

        return rewrite

    return for_path


class _Installer:
    """Moves staged entries into place, remembering enough to undo everything on failure."""

    def __init__(self, dest: Path, staging: Path) -> None:
        self.dest = dest
        self.staging = staging
        self._moved: list[tuple[Path, Path | None]] = []  # (final path, backup of what it replaced)
        self._n = 0

    def install(self, staged: Path, final: Path, overwrite: bool, exists: bool | None = None) -> str:
        """'extracted' | 'replaced' | 'present' (`exists`: already known, else looked up)."""
        # Triton keys are one path component (checked lexically); deeper vLLM paths are resolved.
        if final.parent != self.dest and not _inside(final, self.dest):
            raise UnsafeImageError(f"{final} would land outside {self.dest}")
        backup = None
        if exists if exists is not None else os.path.lexists(final):
            if not overwrite:
                return "present"
            self._n += 1
            backup = self.staging / f".replaced-{self._n}"
            os.rename(final, backup)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staged, final)
        except OSError as exc:
            if backup is not None:
                os.rename(backup, final)
            elif exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                return "present"  # a concurrent unpack installed it first: same content, keep theirs
            raise
        self._moved.append((final, backup))
        return "replaced" if backup is not None else "extracted"

    def rollback(self) -> None:
        for final, backup in reversed(self._moved):
            try:
                if final.is_dir() and not final.is_symlink():
                    shutil.rmtree(final)
                elif os.path.lexists(final):
                    os.unlink(final)
                if backup is not None:
                    os.rename(backup, final)
            except OSError as exc:  # pragma: no cover - best effort, reported
                logger.error("could not roll back %s: %s", final, exc)
        self._moved.clear()


def _inside(path: Path, root: Path) -> bool:
    try:
        path.parent.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def unpack(
    reference: str | ImageReference,
    dest: str | os.PathLike[str] | None = None,
    targets: Sequence[str] | None = None,
    *,
    force: bool = False,
    overwrite: bool = False,
    options: RegistryOptions | None = None,
    limits: ExtractLimits | None = None,
    progress: ProgressCallback | None = None,
) -> UnpackReport:
    """Install the compatible entries of an image into `dest` (default per the spec); see the module doc."""
    gpus, source_kind = local_targets(targets)
    source = open_source(reference, options)
    try:
        manifest, config = load_image(source)
        labels = config_labels(config)
        ref_text = str(source.reference)
        check = with_inductor(evaluate(ref_text, L.summary_targets(labels), gpus, source_kind), labels)
        component = _primary_component(labels)
        if not gpus and component != inductor.COMPONENT:
            raise InfercacheError("no GPU detected and no --target given: cannot tell which entries to unpack")
        if not check.compatible and not force:
            reasons = "; ".join([r for g in check.gpus for r in g.reasons]
                                + list(check.extra.get("inductor", {}).get("reasons", []))) or check.message \
                or "no matching target"
            raise InfercacheError(f"image {ref_text} is not compatible with this machine ({reasons}); "
                                  "use --force to unpack the compatible entries anyway")
        dest_path = Path(dest).expanduser() if dest is not None else default_dest(component)
        if dest_path.exists() and not dest_path.is_dir():
            raise BadInputError(f"{dest_path} exists and is not a directory")
        created_dest = not dest_path.exists()
        dest_path.mkdir(parents=True, exist_ok=True)
        dest_path = dest_path.resolve()
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=dest_path))
        installer = _Installer(dest_path, staging)
        try:
            total = sum(layer.size for layer in manifest.layers)
            done = 0
            hashes: dict[str, ExtractedFile] = {}
            state = StagingState(staging)
            rewrite = group_rewriter(component, dest_path)
            for layer in manifest.layers:
                reader = VerifyingReader(source.open_blob(layer), layer, "layer")
                try:
                    base = done

                    def _progress(_n: int, base: int = base, reader: VerifyingReader = reader) -> None:
                        if progress is not None:
                            progress(min(base + reader._read, total), total)  # noqa: SLF001

                    hashes.update(extract_layer(reader, layer.size, staging, L.TOP_LEVEL_DIRS, limits, _progress,
                                                state=state, rewrite=rewrite))
                    reader.verify_to_end()  # staged bytes are trusted only once the digest matched
                finally:
                    reader.close()
                done += layer.size
                if progress is not None:
                    progress(done, total)
            local_triton = compat.installed_triton_version()
            if component == inductor.COMPONENT:
                report = _install_inductor(staging, hashes, overwrite, installer, dest_path, gpus, local_triton)
            else:
                report = _install(
                    staging, component, hashes, overwrite, installer, dest_path,
                    lambda rec: compat.compatible_with_any(GpuTarget.from_entry(rec), gpus, local_triton),
                )
                if (staging / L.MANIFEST_DIRS[inductor.COMPONENT]).is_dir():  # a vLLM cache's Inductor parts
                    more = _install_inductor(staging, hashes, overwrite, installer, dest_path, gpus, local_triton)
                    report = tuple(a + b for a, b in zip(report, more))  # type: ignore[assignment]
        except BaseException:
            installer.rollback()
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if created_dest:
                try:
                    dest_path.rmdir()  # only succeeds when nothing was installed
                except OSError:
                    pass
    finally:
        source.close()
    extracted, replaced, present, skipped, others, warnings = report
    warnings = warnings + tuple(w for g in check.gpus for w in g.warnings)
    logger.info("unpacked %s into %s: %d extracted, %d skipped (incompatible), %d already present",
                ref_text, dest_path, len(extracted), len(skipped), len(present))
    return UnpackReport(
        reference=ref_text,
        digest=manifest.digest,
        dest=dest_path,
        extracted=extracted,
        skipped_incompatible=skipped,
        already_present=present,
        replaced=replaced,
        other_files=others,
        warnings=tuple(dict.fromkeys(warnings)),
        check=check,
        forced=force and not check.compatible,
    )


def _install_inductor(
    staging: Path, hashes: dict[str, ExtractedFile], overwrite: bool, installer: _Installer, dest: Path,
    gpus: Sequence[Any], local_triton: str | None,
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...], int, tuple[str, ...]]:
    """The inductor component: manifest checked against the layer, then each usable artifact moved in."""
    records = L.manifest_records(_load_manifest_json(staging, inductor.COMPONENT), inductor.COMPONENT)
    try:
        checked = inductor.verify(L.CACHE_DIRS[inductor.COMPONENT], records, hashes)
    except inductor.ManifestMismatch as exc:
        raise UnsafeImageError(str(exc)) from None
    unlisted = inductor.unlisted_in_dirs(staging / L.CACHE_DIRS[inductor.COMPONENT], checked)
    if unlisted:
        raise UnsafeImageError(f"layer holds entries not listed in manifest.json: {', '.join(unlisted[:5])}"
                               + (" ..." if len(unlisted) > 5 else ""))

    def gpu_ok(record: Any) -> bool | None:
        if not gpus:
            return None
        try:
            return compat.compatible_with_any(GpuTarget.from_entry(record), gpus, local_triton)
        except BadInputError:
            return False

    out = inductor.install(staging / L.CACHE_DIRS[inductor.COMPONENT], dest, checked, overwrite,
                           lambda staged, final, ow: installer.install(staged, final, ow), gpu_ok,
                           inductor.host_facts())
    return tuple(out.extracted), tuple(out.replaced), tuple(out.present), tuple(out.skipped), 0, tuple(out.warnings)


def _install(
    staging: Path,
    component: str,
    hashes: dict[str, ExtractedFile],
    overwrite: bool,
    installer: _Installer,
    dest: Path,
    is_compatible: Callable[[dict[str, Any]], bool],
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...], int, tuple[str, ...]]:
    manifest_doc = _load_manifest_json(staging, component)
    records = L.manifest_records(manifest_doc, component)
    by_dir = verify_entries(staging, component, records, hashes)
    top = staging / L.CACHE_DIRS[component]
    # Triton entries are direct children of dest: one listing instead of a lookup per entry.
    existing = set(os.listdir(dest)) if component == "triton" else None
    extracted: list[str] = []
    replaced: list[str] = []
    present: list[str] = []
    skipped: list[str] = []
    warnings: list[str] = []
    for rel in sorted(by_dir):
        record = by_dir[rel]
        try:
            ok = is_compatible(record)
        except BadInputError as exc:
            warnings.append(f"entry {rel}: unusable target ({exc}); skipped")
            ok = False
        if not ok:
            skipped.append(rel)
            continue
        staged = top / rel
        final = dest / rel
        outcome = installer.install(staged, final, overwrite, (rel in existing) if existing is not None else None)
        {"extracted": extracted, "replaced": replaced, "present": present}[outcome].append(rel)
        if outcome == "replaced":
            extracted.append(rel)
    others = 0
    if component == "vllm" and top.is_dir():
        # Non-kernel vLLM files (compiled graphs, artifacts): installed file by file.
        entry_dirs = {top / rel for rel in by_dir}
        for dirpath, dirnames, filenames in os.walk(top):
            here = Path(dirpath)
            dirnames[:] = [d for d in dirnames if here / d not in entry_dirs]
            for name in sorted(filenames):
                staged = here / name
                if staged.is_symlink():
                    continue
                final = dest / staged.relative_to(top)
                if installer.install(staged, final, overwrite) != "present":
                    others += 1
    return tuple(extracted), tuple(replaced), tuple(present), tuple(skipped), others, tuple(warnings)
