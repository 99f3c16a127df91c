"""The block allocator on its own: correctness against a reference model, coalescing,
exhaustion, rebuild and check, and a huge (64 GiB-geometry) sparse instance."""

from __future__ import annotations

import mmap
import random

import pytest

from infercache.kv.allocator import Allocator


def _alloc(n_blocks: int) -> Allocator:
    buf = mmap.mmap(-1, Allocator.metadata_bytes(n_blocks))  # anonymous: zero-filled and sparse, like a new pool
    return Allocator(memoryview(buf), n_blocks, init=True)


def test_fresh_allocator_is_one_free_extent() -> None:
    a = _alloc(1000)
    assert a.free_blocks == 1000
    assert a.free_extents() == [(0, 1000)]
    assert a.check([]) == []


def test_alloc_free_coalesces_both_sides() -> None:
    a = _alloc(100)
    x, y, z = a.alloc(10), a.alloc(20), a.alloc(30)
    assert (x, y, z) == (0, 10, 30)
    assert a.free_blocks == 40
    a.free(x, 10)
    a.free(z, 30)
    assert sorted(a.free_extents()) == [(0, 10), (30, 70)]  # z merged with the tail
    a.free(y, 20)
    assert a.free_extents() == [(0, 100)]  # y merged left and right
    assert a.check([]) == []


def test_exact_fit_and_exhaustion() -> None:
    a = _alloc(64)
    blocks = [a.alloc(8) for _ in range(8)]
    assert sorted(blocks) == list(range(0, 64, 8))
    assert a.alloc(1) == -1
    a.free(blocks[3], 8)
    assert a.alloc(9) == -1  # 8 free blocks, but not 9
    assert a.alloc(8) == blocks[3]
    assert a.alloc(0) == -1


def test_fragmented_request_finds_a_large_enough_extent_in_its_own_class() -> None:
    """Extents of 100 and 103 blocks share a size class; asking 103 must find the 103."""
    a = _alloc(1000)
    parts = [a.alloc(n) for n in (100, 1, 103, 1)]
    rest = a.alloc(a.free_blocks)
    a.free(parts[0], 100)
    a.free(parts[2], 103)
    assert a.alloc(103) == parts[2]
    assert a.check([(parts[1], 1), (parts[2], 103), (parts[3], 1), (rest, 1000 - 205)]) == []


def test_random_workload_matches_a_reference_model() -> None:
    n = 1 << 14
    a = _alloc(n)
    rng = random.Random(7)
    live: dict[int, int] = {}
    owner = [0] * n  # reference: which allocation owns each block (0 = free)
    token = 0
    for step in range(6000):
        if live and (rng.random() < 0.47 or a.free_blocks < 64):
            start = rng.choice(list(live))
            size = live.pop(start)
            a.free(start, size)
            owner[start : start + size] = [0] * size
        else:
            size = rng.choice([1, 1, 2, 3, 7, 8, 9, 15, 16, 17, 100, 255, 256, 1000])
            start = a.alloc(size)
            if start < 0:
                assert max_run(owner) < size, "alloc failed although a large enough free run exists"
                continue
            assert all(o == 0 for o in owner[start : start + size]), "allocated blocks already in use"
            token += 1
            owner[start : start + size] = [token] * size
            live[start] = size
        if step % 500 == 0:
            assert a.check(live.items()) == []
            assert a.free_blocks == owner.count(0)
    assert a.check(live.items()) == []


def max_run(owner: list[int]) -> int:
    best = run = 0
    for o in owner:
        run = run + 1 if o == 0 else 0
        best = max(best, run)
    return best


def test_check_finds_damage_and_rebuild_repairs_it() -> None:
    a = _alloc(4096)
    used = [(a.alloc(n), n) for n in (5, 50, 500, 7, 70)]
    a.free(used[1][0], 50)
    used.pop(1)
    assert a.check(used) == []
    a._h[0] += 1  # free counter
    assert any("free counter" in p for p in a.check(used))
    a.rebuild(used)
    assert a.check(used) == []
    # the allocator thinks a used extent is free: overlap
    a.free(used[0][0], used[0][1])
    assert any("overlap" in p for p in a.check(used))
    a.rebuild(used)
    assert a.check(used) == []
    # a used extent the allocator forgot: its blocks are leaked
    assert any("leaked" in p for p in a.check(used[1:]))
    assert a.free_blocks == 4096 - sum(n for _, n in used)


def test_huge_sparse_geometry_64_gib() -> None:
    """16 Mi blocks of 4 KiB: metadata is 256 MiB, but a fresh allocator touches only a few pages."""
    n = (64 << 30) // 4096
    a = _alloc(n)
    starts = [a.alloc(256) for _ in range(1000)]
    assert starts == [i * 256 for i in range(1000)]
    tail = a.alloc(n - 256 * 1000)
    assert tail == 256 * 1000 and a.free_blocks == 0
    for s in starts[::2]:
        a.free(s, 256)
    assert a.free_blocks == 500 * 256
    assert a.alloc(257) == -1  # every hole is 256 blocks
    a.free(starts[1], 256)  # joins two holes and itself: 768
    assert a.alloc(768) == 0


def test_bad_geometry() -> None:
    with pytest.raises(ValueError):
        Allocator(memoryview(bytearray(8192)), 0)
