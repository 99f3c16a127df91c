"""KV caches: named shared-memory pools (`Pool`) that many processes on a host attach to.

Imports are lazy so `import infercache.kv` stays cheap for the CLI.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Pool", "POLICIES", "CheckReport", "Engine", "EngineConfig"]


def __getattr__(name: str) -> Any:
    if name == "POLICIES":
        from infercache.kv.policies import POLICIES

        return POLICIES
    if name in ("Pool", "CheckReport"):
        from infercache.kv import pool

        return getattr(pool, name)
    if name == "Engine":
        from infercache.kv.engine import Engine

        return Engine
    if name == "EngineConfig":
        from infercache.kv.config import EngineConfig

        return EngineConfig
    raise AttributeError(f"module 'infercache.kv' has no attribute {name!r}")
