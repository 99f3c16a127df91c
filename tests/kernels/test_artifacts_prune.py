"""`kernels prune --artifacts`: the default never turns a warm start into a compile, judged by PyTorch itself.

Each warm-start check runs the same three models in a FRESH process on the pruned cache and
counts the compile work Inductor does there (C++ builds into the cache dir, Triton compiles),
not only its `fxgraph_cache_hit` counter (which stays a "hit" while every module is rebuilt).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from infercache.cli.app import app
from infercache.kernels.artifact_prune import plan_artifact_prune
from infercache.kernels.catalog import Catalog
from infercache.kernels.query import KernelFilter, query, query_artifacts
from tests.helpers import copy_triton_cache
from tests.kernels.kutil import do_index, du
from tests.torchcache import TorchCache, run_fresh

runner = CliRunner()


def _age(path: Path, seconds: float) -> None:
    ts = time.time() - seconds
    os.utime(path, (ts, ts), follow_symlinks=False)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_default_prune_keeps_every_warm_start_warm(torch_cache_master: TorchCache, tmp_path: Path,
                                                   data_dir: Path) -> None:
    cache = torch_cache_master.copy(tmp_path / "inductor")
    for lock in (cache / "locks").iterdir():
        _age(lock, 3600)
    stale_tmp = next((cache / "fxgraph").glob("*/*")) / ".4242.1.tmp"
    stale_tmp.write_bytes(b"half-written")
    _age(stale_tmp, 3600)
    fresh_lock = cache / "locks" / "cfresh.lock"
    fresh_lock.write_bytes(b"")  # may belong to a compile in progress: kept
    before = _files(cache)
    size_before = du(cache)
    assert runner.invoke(app, ["kernels", "index", "--cache-dir", str(cache)]).exit_code == 0
    dry = runner.invoke(app, ["kernels", "prune", "--artifacts", "--dry-run", "--format", "json"])
    assert dry.exit_code == 0, dry.output
    plan = json.loads(dry.stdout)
    assert _files(cache) == before and plan["bytes_freed"] > 0  # a dry run changes nothing
    r = runner.invoke(app, ["kernels", "prune", "--artifacts", "-y", "--format", "json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)["result"]
    assert result["bytes_freed"] == plan["bytes_freed"] == size_before - du(cache)  # exact bytes
    gone = before - _files(cache)
    assert gone and all(g.endswith((".py", ".cpp", ".lock", ".tmp")) for g in gone), gone
    assert not any(g.startswith(("fxgraph", "aotautograd")) and not g.endswith(".tmp") for g in gone)
    assert not any(g.endswith(".so") for g in gone) and fresh_lock.exists() and not stale_tmp.exists()
    # The catalog matches the disk: modules left with no files are gone, the rest lost their sources.
    with Catalog.open(data_dir) as cat:
        rows = query_artifacts(cat)
        assert all((Path(r.path).parent / n).exists() for r in rows if r.kind == "module" for n in r.files)
        assert sum(r.size for r in rows) == du(cache) - fresh_lock.stat().st_size
    warm = run_fresh(cache)
    assert warm["compile_work"] == 0, warm["build_targets"]
    assert warm["counters"].get("fxgraph_cache_hit") == 3
    assert warm["checksum"] == torch_cache_master.cold["checksum"]


@pytest.mark.slow
def test_full_prune_of_one_module_costs_exactly_its_build(torch_cache_master: TorchCache, tmp_path: Path,
                                                          catalog: Catalog) -> None:
    cache = torch_cache_master.copy(tmp_path / "inductor")
    do_index(catalog, cache)
    module = next(r for r in query_artifacts(catalog, kinds=["module"], sort="key")
                  if any(n.endswith(".main.so") for n in r.files))
    flt = KernelFilter.build(name=module.key)
    free = plan_artifact_prune(catalog, flt, kinds=["module"])
    assert [a.files for a in free.actions] == [tuple(n for n in sorted(module.files) if n.endswith(".cpp"))]
    full = plan_artifact_prune(catalog, flt, "full", kinds=["module"])
    assert len(full.actions) == 1 and full.bytes_freed == module.size
    result = full.execute(catalog)
    assert result.bytes_freed == module.size
    assert not any((Path(module.path).parent / n).exists() for n in module.files)
    warm = run_fresh(cache)
    assert warm["builds"] == 1 and warm["build_targets"][0].endswith(".main.so"), warm  # the counter sees it


def test_kind_and_age_filters_without_full_only_trim_sources(torch_cache_master: TorchCache, tmp_path: Path,
                                                             catalog: Catalog) -> None:
    cache = torch_cache_master.copy(tmp_path / "inductor")
    do_index(catalog, cache)
    for kinds in (["fxgraph"], ["aotautograd"]):
        assert plan_artifact_prune(catalog, kinds=kinds).actions == ()  # nothing of theirs is free
    plan = plan_artifact_prune(catalog, KernelFilter.build(older_than="0s"), kinds=["module"])
    assert plan.actions and all(a.kind == "files" for a in plan.actions)
    assert all(n.endswith((".py", ".cpp")) for a in plan.actions for n in a.files)
    assert plan_artifact_prune(catalog, KernelFilter.build(older_than="1d"), kinds=["module"]).actions == ()
    full = plan_artifact_prune(catalog, strategy="full", kinds=["fxgraph"])
    assert len(full.actions) == 3 and all(a.kind == "dir" for a in full.actions)
    full.execute(catalog)
    assert not list((cache / "fxgraph").glob("*/*")) and len(query_artifacts(catalog, kinds=["fxgraph"])) == 0


def test_max_size_is_lru_across_kernels_and_artifacts(torch_cache_master: TorchCache, sample_cache_master: Path,
                                                      tmp_path: Path, catalog: Catalog) -> None:
    cache = torch_cache_master.copy(tmp_path / "inductor")
    copy_triton_cache(sample_cache_master, cache / "triton" / "0")
    # Kernels last used two days ago, FX graph entries one day ago, everything else now.
    for p in (cache / "triton" / "0").rglob("*"):
        _age(p, 2 * 86400)
    for p in (cache / "fxgraph").rglob("*"):
        _age(p, 86400)
    do_index(catalog, cache)
    kernels = query(catalog)
    arts = query_artifacts(catalog)
    total = sum(k.total_size for k in kernels) + sum(a.size for a in arts)
    limit = total - sum(k.total_size for k in kernels) - 1  # all kernels and some FX graph entries must go
    plan = plan_artifact_prune(catalog, strategy="max_size", max_size=limit)
    names = [a.name for a in plan.actions]
    assert names[: len(kernels)] == ["kernel"] * len(kernels) and names[len(kernels)] == "fxgraph"
    assert "module" not in names
    before = du(cache)
    result = plan.execute(catalog)
    assert result.bytes_freed == plan.bytes_freed == before - du(cache)
    left = sum(k.total_size for k in query(catalog)) + sum(a.size for a in query_artifacts(catalog))
    assert left <= limit and query(catalog) == []


def test_cli_refuses_what_does_not_apply(torch_cache_master: TorchCache, tmp_path: Path, data_dir: Path) -> None:
    cache = torch_cache_master.copy(tmp_path / "inductor")
    assert runner.invoke(app, ["kernels", "index", "--cache-dir", str(cache)]).exit_code == 0
    for args in (["--kind", "fxgraph"], ["--artifacts", "--deduplicate"], ["--artifacts", "--garbage"],
                 ["--artifacts", "--kind", "bogus"], ["--artifacts", "-b", "cuda"]):
        r = runner.invoke(app, ["kernels", "prune", "--dry-run", *args])
        assert r.exit_code == 2, (args, r.output)
    r = runner.invoke(app, ["kernels", "prune", "--artifacts", "--max-size", "1K", "--dry-run"])
    assert r.exit_code == 0 and "would prune" in r.stdout and "limit 1.0 KiB" in r.stdout


def test_cache_dir_below_the_root_limits_every_action_to_it(torch_cache_master: TorchCache, tmp_path: Path,
                                                            catalog: Catalog) -> None:
    """`--cache-dir` naming a dir inside an indexed root: stale locks and temp files elsewhere in the
    root are out of scope too, not only the artifacts."""
    cache = torch_cache_master.copy(tmp_path / "inductor")
    for lock in (cache / "locks").iterdir():
        _age(lock, 3600)
    entry_dir = next((cache / "fxgraph").glob("*/*"))
    stale_tmp = entry_dir / ".4242.1.tmp"
    stale_tmp.write_bytes(b"half-written")
    _age(stale_tmp, 3600)
    do_index(catalog, cache)
    whole = plan_artifact_prune(catalog, KernelFilter())
    assert any(a.path.parent == cache / "locks" for a in whole.actions)  # in scope of the whole root
    scope = cache / "fxgraph"
    plan = plan_artifact_prune(catalog, KernelFilter.build(cache_dirs=[scope]))
    assert [a.path for a in plan.actions] == [stale_tmp]
