"""Scan Torch Inductor caches and vLLM ``torch_compile_cache`` trees for artifacts (not Triton kernels).

Layouts (reference ``vllm-inductor-cache.md``; torch 2.13 ``_inductor/codecache.py``):

* Inductor (``$TORCHINDUCTOR_CACHE_DIR``): ``fxgraph/<2>/<key>/<sha>``,
  ``aotautograd/<key>/<sha>``, ``<2 chars>/c<hash>.{py,cpp,so,main.cpp,main.so}`` and
  ``<hash>.best_config``, ``locks/<hash>.lock``, ``autotune/``, ``triton/`` (kernels,
  indexed elsewhere). Inductor writes every file through ``.<pid>.<tid>.tmp`` + rename.
* vLLM: ``inductor_cache/`` dirs are Inductor caches; ``artifact_compile_range_*``
  files (binary: CRC32-framed) or dirs (unpacked); graph files beside them;
  ``torch_aot_compile/<sha>/rank_*/model``.

Incremental: a row whose files (name, size, mtime, inode) are unchanged keeps what
was read from its content last time (torch version, damage check); only new or
changed artifacts are read. Symlinks are never followed; unreadable parts are warnings.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

from infercache.kernels import artifacts as A
from infercache.kernels.artifacts import ArtifactRow
from infercache.kernels.discovery import NO_VLLM, VllmInfo, vllm_info_for

logger = logging.getLogger(__name__)

_MAX_DEPTH = 16
#: Signature prefix of rows whose content was damaged: never "unchanged", so every index warns again.
DAMAGED = "damaged:"


@dataclass(frozen=True)
class NoiseFile:
    """A lock or in-progress temp file: classified, never an artifact."""

    path: str
    kind: str  # "lock" | "temp"
    size: int
    modified: float


@dataclass(frozen=True)
class Problem:
    """A damaged artifact (still indexed: it takes space) or an unreadable part of the tree."""

    path: str
    kind: str  # "truncated" | "unparsable" | "unreadable"
    reason: str


@dataclass(frozen=True)
class ArtifactScan:
    """What one scan of a cache root found."""

    rows: tuple[ArtifactRow, ...]
    noise: tuple[NoiseFile, ...]
    problems: tuple[Problem, ...]
    reused: int  # rows whose content was not read again (files unchanged)
    changed: tuple[ArtifactRow, ...] = ()  # rows that differ from the catalog's (all of them on a first scan)
    gone: tuple[str, ...] = ()  # catalog paths no longer on disk
    full: bool = True  # no catalog rows were given: replace the root's rows wholesale

    def by_kind(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.rows:
            counts[row.kind] = counts.get(row.kind, 0) + 1
        return counts


def _scandir(path: str, problems: list[Problem]) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except FileNotFoundError:
        return []
    except OSError as exc:
        problems.append(Problem(path, "unreadable", exc.strerror or str(exc)))
        logger.warning("skipping unreadable directory %s: %s", path, exc)
        return []


def _lstat(entry: os.DirEntry[str]) -> os.stat_result | None:
    try:
        return entry.stat(follow_symlinks=False)
    except OSError:
        return None


def _read(path: str, limit: int = A.VERSION_READ_LIMIT) -> bytes:
    """File bytes without bumping its access time where the OS allows (atime is our LRU clock)."""
    flags = os.O_RDONLY | getattr(os, "O_NOATIME", 0)
    try:
        fd = os.open(path, flags)
    except PermissionError:  # O_NOATIME needs ownership
        fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        left = limit
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


class _Scanner:
    def __init__(self, root: Path, mode: str, known: Mapping[str, ArtifactRow]) -> None:
        self.root = str(root)
        self.mode = mode
        self.known = known
        self.rows: list[ArtifactRow] = []
        self.noise: list[NoiseFile] = []
        self.problems: list[Problem] = []
        self.reused = 0
        self.fx_versions: dict[str, str] = {}
        self.aot_links: dict[str, set[str]] = {}

    # --- helpers ------------------------------------------------------------------------------
    def _noise(self, path: str, kind: str, st: os.stat_result | None) -> None:
        self.noise.append(NoiseFile(path, kind, st.st_size if st else 0, st.st_mtime if st else 0.0))

    def _add(self, path: str, kind: str, key: str, files: list[tuple[str, os.stat_result]],
             where: VllmInfo, check: str | None = None) -> None:
        """One artifact from its files' lstat results; `check` names the content check to run."""
        if not files:
            return
        sig_src = "|".join(f"{n}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}" for n, st in files)
        sig = hashlib.sha1(sig_src.encode()).hexdigest()
        size = sum(st.st_size for _, st in files)
        modified = max(st.st_mtime for _, st in files)
        atime = max(st.st_atime for _, st in files)
        prior = self.known.get(path)
        if prior is not None and prior.signature == sig:
            version = prior.torch_version
            self.reused += 1
        else:
            version, damage = self._inspect(path, kind, files, check)
            if damage is not None:
                self.problems.append(Problem(path, damage[0], damage[1]))
                logger.warning("damaged %s artifact %s: %s", kind, path, damage[1])
                sig = DAMAGED + sig
        if kind == "fxgraph" and version:
            self.fx_versions[key] = version
        sizes = {n: st.st_size for n, st in files}
        self.rows.append(ArtifactRow(path, self.root, kind, key, self.mode, size, sizes, modified, atime, sig, version,
                                     where))

    def _inspect(self, path: str, kind: str, files: list[tuple[str, os.stat_result]],
                 check: str | None) -> tuple[str | None, tuple[str, str] | None]:
        if check is None:
            return None, None
        version = None
        for name, st in files:
            full = os.path.join(path, name) if check in ("pickle", "aot") else path
            try:
                data = _read(full)
            except OSError as exc:
                return None, ("unreadable", exc.strerror or str(exc))
            if check in ("pickle", "aot"):
                why = A.check_pickle(data) if st.st_size <= A.VERSION_READ_LIMIT else None
                if why:
                    return None, ("truncated" if why.startswith(("truncated", "empty")) else "unparsable", why)
                if check == "aot":
                    self.aot_links[path] = A.fx_keys_in(data)
                version = version or A.torch_version_in(data)
            elif check == "binary":
                why = A.check_binary_artifact(data)
                if why:
                    return None, ("truncated", why)
                version = A.torch_version_in(data)
            elif check == "text":
                version = A.torch_version_in(data)
        return version, None

    # --- Inductor cache -----------------------------------------------------------------------
    def inductor(self, base: str, where: VllmInfo) -> None:
        for entry in _scandir(base, self.problems):
            st = _lstat(entry)
            if st is None or stat.S_ISLNK(st.st_mode):
                continue
            name, path = entry.name, entry.path
            if not stat.S_ISDIR(st.st_mode):
                kind = "temp" if A.is_temp(name) else "lock" if A.is_lock(name) else None
                if kind:
                    self._noise(path, kind, st)
                continue
            if name == "triton":
                continue  # Triton kernel entries: the kernel indexer's
            if name == "fxgraph":
                for sub in _scandir(path, self.problems):
                    if sub.is_dir(follow_symlinks=False):
                        for key_dir in _scandir(sub.path, self.problems):
                            self._entry_dir(key_dir, "fxgraph", where, "pickle")
            elif name == "aotautograd":
                for key_dir in _scandir(path, self.problems):
                    self._entry_dir(key_dir, "aotautograd", where, "aot")
            elif name == "locks":
                for f in _scandir(path, self.problems):
                    self._noise(f.path, "lock" if A.is_lock(f.name) else "temp" if A.is_temp(f.name) else "lock",
                                _lstat(f))
            elif name == "autotune":
                for f in _scandir(path, self.problems):
                    self._single(f, "autotune", where)
            elif A.is_module_dir(name) or name == "precompiled_headers":
                self._module_dir(path, where)
            else:
                logger.debug("not an artifact: %s", path)
        self._link_aot_versions()

    def _entry_dir(self, entry: os.DirEntry[str], kind: str, where: VllmInfo, check: str) -> None:
        """``fxgraph/<2>/<key>/`` or ``aotautograd/<key>/``: one artifact of its finished files."""
        if not entry.is_dir(follow_symlinks=False):
            st = _lstat(entry)
            if st is not None and A.is_temp(entry.name):
                self._noise(entry.path, "temp", st)
            return
        files: list[tuple[str, os.stat_result]] = []
        for f in _scandir(entry.path, self.problems):
            st = _lstat(f)
            if st is None or not stat.S_ISREG(st.st_mode):
                continue
            if A.is_temp(f.name):
                self._noise(f.path, "temp", st)  # a write in progress (or one that died)
                continue
            files.append((f.name, st))
        self._add(entry.path, kind, entry.name, files, where, check)

    def _single(self, entry: os.DirEntry[str], kind: str, where: VllmInfo, check: str | None = None) -> None:
        st = _lstat(entry)
        if st is None or stat.S_ISLNK(st.st_mode):
            return
        if A.is_temp(entry.name):
            self._noise(entry.path, "temp", st)
            return
        if stat.S_ISDIR(st.st_mode):
            files = list(self._tree_files(entry.path))
            self._add(entry.path, kind, entry.name, files, where, None)
        elif stat.S_ISREG(st.st_mode):
            self.rows_for_file(entry.path, entry.name, kind, st, where, check)

    def rows_for_file(self, path: str, key: str, kind: str, st: os.stat_result, where: VllmInfo,
                      check: str | None) -> None:
        # A single-file artifact: `files` is {basename: size}, content checks read `path` itself.
        self._add(path, kind, key, [(os.path.basename(path), st)], where, check)

    def _tree_files(self, top: str, skip: frozenset[str] = frozenset()) -> Iterator[tuple[str, os.stat_result]]:
        """(relative path, lstat) of every regular file under `top` (no symlinks, `skip` names pruned)."""
        stack = [(top, "")]
        while stack:
            here, rel = stack.pop()
            for e in _scandir(here, self.problems):
                st = _lstat(e)
                if st is None or stat.S_ISLNK(st.st_mode):
                    continue
                name = f"{rel}{e.name}"
                if stat.S_ISDIR(st.st_mode):
                    if e.name not in skip:
                        stack.append((e.path, name + "/"))
                elif stat.S_ISREG(st.st_mode) and not A.is_temp(e.name):
                    yield name, st

    def _module_dir(self, path: str, where: VllmInfo) -> None:
        """A ``<2 chars>/`` dir: files grouped by hash into modules; best_configs; locks; temps."""
        groups: dict[str, list[tuple[str, os.stat_result]]] = {}
        for f in _scandir(path, self.problems):
            st = _lstat(f)
            if st is None or stat.S_ISLNK(st.st_mode):
                continue
            if stat.S_ISDIR(st.st_mode):
                if f.name == "locks":  # precompiled_headers/locks/
                    for lock in _scandir(f.path, self.problems):
                        self._noise(lock.path, "temp" if A.is_temp(lock.name) else "lock", _lstat(lock))
                else:  # e.g. AOTInductor output dirs named by hash
                    self._add(f.path, "module", f.name, list(self._tree_files(f.path)), where)
                continue
            kind = A.classify_module_file(f.name)
            if kind in ("temp", "lock"):
                self._noise(f.path, kind, st)
            elif kind == "autotune":
                self._add(f.path, "autotune", f.name.split(".", 1)[0], [(f.name, st)], where)
            elif kind == "module":
                groups.setdefault(A.module_stem(f.name), []).append((f.name, st))
        for stem, files in groups.items():
            # Module rows: path is the shared stem; `files` names sit beside it in `path`'s dir.
            self._add_module(os.path.join(path, stem), stem, files, where)

    def _add_module(self, stem_path: str, stem: str, files: list[tuple[str, os.stat_result]], where: VllmInfo) -> None:
        self._add(stem_path, "module", stem, files, where)

    def _link_aot_versions(self) -> None:
        """AOTAutograd entries name their FX graph keys: they share that entry's torch version."""
        if not self.aot_links:
            return
        for i, row in enumerate(self.rows):
            if row.kind == "aotautograd" and row.torch_version is None:
                keys = self.aot_links.get(row.path, set())
                version = next((self.fx_versions[k] for k in sorted(keys) if k in self.fx_versions), None)
                if version:
                    self.rows[i] = ArtifactRow(row.path, row.cache_root, row.kind, row.key, row.mode, row.size,
                                               row.files, row.modified, row.last_access, row.signature, version,
                                               row.vllm)

    # --- vLLM tree ----------------------------------------------------------------------------
    def vllm(self) -> None:
        def where_of(path: str) -> VllmInfo:
            return vllm_info_for(Path(path)).known()

        stack: list[tuple[str, int]] = [(self.root, 0)]
        if os.path.basename(self.root) == "inductor_cache":
            self.inductor(self.root, where_of(self.root))
            return
        while stack:
            path, depth = stack.pop()
            if depth > _MAX_DEPTH:
                logger.warning("not descending below %s: deeper than %d levels", path, _MAX_DEPTH)
                continue
            parts = Path(path).parts
            in_rank = any(p.startswith("rank") for p in parts[len(Path(self.root).parts) - 1:])
            in_aot = "torch_aot_compile" in parts
            subdirs = []
            for e in _scandir(path, self.problems):
                st = _lstat(e)
                if st is None or stat.S_ISLNK(st.st_mode):
                    continue
                if stat.S_ISDIR(st.st_mode):
                    if e.name == "inductor_cache":
                        self.inductor(e.path, where_of(e.path))
                    elif e.name.startswith(A.ARTIFACT_PREFIX):
                        # Unpacked artifact: one row, its Triton kernels left to the kernel indexer.
                        files = list(self._tree_files(e.path, skip=frozenset({"triton"})))
                        self._add(e.path, "vllm-artifact", e.name, files, where_of(e.path))
                    elif e.name not in ("triton_cache", "triton") and len(e.name) != 52:
                        subdirs.append((e.path, depth + 1))
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                kind = A.classify_vllm_file(e.name, in_rank or e.name == "model", in_aot)
                if kind in ("temp", "lock"):
                    self._noise(e.path, kind, st)
                elif kind is not None:
                    check = {"vllm-artifact": "binary", "aot-model": "text"}.get(kind)
                    self.rows_for_file(e.path, e.name, kind, st, where_of(e.path), check)
            stack.extend(reversed(subdirs))


