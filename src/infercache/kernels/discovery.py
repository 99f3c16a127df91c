"""Find the directories that hold Triton entries in Triton, vLLM and Inductor cache layouts.

Discovery is separate from parsing: this module only says *where* Triton cache
directories are; `kernels/triton_entry.py` reads the entries inside them, and
`kernels/inductor.scan_root` (with `artifacts.classify_vllm_file`) finds vLLM's
opaque artifacts. Layouts (see docs in the reference
`vllm-inductor-cache.md`):

* triton   — the root itself holds ``<52-char key>/`` entries.
* inductor — ``<root>/triton/<device index>/<key>/``.
* vllm     — legacy ``torch_compile_cache/<hash>/rank_*/[prefix/]triton_cache/``;
  newer ``rank_*/<prefix>/artifact_compile_range_*`` (a directory is an unpacked
  Inductor cache with ``triton/<device>/``; a file is an opaque artifact, not ours) next to
  ``cache_key_factors.json``; AOT ``torch_aot_compile/<sha>/inductor_cache/triton/<device>/``
  with ``rank_*/model`` files.

Symlinks are never followed (so nothing outside the root is ever reached) and an
unreadable directory is a logged warning, not a crash.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from infercache import paths
from infercache.errors import BadInputError

logger = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("triton", "vllm", "inductor")
#: rank of Triton dirs in the AOT layout, whose ``inductor_cache`` all ranks share.
AOT_SHARED_RANK = "shared"

_RANK_RE = re.compile(r"^rank_?\d+(?:_\d+)*$")
#: vLLM's compile artifacts (a file when saved "binary", a dir "unpacked"); one home for the name.
ARTIFACT_PREFIX = "artifact_compile_range_"
_TRITON_KEY_RE = re.compile(r"^[A-Z2-7]{52}$")
# Names whose presence on disk says "this is a vLLM cache".
_VLLM_MARKERS = ("torch_compile_cache", "torch_aot_compile", "triton_cache", "cache_key_factors.json",
                 "vllm_compile_cache.py")
# Inductor sub-dirs that never hold Triton entries: skipped to keep big caches cheap to walk.
_INDUCTOR_NOISE = frozenset({"fxgraph", "aotautograd", "aotinductor", "autotune", "precompile_cache"})
_MAX_DEPTH = 16  # vLLM trees are ~8 deep; bounds pathological trees
_DETECT_BUDGET = 400  # directories a detect_mode probe may list


@dataclass(frozen=True)
class VllmInfo:
    """Where in a vLLM cache something sits: compile hash, rank dir name, optional prefix.

    The one vLLM location of kernels (a cache dir) and of artifacts and catalog rows, where a
    part may be unknown (None; :data:`NO_VLLM`: not in a vLLM tree at all).
    """

    hash: str | None
    rank: str | None
    prefix: str | None

    def known(self) -> VllmInfo:
        """Empty parts as None (:func:`vllm_info_for` gives "" for a part the path lacks)."""
        return VllmInfo(self.hash or None, self.rank or None, self.prefix)

    def to_json(self) -> dict[str, str | None] | None:
        """The spec's `vllm` value: null outside a vLLM tree."""
        if self.hash is None and self.rank is None:
            return None
        return {"hash": self.hash, "rank": self.rank, "prefix": self.prefix}


#: Not in a vLLM tree.
NO_VLLM = VllmInfo(None, None, None)


@dataclass(frozen=True)
class TritonCacheDir:
    """A directory whose children are Triton cache entries (``<key>/``)."""

    path: Path
    mode: str  # "triton" | "vllm" | "inductor"
    cache_root: Path
    vllm: VllmInfo | None = None


def _scandir(path: Path, sort: bool = True) -> list[os.DirEntry[str]]:
    """Children of `path` (sorted by name: stable output), or [] with a warning when unlistable."""
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name) if sort else list(it)
    except PermissionError:
        logger.warning("skipping unreadable directory %s (permission denied)", path)
    except FileNotFoundError:
        logger.warning("skipping directory that vanished during the scan: %s", path)
    except OSError as exc:
        logger.warning("skipping directory %s: %s", path, exc)
    return []


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _looks_like_entry(entry: os.DirEntry[str]) -> bool:
    """A Triton entry dir: 52-char base32 name (cheap check, no I/O)."""
    return _TRITON_KEY_RE.match(entry.name) is not None


