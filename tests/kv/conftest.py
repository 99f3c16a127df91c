"""Fixtures for the pool tests: unique pool names (pools under /dev/shm are host-wide), always destroyed."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.helpers import destroy_pool_if_present


@pytest.fixture()
def make_pool(data_dir: Path) -> Iterator[Callable[..., Any]]:
    """make_pool(**create_kwargs) -> an open Pool with a unique name; closed and destroyed afterwards."""
    from infercache.kv import Pool

    made: list[Any] = []

    def make(**kwargs: Any) -> Any:
        name = kwargs.pop("name", None) or f"t-pool-{uuid.uuid4().hex[:10]}"
        pool = Pool.create(name, data_dir=data_dir, **kwargs)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.close()
        destroy_pool_if_present(pool.name, data_dir)
