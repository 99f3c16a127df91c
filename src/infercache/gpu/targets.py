"""The GPU target model: what a Triton entry was compiled for, or what a local GPU can run.

One small value type shared by the catalog (entries' targets), the vault (image
summaries, `--target`) and detection, so that "cuda:90" means the same thing
everywhere. Triton stores CUDA arches as ints (90) and HIP arches as strings
("gfx942"); here `arch` is always a string.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from infercache.errors import BadInputError

BACKENDS: tuple[str, ...] = ("cuda", "hip")
#: What users type → Triton's backend name ("rocm" is what people call "hip").
BACKEND_ALIASES: dict[str, str] = {"cuda": "cuda", "nvidia": "cuda", "hip": "hip", "rocm": "hip", "amd": "hip"}

# CUDA: compute capability major*10+minor, optionally arch-specific ("90a") or family ("100f").
_CUDA_ARCH_RE = re.compile(r"^(?:sm_?)?(\d{2,3})([af]?)$", re.IGNORECASE)
# HIP: gfx + 3-4 hex digits ("gfx90a", "gfx942", "gfx1100"), optional target-id features.
_HIP_ARCH_RE = re.compile(r"^(gfx[0-9a-f]{3,4})(?::[a-z0-9_+-]+)*$", re.IGNORECASE)


def backend_name(value: Any) -> str | None:
    """Triton's backend name for a spelling found in metadata ('rocm' → 'hip'); other names lower-cased,
    None when absent. Lenient: for reading what a cache says, not for checking user input."""
    if not isinstance(value, str) or not value.strip():
        return None
    lower = value.strip().lower()
    return BACKEND_ALIASES.get(lower, lower)


def normalize_backend(backend: str) -> str:
    """'cuda' | 'hip' from any accepted spelling ('rocm' → 'hip'); BadInputError otherwise."""
    value = BACKEND_ALIASES.get(str(backend).strip().lower())
    if value is None:
        raise BadInputError(f"unknown GPU backend {backend!r} (expected cuda, hip or rocm)")
    return value


def arch_name(value: Any) -> str | None:
    """An arch as the catalog stores it, from any spelling: 90 / "sm90" / "sm_90a" / "compute_90" → "90" / "90a",
    "GFX942" → "gfx942"; None when absent. Lenient (no validation): :func:`normalize_arch` checks user input."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return str(int(value))
    lower = str(value).strip().lower()
    for prefix in ("sm_", "sm", "compute_"):
        if lower.startswith(prefix) and lower[len(prefix) :][:1].isdigit():
            return lower[len(prefix) :]
    return lower or None


def normalize_arch(backend: str, arch: str | int) -> str:
    """Canonical arch string, validated: cuda 90 / 'sm_90' / 'sm90' → '90' ('90a' kept); hip 'gfx90a:xnack-' → 'gfx90a'."""
    text = str(arch).strip()
    if backend == "cuda":
        match = _CUDA_ARCH_RE.match(text)
        if not match:
            raise BadInputError(f"bad CUDA arch {arch!r} (expected a compute capability like 80, 90 or 90a)")
        return match.group(1) + match.group(2).lower()
    match = _HIP_ARCH_RE.match(text)
    if not match:
        raise BadInputError(f"bad HIP arch {arch!r} (expected a gfx name like gfx90a or gfx942)")
    return match.group(1).lower()


def default_warp_size(backend: str, arch: str) -> int:
    """32 on CUDA; on AMD 64 (CDNA/GCN, gfx9xx) but 32 for RDNA (gfx10/11/12), as HIP's warpSize reports."""
    if backend == "cuda":
        return 32
    return 32 if re.match(r"^gfx1[0-9]", arch) and len(arch) >= 7 else 64


def cuda_arch_base(arch: str) -> str:
    """'90a' → '90': the compute capability an arch-specific CUDA arch needs exactly."""
    return arch.rstrip("af")


def format_ptx_version(version: int | None) -> str | None:
    """Triton's int PTX ISA version (84) → '8.4'."""
    return None if version is None else f"{version // 10}.{version % 10}"