def check_root(root: str | os.PathLike[str]) -> Path:
    """A cache dir the user named, resolved: it must exist, be a directory and be readable (else exit 2)."""
    path = Path(root).expanduser()
    if not path.exists():
        raise BadInputError(f"cache directory does not exist: {path}")
    if not path.is_dir():
        raise BadInputError(f"not a directory: {path}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise BadInputError(f"cache directory is not readable: {path}")
    return path.resolve()


def check_mode(mode: str, allow_auto: bool = True) -> str:
    """`mode` if it names a cache mode (or "auto"); BadInputError naming the choices otherwise."""
    valid = (*MODES, "auto") if allow_auto else MODES
    if mode not in valid:
        raise BadInputError(f"unknown cache mode {mode!r} (expected one of {', '.join(valid)})")
    return mode


def _is_inductor_triton_dir(path: Path) -> bool:
    """``triton/`` of an Inductor cache: has device-index sub-dirs (``0``, ``1``...)."""
    return any(_is_dir(e) and e.name.isdigit() for e in _scandir(path))


def detect_mode(root: Path) -> str:
    """"triton" | "vllm" | "inductor", from what is on disk (bounded probe, never follows links)."""
    root = check_root(root)
    if "torch_compile_cache" in root.parts or "torch_aot_compile" in root.parts:
        return "vllm"
    children = _scandir(root, sort=False)
    names = {e.name for e in children}
    if any(m in names for m in _VLLM_MARKERS) or any(
        n.startswith(ARTIFACT_PREFIX) for n in names
    ):
        return "vllm"
    if "triton" in names and (names & {"fxgraph", "aotautograd"} or _is_inductor_triton_dir(root / "triton")):
        return "inductor"
    if names & {"fxgraph", "aotautograd"}:  # a CPU-only torch.compile cache has no triton/ at all
        return "inductor"
    if any(_looks_like_entry(e) for e in children if _is_dir(e)):
        return "triton"
    # A vLLM hash dir (rank_* children) or a rank dir (prefix/ with cache_key_factors.json) sits
    # a level or two above the markers: breadth-first probe with a budget.
    queue: list[tuple[Path, int]] = [(Path(e.path), 1) for e in children if _is_dir(e)]
    if any(_RANK_RE.match(n) for n in names if (root / n).is_dir()):
        return "vllm"
    budget = _DETECT_BUDGET
    while queue and budget > 0:
        path, depth = queue.pop(0)
        budget -= 1
        sub = _scandir(path)
        sub_names = {e.name for e in sub}
        if any(m in sub_names for m in _VLLM_MARKERS) or any(n.startswith(ARTIFACT_PREFIX) for n in sub_names):
            return "vllm"
        if depth < 3:
            queue.extend((Path(e.path), depth + 1) for e in sub if _is_dir(e) and not _looks_like_entry(e))
    # Nothing on disk says which: an (empty) vLLM or Inductor default dir is still that kind of
    # cache, and must not be treated as a Triton cache whose odd children are garbage to prune.
    for mode, default in (("vllm", paths.vllm_cache_root), ("inductor", paths.inductor_cache_dir)):
        try:
            if default().resolve() == root:
                return mode
        except OSError:
            continue
    return "triton"


def default_cache_dirs(mode: str = "auto") -> list[Path]:
    """The default cache dir of `mode` (as the spec resolves it); "auto" → those of all three that exist."""
    check_mode(mode)
    by_mode = {
        "triton": paths.triton_cache_dir,
        "vllm": paths.vllm_cache_root,
        "inductor": paths.inductor_cache_dir,
    }
    if mode != "auto":
        return [by_mode[mode]()]
    return [d for d in (f() for f in by_mode.values()) if d.is_dir()]


def discover(root: Path, mode: str = "auto") -> Iterator[TritonCacheDir]:
    """Yield every Triton cache directory under `root`, sorted, once each."""
    check_mode(mode)
    root = check_root(root)
    if mode == "auto":
        mode = detect_mode(root)
        logger.info("detected %s cache layout in %s", mode, root)
    if mode == "triton":
        yield TritonCacheDir(root, "triton", root, None)
    elif mode == "inductor":
        yield from _discover_inductor(root)
    else:
        yield from _discover_vllm(root)


def _triton_dirs_under(triton_dir: Path) -> Iterator[Path]:
    """Device dirs of an Inductor ``triton/`` dir; the dir itself if entries sit directly in it."""
    children = [e for e in _scandir(triton_dir) if _is_dir(e)]
    if any(_looks_like_entry(e) for e in children):
        yield triton_dir
    for e in children:
        if not _looks_like_entry(e):
            yield Path(e.path)


def _discover_inductor(root: Path) -> Iterator[TritonCacheDir]:
    triton_dir = root / "triton"
    if triton_dir.is_dir() and not triton_dir.is_symlink():
        for path in _triton_dirs_under(triton_dir):
            yield TritonCacheDir(path, "inductor", root, None)
    elif root.name == "triton" or root.parent.name == "triton":
        # Pointed straight at `triton/` or `triton/<device>/`.
        for path in _triton_dirs_under(root) if root.name == "triton" else [root]:
            yield TritonCacheDir(path, "inductor", root, None)
    else:  # normal for a CPU-only torch.compile cache; its artifacts are indexed by kernels/inductor.py
        logger.debug("no Inductor triton/ directory in %s", root)


def vllm_info_for(path: Path) -> VllmInfo:
    """vLLM hash, rank and prefix from a path inside a vLLM cache (absolute path components).

    hash: the dir after ``torch_compile_cache`` (after ``torch_aot_compile`` for AOT), else the
    rank dir's parent; rank: the ``rank*`` component (AOT's shared ``inductor_cache`` →
    ``"shared"``); prefix: dirs between the rank dir and the cache/artifact (joined by ``/``).
    """
    parts = Path(path).parts
    rank_idx = next((i for i in range(len(parts) - 1, -1, -1) if _RANK_RE.match(parts[i])), None)
    vhash = ""
    if "torch_aot_compile" in parts:
        i = len(parts) - 1 - parts[::-1].index("torch_aot_compile")
        vhash = parts[i + 1] if i + 1 < len(parts) else ""
        if rank_idx is None or rank_idx < i:
            return VllmInfo(vhash, AOT_SHARED_RANK, None)
    elif "torch_compile_cache" in parts:
        i = len(parts) - 1 - parts[::-1].index("torch_compile_cache")
        vhash = parts[i + 1] if i + 1 < len(parts) else ""
    if rank_idx is None:
        return VllmInfo(vhash, "", None)
    if not vhash and rank_idx > 0:
        vhash = parts[rank_idx - 1]
    stop_names = {"triton_cache", "inductor_cache", "triton", "model"}
    prefix_parts: list[str] = []
    for part in parts[rank_idx + 1:]:
        if part in stop_names or part.startswith(ARTIFACT_PREFIX):
            break
        prefix_parts.append(part)
    return VllmInfo(vhash, parts[rank_idx], "/".join(prefix_parts) or None)


def _discover_vllm(root: Path) -> Iterator[TritonCacheDir]:
    """Depth-first walk that recognises each vLLM layout by its directory names."""
    root_inductor = root.name == "inductor_cache" or root.name.startswith(ARTIFACT_PREFIX)
    stack: list[tuple[Path, int, bool]] = [(root, 0, root_inductor)]
    seen: set[Path] = set()
    while stack:
        path, depth, in_inductor = stack.pop()
        if depth > _MAX_DEPTH:
            logger.warning("not descending below %s: deeper than %d levels", path, _MAX_DEPTH)
            continue
        if path.name == "triton_cache" or (in_inductor and path.name == "triton"):
            for cache in ([path] if path.name == "triton_cache" else _triton_dirs_under(path)):
                if cache not in seen:
                    seen.add(cache)
                    yield TritonCacheDir(cache, "vllm", root, vllm_info_for(cache))
            continue
        if in_inductor:
            # Inside an Inductor cache only triton/ holds entries; the rest is generated code
            # (often thousands of dirs), so look up that one name instead of listing.
            triton = path / "triton"
            try:
                if stat.S_ISDIR(os.lstat(triton).st_mode):
                    stack.append((triton, depth + 1, True))
            except FileNotFoundError:
                pass
            except OSError as exc:
                logger.warning("skipping %s: %s", triton, exc)
            continue
        subdirs: list[tuple[Path, int, bool]] = []
        for entry in _scandir(path):
            if not _is_dir(entry) or entry.name in _INDUCTOR_NOISE or _looks_like_entry(entry):
                continue
            child_inductor = entry.name == "inductor_cache" or entry.name.startswith(ARTIFACT_PREFIX)
            subdirs.append((Path(entry.path), depth + 1, child_inductor))
        stack.extend(reversed(subdirs))
