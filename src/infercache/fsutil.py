"""Filesystem helpers every part needs: atomic writes and containment checks."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, BinaryIO, Iterator


_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _create_temp(target: Path, mode: int) -> tuple[int, str]:
    """A new file beside `target`, created with `mode` (the kernel applies the umask, as open() does)."""
    for _ in range(100):
        tmp = str(target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, _TEMP_FLAGS, mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temp name beside {target}")


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or create in directory `path` durable (the entry lives in the directory)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: int | None = None, fsync: bool = True) -> Iterator[BinaryIO]:
    """A binary file that appears at `path` only when the block ends without error.

    Written under a temp name beside `path` (same filesystem) and renamed: readers see the old
    content or the new, never half; any exception removes the temp file and leaves `path`
    untouched. Mode: `mode`, else the old file's, else the umask default (the temp file is
    created with it, so the process umask is never changed and the file is never more open than
    that while written). `fsync`: the data before the rename and the directory after it, so the
    new content survives a crash once the block has returned.
    """
    target = Path(path)
    keep: int | None = mode
    if keep is None:
        try:
            keep = target.stat().st_mode & 0o7777
        except FileNotFoundError:
            keep = None
    fd, tmp = _create_temp(target, 0o666 if keep is None else keep & 0o777)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        if keep is not None:
            os.chmod(tmp, keep)  # exactly, whatever the umask took away
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if fsync:
        fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int | None = None) -> None:
    """Write `data` to `path` atomically (see :func:`atomic_file`)."""
    with atomic_file(path, mode) as handle:
        handle.write(data)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, mode: int | None = None) -> None:
    """JSON flavour of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, json.dumps(obj, indent=None).encode(), mode=mode)


def is_within(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> bool:
    """True when `path`, with symlinks resolved, lies inside `root` (also resolved)."""
    try:
        resolved = Path(path).resolve(strict=False)
        base = Path(root).resolve(strict=False)
    except (OSError, RuntimeError):  # RuntimeError: symlink loop on older Pythons
        return False
    return resolved == base or base in resolved.parents
