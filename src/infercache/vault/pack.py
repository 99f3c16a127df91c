"""Pack a kernel cache into an OCI/Docker image without any daemon.

One layer, streamed: files are read one at a time through a tar writer into the
compressor into a temp file, hashing the tar (diff ID), the compressed blob
(layer digest) and each file (for `manifest.json`) on the way, so the cache is
never held in memory and each byte is read once.

Reproducible by construction: entries sorted, fixed mtime/uid/gid/owner names,
gzip without timestamp (mtime 0), zstd in multi-threaded mode (its output does
not depend on the worker count), canonical JSON, and `created` taken from
`SOURCE_DATE_EPOCH` or else from the newest packed file, not the clock.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import platform
import stat
import tarfile
import tempfile
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from infercache.errors import BadInputError, InfercacheError
from infercache.kernels.discovery import (
    ARTIFACT_PREFIX,
    check_mode,
    detect_mode,
    discover,
)
from infercache.kernels.triton_entry import (
    KERNEL_FIELDS,
    TMP_PREFIX,
    TritonEntry,
    group_children,
    parse_entry,
)
from infercache.units import ProgressCallback
from infercache.vault import inductor as vault_inductor
from infercache.vault import labels as L
from infercache.vault.image import (
    DOCKER_CONFIG,
    OCI_CONFIG,
    build_manifest,
    canonical_json,
    layer_media_type,
    sha256_digest,
)
from infercache.vault.reference import Descriptor, ImageReference, RegistryOptions
from infercache.vault.transport import open_destination

logger = logging.getLogger(__name__)

COMPRESSIONS: tuple[str, ...] = ("gzip", "zstd", "none")
FORMATS: tuple[str, ...] = ("oci", "docker")
#: ISA-L level 2 (its default): ~10x zlib -6 speed at a similar ratio on kernel caches.
GZIP_LEVEL = 2
ZSTD_LEVEL = 3
_CHUNK = 1 << 20


@dataclass(frozen=True)
class PackFile:
    """One file to put in the layer: where it comes from and what it holds (group files are rewritten)."""

    arcname: str
    path: Path
    size: int
    mtime: float
    content: bytes | None = None  # replacement content (relative group file)


@dataclass(frozen=True)
class PackPlan:
    """What a pack will write: every file, the manifest records per component, what was left out."""

    cache_dir: Path
    mode: str
    files: tuple[PackFile, ...]
    records: dict[str, list[dict[str, Any]]]
    sizes: dict[str, int]
    skipped: tuple[tuple[str, str, str], ...]  # (path, kind, reason)
    #: Per component: fields added to its manifest.json (inductor: "host") and to its summary label.
    manifest_extra: dict[str, dict[str, Any]] = field(default_factory=dict)
    summary_extra: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def entry_count(self) -> int:
        return sum(len(r) for r in self.records.values())

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class PackResult:
    """What pack wrote."""

    reference: str
    digest: str
    media_type: str
    config_digest: str
    layer: Descriptor
    diff_id: str
    entries: int
    cache_size: int
    targets: list[dict[str, Any]] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    skipped: int = 0


def _relative_group(path: Path) -> bytes:
    """The group file with child paths made relative (the image must not carry this host's paths)."""
    with open(path, "rb") as handle:
        data = json.load(handle)
    names = list(dict.fromkeys(os.path.basename(c) for c in group_children(data)))
    return json.dumps({"child_paths": {n: n for n in names}}).encode()


def _entry_files(entry: Any, arcdir: str) -> list[PackFile]:
    files = []
    for f in entry.files:
        path = entry.path / f.name
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            raise InfercacheError(f"{path} changed while packing (not a regular file any more)")
        content = _relative_group(path) if f.type == "group" else None
        size = len(content) if content is not None else st.st_size
        files.append(PackFile(f"{arcdir}/{f.name}", path, size, st.st_mtime, content))
    return files


def _record(entry: TritonEntry, files: list[PackFile]) -> dict[str, Any]:
    return {
        "key": entry.key,
        **{f: getattr(entry, f) for f in KERNEL_FIELDS},
        "files": [{"name": f.arcname.rsplit("/", 1)[1], "size": f.size} for f in files],
    }


def plan_pack(cache_dir: str | os.PathLike[str], mode: str = "auto") -> PackPlan:
    """Decide what goes in the image: parsable kernels (and, for vLLM, its other cache files)."""
    root = Path(cache_dir).expanduser()
    if not root.is_dir():
        raise BadInputError(f"{root}: no such cache directory")
    root = root.resolve()
    check_mode(mode)
    if mode == "auto":
        mode = detect_mode(root)
    component = {"vllm": "vllm", "inductor": "inductor"}.get(mode, "triton")
    top = L.CACHE_DIRS[component]
    files: list[PackFile] = []
    records: list[dict[str, Any]] = []
    skipped: list[tuple[str, str, str]] = []
    triton_dirs: set[Path] = set()

    for found in discover(root, mode):
        triton_dirs.add(found.path)
        with os.scandir(found.path) as it:
            children = sorted(it, key=lambda e: e.name)
        for child in children:
            result = parse_entry(Path(child.path))
            if not isinstance(result, TritonEntry):
                if child.is_dir(follow_symlinks=False) or result.kind not in ("orphan",):
                    skipped.append((str(result.path), result.kind, result.reason))
                    logger.info("left out %s: %s (%s)", result.path, result.kind, result.reason)
                    continue
                if component == "triton":  # a stray file in a plain Triton cache is not ours to ship
                    skipped.append((str(result.path), result.kind, result.reason))
                    continue
                continue  # vLLM: picked up by the walk below as an ordinary cache file
            rel = result.path.relative_to(root).as_posix()
            entry_files = _entry_files(result, f"{top}/{rel}")
            files.extend(entry_files)
            record = _record(result, entry_files)
            if found.vllm is not None or component == "vllm":
                record.update({**vault_inductor.vllm_record_fields(found.vllm), "path": rel})
            elif component == "inductor":
                record.update({"kind": "triton", "path": rel, "unit": "dir", "torch_version": None})
            records.append(record)

    manifest_extra: dict[str, dict[str, Any]] = {}
    summary_extra: dict[str, dict[str, Any]] = {}
    inductor_records: list[dict[str, Any]] = []
    taken: set[Path] = set()  # files of the inductor component inside a vLLM cache
    if component == "inductor":
        # Everything else Inductor keeps (FX graph / AOTAutograd entries, compiled modules), with the host facts.
        found_files, found_records = vault_inductor.plan_files(root, top)
        files.extend(PackFile(arc, path, size, mtime) for arc, path, size, mtime in found_files)
        records.extend(found_records)
        manifest_extra[component], summary_extra[component] = vault_inductor.pack_extras(records)

    if component == "vllm":
        # Everything else in a vLLM cache (compiled graphs, artifacts, cache_key_factors.json) ships as is,
        # but for its Inductor caches, which ship as the inductor component (locks and temp files left out).
        inductor_dirs: list[str] = []
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            if here != root and (here.name == "inductor_cache" or here.name.startswith(ARTIFACT_PREFIX)):
                found_files, found_records = vault_inductor.plan_files(
                    here, L.CACHE_DIRS["inductor"], here.relative_to(root).as_posix(), vault_inductor.vllm_fields)
                files.extend(PackFile(arc, path, size, mtime) for arc, path, size, mtime in found_files)
                taken.update(path for _, path, _, _ in found_files)
                inductor_records.extend(found_records)
                inductor_dirs.append(str(here) + "/")
            inside_inductor = any((dirpath + "/").startswith(d) for d in inductor_dirs)
            if here in triton_dirs:
                dirnames[:] = []
                for name in filenames:  # stray files beside Triton entries
                    p = here / name
                    if os.path.islink(p) or name.startswith(TMP_PREFIX):
                        continue
                    st = os.lstat(p)
                    files.append(PackFile(f"{top}/{p.relative_to(root).as_posix()}", p, st.st_size, st.st_mtime))
                continue
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(TMP_PREFIX) and not os.path.islink(here / d))
            for name in sorted(filenames):
                p = here / name
                if inside_inductor:  # an artifact already planned above, or a lock / temp file
                    continue
                st = os.lstat(p)
                if not stat.S_ISREG(st.st_mode) or name.startswith(TMP_PREFIX):
                    continue
                files.append(PackFile(f"{top}/{p.relative_to(root).as_posix()}", p, st.st_size, st.st_mtime))
        if inductor_records:
            manifest_extra["inductor"], summary_extra["inductor"] = vault_inductor.pack_extras(inductor_records)

    if not records and not files:
        raise BadInputError(f"{root}: no kernel cache entries found (mode {mode})")
    files.sort(key=lambda f: f.arcname)
    return PackPlan(
        cache_dir=root,
        mode=mode,
        files=tuple(files),
        records={component: records, **({"inductor": inductor_records} if inductor_records else {})},
        sizes={component: sum(f.size for f in files if f.path not in taken),
               **({"inductor": sum(f.size for f in files if f.path in taken)} if inductor_records else {})},
        skipped=tuple(skipped),
        manifest_extra=manifest_extra,
        summary_extra=summary_extra,
    )


