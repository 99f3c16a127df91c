"""Parsing in worker processes (big first-time indexes) writes exactly what serial indexing writes."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest

from infercache.kernels import entry_rows, index_workers, indexer
from infercache.kernels.catalog import Catalog
from infercache.testing.replicate import replicate_entry
from tests.kernels.kutil import SAMPLE_ENTRIES, add_bad_content, entries


def _mixed_cache(triton_cache: Path, tmp_path: Path) -> tuple[Path, list[Path]]:
    """Real entries (originals + 3 replicas each) plus every kind of bad or foreign content."""
    originals = entries(triton_cache)
    for i in range(3):
        for e in originals:
            replicate_entry(e.path, triton_cache, f"par{i}", link=True)
    es = originals
    add_bad_content(triton_cache, es, tmp_path)
    (es[3].path / "stray.bin").write_bytes(b"x" * 10)  # orphan inside an entry
    (es[4].path / "tmp.pid_7_x").mkdir()  # leftover inside an entry
    (es[4].path / "tmp.pid_7_x" / "half").write_bytes(b"y" * 3)
    return triton_cache, [es[0].path, es[1].path]


def _dump(cat: Catalog) -> dict[str, Any]:
    conn = cat.conn
    cols = [r[1] for r in conn.execute("PRAGMA table_info(entries)") if r[1] not in ("indexed_at",)]
    return {
        "entries": sorted(tuple(r) for r in conn.execute(f"SELECT {', '.join(cols)} FROM entries")),
        "files": sorted(
            tuple(r) for r in conn.execute(
                "SELECT e.path, f.name, f.type, f.size FROM files f JOIN entries e ON e.id = f.entry_id"
            )
        ),
        "skipped": sorted(tuple(r) for r in conn.execute("SELECT * FROM skipped")),
    }


def test_parallel_index_matches_serial(triton_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture) -> None:
    cache, bad = _mixed_cache(triton_cache, tmp_path)
    monkeypatch.setattr(indexer, "PARALLEL_MIN", 1)
    monkeypatch.setattr(index_workers, "CHUNK", 7)  # many chunks, several per worker
    monkeypatch.setattr(indexer, "BATCH", 20)  # writes interleave with chunks arriving
    used: list[int] = []
    real = index_workers.prepare_parallel

    def spy(*args: Any) -> Any:
        used.append(args[-1])
        return real(*args)

    monkeypatch.setattr(index_workers, "prepare_parallel", spy)
    with Catalog(tmp_path / "serial.db") as cat:
        serial = indexer.index(cat, [cache], mode="triton", workers=1)
        serial_rows = _dump(cat)
    assert used == []
    progress: list[tuple[int, int]] = []
    with caplog.at_level(logging.WARNING), Catalog(tmp_path / "parallel.db") as cat:
        par = indexer.index(cat, [cache], mode="triton", workers=3, progress=lambda d, t: progress.append((d, t)))
        par_rows = _dump(cat)
    assert used == [3]
    assert par.new == serial.new == 4 * SAMPLE_ENTRIES - 2
    assert par.skipped == serial.skipped == {"unparsable": 1, "truncated": 1, "symlink": 2, "garbage": 1,
                                             "launcher": 1}
    assert sorted((p.path, p.kind) for p in par.problems) == sorted((p.path, p.kind) for p in serial.problems)
    assert (par.entries, par.total_size) == (serial.entries, serial.total_size)
    # Warnings come from this process (the workers only parse; caplog sees this process only).
    assert all(str(p) in caplog.text for p in bad)
    assert {p.path for p in par.problems} >= set(bad)
    assert par_rows == serial_rows
    kinds = {r[3] for r in par_rows["skipped"]}
    assert {"orphan", "garbage"} <= kinds
    # Progress moves forward only and ends complete.
    assert progress[-1][0] == progress[-1][1] == len(list(cache.iterdir()))
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)


def test_parallel_rescan_updates_in_place(triton_cache: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A forced rescan through workers updates rows (same ids), and the next run is all unchanged."""
    monkeypatch.setattr(indexer, "PARALLEL_MIN", 1)
    monkeypatch.setattr(index_workers, "CHUNK", 5)
    with Catalog(tmp_path / "c.db") as cat:
        first = indexer.index(cat, [triton_cache], mode="triton", workers=2)
        ids = dict(cat.conn.execute("SELECT path, id FROM entries").fetchall())
        again = indexer.index(cat, [triton_cache], mode="triton", workers=2, rescan=True)
        assert (first.new, again.new, again.updated) == (SAMPLE_ENTRIES, 0, SAMPLE_ENTRIES)
        assert dict(cat.conn.execute("SELECT path, id FROM entries").fetchall()) == ids
        assert cat.conn.execute("SELECT count(*) FROM files").fetchone()[0] == sum(
            len(e.files) for e in entries(triton_cache)
        )
        third = indexer.index(cat, [triton_cache], mode="triton", workers=2)
        assert third.unchanged == SAMPLE_ENTRIES and third.new == third.updated == 0


def test_no_workers_falls_back_to_parsing_here(triton_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """Where no process can be started (fork refused; faked: no way to exhaust processes safely), the
    parallel path is tried, gives up, and every entry is parsed in this process instead."""
    import concurrent.futures

    attempts: list[str] = []

    class Refused:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            attempts.append("pool")

        def map(self, *args: Any) -> Any:
            attempts.append("map")
            raise OSError(11, "Resource temporarily unavailable")

        def shutdown(self, *args: Any, **kwargs: Any) -> None:
            pass

    parsed_here: list[str] = []
    real_prepare = entry_rows.prepare

    def counting_prepare(path: str, *args: Any) -> Any:
        parsed_here.append(path)  # only calls in this process land here; a worker's would not
        return real_prepare(path, *args)

    monkeypatch.setattr(indexer, "PARALLEL_MIN", 1)
    monkeypatch.setattr(entry_rows, "prepare", counting_prepare)
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", Refused)
    with caplog.at_level(logging.DEBUG, logger="infercache.kernels.index_workers"), Catalog(tmp_path / "c.db") as cat:
        s = indexer.index(cat, [triton_cache], mode="triton", workers=2)
        assert s.new == SAMPLE_ENTRIES
        assert cat.conn.execute("SELECT count(*) FROM entries").fetchone()[0] == SAMPLE_ENTRIES
    assert attempts == ["pool", "map"], "the parallel path was never tried"
    assert "no parsing workers" in caplog.text
    assert {os.path.basename(p) for p in parsed_here} >= {e.path.name for e in entries(triton_cache)}
    # The next run may use workers again (the guard was released).
    monkeypatch.undo()
    assert index_workers._PARALLEL.acquire(blocking=False)
    index_workers._PARALLEL.release()
