"""Every prune strategy on real caches: exact bytes, Triton hits kept, catalog in line with the disk."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from infercache.errors import BadInputError
from infercache.kernels.catalog import Catalog
from infercache.kernels.prune import plan_prune
from infercache.kernels.query import KernelFilter, query
from infercache.testing.replicate import replicate_entry
from infercache.testing.samples import DEFAULT_TARGETS, SAMPLE_KERNELS, compile_sample
from infercache.kernels.stats import compute_stats
from infercache.kernels.triton_entry import IR_TYPES, TritonEntry, parse_entry
from tests.kernels.kutil import SAMPLE_ENTRIES, do_index, du, entries, group_of, set_age


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def assert_catalog_matches_disk(cat: Catalog, root: Path) -> None:
    on_disk = {e.key: e for e in entries(root)}
    rows = {r.key: r for r in query(cat, KernelFilter.build(cache_dirs=[root]))}
    assert set(rows) == set(on_disk)
    for key, r in rows.items():
        assert r.total_size == on_disk[key].total_size
        assert dict(r.files) == on_disk[key].files_by_type()
    s = do_index(cat, root)
    assert (s.new, s.updated, s.removed) == (0, 0, 0)


def test_ir_only_keeps_every_kernel_a_triton_hit(triton_cache: Path, catalog: Catalog) -> None:
    do_index(catalog, triton_cache)
    before = du(triton_cache)
    ir_bytes = compute_stats(catalog).reclaimable_ir_bytes
    plan = plan_prune(catalog)
    assert plan.strategy == "ir" and len(plan.actions) == SAMPLE_ENTRIES
    result = plan.execute(catalog)
    assert result.entries_pruned == SAMPLE_ENTRIES and result.skipped == ()
    assert before - du(triton_cache) == plan.bytes_freed == result.bytes_freed
    assert plan.bytes_freed > ir_bytes * 0.9  # group files shrink a little too
    for e in entries(triton_cache):
        assert not any(f.type in IR_TYPES for f in e.files)
        assert set(group_of(e.path)["child_paths"]) == {f.name for f in e.files if f.type != "group"}
        assert all(Path(p).exists() for p in group_of(e.path)["child_paths"].values())
    assert_catalog_matches_disk(catalog, triton_cache)
    assert compute_stats(catalog).reclaimable_ir_bytes == 0
    # The proof: the same compiles are cache hits (the listener reports no compile ran).
    hits = [
        compile_sample(triton_cache, k, t, num_warps=w).cache_hit
        for t in DEFAULT_TARGETS for k in SAMPLE_KERNELS for w in (4, 8)
    ]
    assert hits == [True] * SAMPLE_ENTRIES
    # Nothing left to prune.
    assert plan_prune(catalog).actions == ()


def test_ir_prune_respects_filters_and_list_form(triton_cache: Path, catalog: Catalog) -> None:
    es = entries(triton_cache)
    listed = next(e for e in es if e.name == "row_sum_kernel" and e.backend == "hip")
    names = sorted(group_of(listed.path)["child_paths"])
    listed.group_file.write_text(json.dumps({"child_paths": names}))
    do_index(catalog, triton_cache)
    untouched = {str(e.path): snapshot(e.path) for e in es if e.name != "row_sum_kernel"}
    plan = plan_prune(catalog, KernelFilter.build(name="row_sum_kernel"))
    assert {a.name for a in plan.actions} == {"row_sum_kernel"} and len(plan.actions) == 8
    plan.execute(catalog)
    for e in es:
        if e.name != "row_sum_kernel":
            assert snapshot(e.path) == untouched[str(e.path)]
    group = group_of(listed.path)["child_paths"]
    assert isinstance(group, list) and group == sorted(n for n in names if n.rsplit(".", 1)[1] not in IR_TYPES)
    assert_catalog_matches_disk(catalog, triton_cache)


def test_dry_run_changes_nothing(triton_cache: Path, catalog: Catalog) -> None:
    do_index(catalog, triton_cache)
    before = snapshot(triton_cache)
    for strategy in ("ir", "full", "deduplicate", "garbage"):
        plan_prune(catalog, strategy=strategy)
    plan_prune(catalog, strategy="max_size", max_size=0)
    assert snapshot(triton_cache) == before
    assert len(query(catalog)) == SAMPLE_ENTRIES


def test_full_prune(triton_cache: Path, catalog: Catalog) -> None:
    do_index(catalog, triton_cache)
    before = du(triton_cache)
    plan = plan_prune(catalog, KernelFilter.build(backend="rocm", arch="gfx942"), "full")
    assert len(plan.actions) == 6 and all(a.kind == "dir" for a in plan.actions)
    result = plan.execute(catalog)
    assert result.entries_removed == 6
    assert before - du(triton_cache) == plan.bytes_freed == result.bytes_freed
    assert all(not a.path.exists() for a in plan.actions)
    assert {r.arch for r in query(catalog)} == {"80", "90", "gfx90a"}
    assert catalog.conn.execute(
        "SELECT count(*) FROM files WHERE entry_id NOT IN (SELECT id FROM entries)").fetchone()[0] == 0
    assert_catalog_matches_disk(catalog, triton_cache)


def test_deduplicate_keeps_newest_and_hits(triton_cache: Path, catalog: Catalog) -> None:
    """Copies identical apart from `hash` (older) are removed; the real, newest entries still hit."""
    originals = [e for e in entries(triton_cache) if e.arch == "90" and e.num_warps == 4]
    replicas = []
    for e in originals:
        for i in range(2):
            r = replicate_entry(e.path, triton_cache, f"dup{i}")
            set_age(r, 3600 * (i + 1))
            replicas.append(r)
    do_index(catalog, triton_cache)
    before = du(triton_cache)
    plan = plan_prune(catalog, strategy="deduplicate")
    assert sorted(a.path for a in plan.actions) == sorted(replicas)
    result = plan.execute(catalog)
    assert result.entries_removed == len(replicas)
    assert before - du(triton_cache) == plan.bytes_freed
    assert {e.key for e in entries(triton_cache)} >= {e.key for e in originals}
    assert len(entries(triton_cache)) == SAMPLE_ENTRIES
    for e in originals:
        assert compile_sample(triton_cache, e.name, "cuda:90", num_warps=4).cache_hit is True
    assert plan_prune(catalog, strategy="deduplicate").actions == ()
    assert_catalog_matches_disk(catalog, triton_cache)


def test_max_size_removes_least_recently_used(triton_cache: Path, catalog: Catalog) -> None:
    do_index(catalog, triton_cache)
    rows = query(catalog, sort="key")
    total = sum(r.total_size for r in rows)
    # Two entries were used long ago (tracked access), one recently though it is the oldest on disk.
    catalog.record_usage(rows[0].key, hits=1, last_access=1000.0)
    catalog.record_usage(rows[1].key, hits=1, last_access=2000.0)
    set_age(rows[2].path, 30 * 86400)
    catalog.record_usage(rows[2].key, hits=1, last_access=time.time())
    do_index(catalog, triton_cache, rescan=True)
    limit = total - rows[0].total_size - 1
    plan = plan_prune(catalog, strategy="max_size", max_size=limit)
    assert [a.key for a in plan.actions] == [rows[0].key, rows[1].key]
    plan.execute(catalog)
    assert sum(r.total_size for r in query(catalog)) <= limit
    assert rows[2].path.exists()
    # Already fits: nothing to do.
    assert plan_prune(catalog, strategy="max_size", max_size=total).actions == ()
    with pytest.raises(BadInputError):
        plan_prune(catalog, strategy="max_size")


def _age(path: Path, seconds: float) -> None:
    ts = time.time() - seconds
    os.utime(path, (ts, ts), follow_symlinks=False)


def test_garbage(triton_cache: Path, catalog: Catalog, tmp_path: Path) -> None:
    stale = triton_cache / "tmp.pid_11_old"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "x.cubin").write_bytes(b"0" * 100)
    fresh = triton_cache / "tmp.pid_12_new"
    fresh.mkdir()
    empty = triton_cache / ("E" * 52)
    empty.mkdir()
    stray = triton_cache / "stray.txt"
    stray.write_bytes(b"s" * 7)
    es = entries(triton_cache)
    host = es[0]
    inner_tmp = host.path / "tmp.pid_13_in"
    inner_tmp.mkdir()
    (inner_tmp / "k.ttir").write_bytes(b"t" * 5)
    orphan = host.path / "unlisted.bin"
    orphan.write_bytes(b"o" * 3)
    launcher = triton_cache / ("c" * 64)
    launcher.mkdir()
    (launcher / "cuda_utils.so").write_bytes(b"\x7fELF")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    (triton_cache / "tmp.pid_14_link").symlink_to(outside)
    for p in (stale, empty, stray, inner_tmp, orphan, launcher):
        _age(p, 3600)
    do_index(catalog, triton_cache)
    plan = plan_prune(catalog, strategy="garbage")
    assert {a.path for a in plan.actions} == {stale, empty, stray, inner_tmp, orphan}
    assert plan.bytes_freed == 100 + 7 + 5 + 3
    before = du(triton_cache)
    result = plan.execute(catalog)
    assert result.paths_removed == 5 and before - du(triton_cache) == plan.bytes_freed
    assert fresh.exists() and launcher.exists() and (outside / "precious").exists()
    assert isinstance(parse_entry(host.path), TritonEntry)
    assert plan_prune(catalog, strategy="garbage").actions == ()
    assert_catalog_matches_disk(catalog, triton_cache)
    with pytest.raises(BadInputError, match="--garbage"):
        plan_prune(catalog, KernelFilter.build(name="add_kernel"), "garbage")


def test_never_through_symlinks_or_outside_roots(triton_cache: Path, catalog: Catalog, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    victim = entries(triton_cache)[0]
    shutil.copytree(victim.path, outside / victim.key)
    (triton_cache / ("S" * 52)).symlink_to(outside / victim.key)
    do_index(catalog, triton_cache)
    keep = snapshot(outside)
    plan_prune(catalog, strategy="full").execute(catalog)
    assert snapshot(outside) == keep
    assert (triton_cache / ("S" * 52)).is_symlink()
    assert entries(triton_cache) == []


def test_entries_changed_after_planning_are_left_alone(triton_cache: Path, catalog: Catalog) -> None:
    do_index(catalog, triton_cache)
    plan = plan_prune(catalog)
    changed = plan.actions[0]
    group = next(changed.path.glob("__grp__*.json"))
    data = json.loads(group.read_text())
    data["child_paths"][f"{changed.name}.extra"] = str(changed.path / f"{changed.name}.extra")
    (changed.path / f"{changed.name}.extra").write_text("new")
    group.write_text(json.dumps(data))
    result = plan.execute(catalog)
    assert [p for p, _ in result.skipped] == [str(changed.path)]
    assert all((changed.path / f).exists() for f in changed.files)
    assert result.entries_pruned == SAMPLE_ENTRIES - 1
    # Execution refuses roots that are no longer in the catalog.
    plan2 = plan_prune(catalog, strategy="full")
    catalog.conn.execute("DELETE FROM roots")
    result = plan2.execute(catalog)
    assert result.entries_removed == 0 and len(result.skipped) == len(plan2.actions)
    assert len(entries(triton_cache)) == SAMPLE_ENTRIES


def test_vllm_cache_ir_prune_keeps_hits(sample_cache_master: Path, tmp_path: Path, catalog: Catalog) -> None:
    """vLLM rows (hash, rank, prefix) prune like Triton ones; the Triton cache inside still hits."""
    from tests.kernels import layouts

    root = tmp_path / "vllm"
    lay = layouts.make_vllm_legacy(root, sample_cache_master, ranks=("rank_0_0", "rank_1_0"))
    do_index(catalog, root)
    plan = plan_prune(catalog, KernelFilter.build(mode="vllm", backend="cuda", arch="80"))
    assert len(plan.actions) == 2 * 6
    result = plan.execute(catalog)
    assert result.entries_pruned == 12 and result.skipped == ()
    for cache in lay.triton_dirs:
        for kernel in SAMPLE_KERNELS:
            for warps in (4, 8):
                assert compile_sample(cache, kernel, "cuda:80", num_warps=warps).cache_hit is True
    rows = query(catalog, KernelFilter.build(cache_dirs=[root], arch="80"))
    assert len(rows) == 12 and all(not any(t in IR_TYPES for t in r.files) for r in rows)
    assert {r.vllm["rank"] for r in rows} == {"rank_0_0", "rank_1_0"}
    plan = plan_prune(catalog, KernelFilter.build(cache_dirs=[root], arch="90"), "full")
    plan.execute(catalog)
    assert len(query(catalog, KernelFilter.build(cache_dirs=[root]))) == 2 * SAMPLE_ENTRIES - 12


def test_garbage_with_a_cache_dir_inside_the_root_stays_in_it(sample_cache_master: Path, tmp_path: Path,
                                                             catalog: Catalog) -> None:
    """`--garbage --cache-dir <one rank>` of an indexed vLLM root leaves the other ranks' leftovers alone."""
    from tests.kernels.layouts import make_vllm_legacy

    root = tmp_path / "vllm"
    layout = make_vllm_legacy(root, sample_cache_master, ranks=("rank_0_0", "rank_1_0"))
    stale = []
    for cache in layout.triton_dirs:
        leftover = cache / "tmp.pid_11_old"
        leftover.mkdir()
        (leftover / "x.cubin").write_bytes(b"0" * 10)
        _age(leftover, 3600)
        stale.append(leftover)
    do_index(catalog, root, mode="vllm")
    assert {a.path for a in plan_prune(catalog, strategy="garbage").actions} == set(stale)
    rank0 = layout.triton_dirs[0].parent
    plan = plan_prune(catalog, KernelFilter.build(cache_dirs=[rank0]), "garbage")
    assert [a.path for a in plan.actions] == [stale[0]]
