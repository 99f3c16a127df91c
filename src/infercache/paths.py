"""Default locations: the data dir and the caches' own default directories."""

from __future__ import annotations

import getpass
import os
import tempfile
from pathlib import Path

DATA_DIR_ENV = "INFERCACHE_DATA_DIR"


def data_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Where the catalog and pool registry live: flag, then env, then the platform data dir."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("infercache", appauthor=False))


def triton_cache_dir() -> Path:
    """$TRITON_CACHE_DIR, else $TRITON_HOME/.triton/cache, else ~/.triton/cache."""
    if os.environ.get("TRITON_CACHE_DIR"):
        return Path(os.environ["TRITON_CACHE_DIR"]).expanduser()
    home = os.environ.get("TRITON_HOME") or str(Path.home())
    return Path(home).expanduser() / ".triton" / "cache"


def vllm_cache_root() -> Path:
    """$VLLM_CACHE_ROOT, else $XDG_CACHE_HOME/vllm, else ~/.cache/vllm."""
    if os.environ.get("VLLM_CACHE_ROOT"):
        return Path(os.environ["VLLM_CACHE_ROOT"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "vllm"
    return Path.home() / ".cache" / "vllm"


def inductor_cache_dir() -> Path:
    """$TORCHINDUCTOR_CACHE_DIR, else <tmp>/torchinductor_<user>."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]).expanduser()
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return Path(tempfile.gettempdir()) / f"torchinductor_{user}"