class _Tee(io.RawIOBase):
    """A write sink that hashes and counts what passes through to `sink`."""

    def __init__(self, sink: Any) -> None:
        super().__init__()
        self.sink = sink
        self.hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.hash.update(view)
        self.size += view.nbytes
        self.sink.write(view)
        return view.nbytes

    def tell(self) -> int:  # lets tarfile write straight through (mode "w") instead of re-buffering
        return self.size

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


class _GzipWriter:
    """Deterministic gzip stream (no name, mtime 0) with ISA-L when available, zlib otherwise."""

    def __init__(self, sink: Any) -> None:
        try:
            from isal import isal_zlib as zmod

            level = GZIP_LEVEL
        except ImportError:  # pragma: no cover - isal is a declared dependency
            import zlib as zmod  # type: ignore[no-redef]

            level = 6
        self._c = zmod.compressobj(level, zmod.DEFLATED, 31)
        self._sink = sink

    def write(self, data: Any) -> int:
        out = self._c.compress(data)
        if out:
            self._sink.write(out)
        return len(data)

    def close(self) -> None:
        self._sink.write(self._c.flush())


class _ZstdWriter:
    def __init__(self, sink: Any) -> None:
        import zstandard

        # threads=-1: one worker per CPU; multi-threaded output is identical for any worker count >= 1.
        cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=-1)
        self._w = cctx.stream_writer(sink, closefd=False)

    def write(self, data: Any) -> int:
        self._w.write(data)
        return len(data)

    def close(self) -> None:
        self._w.close()


