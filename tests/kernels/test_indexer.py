"""Indexing real caches into the catalog: full, incremental, vanished entries, bad input, layouts."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from infercache.errors import BadInputError
from infercache.kernels.catalog import Catalog
from infercache.kernels.indexer import index
from infercache.kernels.query import KernelFilter, query
from tests.kernels import layouts
from tests.kernels.kutil import SAMPLE_ENTRIES, add_bad_content, do_index, entries


def test_full_then_unchanged(triton_cache: Path, catalog: Catalog) -> None:
    seen: list[tuple[int, int]] = []
    s = index(catalog, [triton_cache], progress=lambda done, total: seen.append((done, total)))
    assert (s.new, s.updated, s.unchanged, s.removed, s.skipped_total) == (SAMPLE_ENTRIES, 0, 0, 0, 0)
    assert s.entries == SAMPLE_ENTRIES and s.modes == ("triton",)
    assert s.total_size == sum(e.total_size for e in entries(triton_cache))
    assert seen[0] == (0, SAMPLE_ENTRIES) and seen[-1] == (SAMPLE_ENTRIES, SAMPLE_ENTRIES)
    assert catalog.conn.execute("SELECT count(*) FROM files").fetchone()[0] == sum(
        len(e.files) for e in entries(triton_cache)
    )
    again = do_index(catalog, triton_cache)
    assert (again.new, again.updated, again.unchanged, again.removed) == (0, 0, SAMPLE_ENTRIES, 0)
    assert "24 unchanged" in again.line()


def test_incremental_reads_only_changed_entries(triton_cache: Path, catalog: Catalog,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    do_index(catalog, triton_cache)
    es = entries(triton_cache)
    changed, gone = es[0], es[1]
    # Change one entry the way Triton does (a file renamed into the dir), delete another.
    extra = changed.path / f"{changed.name}.glir"
    tmp = changed.path / "x.tmp"
    tmp.write_text("gluon ir")
    os.replace(tmp, extra)
    shutil.rmtree(gone.path)

    from infercache.kernels import entry_rows

    parsed: list[Path] = []
    real = entry_rows.scan
    monkeypatch.setattr(entry_rows, "scan", lambda p, st=None: (parsed.append(Path(p)), real(p, st))[1])
    s = do_index(catalog, triton_cache)
    assert parsed == [changed.path]
    assert (s.new, s.updated, s.unchanged, s.removed) == (0, 1, SAMPLE_ENTRIES - 2, 1)
    rows = {r.key: r for r in query(catalog)}
    assert gone.key not in rows
    assert rows[changed.key].files["glir"] == len("gluon ir")
    assert catalog.conn.execute(
        "SELECT count(*) FROM files f JOIN entries e ON e.id = f.entry_id WHERE e.key = ?", (gone.key,)
    ).fetchone()[0] == 0
    # A forced rescan re-reads everything.
    parsed.clear()
    s = do_index(catalog, triton_cache, rescan=True)
    assert len(parsed) == SAMPLE_ENTRIES - 1 and s.updated == SAMPLE_ENTRIES - 1


def test_new_entries_are_added(triton_cache: Path, catalog: Catalog, tmp_path: Path,
                               sample_cache_master: Path) -> None:
    from infercache.testing.samples import compile_sample

    do_index(catalog, triton_cache)
    compile_sample(triton_cache, "add_kernel", "cuda:90", num_warps=2)
    s = do_index(catalog, triton_cache)
    assert (s.new, s.unchanged) == (1, SAMPLE_ENTRIES)
    rows = query(catalog, KernelFilter.build(name="add_kernel", arch="90"), sort="warps")
    assert [r.num_warps for r in rows] == [2, 4, 8]


def test_bad_content_is_skipped_with_warnings(triton_cache: Path, catalog: Catalog, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    es = entries(triton_cache)
    outside = add_bad_content(triton_cache, es, tmp_path)
    with caplog.at_level(logging.WARNING):
        s = do_index(catalog, triton_cache)
    assert s.new == SAMPLE_ENTRIES - 2
    assert s.skipped == {"unparsable": 1, "truncated": 1, "symlink": 2, "garbage": 1, "launcher": 1}
    problems = {p.path: p.kind for p in s.problems}
    assert problems[es[0].path] == "unparsable" and problems[es[1].path] == "truncated"
    assert str(es[0].path) in caplog.text and str(es[1].path) in caplog.text
    assert "launcher" not in {p.kind for p in s.problems}
    # Unchanged bad entries are not re-read, but still reported.
    again = do_index(catalog, triton_cache)
    assert again.skipped == s.skipped and again.unchanged == SAMPLE_ENTRIES - 2
    # Repairing an entry turns it into a kernel on the next run.
    (es[0].path / f"{es[0].name}.json").write_text(json.dumps(es[0].metadata))
    tmp = es[0].path / "touch"
    tmp.write_text("")
    tmp.unlink()
    fixed = do_index(catalog, triton_cache)
    assert fixed.new == 1 and fixed.skipped.get("unparsable") is None
    # The outside entry was never touched or indexed.
    assert not any(str(r.path).startswith(str(outside)) for r in query(catalog))


def test_missing_or_bad_cache_dir(catalog: Catalog, tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="does not exist"):
        do_index(catalog, tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BadInputError, match="not a directory"):
        do_index(catalog, tmp_path / "file")
    with pytest.raises(BadInputError, match="mode"):
        index(catalog, [tmp_path], mode="bogus")


def test_default_cache_dir_from_env(triton_cache: Path, catalog: Catalog, monkeypatch: pytest.MonkeyPatch,
                                    tmp_path: Path) -> None:
    monkeypatch.setenv("TRITON_CACHE_DIR", str(triton_cache))
    s = index(catalog, None, mode="triton")
    assert s.roots == (triton_cache.resolve(),) and s.entries == SAMPLE_ENTRIES
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "absent"))
    with pytest.raises(BadInputError, match="no cache directory found"):
        index(catalog, None, mode="triton")


def test_vllm_legacy_layout(sample_cache_master: Path, tmp_path: Path, catalog: Catalog) -> None:
    root = tmp_path / "vllm"
    layouts.make_vllm_legacy(root, sample_cache_master, ranks=("rank_0_0", "rank_1_0"), prefix="backbone")
    s = do_index(catalog, root)
    assert s.modes == ("vllm",) and s.entries == 2 * SAMPLE_ENTRIES
    rows = query(catalog)
    assert {r.mode for r in rows} == {"vllm"}
    assert {(r.vllm["hash"], r.vllm["rank"], r.vllm["prefix"]) for r in rows} == {
        (layouts.DEFAULT_VLLM_HASH, "rank_0_0", "backbone"),
        (layouts.DEFAULT_VLLM_HASH, "rank_1_0", "backbone"),
    }
    assert all(r.cache_root == root.resolve() for r in rows)
    # A whole rank dir vanishing removes its rows.
    shutil.rmtree(root / "torch_compile_cache" / layouts.DEFAULT_VLLM_HASH / "rank_1_0")
    s = do_index(catalog, root)
    assert s.removed == SAMPLE_ENTRIES and s.entries == SAMPLE_ENTRIES


def test_vllm_new_layout_with_artifacts(sample_cache_master: Path, tmp_path: Path, catalog: Catalog) -> None:
    root = tmp_path / "vllm"
    lay = layouts.make_vllm_new(root, sample_cache_master, binary=2)
    s = do_index(catalog, root, mode="vllm")
    # 2 binary + 1 unpacked artifact, cache_key_factors.json
    assert s.entries == lay.entry_count and s.artifacts == 4 and not s.problems
    arts = catalog.conn.execute("SELECT path, size, vllm_hash, vllm_rank FROM artifacts WHERE kind = 'vllm-artifact' "
                                "AND size = 4096 ORDER BY path").fetchall()
    assert [a["path"] for a in arts] == [str(p.resolve()) for p in sorted(lay.artifacts)]
    assert all(a["size"] == 4096 and a["vllm_rank"] == "rank_0_0" for a in arts)


def test_inductor_layout(sample_cache_master: Path, tmp_path: Path, catalog: Catalog) -> None:
    root = tmp_path / "inductor"
    lay = layouts.make_inductor(root, sample_cache_master, devices=("0", "1"))
    s = do_index(catalog, root)
    assert s.modes == ("inductor",) and s.entries == lay.entry_count
    assert {r.mode for r in query(catalog)} == {"inductor"} and all(r.vllm is None for r in query(catalog))


def test_two_roots_kept_apart(triton_cache: Path, sample_cache_master: Path, tmp_path: Path,
                              catalog: Catalog) -> None:
    from tests.helpers import copy_triton_cache

    other = copy_triton_cache(sample_cache_master, tmp_path / "other")
    do_index(catalog, triton_cache)
    do_index(catalog, other)
    assert len(query(catalog)) == 2 * SAMPLE_ENTRIES
    shutil.rmtree(other / entries(other)[0].key)
    s = do_index(catalog, other)
    assert s.removed == 1
    assert len(query(catalog, KernelFilter.build(cache_dirs=[triton_cache]))) == SAMPLE_ENTRIES
    assert {p for p, _ in catalog.roots()} == {triton_cache.resolve(), other.resolve()}

