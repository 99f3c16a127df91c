"""The ``inductor`` image component: torch.compile (Inductor) caches packed, checked and unpacked.

Why host facts: Inductor's cache keys cover the torch version, and its compiled modules
are CPython extensions built with the vector ISA flags Inductor picks on the compile host
(``-mavx512f ...``); an image compiled elsewhere can only hit where all of these match.
So a pack records them (``cache.inductor.image/summary``: ``torch_version``,
``torch_versions`` of its entries, ``python_version``, ``machine``, ``cpu_isa``,
``targets`` of its Triton entries) and check/unpack refuse, with reasons, an image that
cannot hit here; entries whose own torch version (read from their bytes) differs are
skipped one by one.

Image layout: every file of every artifact under ``io.inductor.cache/<path in the cache>``
(locks and temp files left out), records in ``io.inductor.manifest/manifest.json``
(``{"schema", "triton": [], "vllm": [], "inductor": [RECORD...], "host": FACTS}``).
A RECORD has ``kind``, ``key``, ``path`` (the directory holding its files, relative),
``unit`` (``dir``: installed as one directory; ``files``: file by file, e.g. modules that
share a two-character directory), ``torch_version``, ``files`` and, for Triton entries,
the kernel fields.
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from infercache.kernels.discovery import NO_VLLM, VllmInfo, vllm_info_for
from infercache.kernels.inductor import scan_root
from infercache.vault.staged_check import check_file, safe_rel

logger = logging.getLogger(__name__)

COMPONENT = "inductor"
#: Inductor's x86 vector ISAs, best first (torch/_inductor/cpu_vec_isa.py), as /proc/cpuinfo flag sets.
_X86_ISAS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("avx512 avx512_vnni amx_tile", ("avx512f", "avx512dq", "avx512vl", "avx512bw", "avx512_vnni", "amx_tile")),
    ("avx512 avx512_vnni", ("avx512f", "avx512dq", "avx512vl", "avx512bw", "avx512_vnni")),
    ("avx512", ("avx512f", "avx512dq", "avx512vl", "avx512bw")),
    ("avx2", ("avx2", "fma")),
)
#: Optional flags Inductor adds to an ISA's compile command (and so to its keys) when the CPU has them.
_X86_EXTRAS: Mapping[str, tuple[str, ...]] = {"avx512": ("avx512_bf16",),
                                              "avx512 avx512_vnni amx_tile": ("avx512_bf16", "amx_fp16")}
_DIR_KINDS = frozenset({"fxgraph", "aotautograd", "vllm-artifact"})


@dataclass(frozen=True)
class HostFacts:
    """What Inductor's keys depend on, for this host (or an image's compile host)."""

    torch_version: str | None
    python_version: str
    machine: str
    cpu_isa: str | None

    def to_json(self) -> dict[str, Any]:
        return {"torch_version": self.torch_version, "python_version": self.python_version,
                "machine": self.machine, "cpu_isa": self.cpu_isa}


def cpu_isa(cpuinfo: str | None = None, machine: str | None = None, env: Mapping[str, str] | None = None) -> str | None:
    """The vector ISA Inductor picks here (its name plus the optional flags it compiles with).

    Read from /proc/cpuinfo like Inductor's own checker, without importing torch;
    ``ATEN_CPU_CAPABILITY`` (avx2, avx512, default) caps it as it does for Inductor.
    """
    machine = (machine or platform.machine()).lower()
    env = os.environ if env is None else env
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
                cpuinfo = handle.read(1 << 20)
        except OSError:
            return None
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
            break
    if machine in ("x86_64", "amd64"):
        cap = env.get("ATEN_CPU_CAPABILITY", "").strip().lower()
        if cap == "default":
            return "none"
        for name, needed in _X86_ISAS:
            if cap == "avx2" and name != "avx2" or cap == "avx512" and "amx" in name:
                continue
            if all(f in flags for f in needed):
                extras = [e for e in _X86_EXTRAS.get(name, ()) if e in flags]
                return " ".join([name, *(f"+{e}" for e in extras)])
        return "none"
    if machine in ("aarch64", "arm64"):
        return "sve256" if "sve" in flags else "neon"
    return None


def host_facts() -> HostFacts:
    """This host's facts (torch from package metadata: importing it takes seconds)."""
    try:
        torch_version: str | None = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    return HostFacts(torch_version, platform.python_version(), platform.machine().lower(), cpu_isa())


def facts_from(data: Mapping[str, Any] | None) -> HostFacts | None:
    """HostFacts from a summary label or a manifest's ``host`` (None when absent or malformed)."""
    if not isinstance(data, Mapping) or not data.get("python_version"):
        return None
    return HostFacts(data.get("torch_version"), str(data.get("python_version")), str(data.get("machine") or ""),
                     data.get("cpu_isa"))


def _minor(version: str | None) -> str:
    return ".".join((version or "").split(".")[:2])


