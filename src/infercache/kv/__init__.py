"""KV caches: named shared-memory pools (`Pool`) that many processes on a host attach to, and the
prefix-keyed chunk `Engine` over them.

Importing this package stays cheap for the CLI: these modules import numpy, torch, redis and
zstandard only inside the functions that need them.
"""

from __future__ import annotations

from infercache.kv.config import EngineConfig
from infercache.kv.engine import Engine
from infercache.kv.policies import POLICIES
from infercache.kv.pool import CheckReport, Pool

__all__ = ["Pool", "POLICIES", "CheckReport", "Engine", "EngineConfig"]