def _optional_int(value: Any, field: str) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise BadInputError(f"bad {field} {value!r}")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if re.fullmatch(r"\d+\.\d", text):  # "8.4" → 84
        major, minor = text.split(".")
        return int(major) * 10 + int(minor)
    try:
        return int(text)
    except ValueError:
        raise BadInputError(f"bad {field} {value!r} (expected an integer)") from None


@dataclass(frozen=True)
class GpuTarget:
    """A Triton compile target: backend, arch (string), warp size; PTX ISA and Triton version where known."""

    backend: str
    arch: str
    warp_size: int
    ptx_version: int | None = None
    triton_version: str | None = None

    @classmethod
    def make(
        cls,
        backend: str,
        arch: str | int,
        warp_size: int | str | None = None,
        ptx_version: int | str | None = None,
        triton_version: str | None = None,
    ) -> GpuTarget:
        """Normalising constructor: aliases, int arches, default warp size."""
        b = normalize_backend(backend)
        a = normalize_arch(b, arch)
        warp = _optional_int(warp_size, "warp size")
        if warp is None:
            warp = default_warp_size(b, a)
        if warp not in (16, 32, 64):
            raise BadInputError(f"bad warp size {warp_size!r} (expected 32 or 64)")
        return cls(b, a, warp, _optional_int(ptx_version, "ptx_version"),
                   str(triton_version) if triton_version else None)

    @classmethod
    def parse(cls, text: str) -> GpuTarget:
        """'cuda:90', 'cuda:90:32', 'hip:gfx942', 'rocm:gfx90a', 'hip:gfx1100:32' → GpuTarget."""
        if not isinstance(text, str) or not text.strip():
            raise BadInputError(f"bad GPU target {text!r} (expected BACKEND:ARCH[:WARP], e.g. cuda:90)")
        parts = text.strip().split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise BadInputError(f"bad GPU target {text!r} (expected BACKEND:ARCH[:WARP], e.g. cuda:90 or hip:gfx942)")
        try:
            return cls.make(parts[0], parts[1], parts[2] if len(parts) == 3 else None)
        except BadInputError as exc:
            raise BadInputError(f"bad GPU target {text!r}: {exc}") from None

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> GpuTarget:
        """From a catalog/manifest entry or an image-summary target (keys backend, arch, warp_size,
        ptx_version, triton_version; arch int or str). Raw Triton metadata works too: its nested
        ``target`` dict wins over the top-level ``arch`` ("sm90")."""
        if not isinstance(entry, Mapping):
            raise BadInputError(f"bad target entry {entry!r} (expected a mapping)")
        nested = entry.get("target") if isinstance(entry.get("target"), Mapping) else {}
        backend = nested.get("backend", entry.get("backend"))
        arch = nested.get("arch", entry.get("arch"))
        if backend is None or arch is None:
            raise BadInputError(f"target entry lacks backend/arch: {dict(entry)!r}")
        return cls.make(
            backend,
            arch,
            nested.get("warp_size", entry.get("warp_size")),
            entry.get("ptx_version"),
            entry.get("triton_version"),
        )

    @property
    def key(self) -> tuple[str, str, int]:
        """(backend, arch, warp_size): what makes two targets the same for summaries."""
        return (self.backend, self.arch, self.warp_size)

    def __str__(self) -> str:
        base = f"{self.backend}:{self.arch}"
        return base if self.warp_size == default_warp_size(self.backend, self.arch) else f"{base}:{self.warp_size}"

    def to_json(self) -> dict[str, Any]:
        """Summary-target shape: backend, arch, warp_size, plus ptx_version/triton_version when known."""
        data: dict[str, Any] = {"backend": self.backend, "arch": self.arch, "warp_size": self.warp_size}
        if self.ptx_version is not None:
            data["ptx_version"] = self.ptx_version
        if self.triton_version is not None:
            data["triton_version"] = self.triton_version
        return data
