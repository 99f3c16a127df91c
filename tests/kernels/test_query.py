"""Every `list` filter, sorting and limits, against a real indexed cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from infercache.errors import BadInputError
from infercache.kernels.catalog import Catalog
from infercache.kernels.query import KernelFilter, query
from tests.kernels.kutil import SAMPLE_ENTRIES, do_index, entries, set_age

DAY = 86400


@pytest.fixture()
def indexed(triton_cache: Path, catalog: Catalog) -> Catalog:
    """The sample cache with ages: cuda:80 entries 10 days old, hip:gfx90a 2 hours, others fresh."""
    for e in entries(triton_cache):
        if e.arch == "80":
            set_age(e.path, 10 * DAY)
        elif e.arch == "gfx90a":
            set_age(e.path, 2 * 3600)
    do_index(catalog, triton_cache)
    return catalog


def keys(rows: list) -> set[tuple[str, str, str, int]]:
    return {(r.name, r.backend, r.arch, r.num_warps) for r in rows}


def q(cat: Catalog, **kw: object) -> list:
    return query(cat, KernelFilter.build(**kw))  # type: ignore[arg-type]


def test_name_and_glob(indexed: Catalog) -> None:
    assert len(q(indexed)) == SAMPLE_ENTRIES
    rows = q(indexed, name="add_kernel")
    assert len(rows) == 8 and {r.name for r in rows} == {"add_kernel"}
    assert q(indexed, name="add") == []  # exact, not a prefix
    assert {r.name for r in q(indexed, name_like="*_kernel")} == {"add_kernel", "matmul_kernel", "row_sum_kernel"}
    assert {r.name for r in q(indexed, name_like="*sum*")} == {"row_sum_kernel"}
    assert len(q(indexed, name_like="[am]*")) == 16


def test_backend_with_rocm_alias(indexed: Catalog) -> None:
    assert {r.backend for r in q(indexed, backend="cuda")} == {"cuda"}
    hip = q(indexed, backend="hip")
    assert len(hip) == 12 and keys(q(indexed, backend="rocm")) == keys(hip) == keys(q(indexed, backend="ROCm"))
    with pytest.raises(BadInputError, match="'metal'"):
        KernelFilter.build(backend="metal")


@pytest.mark.parametrize("arch,expected", [("80", 6), ("90", 6), ("sm90", 6), ("sm_80", 6), ("gfx90a", 6),
                                           ("gfx942", 6), ("gfx1100", 0)])
def test_arch(indexed: Catalog, arch: str, expected: int) -> None:
    rows = q(indexed, arch=arch)
    assert len(rows) == expected
    assert all(r.arch == arch.replace("sm_", "").replace("sm", "") for r in rows)


def test_older_and_younger(indexed: Catalog) -> None:
    assert {r.arch for r in q(indexed, older_than="7d")} == {"80"}
    assert {r.arch for r in q(indexed, older_than="1h")} == {"80", "gfx90a"}
    assert {r.arch for r in q(indexed, older_than="90m", younger_than="1d")} == {"gfx90a"}
    assert {r.arch for r in q(indexed, younger_than="30m")} == {"90", "gfx942"}
    assert {r.arch for r in q(indexed, younger_than="2w")} == {"80", "90", "gfx90a", "gfx942"}
    # 0 is a real bound (MCM ignored it): everything is older than now, nothing younger than 0 s.
    assert len(q(indexed, older_than="0d")) == SAMPLE_ENTRIES
    assert q(indexed, younger_than="0s") == []
    with pytest.raises(BadInputError, match="'3 fortnights'"):
        KernelFilter.build(older_than="3 fortnights")


def test_cache_hit_bounds(indexed: Catalog) -> None:
    rows = q(indexed, name="add_kernel")
    indexed.record_usage(rows[0].key, hits=3)
    indexed.record_usage(rows[1].key, hits=10, misses=2)
    assert {r.key for r in q(indexed, hits_higher=2)} == {rows[0].key, rows[1].key}
    assert {r.key for r in q(indexed, hits_higher=5)} == {rows[1].key}
    assert len(q(indexed, hits_lower=1)) == SAMPLE_ENTRIES - 2
    assert {r.key for r in q(indexed, hits_lower=10, hits_higher=0)} == {rows[0].key}
    with pytest.raises(BadInputError):
        KernelFilter.build(hits_lower=-1)


def test_cache_dir_and_mode(indexed: Catalog, triton_cache: Path, sample_cache_master: Path, tmp_path: Path) -> None:
    from tests.kernels import layouts

    root = tmp_path / "vllm"
    layouts.make_vllm_legacy(root, sample_cache_master)
    do_index(indexed, root)
    assert len(q(indexed)) == 2 * SAMPLE_ENTRIES
    assert {r.mode for r in q(indexed, cache_dirs=[root])} == {"vllm"}
    assert {r.mode for r in q(indexed, cache_dirs=[triton_cache])} == {"triton"}
    # A sub-directory of a root selects the entries below it.
    sub = next(root.rglob("triton_cache"))
    assert len(q(indexed, cache_dirs=[sub])) == SAMPLE_ENTRIES
    assert len(q(indexed, mode="vllm")) == SAMPLE_ENTRIES and len(q(indexed, mode="auto")) == 2 * SAMPLE_ENTRIES
    with pytest.raises(BadInputError, match="does not exist"):
        KernelFilter.build(cache_dirs=[tmp_path / "missing"])
    with pytest.raises(BadInputError, match="'tpu'"):
        KernelFilter.build(mode="tpu")


def test_sort_and_limit(indexed: Catalog) -> None:
    by_size = query(indexed, sort="size:desc")
    sizes = [r.total_size for r in by_size]
    assert sizes == sorted(sizes, reverse=True)
    assert [r.key for r in query(indexed, sort="size:desc", limit=3)] == [r.key for r in by_size[:3]]
    oldest = query(indexed, sort="modified", limit=6)
    assert {r.arch for r in oldest} == {"80"}
    names = [r.name for r in query(indexed)]
    assert names == sorted(names)
    assert query(indexed, limit=0) == []
    for bad in ("colour", "size:sideways"):
        with pytest.raises(BadInputError, match=bad.split(":")[-1]):
            query(indexed, sort=bad)


def test_combined_filters(indexed: Catalog) -> None:
    rows = q(indexed, backend="rocm", arch="gfx90a", name_like="mat*", younger_than="7d")
    assert keys(rows) == {("matmul_kernel", "hip", "gfx90a", 4), ("matmul_kernel", "hip", "gfx90a", 8)}
