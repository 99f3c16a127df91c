"""Fixtures of the kernel-catalog tests (the real Triton caches come from tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from infercache.kernels.catalog import Catalog


@pytest.fixture()
def catalog(data_dir: Path) -> Iterator[Catalog]:
    """A fresh catalog in the test's isolated data dir (the one the CLI also uses)."""
    with Catalog.open(data_dir) as cat:
        yield cat