class _PlainWriter:
    def __init__(self, sink: Any) -> None:
        self._sink = sink

    def write(self, data: Any) -> int:
        self._sink.write(data)
        return len(data)

    def close(self) -> None:
        pass


class _HashingFile(io.RawIOBase):
    """Reads a source file, hashing it; fails if it does not hold exactly `size` bytes."""

    def __init__(self, handle: BinaryIO, size: int, name: str) -> None:
        super().__init__()
        self._h = handle
        self.hash = hashlib.sha256()
        self.read_bytes = 0
        self._size = size
        self._name = name

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._h.readinto(buffer)  # type: ignore[attr-defined]
        if n:
            self.hash.update(memoryview(buffer)[:n])
            self.read_bytes += n
        return n or 0


def source_date_epoch() -> int | None:
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise BadInputError(f"SOURCE_DATE_EPOCH must be an integer, got {value!r}") from None


def _iso(epoch: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _tarinfo(name: str, is_dir: bool, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    info.mode = 0o755 if is_dir else 0o644
    info.size = 0 if is_dir else size
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


#: Files up to this size are read (and hashed) ahead on worker threads; bigger ones stream.
_PREFETCH_MAX_FILE = 4 << 20
_PREFETCH_BYTES = 32 << 20


def _read_whole(f: PackFile) -> tuple[bytes, str]:
    with open(f.path, "rb") as handle:
        data = handle.read(f.size + 1)
    if len(data) != f.size:
        raise InfercacheError(f"{f.path} changed while packing ({len(data)} bytes, expected {f.size})")
    return data, hashlib.sha256(data).hexdigest()


def _prefetch(files: tuple[PackFile, ...], threads: int = 4) -> Iterator[tuple[PackFile, Future | None]]:
    """Yield files in order, small ones already being read and hashed on worker threads.

    Packing is thousands of small files: open/read latency and sha256 (both release the GIL)
    overlap with the tar/compress work on the main thread; at most ~32 MiB is read ahead.
    """
    pending: deque[tuple[PackFile, Future | None]] = deque()
    index = 0
    budget = 0
    with ThreadPoolExecutor(threads, thread_name_prefix="infercache-pack") as pool:
        def top_up() -> None:
            nonlocal index, budget
            while index < len(files) and (budget < _PREFETCH_BYTES or not pending):
                f = files[index]
                index += 1
                small = f.content is None and f.size <= _PREFETCH_MAX_FILE
                pending.append((f, pool.submit(_read_whole, f) if small else None))
                budget += f.size if small else 0

        try:
            top_up()
            while pending:
                f, future = pending.popleft()
                if future is not None:
                    budget -= f.size
                yield f, future
                top_up()
        finally:
            for _, future in pending:
                if future is not None:
                    future.cancel()


def write_layer(
    plan: PackPlan, out: BinaryIO, compression: str, mtime: int = 0, progress: ProgressCallback | None = None
) -> tuple[Descriptor, str]:
    """Stream the plan as one tar layer into `out`; returns (compressed digest+size, diff ID)."""
    if compression not in COMPRESSIONS:
        raise BadInputError(f"bad compression {compression!r}: choose {', '.join(COMPRESSIONS)}")
    compressed = _Tee(out)
    compressor = {"gzip": _GzipWriter, "zstd": _ZstdWriter, "none": _PlainWriter}[compression](compressed)
    plain = _Tee(compressor)
    total = plan.total_size
    done = 0
    manifests: dict[str, dict[str, Any]] = {}
    hashes: dict[str, str] = {}
    dirs_done: set[str] = set()

    with tarfile.open(fileobj=plain, mode="w", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        tar.copybufsize = _CHUNK

        def add_dirs(arcname: str) -> None:
            parts = arcname.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs_done:
                    dirs_done.add(d)
                    tar.addfile(_tarinfo(d + "/", True, 0, mtime))

        for f, ready in _prefetch(plan.files):
            add_dirs(f.arcname)
            info = _tarinfo(f.arcname, False, f.size, mtime)
            if f.content is not None:
                tar.addfile(info, io.BytesIO(f.content))
                hashes[f.arcname] = hashlib.sha256(f.content).hexdigest()
            elif ready is not None:
                data, hashes[f.arcname] = ready.result()
                tar.addfile(info, io.BytesIO(data))
            else:
                with open(f.path, "rb") as handle:
                    reader = _HashingFile(handle, f.size, str(f.path))
                    try:
                        tar.addfile(info, io.BufferedReader(reader, _CHUNK))
                    except OSError as exc:
                        raise InfercacheError(f"{f.path} changed while packing: {exc}") from None
                    hashes[f.arcname] = reader.hash.hexdigest()
            done += f.size
            if progress is not None:
                progress(done, total)

        for component, records in plan.records.items():
            top = L.CACHE_DIRS[component]
            for record in records:
                base = f"{top}/{record.get('path') or record['key']}"
                for entry_file in record["files"]:
                    entry_file["sha256"] = hashes[f"{base}/{entry_file['name']}"]
            manifests[component] = {"schema": L.MANIFEST_SCHEMA, "triton": [], "vllm": []}
            manifests[component][component] = records
            manifests[component].update(plan.manifest_extra.get(component, {}))
        for component, doc in sorted(manifests.items()):
            data = canonical_json(doc)
            arcname = f"{L.MANIFEST_DIRS[component]}/{L.MANIFEST_NAME}"
            add_dirs(arcname)
            tar.addfile(_tarinfo(arcname, False, len(data), mtime), io.BytesIO(data))
    compressor.close()
    media_type = layer_media_type("oci", compression)
    return Descriptor(media_type, compressed.digest, compressed.size), plain.digest


def _go_arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "ppc64le": "ppc64le",
            "s390x": "s390x"}.get(machine, machine or "amd64")


def build_config(labels: dict[str, str], diff_id: str, created: str, fmt: str, extra_labels: dict[str, str]) -> bytes:
    config = {
        "architecture": _go_arch(),
        "os": "linux",
        "created": created,
        "config": {"Labels": {**extra_labels, **labels}},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": "infercache vault pack"}],
    }
    return canonical_json(config)


def pack(
    cache_dir: str | os.PathLike[str],
    reference: str | ImageReference,
    *,
    mode: str = "auto",
    fmt: str = "oci",
    compression: str = "gzip",
    title: str | None = None,
    options: RegistryOptions | None = None,
    progress: ProgressCallback | None = None,
) -> PackResult:
    """Pack `cache_dir` into the image `reference` (any transport) and return what was written."""
    if fmt not in FORMATS:
        raise BadInputError(f"bad --format {fmt!r}: choose oci or docker")
    if compression not in COMPRESSIONS:
        raise BadInputError(f"bad --compression {compression!r}: choose {', '.join(COMPRESSIONS)}")
    layer_type = layer_media_type(fmt, compression)  # docker + zstd → BadInputError before any work
    ref = ImageReference.parse(reference) if isinstance(reference, str) else reference
    if fmt == "docker" and ref.transport in ("oci", "oci-archive"):
        # OCI layouts index OCI manifests only (skopeo finds nothing else): convert, as skopeo does.
        logger.warning("%s holds OCI manifests only; writing OCI media types (docker format applies to "
                       "docker-archive: and docker://)", ref.transport)
        fmt = "oci"
        layer_type = layer_media_type(fmt, compression)
    plan = plan_pack(cache_dir, mode)
    epoch = source_date_epoch()
    mtime = epoch if epoch is not None else 0
    created_epoch = epoch if epoch is not None else int(max((f.mtime for f in plan.files), default=0))
    created = _iso(created_epoch)
    component = next(iter(plan.records))
    title = title or f"{component} kernel cache"

    dest = open_destination(ref, options)
    try:
        # A destination on local disk may take the spooled layer by rename (no second copy).
        adopt = getattr(dest, "adopt_blob", None)
        spool_dir = dest.spool_dir() if adopt is not None else None  # type: ignore[attr-defined]
        if spool_dir is None and ref.path:
            parent = Path(ref.path).expanduser().resolve().parent
            spool_dir = parent if parent.is_dir() else None
        fd, spool_name = tempfile.mkstemp(prefix=".layer-", suffix=".tmp", dir=spool_dir)
        try:
            with os.fdopen(fd, "w+b") as spool:
                layer, diff_id = write_layer(plan, spool, compression, mtime, progress)  # type: ignore[arg-type]
                layer = Descriptor(layer_type, layer.digest, layer.size)
                if dest.has_blob(layer):
                    logger.info("destination already has layer %s", layer.digest)
                elif adopt is None:
                    spool.seek(0)
                    dest.put_blob(layer, spool)  # type: ignore[arg-type]
            if adopt is not None and not dest.has_blob(layer):
                adopt(layer, Path(spool_name))  # digest computed while writing it
        finally:
            if os.path.exists(spool_name):
                os.unlink(spool_name)
        image_labels = L.build_labels(plan.records, plan.sizes, plan.summary_extra)
        notes = L.annotations(title, created)
        config_raw = build_config(image_labels, diff_id, created, fmt, notes if fmt == "docker" else {})
        config = Descriptor(DOCKER_CONFIG if fmt == "docker" else OCI_CONFIG, sha256_digest(config_raw), len(config_raw))
        manifest_raw, manifest_type = build_manifest(config, [layer], fmt, notes)
        if not dest.has_blob(config):
            dest.put_blob(config, io.BytesIO(config_raw))
        digest = dest.put_manifest(manifest_raw, manifest_type)
    finally:
        dest.close()
    logger.info("packed %d entries from %s into %s (%s)", plan.entry_count, plan.cache_dir, ref, digest)
    return PackResult(
        reference=str(ref),
        digest=digest,
        media_type=manifest_type,
        config_digest=config.digest,
        layer=layer,
        diff_id=diff_id,
        entries=plan.entry_count,
        cache_size=plan.total_size,
        targets=json.loads(image_labels[L.LABEL_SUMMARY])["targets"],
        labels=image_labels,
        skipped=len(plan.skipped),
    )