def _isa_features(isa: str) -> set[str]:
    """What an ISA name says the CPU can run (an AVX-512 CPU runs AVX2 code too)."""
    features = set(isa.replace("+", "").split()) - {"none"}
    if "avx512" in features:
        features.add("avx2")
    return features


def host_reasons(image: HostFacts, here: HostFacts) -> list[str]:
    """Why nothing of an image compiled on `image` can hit on `here` (torch version aside: it is per entry)."""
    reasons = []
    if image.machine and here.machine and image.machine != here.machine:
        reasons.append(f"compiled on {image.machine}, this host is {here.machine}")
    if _minor(image.python_version) != _minor(here.python_version):
        reasons.append(f"compiled modules are CPython {_minor(image.python_version)} extensions, this host runs "
                       f"Python {_minor(here.python_version)}")
    if image.cpu_isa and here.cpu_isa and image.cpu_isa != here.cpu_isa:
        missing = _isa_features(image.cpu_isa) - _isa_features(here.cpu_isa)
        why = (f"this CPU lacks {', '.join(sorted(missing))}: its modules would not load" if missing else
               f"Inductor picks '{here.cpu_isa}' here: its keys differ, nothing would hit")
        reasons.append(f"compiled for CPU ISA '{image.cpu_isa}'; {why}")
    return reasons


def torch_reason(version: str | None, here: HostFacts) -> str | None:
    """Why an entry compiled by torch `version` cannot hit here (None: it can, or it is unknown)."""
    if version is None:
        return None
    if here.torch_version is None:
        return "torch is not installed here"
    if version != here.torch_version:
        return f"compiled by torch {version}, this host has torch {here.torch_version} (Inductor keys include it)"
    return None


@dataclass(frozen=True)
class HostCheck:
    """The inductor component's verdict for this host."""

    compatible: bool
    reasons: tuple[str, ...]
    image: HostFacts | None
    host: HostFacts
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"compatible": self.compatible, "reasons": list(self.reasons), "warnings": list(self.warnings),
                "image": self.image.to_json() if self.image else None, "host": self.host.to_json()}


def check_summary(summary: Mapping[str, Any] | None, here: HostFacts | None = None) -> HostCheck:
    """Compatible when the compile host's facts match and at least one entry's torch version does."""
    here = here or host_facts()
    image = facts_from(summary)
    if image is None:
        return HostCheck(False, ("the image declares no inductor host facts (no cache.inductor.image/summary)",),
                         None, here)
    reasons = host_reasons(image, here)
    versions = [v for v in (summary or {}).get("torch_versions") or [image.torch_version] if v]
    torch_why = [r for r in (torch_reason(v, here) for v in versions) if r]
    if versions and len(torch_why) == len(versions):
        reasons.extend(torch_why)
    warnings = tuple(torch_why) if len(torch_why) < len(versions) else ()
    if not image.cpu_isa:
        warnings += ("the image does not say which CPU ISA it was compiled for",)
    return HostCheck(not reasons, tuple(reasons), image, here, warnings)


# --- pack ---------------------------------------------------------------------------------------
def plan_files(root: Path, top: str, base: str = "",
               where: Callable[[str], Mapping[str, Any]] | None = None) -> tuple[list[tuple[str, Path, int, float]],
                                                                              list[dict[str, Any]]]:
    """The artifacts of the Inductor cache `root` as (arcname, path, size, mtime) and manifest records.

    `base`: where `root` lies in the packed tree (vLLM: ``torch_compile_cache/<hash>/...``);
    `where`: extra record fields for a path (vLLM hash/rank/prefix). Triton entries are the caller's.
    """
    scan = scan_root(root, "inductor")
    files: list[tuple[str, Path, int, float]] = []
    records: list[dict[str, Any]] = []
    prefix = f"{base}/" if base else ""
    for row in sorted(scan.rows, key=lambda r: r.path):
        path = Path(row.path)
        unit = "dir" if row.kind in _DIR_KINDS and path.is_dir() else "files"
        holder = path if unit == "dir" else path.parent
        rel = prefix + holder.relative_to(root).as_posix() if holder != root else prefix.rstrip("/")
        entry_files = []
        for name in sorted(row.files):
            p = holder / name
            try:
                st = os.lstat(p)
            except OSError as exc:
                logger.warning("left out %s: %s", p, exc)
                continue
            files.append((f"{top}/{rel}/{name}", p, st.st_size, st.st_mtime))
            entry_files.append({"name": name, "size": st.st_size})
        if not entry_files:
            continue
        record = {"kind": row.kind, "key": row.key, "path": rel, "unit": unit, "torch_version": row.torch_version,
                  "files": entry_files}
        if where is not None:
            record.update(where(row.path))
        records.append(record)
    for p in scan.problems:
        logger.info("packing damaged artifact %s as is: %s", p.path, p.reason)
    return files, records


def vllm_record_fields(info: VllmInfo | None) -> dict[str, Any]:
    """The vLLM fields of a manifest record (vllm_hash, rank, prefix; all null outside a vLLM tree)."""
    where = info.known() if info is not None else NO_VLLM
    return {"vllm_hash": where.hash, "rank": where.rank, "prefix": where.prefix}


