"""Shared fixtures: a real Triton cache compiled once per session, and tool checks.

The cache is made by Triton's own AOT compiler for four targets (no GPU needed);
each test that changes it gets its own copy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.helpers import require_module, require_tool  # noqa: F401  (re-exported for test modules)

if TYPE_CHECKING:
    from tests.torchcache import TorchCache

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


@pytest.fixture(scope="session")
def sample_cache_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Triton cache: 3 kernels × 4 targets (cuda:80/90, hip:gfx90a/gfx942) × num_warps 4/8."""
    from infercache.testing.samples import build_sample_cache

    root = tmp_path_factory.mktemp("triton-master") / "cache"
    build_sample_cache(root)
    return root


@pytest.fixture()
def triton_cache(sample_cache_master: Path, tmp_path: Path) -> Path:
    """A private copy of the sample cache with group files rewritten to the copy's location."""
    from tests.helpers import copy_triton_cache

    return copy_triton_cache(sample_cache_master, tmp_path / "triton-cache")


@pytest.fixture(scope="session")
def torch_cache_master(tmp_path_factory: pytest.TempPathFactory) -> "TorchCache":
    """A real torch.compile (Inductor, CPU) cache of three small models, compiled once per session."""
    require_module("torch")
    from tests.torchcache import build_master

    return build_master(tmp_path_factory.mktemp("torch-master"))


@pytest.fixture()
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated infercache data dir (catalog, pool registry)."""
    path = tmp_path / "data"
    path.mkdir()
    monkeypatch.setenv("INFERCACHE_DATA_DIR", str(path))
    return path
