"""Helpers for tests: copying real caches, requiring external tools."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest


def require_tool(name: str, apt_package: str | None = None) -> str:
    """Path of `name`; under CI=true a missing tool fails the test, elsewhere it skips.

    `make test` installs every tool the suite needs, so a miss under CI is a broken set-up.
    """
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if path:
        return path
    message = f"{name} not found (apt-get install {apt_package or name}; `make test` does this)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def require_module(name: str) -> Any:
    """Import `name`; under CI=true a missing module fails (the test set-up installs it), elsewhere it skips."""
    if os.environ.get("CI") == "true":
        return importlib.import_module(name)
    return pytest.importorskip(name)


def destroy_pool_if_present(name: str, data_dir: Path | str | None = None) -> None:
    """Test teardown: destroy a KV pool the test may already have destroyed (or never created).

    Only "unknown pool" is ignored; any other failure is a leak (a pool left in /dev/shm) and fails."""
    from infercache.errors import BadInputError
    from infercache.kv.pool import Pool

    try:
        Pool.destroy(name, data_dir=data_dir)
    except BadInputError as exc:
        if not str(exc).startswith("unknown pool"):
            raise


def copy_triton_cache(src: Path, dest: Path) -> Path:
    """Copy a Triton cache and rewrite group files to the new location, as Triton needs."""
    shutil.copytree(src, dest, symlinks=True)
    for group in dest.glob("*/__grp__*.json"):
        data = json.loads(group.read_text())
        children = data.get("child_paths")
        if isinstance(children, dict):
            data["child_paths"] = {name: str(group.parent / name) for name in children}
            group.write_text(json.dumps(data))
    return dest


def run_cli(*args: str, env: dict[str, str] | None = None, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the installed `infercache` entry point in a subprocess, as a user would."""
    import sys

    cmd = [sys.executable, "-m", "infercache.cli.app", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} exited {result.returncode}\nstdout:{result.stdout}\nstderr:{result.stderr}")
    return result
