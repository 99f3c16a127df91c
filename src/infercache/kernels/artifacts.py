"""Compile-cache artifacts (everything in a compile cache that is not a Triton kernel): kinds, names, rows.

Kinds (the spec's names):

* ``fxgraph``      Inductor's FX graph entry dir ``fxgraph/<2>/<key>/`` (pickled compiled graph,
                   holding the wrapper module's source);
* ``aotautograd``  AOTAutograd entry dir ``aotautograd/<key>/``;
* ``module``       generated code in ``<2 chars>/``: ``c<hash>.py|.cpp|.so|.main.cpp|.main.so...``
                   grouped by hash (``path`` is ``<dir>/c<hash>``, the files' common stem);
* ``autotune``     ``<hash>.best_config`` and Inductor's ``autotune/`` results;
* ``vllm-artifact`` ``artifact_compile_range_*`` (a file when saved "binary", a dir "unpacked");
* ``vllm-graph``   ``computation_graph.py``, ``vllm_compile_cache.py``, ``transformed_code.py``,
                   ``cache_key_factors.json``;
* ``aot-model``    ``torch_aot_compile/<sha>/rank_*/model``.

Lock files (``locks/*.lock``) and in-progress temp files (Inductor's ``.<pid>.<tid>.tmp``,
Triton's ``tmp.pid_*``) are *classified* (so prune can drop stale ones) but never indexed.

Torch versions are read only where the bytes say it in clear text (an FX graph entry
carries ``# torch version: X`` in its repro source); nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from dataclasses import dataclass
from typing import Any, Mapping

from infercache.kernels.discovery import ARTIFACT_PREFIX, NO_VLLM, VllmInfo
from infercache.kernels.query import iso

VLLM_GRAPH_FILES = frozenset({"computation_graph.py", "vllm_compile_cache.py", "transformed_code.py",
                              "cache_key_factors.json"})
#: Suffixes Inductor re-creates from the FX graph entry (sources written before each load).
SOURCE_SUFFIXES = (".py", ".cpp", ".h", ".hpp", ".cu")
#: Suffixes of compiled code: losing them costs a C++ build (or a Triton compile).
COMPILED_SUFFIXES = (".so", ".o", ".gch", ".pch", ".cubin", ".hsaco", ".spv")

_TORCH_VERSION_RE = re.compile(rb"# torch version: ([0-9][0-9A-Za-z.+\-_]{0,63})")
_FX_KEY_RE = re.compile(rb"f[a-z0-9]{51}")
_INDUCTOR_TMP_RE = re.compile(r"^\.\d+\.\d+\.tmp$")
_TWO_CHAR_RE = re.compile(r"^[a-z0-9_]{2}$")
#: Bytes of an entry read for its torch version: the repro source sits in the first part.
VERSION_READ_LIMIT = 64 << 20


def is_lock(name: str) -> bool:
    return name.endswith(".lock")


def is_temp(name: str) -> bool:
    """An in-progress write: Inductor's ``.<pid>.<tid>.tmp``, Triton's ``tmp.pid_*``, ``*.tmp``."""
    return bool(_INDUCTOR_TMP_RE.match(name)) or name.startswith("tmp.pid_") or name.endswith(".tmp")


def is_module_dir(name: str) -> bool:
    """Inductor's generated-code dirs are named by two characters of the hash."""
    return bool(_TWO_CHAR_RE.match(name))


def module_stem(name: str) -> str:
    """``cabc.main.so`` → ``cabc``: the hash that groups a module's files."""
    return name.split(".", 1)[0]


def classify_module_file(name: str) -> str | None:
    """Kind of a file in a ``<2 chars>/`` dir: "module", "autotune", "lock", "temp" (None: unknown)."""
    if is_temp(name):
        return "temp"
    if is_lock(name):
        return "lock"
    if name.endswith(".best_config"):
        return "autotune"
    if name.startswith(".") or "." not in name:
        return None
    return "module"


def classify_vllm_file(name: str, in_rank: bool, in_aot: bool) -> str | None:
    """Kind of a file found in a vLLM tree outside Inductor/Triton caches (None: not an artifact)."""
    if is_temp(name):
        return "temp"
    if is_lock(name):
        return "lock"
    if name.startswith(ARTIFACT_PREFIX):
        return "vllm-artifact"
    if name in VLLM_GRAPH_FILES:
        return "vllm-graph"
    if name == "model" and in_rank and in_aot:
        return "aot-model"
    return None


