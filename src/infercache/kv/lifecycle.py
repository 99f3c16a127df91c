"""A pool's life outside its hot path: argument checks, room checks, formatting, prefaulting,
building under a temporary name, registering, destroying.

Nothing is created before every check passed, and a pool file appears under its final name
only once it is complete (formatted, filled, prefaulted): a build runs on a temporary file
that is linked into place at the end, so a crash never leaves a half-made pool behind a name.
"""

from __future__ import annotations

import logging
import mmap
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from infercache.errors import BadInputError, InfercacheError
from infercache.kv import registry
from infercache.kv.allocator import MAX_BLOCKS, Allocator
from infercache.kv.layout import (
    HDR_ALLOC_OFF, HDR_BLOCK_SIZE, HDR_CREATED, HDR_DATA_OFF, HDR_FILE_SIZE, HDR_FREE_OFF, HDR_GHOST_CAP,
    HDR_GHOST_OFF, HDR_INDEX_CAP, HDR_INDEX_OFF, HDR_MAGIC, HDR_N_BLOCKS, HDR_POLICY, HDR_TABLE_CAP, HDR_TABLE_OFF,
    HDR_TIER, HDR_VERSION, HEADER_BYTES, LAYOUT_VERSION, MAGIC, NAME_MAX, NAME_OFFSET, TIERS, Geometry,
    compute_geometry,
)  # fmt: skip
from infercache.kv.policies import REGISTRY
from infercache.kv.procs import pid_alive
from infercache.units import format_size, parse_size

log = logging.getLogger(__name__)

TMP_PREFIX = ".infercache-tmp-"
# Linux's MADV_POPULATE_READ/WRITE (5.14+): fault every page in, in one call, writing nothing.
# Python exposes the constants from 3.12 only; the numbers are Linux's ABI.
_LINUX = sys.platform.startswith("linux")
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if _LINUX else None)
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23 if _LINUX else None)
T = TypeVar("T")


@dataclass(frozen=True)
class PoolSpec:
    """A checked request for a new pool: where its file goes and how it is laid out."""

    name: str
    tier: str
    policy: str
    target: Path
    geometry: Geometry
    prefault: bool


def _target(name: str, tier: str, path: Any, data_dir: Any) -> Path:
    if tier not in TIERS:
        raise BadInputError(f"unknown tier {tier!r} (expected one of: {', '.join(TIERS)})")
    if tier == "disk":
        if path is None:
            raise BadInputError("tier disk needs a path for the backing file")
        target = Path(path).expanduser().absolute()
        if not target.parent.is_dir():
            raise BadInputError(f"directory {target.parent} does not exist")
        return target
    if path is not None:
        raise BadInputError("a path is only used for tier disk (tier cpu lives in /dev/shm)")
    return registry.shm_path(name, data_dir)


def check_create(
    name: str, size: str | int, tier: str, path: Any, policy: str, block_size: str | int, data_dir: Any,
    prefault: bool | None,
) -> PoolSpec:  # fmt: skip
    """Every check `Pool.create` makes before anything exists (BadInputError with the reason)."""
    registry.validate_name(name)
    if policy not in REGISTRY:
        raise BadInputError(f"unknown policy {policy!r} (expected one of: {', '.join(REGISTRY)})")
    size_b = parse_size(size)
    bs = parse_size(block_size)
    if bs < 64 or bs & (bs - 1) or bs > 1 << 30:
        raise BadInputError(f"block size {block_size!r} must be a power of two between 64 B and 1 GiB")
    if size_b < bs:
        raise BadInputError(f"pool size {size!r} must be at least one block ({bs} bytes)")
    if size_b // bs > MAX_BLOCKS:
        raise BadInputError(f"pool size {size!r} has more than {MAX_BLOCKS} blocks; use a larger --block-size")
    target = _target(name, tier, path, data_dir)
    return PoolSpec(name, tier, policy, target, compute_geometry(size_b, bs), _default_prefault(tier, prefault))


def check_restore(name: str, tier: str, pool_path: Any, data_dir: Any, policy: str, geometry: Geometry,
                  prefault: bool | None) -> PoolSpec:  # fmt: skip
    registry.validate_name(name)
    if tier == "disk" and pool_path is None:
        raise BadInputError("restoring to tier disk needs pool_path")
    return PoolSpec(name, tier, policy, _target(name, tier, pool_path, data_dir), geometry,
                    _default_prefault(tier, prefault))  # fmt: skip


