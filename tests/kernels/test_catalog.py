"""The SQLite catalog itself: file mode, WAL, schema versions, concurrent writers."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from infercache.errors import InfercacheError
from infercache.kernels.catalog import SCHEMA_VERSION, Catalog
from infercache.kernels.query import KernelFilter, query
from infercache.testing.replicate import replicate_entry
from tests.kernels.kutil import SAMPLE_ENTRIES, do_index, entries


def test_file_mode_wal_and_version(data_dir: Path, catalog: Catalog) -> None:
    path = data_dir / "catalog.db"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert catalog.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert catalog.conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 10_000
    assert catalog.schema_version == SCHEMA_VERSION
    catalog.record_usage("K", hits=1)
    for suffix in ("-wal", "-shm"):
        side = Path(str(path) + suffix)
        if side.exists():
            assert stat.S_IMODE(side.stat().st_mode) & 0o077 == 0


def test_migration_from_v1_keeps_rows(triton_cache: Path, data_dir: Path) -> None:
    """A catalog written at schema 1 (no usage table) is upgraded in place, rows kept."""
    path = data_dir / "catalog.db"
    with Catalog(path, upto=1) as old:
        assert old.schema_version == 1
        do_index(old, triton_cache)
        assert old.conn.execute("SELECT name FROM sqlite_master WHERE name = 'usage'").fetchone() is None
    with Catalog(path) as new:
        assert new.schema_version == SCHEMA_VERSION
        new.record_usage(entries(triton_cache)[0].key, hits=3, misses=1, last_access=1.0)
        rows = query(new, KernelFilter(hits_higher=2))
        assert len(rows) == 1 and rows[0].hits == 3 and rows[0].misses == 1
        assert len(query(new)) == SAMPLE_ENTRIES


def test_newer_schema_is_refused(data_dir: Path) -> None:
    path = data_dir / "catalog.db"
    Catalog(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 5}")
    conn.commit()
    conn.close()
    with pytest.raises(InfercacheError, match="newer"):
        Catalog(path)


def test_usage_counters_survive_reindex_and_zero(triton_cache: Path, catalog: Catalog) -> None:
    do_index(catalog, triton_cache)
    key = entries(triton_cache)[0].key
    catalog.record_usage(key, hits=2, last_access=100.0)
    catalog.record_usage(key, hits=3, misses=1, last_access=50.0)
    do_index(catalog, triton_cache, rescan=True)
    (row,) = [r for r in query(catalog) if r.key == key]
    assert (row.hits, row.misses, row.last_access) == (5, 1, 100.0)
    assert catalog.zero_usage() == 1
    (row,) = [r for r in query(catalog) if r.key == key]
    assert (row.hits, row.misses) == (0, 0)


@pytest.fixture()
def big_cache(triton_cache: Path) -> Path:
    """~600 real entries (replicas): enough for index runs in two processes to overlap."""
    originals = entries(triton_cache)
    for i in range(24):
        for e in originals:
            replicate_entry(e.path, triton_cache, f"r{i}")
    return triton_cache


def _cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "infercache.cli.app", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ))


def test_two_concurrent_index_runs(big_cache: Path, data_dir: Path) -> None:
    """Two `index` processes at once (a fresh catalog: both create the schema): both succeed."""
    procs = [_cli("kernels", "index", "--rescan", "--cache-dir", str(big_cache)) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "locked" not in err.lower()
    with Catalog.open(data_dir) as cat:
        assert len(query(cat)) == 25 * SAMPLE_ENTRIES
        assert cat.conn.execute("SELECT count(DISTINCT entry_id) FROM files").fetchone()[0] == 25 * SAMPLE_ENTRIES


def test_index_during_prune(big_cache: Path, data_dir: Path) -> None:
    """`prune --full -y` and `index` in two processes at once: both finish, catalog matches the disk."""
    with Catalog.open(data_dir) as cat:
        do_index(cat, big_cache)
    procs = [
        _cli("kernels", "prune", "--full", "-y", "--name", "matmul_kernel", "--cache-dir", str(big_cache)),
        _cli("kernels", "index", "--rescan", "--cache-dir", str(big_cache)),
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "locked" not in err.lower()
    with Catalog.open(data_dir) as cat:
        # No stale row for a deleted dir, even before any re-index (both sides check under the lock).
        on_disk = {e.key for e in entries(big_cache)}
        assert {r.key for r in query(cat)} == on_disk
        assert not any(r.name == "matmul_kernel" for r in query(cat))
        assert len(on_disk) == 25 * SAMPLE_ENTRIES * 2 // 3
        s = do_index(cat, big_cache)
        assert (s.new, s.updated, s.removed) == (0, 0, 0)


def test_unusable_catalog_is_a_clear_error(data_dir: Path, tmp_path: Path) -> None:
    (data_dir / "catalog.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(InfercacheError, match="catalog"):
        Catalog.open(data_dir)
    (tmp_path / "plain-file").write_text("x")
    with pytest.raises(InfercacheError, match="cannot open"):
        Catalog.open(tmp_path / "plain-file" / "sub")


def test_migration_of_old_vllm_artifact_rows(data_dir: Path) -> None:
    """Artifact rows written before schema 4 (kinds 'artifact'/'aot_model', no key or mode) come out
    with the spec's kinds, their basename as key and their root's mode, before any re-index."""
    from infercache.kernels.query import KernelFilter, query_artifacts

    path = data_dir / "catalog.db"
    root = "/caches/vllm"
    old_rows = [(f"{root}/torch_compile_cache/ab/rank_0_0/backbone/artifact_compile_range_1_8", "artifact", 64),
                (f"{root}/torch_aot_compile/de/rank_0_0/model", "aot_model", 5)]
    with Catalog(path, upto=2) as old:
        with old.transaction() as conn:
            conn.execute("INSERT INTO roots(path, mode, indexed_at) VALUES (?, 'vllm', 1.0)", (root,))
            conn.executemany("INSERT INTO artifacts(path, cache_root, kind, size, modified, indexed_at) "
                             "VALUES (?, ?, ?, ?, 1.0, 1.0)", [(p, root, k, n) for p, k, n in old_rows])
    with Catalog(path) as new:
        assert new.schema_version == SCHEMA_VERSION
        rows = {r.kind: r for r in query_artifacts(new, KernelFilter.build(mode="vllm"))}
        assert set(rows) == {"vllm-artifact", "aot-model"}
        assert rows["vllm-artifact"].key == "artifact_compile_range_1_8" and rows["aot-model"].key == "model"
        assert all(r.mode == "vllm" for r in rows.values())
        named = query_artifacts(new, KernelFilter.build(name="artifact_compile_range_1_8"))
        assert [r.size for r in named] == [64]