def regenerable(name: str) -> bool:
    """A generated source Inductor writes again (``write()`` before every load) at no compile cost."""
    return name.endswith(SOURCE_SUFFIXES)


def torch_version_in(data: bytes) -> str | None:
    """The torch version an entry states in clear text (``# torch version: X``), else None."""
    match = _TORCH_VERSION_RE.search(data)
    return match.group(1).decode("ascii") if match else None


def fx_keys_in(data: bytes) -> set[str]:
    """FX graph keys named in an AOTAutograd entry (to borrow their torch version)."""
    return {m.decode("ascii") for m in _FX_KEY_RE.findall(data)}


def check_binary_artifact(data: bytes) -> str | None:
    """Why a vLLM "binary" artifact is damaged (CRC32 header of torch's BytesWriter), or None."""
    if len(data) < 4 + 8:
        return "truncated: shorter than its header"
    if zlib.crc32(data[4:]).to_bytes(4, "big") != data[:4]:
        return "checksum mismatch: truncated or corrupt"
    return None


def check_pickle(data: bytes) -> str | None:
    """Why a pickled Inductor entry is damaged (empty, not a pickle, cut short), or None.

    Never executes it: protocol 4+ pickles are a chain of length-prefixed frames ending in
    STOP, so following the frame headers finds a truncation in a few steps; anything else is
    walked opcode by opcode with `pickletools` (which only parses).
    """
    if not data:
        return "empty file"
    if data[:1] != b"\x80" or len(data) < 3:
        return "not a pickle"
    if data[1] >= 4:
        pos, size = 2, len(data)
        while pos < size and data[pos] == 0x95:  # FRAME <8-byte little-endian length>
            if pos + 9 > size:
                return "truncated pickle (ends inside a frame header)"
            pos += 9 + int.from_bytes(data[pos + 1 : pos + 9], "little")
        if pos > size:
            return "truncated pickle (ends inside a frame)"
        if pos == size:
            return None if data[-1:] == b"." else "truncated pickle (ends before its STOP opcode)"
    return _walk_pickle(data)


def _walk_pickle(data: bytes) -> str | None:
    import pickletools

    try:
        for _op, _arg, _pos in pickletools.genops(data):
            pass
    except Exception as exc:  # noqa: BLE001 - any parse failure means a damaged entry
        if any(m in str(exc) for m in ("exhausted", "remain", "not enough data")):
            return "truncated pickle (ends before its STOP opcode)"
        return f"corrupt pickle ({str(exc)[:60]})"
    return None


@dataclass(frozen=True)
class ArtifactRow:
    """One artifact as the catalog holds it (see the module doc for `path` of a module)."""

    path: str
    cache_root: str
    kind: str
    key: str
    mode: str
    size: int
    files: Mapping[str, int]
    modified: float
    last_access: float | None
    signature: str
    torch_version: str | None = None
    vllm: VllmInfo = NO_VLLM

    def db_tuple(self, now: float) -> tuple[Any, ...]:
        """Column order of `catalog` table `artifacts` (see ARTIFACT_COLUMNS)."""
        return (self.path, self.cache_root, self.kind, self.size, self.modified, self.vllm.hash, self.vllm.rank,
                self.vllm.prefix, now, self.key, self.mode, json.dumps(dict(self.files), sort_keys=True),
                self.last_access, self.torch_version, self.signature)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "key": self.key,
            "path": self.path,
            "cache_root": self.cache_root,
            "mode": self.mode,
            "size": self.size,
            "files": dict(self.files),
            "modified": iso(self.modified),
            "last_access": iso(self.last_access),
            "torch_version": self.torch_version,
            "vllm": self.vllm.to_json(),
        }


ARTIFACT_COLUMNS = ("path, cache_root, kind, size, modified, vllm_hash, vllm_rank, vllm_prefix, indexed_at, "
                    "key, mode, files_json, last_access, torch_version, signature")


def row_from_db(row: Any) -> ArtifactRow:
    """An ArtifactRow from a catalog row (sqlite3.Row or a mapping with ARTIFACT_COLUMNS)."""
    return ArtifactRow(
        path=row["path"], cache_root=row["cache_root"], kind=row["kind"],
        key=row["key"] or os.path.basename(row["path"]),
        mode=row["mode"] or "vllm", size=row["size"], files=json.loads(row["files_json"] or "{}"),
        modified=row["modified"], last_access=row["last_access"], signature=row["signature"] or "",
        torch_version=row["torch_version"], vllm=VllmInfo(row["vllm_hash"], row["vllm_rank"], row["vllm_prefix"]),
    )