def scan_root(root: str | os.PathLike[str], mode: str, known: Mapping[str, ArtifactRow] | None = None) -> ArtifactScan:
    """Every artifact (and lock/temp file) under a cache root of `mode` ("inductor" | "vllm" | "triton").

    `known`: the catalog's rows of this root by path; unchanged ones are reused without reading.
    """
    known = known or {}
    scanner = _Scanner(Path(root), mode, known)
    if mode == "inductor":
        scanner.inductor(scanner.root, NO_VLLM)
    elif mode == "vllm":
        scanner.vllm()
    rows = tuple(scanner.rows)
    live = {r.path for r in rows}
    return ArtifactScan(rows, tuple(scanner.noise), tuple(scanner.problems), scanner.reused,
                        changed=tuple(r for r in rows if known.get(r.path) != r),
                        gone=tuple(p for p in known if p not in live), full=not known)


def known_rows(conn: object, root: str) -> dict[str, ArtifactRow]:
    """The catalog's artifact rows of `root` by path (for an incremental scan)."""
    cur = conn.execute(  # type: ignore[attr-defined]
        f"SELECT {A.ARTIFACT_COLUMNS} FROM artifacts WHERE cache_root = ?", (root,)
    )
    return {r["path"]: A.row_from_db(r) for r in cur}


def write_scan(conn: object, root: str, scan: ArtifactScan, now: float) -> None:
    """Replace `root`'s artifact and lock/temp rows with `scan` (inside the caller's transaction)."""
    execute = conn.execute  # type: ignore[attr-defined]
    executemany = conn.executemany  # type: ignore[attr-defined]
    if scan.full:
        execute("DELETE FROM artifacts WHERE cache_root = ?", (root,))
    elif scan.gone:
        executemany("DELETE FROM artifacts WHERE path = ?", [(p,) for p in scan.gone])
    marks = ",".join("?" * 15)
    if scan.changed:
        executemany(f"INSERT OR REPLACE INTO artifacts({A.ARTIFACT_COLUMNS}) VALUES ({marks})",
                    [r.db_tuple(now) for r in scan.changed])
    execute("DELETE FROM skipped WHERE cache_root = ? AND owner = 'artifacts'", (root,))
    executemany(
        "INSERT OR REPLACE INTO skipped(path, parent, cache_root, kind, reason, size, modified, signature, owner) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, '', 'artifacts')",
        [(n.path, os.path.dirname(n.path), root, n.kind, "lock file" if n.kind == "lock" else "write in progress",
          n.size, n.modified) for n in scan.noise],
    )