def vllm_fields(path: str) -> dict[str, Any]:
    """The vLLM fields of an inductor record inside a vLLM tree (hash dir, rank dir, prefix)."""
    return vllm_record_fields(vllm_info_for(Path(path)))


def pack_extras(records: Iterable[Mapping[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """What a pack adds for the inductor component: manifest.json's ``host``, and the
    ``cache.inductor.image/summary`` fields but ``targets`` (the labels add those from the Triton records)."""
    facts = host_facts()
    versions = sorted({str(r["torch_version"]) for r in records if r.get("torch_version")} or
                      ({facts.torch_version} if facts.torch_version else set()))
    return {"host": facts.to_json()}, {**facts.to_json(), "torch_versions": versions}


# --- unpack -------------------------------------------------------------------------------------
class ManifestMismatch(Exception):
    """The layer and manifest.json disagree (the caller turns it into UnsafeImageError)."""


def verify(top_name: str, records: Sequence[Mapping[str, Any]], extracted: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Records with checked paths; every staged file under `top_name` must be listed, size and sha256 equal."""
    listed: set[str] = set()
    out = []
    for record in records:
        rel = safe_rel(record.get("path"), "path", ManifestMismatch)
        files = record.get("files")
        if not isinstance(files, list) or not files:
            raise ManifestMismatch(f"manifest.json entry {rel} lists no files")
        for f in files:
            if not isinstance(f, dict) or not isinstance(f.get("name"), str) or "/" in f["name"] or f["name"] in (
                    "", ".", ".."):
                raise ManifestMismatch(f"manifest.json entry {rel} has a malformed file record")
            arc = f"{top_name}/{rel}/{f['name']}"
            info = extracted.get(arc)
            if info is None:
                raise ManifestMismatch(f"manifest.json lists {rel}/{f['name']}, which the layer does not hold")
            check_file(f"{rel}/{f['name']}", f, info, ManifestMismatch)
            if arc in listed:
                raise ManifestMismatch(f"manifest.json lists {rel}/{f['name']} twice")
            listed.add(arc)
        out.append({**record, "path": rel})
    unlisted = sorted(a for a in extracted if a.startswith(top_name + "/") and a not in listed)
    if unlisted:
        raise ManifestMismatch(f"layer holds files not listed in manifest.json: {', '.join(unlisted[:5])}"
                               + (" ..." if len(unlisted) > 5 else ""))
    return out


def unlisted_in_dirs(top: Path, records: Sequence[Mapping[str, Any]]) -> list[str]:
    """What a `dir` record's staged directory holds besides its listed files (links, say): it would be
    moved in with the directory, unchecked. `records` as :func:`verify` returns them; paths relative to `top`."""
    found: list[str] = []
    for record in records:
        if record.get("unit") != "dir":
            continue
        names = {f["name"] for f in record["files"]}
        root = top / record["path"]
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            links = [d for d in dirnames if (here / d).is_symlink()]
            dirnames[:] = [d for d in dirnames if d not in links]
            for name in [*filenames, *links]:
                if here != root or name not in names or (here / name).is_symlink():
                    found.append((here / name).relative_to(top).as_posix())
    return sorted(found)


@dataclass
class InstallOutcome:
    extracted: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def install(top: Path, dest: Path, records: Sequence[Mapping[str, Any]], overwrite: bool,
            move: Callable[[Path, Path, bool], str], gpu_ok: Callable[[Mapping[str, Any]], bool | None],
            here: HostFacts) -> InstallOutcome:
    """Move each usable record from the staged `top` into `dest` with `move(staged, final, overwrite)`.

    Skipped: entries whose own torch version cannot hit here, and Triton entries no local
    GPU (or --target) can run (`gpu_ok` → False; None: no GPU known, skipped with a warning).
    """
    out = InstallOutcome()
    no_gpu_warned = False
    for record in records:
        rel = record["path"]
        ident = rel if record.get("unit") == "dir" else f"{rel}/{record.get('key')}"
        label = f"{ident} ({record.get('kind')})"
        why = torch_reason(record.get("torch_version"), here)
        if record.get("kind") == "triton":
            ok = gpu_ok(record)
            if ok is None:
                if not no_gpu_warned:
                    out.warnings.append("no GPU detected and no --target: Triton entries skipped")
                    no_gpu_warned = True
                out.skipped.append(ident)
                continue
            if not ok:
                why = why or "no local GPU or --target can run it"
        if why:
            out.skipped.append(ident)
            out.warnings.append(f"skipped {label}: {why}")
            continue
        pairs = ([(top / rel, dest / rel)] if record.get("unit") == "dir" else
                 [(top / rel / f["name"], dest / rel / f["name"]) for f in record["files"]])
        outcomes = [move(staged, final, overwrite) for staged, final in pairs]
        if "replaced" in outcomes:
            out.replaced.append(ident)
            out.extracted.append(ident)
        elif "extracted" in outcomes:
            out.extracted.append(ident)
        else:
            out.present.append(ident)
    return out