def _default_prefault(tier: str, prefault: bool | None) -> bool:
    """On for tier cpu (RAM that the pool holds anyway), off for disk (keeps the file sparse)."""
    return tier == "cpu" if prefault is None else bool(prefault)


def check_room(spec: PoolSpec, pools: dict[str, Any], verb: str) -> None:
    """Refuse, before anything is created, a used name, an existing backing file or too little space."""
    record = pools.get(spec.name)
    target = spec.target
    if record and Path(record["path"]).exists():
        raise BadInputError(f"pool name {spec.name!r} is already used (backing file {record['path']}); choose another name")
    if target.exists():
        raise BadInputError(f"{target} already exists; choose another name or path")
    st = os.statvfs(target.parent)
    avail = st.f_bavail * st.f_frsize
    g = spec.geometry
    if g.file_size > avail:
        raise BadInputError(
            f"{verb} {spec.name!r} needs {g.file_size} bytes ({format_size(g.file_size)}: "
            f"{format_size(g.data_bytes)} data + metadata) but {target.parent} has only "
            f"{avail} bytes ({format_size(avail)}) free"
        )


def build_registered(
    spec: PoolSpec, data_dir: Any, verb: str, attach: Callable[[int, Path], T], mapping_of: Callable[[T], mmap.mmap],
    close: Callable[[T], None], fill: Callable[[T], None] | None = None, **record: Any,
) -> T:  # fmt: skip
    """Check room, build the pool file (format, prefault, `fill`), link it into place and register
    it, all under the registry lock; returns the attached pool (`attach(fd, final_path)`)."""
    with registry.locked(data_dir) as reg_file:
        pools = registry.load(data_dir)
        check_room(spec, pools, verb)
        pool = _build(spec, attach, mapping_of, close, fill)
        pools[spec.name] = {"path": str(spec.target), "tier": spec.tier, "created": time.time(), **record}
        registry.save(reg_file, pools)
    return pool


def _build(spec: PoolSpec, attach: Callable[[int, Path], T], mapping_of: Callable[[T], mmap.mmap],
           close: Callable[[T], None], fill: Callable[[T], None] | None) -> T:  # fmt: skip
    target = spec.target
    sweep_stale_temps(target.parent)
    tmp = target.parent / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    pool = None
    try:
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, spec.geometry.file_size)
        _format(fd, spec)
        pool = attach(fd, target)
        mm = mapping_of(pool)
        if spec.prefault:
            prefault(mm)
        if fill is not None:
            fill(pool)
        if spec.tier == "disk":
            mm.flush()
        try:
            os.link(tmp, target)  # never clobbers: fails if the name appeared meanwhile
        except FileExistsError:
            raise BadInputError(f"{target} already exists; choose another name or path") from None
        os.unlink(tmp)
    except BaseException:
        if pool is not None:
            close(pool)
        else:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return pool


def prefault(mm: mmap.mmap, fresh: bool = True, method: str | None = None) -> str:
    """Fault every page of a mapping in, so the first puts copy at memory speed instead of taking
    a page fault per 4 KiB (a fresh tmpfs mapping fills at ~0.25x memcpy). Returns the method.

    `fresh` (a file nobody else sees yet, at create): MADV_POPULATE_WRITE allocates and maps
    every page; without it (Linux < 5.14), one write per page. Else (attaching to a live pool):
    MADV_POPULATE_READ only maps the pages that exist (fault-around maps 16 per fault, and a
    shared tmpfs page is mapped writable); without it, one read per page (a write could race
    another process's put). `method="touch"` skips the madvise (tests, old kernels).
    """
    advice = MADV_POPULATE_WRITE if fresh else MADV_POPULATE_READ
    if advice is not None and method != "touch":
        try:
            mm.madvise(advice)
            return "madvise"
        except OSError as exc:  # EINVAL before Linux 5.14
            log.debug("MADV_POPULATE_%s unavailable (%s); touching every page", "WRITE" if fresh else "READ", exc)
    import numpy as np

    pages = np.frombuffer(mm, dtype=np.uint8)[:: mmap.PAGESIZE]
    if fresh:
        np.add(pages, 0, out=pages)  # a write per page, bytes unchanged (`pages[:] = pages` would be skipped)
    else:
        int(pages.sum())  # a read per page
    del pages
    return "touch"


