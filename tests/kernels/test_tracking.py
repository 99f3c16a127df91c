"""Runtime hit tracking with real Triton compiles in real processes (no GPU: AOT targets)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from infercache.kernels.catalog import Catalog
from tests.helpers import require_tool
from tests.kernels.kutil import SAMPLE_ENTRIES, do_index, entries

ROOT = Path(__file__).resolve().parents[2]


def _worker(cache: Path, n: int, data_dir: Path, *, start: Path | None = None,
            **env: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "tests.kernels.tracker_worker", str(cache), str(n)]
    if start is not None:
        cmd.append(str(start))
    full_env = {**os.environ, "INFERCACHE_DATA_DIR": str(data_dir), "TRITON_DEFAULT_FP_FUSION": "1", **env}
    return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen[str]) -> tuple[str, str]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out, err


def _usage(data_dir: Path) -> dict[str, tuple[int, int, float | None, float | None]]:
    with Catalog.open(data_dir) as cat:
        rows = cat.conn.execute("SELECT key, hits, misses, last_access, compile_time_s FROM usage").fetchall()
    return {r[0]: (r[1], r[2], r[3], r[4]) for r in rows}


def _add_kernel_key(cache: Path) -> str:
    from infercache.testing.samples import compile_sample

    return compile_sample(cache, "add_kernel", "cuda:90").key  # a hit: the entry is already there


@pytest.mark.slow
def test_two_processes_exact_counts_then_index_shows_them(tmp_path: Path, data_dir: Path) -> None:
    """A compiles (1 miss, 2 hits), then B, activated by the env var, hits 3 times: 5 hits, 1 miss."""
    from infercache.kernels.query import KernelFilter, query

    cache = tmp_path / "cache"
    _finish(_worker(cache, 3, data_dir, TRACKER_ACTIVATION="install"))
    _finish(_worker(cache, 3, data_dir, TRACKER_ACTIVATION="env",
                    TRITON_CACHE_MANAGER="infercache.kernels.tracking:TrackingCacheManager"))
    key = _add_kernel_key(cache)  # this process does not track: no count from it
    usage = _usage(data_dir)
    hits, misses, last_access, compile_time = usage[key]
    assert (hits, misses) == (5, 1)
    assert last_access is not None and abs(last_access - time.time()) < 600
    assert compile_time is not None and compile_time > 0
    # The counts waited for the entry to be indexed (no entries row existed yet); index joins them.
    with Catalog.open(data_dir) as cat:
        assert cat.conn.execute("SELECT count(*) FROM entries").fetchone()[0] == 0
        do_index(cat, cache)
        (record,) = query(cat, KernelFilter(name="add_kernel"))
        assert (record.hits, record.misses) == (5, 1)
        assert query(cat, KernelFilter(hits_lower=1)) == []  # row_sum_kernel was hit too


@pytest.mark.slow
def test_eight_processes_at_once_lose_no_counts(triton_cache: Path, data_dir: Path, tmp_path: Path) -> None:
    """8 trackers flushing every 20 ms into one catalog: every hit lands, nobody sees a lock error."""
    start = tmp_path / "go"
    procs = [_worker(triton_cache, 25, data_dir, start=start, TRACKER_FLUSH_S="0.02", TRACKER_LINGER_S="0.2")
             for _ in range(8)]
    time.sleep(0.5)
    start.touch()
    for proc in procs:
        out, err = _finish(proc)
        assert "hits=25" in out
        assert "WARNING" not in err and "locked" not in err, err
    key = _add_kernel_key(triton_cache)
    assert _usage(data_dir)[key][:2] == (200, 0)


def test_forked_worker_counts_flushed_once(triton_cache: Path, data_dir: Path) -> None:
    """A fork()ed multiprocessing child (exits by os._exit) flushes its counts; the parent's are not doubled."""
    from infercache.testing.samples import compile_sample

    out, _ = _finish(_worker(triton_cache, 3, data_dir, TRACKER_FORK="1"))
    assert "hits=3" in out
    usage = _usage(data_dir)
    assert usage[_add_kernel_key(triton_cache)][:2] == (3, 0)
    assert usage[compile_sample(triton_cache, "row_sum_kernel", "cuda:90").key][:2] == (1, 0)


