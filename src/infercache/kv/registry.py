"""Pool registry: name -> backing file and tier, a small JSON file in the data dir.

Why a registry at all: the backing file alone cannot tell `kv list` where disk-tier pools
live, and names must be unique per data dir. It is written atomically (temp + rename),
mode 0600, under an `flock` on a sibling lock file so concurrent creates cannot lose each
other's records. Stale records (file gone) are tolerated: callers skip them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from infercache.errors import BadInputError
from infercache.fsutil import atomic_write_json
from infercache.paths import data_dir as resolve_data_dir

log = logging.getLogger(__name__)

REGISTRY_FILE = "kv-pools.json"
LOCK_FILE = "kv-pools.lock"
SHM_DIR = Path("/dev/shm")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def validate_name(name: str) -> str:
    """Pool names become file names: letters, digits, '.', '_', '-' only (BadInputError otherwise)."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise BadInputError(
            f"bad pool name {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def registry_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    path = resolve_data_dir(data_dir)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def shm_path(name: str, data_dir: str | os.PathLike[str] | None) -> Path:
    """Backing file of a cpu-tier pool: /dev/shm/infercache-<datadir tag>-<name>.

    The tag (a hash of the data dir) keeps two users or two data dirs that pick the same
    pool name from clobbering each other's segment.
    """
    tag = hashlib.blake2b(str(resolve_data_dir(data_dir).resolve()).encode(), digest_size=4).hexdigest()
    return SHM_DIR / f"infercache-{tag}-{name}"


@contextmanager
def locked(data_dir: str | os.PathLike[str] | None) -> Iterator[Path]:
    """Hold the registry lock; yields the registry file path."""
    root = registry_dir(data_dir)
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield root / REGISTRY_FILE
    finally:
        os.close(fd)


def load(data_dir: str | os.PathLike[str] | None) -> dict[str, dict[str, Any]]:
    """All records (possibly stale); an unreadable registry is reported and treated as empty."""
    path = resolve_data_dir(data_dir) / REGISTRY_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("pool registry %s unreadable (%s); treating it as empty", path, exc)
        return {}
    pools = data.get("pools") if isinstance(data, dict) else None
    return {k: v for k, v in (pools or {}).items() if isinstance(v, dict) and "path" in v}


def save(path: Path, pools: dict[str, dict[str, Any]]) -> None:
    atomic_write_json(path, {"schema": 1, "pools": pools}, mode=0o600)


def lookup(data_dir: str | os.PathLike[str] | None, name: str) -> dict[str, Any] | None:
    return load(data_dir).get(name)