def _format(fd: int, spec: PoolSpec) -> None:
    """Write the header and an empty allocator into a freshly truncated (all-zero) file."""
    g = spec.geometry
    mm = mmap.mmap(fd, g.file_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    mv = memoryview(mm)
    try:
        hq = mv[:HEADER_BYTES].cast("Q")
        hd = mv[:HEADER_BYTES].cast("d")
        values = {
            HDR_VERSION: LAYOUT_VERSION, HDR_BLOCK_SIZE: g.block_size, HDR_N_BLOCKS: g.n_blocks,
            HDR_TABLE_CAP: g.table_cap, HDR_INDEX_CAP: g.index_cap, HDR_GHOST_CAP: g.ghost_cap,
            HDR_ALLOC_OFF: g.alloc_off, HDR_TABLE_OFF: g.table_off, HDR_INDEX_OFF: g.index_off,
            HDR_FREE_OFF: g.free_off, HDR_GHOST_OFF: g.ghost_off, HDR_DATA_OFF: g.data_off,
            HDR_FILE_SIZE: g.file_size, HDR_POLICY: REGISTRY[spec.policy].id, HDR_TIER: TIERS.index(spec.tier),
        }  # fmt: skip
        for word, value in values.items():
            hq[word] = value
        hd[HDR_CREATED] = time.time()
        raw = spec.name.encode()[:NAME_MAX]
        mv[NAME_OFFSET : NAME_OFFSET + 2] = len(raw).to_bytes(2, "little")
        mv[NAME_OFFSET + 2 : NAME_OFFSET + 2 + len(raw)] = raw
        alloc = Allocator(mv[g.alloc_off : g.table_off], g.n_blocks, init=True)
        alloc.release()
        hq[HDR_MAGIC] = MAGIC  # last: a half-formatted file is never taken for a pool
        hq.release()
        hd.release()
    finally:
        mv.release()
        mm.close()


def sweep_stale_temps(directory: Path) -> None:
    """Remove half-built pool files (ours, named .infercache-tmp-<pid>-<hex>) whose builder died.

    A create or restore killed before its final link leaves such a file; nothing else refers
    to it, and only files of this exact pattern, owned by us, with a dead pid, are touched.
    """
    try:
        candidates = [p for p in directory.iterdir() if p.name.startswith(TMP_PREFIX)]
    except OSError:
        return
    for path in candidates:
        pid_text = path.name[len(TMP_PREFIX) :].split("-", 1)[0]
        try:
            if not pid_text.isdigit() or path.stat().st_uid != os.getuid() or pid_alive(int(pid_text)):
                continue
            path.unlink()
            log.info("removed %s left by a pool build that did not finish", path)
        except OSError:
            continue


def open_registered(name: str, data_dir: Any) -> tuple[int, Path]:
    """(fd, path) of a registered pool's backing file; BadInputError if unknown or gone."""
    record = registry.lookup(data_dir, name)
    if record is None:
        raise BadInputError(f"unknown pool {name!r} (see `infercache kv list`)")
    path = Path(record["path"])
    try:
        return os.open(path, os.O_RDWR), path
    except FileNotFoundError:
        raise BadInputError(
            f"pool {name!r}: backing file {path} is gone (stale registry entry; `infercache kv delete {name}`)"
        ) from None


def destroy(name: str, data_dir: Any) -> None:
    """Delete the backing file and the registration (processes still attached keep their mapping)."""
    with registry.locked(data_dir) as reg_file:
        pools = registry.load(data_dir)
        record = pools.get(name)
        if record is None:
            raise BadInputError(f"unknown pool {name!r} (see `infercache kv list`)")
        path = Path(record["path"])
        try:
            with open(path, "rb") as handle:
                head = handle.read(8)
            if int.from_bytes(head.ljust(8, b"\0"), "little") != MAGIC:
                raise InfercacheError(f"{path} is not an infercache pool; not deleting it")
            path.unlink()
        except FileNotFoundError:
            log.warning("pool %s: backing file %s was already gone", name, path)
        del pools[name]
        registry.save(reg_file, pools)
    log.info("deleted pool %s (%s)", name, path)


def registered(data_dir: Any) -> Iterator[tuple[str, dict[str, Any], Path, bool]]:
    """(name, record, backing path, whether it exists) of every registered pool, by name."""
    for name, record in sorted(registry.load(data_dir).items()):
        path = Path(record["path"])
        yield name, record, path, path.exists()