@pytest.fixture()
def read_only_catalog(data_dir: Path) -> Iterator[Path]:
    """A catalog that exists but cannot be written: chattr +i as root (root ignores modes), else chmod."""
    Catalog.open(data_dir).close()
    db = data_dir / "catalog.db"
    for extra in ("catalog.db-wal", "catalog.db-shm"):
        (data_dir / extra).unlink(missing_ok=True)
    if os.geteuid() == 0:
        chattr = require_tool("chattr", "e2fsprogs")
        if subprocess.run([chattr, "+i", str(db), str(data_dir)]).returncode != 0:
            message = "root on a filesystem without the immutable attribute: cannot make the catalog read-only"
            if os.environ.get("CI") == "true":
                pytest.fail(message)
            pytest.skip(message)
        try:
            yield data_dir
        finally:
            subprocess.run([chattr, "-i", str(db), str(data_dir)], check=True)
    else:
        db.chmod(0o444)
        data_dir.chmod(0o555)
        try:
            yield data_dir
        finally:
            data_dir.chmod(0o755)
            db.chmod(0o644)


@pytest.mark.parametrize("kind", ["read-only", "cannot-create"])
def test_unwritable_catalog_kernels_still_load_one_warning(
    kind: str, triton_cache: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if kind == "read-only":
        data = request.getfixturevalue("read_only_catalog")
    else:
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        data = blocker / "data"  # mkdir fails: NotADirectoryError
    out, err = _finish(_worker(triton_cache, 4, data, TRACKER_FLUSH_S="0.05", TRACKER_LINGER_S="0.3"))
    assert "hits=4" in out  # every lookup still found its kernel
    warnings = [line for line in err.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, err
    assert "cannot record kernel cache hits" in warnings[0]


def test_listener_chained_and_dump_override_managers_not_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 data_dir: Path) -> None:
    """install() keeps the user's compile listener; Triton's compile times land in the catalog."""
    import triton

    from infercache.kernels import tracking
    from tests.kernels.warm_kernels import compile_direct

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TRITON_DUMP_DIR", str(tmp_path / "dump"))
    seen: list[bool] = []

    def user_listener(*, cache_hit: bool, **_: object) -> None:
        seen.append(cache_hit)

    previous = triton.knobs.compilation.listener
    triton.knobs.compilation.listener = user_listener
    tracking.install()
    try:
        first = compile_direct("cuda:80")
        second = compile_direct("cuda:80")
        tracking.TrackingCacheManager(first.key, dump=True).get_group("x.json")  # not the cache: not counted
        pending = tracking.pending()
        assert pending[first.key][:2] == (1, 1)
        assert tracking.flush()
    finally:
        tracking.uninstall()
        triton.knobs.compilation.listener = previous
    assert seen == [False, True]
    assert first.key == second.key
    hits, misses, _, compile_time = _usage(data_dir)[first.key]
    assert (hits, misses) == (1, 1) and compile_time is not None and compile_time > 0
    assert triton.knobs.cache.manager_class is None and "TRITON_CACHE_MANAGER" not in os.environ


def test_stats_hit_rate_top_kernels_never_hit_and_zero(triton_cache: Path, data_dir: Path) -> None:
    """Counts as a tracker leaves them → `stats` / `list` show them; `--zero` resets (ccache -z)."""
    import json

    from typer.testing import CliRunner

    from infercache.cli.app import app
    from infercache.kernels.query import KernelFilter
    from infercache.kernels.stats import zero_counters

    runner = CliRunner()
    assert runner.invoke(app, ["kernels", "index", "--cache-dir", str(triton_cache)]).exit_code == 0
    listed = json.loads(runner.invoke(app, ["kernels", "list", "--format", "json"]).stdout)
    k1, k2 = listed[0], listed[1]
    now = time.time()
    with Catalog.open(data_dir) as cat:
        cat.record_usage_batch([(k1["key"], 10, 2, now, 0.5), (k2["key"], 3, 1, now, None),
                                ("NOT-INDEXED-YET", 7, 0, now, None)])
    r = runner.invoke(app, ["kernels", "stats", "--format", "json"])
    stats = json.loads(r.stdout)
    assert (stats["hits"], stats["misses"]) == (13, 3) and stats["hit_rate"] == pytest.approx(13 / 16)
    assert [(t["key"], t["hits"], t["misses"]) for t in stats["top_kernels"]] == [
        (k1["key"], 10, 2), (k2["key"], 3, 1)]
    assert stats["top_kernels"][0]["hit_rate"] == pytest.approx(10 / 12)
    assert stats["top_kernels"][0]["compile_time_s"] == 0.5
    others = [e for e in listed if e["key"] not in (k1["key"], k2["key"])]
    assert stats["never_hit"] == {"entries": len(others), "total_size": sum(e["total_size"] for e in others)}
    table = runner.invoke(app, ["kernels", "stats"]).output
    assert "Most hit kernels" in table and "Never hit" in table
    row = {e["key"]: e for e in json.loads(runner.invoke(app, ["kernels", "list", "--format", "json"]).stdout)}
    assert (row[k1["key"]]["hits"], row[k1["key"]]["misses"]) == (10, 2) and row[k1["key"]]["last_access"]
    with Catalog.open(data_dir) as cat:  # a filter resets only what it selects
        assert zero_counters(cat, KernelFilter(name=k2["name"], backend=k2["backend"], arch=k2["arch"])) >= 1
    assert _usage(data_dir)[k1["key"]][:2] == (10, 2) and _usage(data_dir)[k2["key"]][:2] == (0, 0)
    r = runner.invoke(app, ["kernels", "stats", "--zero", "--format", "json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["hits"] == 10  # shown, then reset
    assert all(v[:2] == (0, 0) for v in _usage(data_dir).values())  # not-indexed counts too


def test_stats_count_each_key_once_when_copies_share_it(sample_cache_master: Path, tmp_path: Path,
                                                        catalog: Catalog) -> None:
    """Two cache dirs holding the same kernels (TP ranks, a copied cache) share one usage row per key:
    `stats` must not add that row once per copy, nor list the kernel twice among the most hit."""
    from infercache.kernels.stats import compute_stats
    from tests.helpers import copy_triton_cache

    a = copy_triton_cache(sample_cache_master, tmp_path / "rank0")
    b = copy_triton_cache(sample_cache_master, tmp_path / "rank1")
    do_index(catalog, a, b, mode="triton")
    k1, k2 = sorted({e.key for e in entries(a)})[:2]
    catalog.record_usage_batch([(k1, 10, 2, 1.0, None), (k2, 3, 1, 1.0, None)])
    stats = compute_stats(catalog)
    assert stats.entries == 2 * SAMPLE_ENTRIES
    assert (stats.hits, stats.misses) == (13, 3)
    assert [(t.key, t.hits) for t in stats.top_kernels] == [(k1, 10), (k2, 3)]
    assert stats.never_hit.entries == 2 * (SAMPLE_ENTRIES - 2)  # every copy of the others takes space


def test_stats_zero_holds_the_write_lock_between_read_and_reset(triton_cache: Path, catalog: Catalog,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A tracker flush cannot slip in between `stats --zero`'s read and its reset (its hits would be
    reset unseen): it finds the catalog locked (a tracker's busy timeout waits, landing after the reset)."""
    import sqlite3

    from infercache.kernels import stats as stats_mod

    do_index(catalog, triton_cache)
    key = entries(triton_cache)[0].key
    catalog.record_usage_batch([(key, 4, 1, 1.0, None)])
    real = stats_mod.compute_stats
    outcome: list[str] = []

    def compute_then_try_a_flush(*args: object, **kwargs: object) -> object:
        result = real(*args, **kwargs)  # type: ignore[arg-type]
        other = sqlite3.connect(catalog.path, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("UPDATE usage SET hits = hits + 5 WHERE key = ?", (key,))
            other.execute("COMMIT")
            outcome.append("written")
        except sqlite3.OperationalError as exc:
            outcome.append(str(exc))
        finally:
            other.close()
        return result

    monkeypatch.setattr(stats_mod, "compute_stats", compute_then_try_a_flush)
    shown = stats_mod.stats_then_zero(catalog)
    assert (shown.hits, shown.misses) == (4, 1)
    assert outcome == ["database is locked"]
    assert _usage(catalog.path.parent)[key][:2] == (0, 0)


def test_flush_against_a_held_write_lock_gives_up_and_retries_later(data_dir: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """While another process holds the catalog's write lock, a flush waits FLUSH_BUSY_TIMEOUT_MS (not the
    catalog's two-minute default: a program's exit would hang on it), keeps its counts, and lands them
    exactly once at the next flush."""
    import sqlite3

    from infercache.kernels import tracking

    monkeypatch.setattr(tracking, "FLUSH_INTERVAL_S", 3600.0)  # no background flush during the test
    monkeypatch.setattr(tracking, "FLUSH_BUSY_TIMEOUT_MS", 50)
    Catalog.open(data_dir).close()
    buffer = tracking._Buffer()
    buffer.add("KEY-A", hits=3)
    holder = sqlite3.connect(data_dir / "catalog.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        assert buffer.flush() is False
        assert buffer.pending()["KEY-A"][:2] == (3, 0)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    buffer.add("KEY-A", hits=1)
    assert buffer.flush() is True
    assert buffer._catalog is not None and buffer._catalog.busy_timeout_ms == 50  # the connection it keeps
    buffer._stop.set()
    buffer._drop_catalog()
    assert buffer.pending() == {}
    assert _usage(data_dir)["KEY-A"][:2] == (4, 0)
    with tracking.Catalog(tracking.catalog_path(), busy_timeout_ms=50) as cat:
        assert cat.conn.execute("PRAGMA busy_timeout").fetchone()[0] == 50
