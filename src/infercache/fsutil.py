"""Filesystem helpers every part needs: atomic writes and containment checks."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: int | None = None, fsync: bool = True) -> Iterator[BinaryIO]:
    """A binary file that appears at `path` only when the block ends without error.

    Written under a temp name beside `path` (same filesystem), fsynced, chmod'ed (`mode`, else
    the old file's mode, else the umask default) and renamed: readers see the old content or
    the new, never half; any exception removes the temp file and leaves `path` untouched.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        elif target.exists():
            os.chmod(tmp, target.stat().st_mode & 0o7777)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


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
