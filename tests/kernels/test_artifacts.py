"""Compile-cache artifacts: every kind classified and indexed from real torch.compile caches.

The Inductor caches are made by real ``torch.compile`` runs on CPU (tests/torchcache.py,
once per session); vLLM trees are built around copies of them. What cannot exist here:
``.best_config`` autotune results (Inductor writes them for GPU Triton kernels only), so
one is written in Inductor's format; vLLM's binary artifacts are the session's real
mega-cache bytes in torch's binary framing (``CompiledArtifact.save(format="binary")``).
"""

from __future__ import annotations

import json
import os
import shutil
from importlib import metadata
from pathlib import Path

import pytest
from typer.testing import CliRunner

from infercache.cli.app import app
from infercache.kernels import artifacts as A
from infercache.kernels import inductor
from infercache.kernels.catalog import Catalog
from infercache.kernels.query import query_artifacts
from tests.kernels.kutil import do_index
from tests.torchcache import TorchCache, frame_binary_artifact

runner = CliRunner()
ARTIFACT_FIELDS = {"kind", "key", "path", "cache_root", "mode", "size", "files", "modified", "last_access",
                   "torch_version", "vllm"}
TORCH = metadata.version("torch")


def kinds_of(catalog: Catalog) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in query_artifacts(catalog):
        out[r.kind] = out.get(r.kind, 0) + 1
    return out


def test_names_are_classified() -> None:
    assert A.is_temp(".1234.140000.tmp") and A.is_temp("tmp.pid_12_34") and not A.is_temp("cabc.py")
    assert A.is_lock("cabc.lock") and not A.is_lock("cabc.so")
    assert A.module_stem("cabc.main.so") == "cabc" and A.module_stem("cabc.py") == "cabc"
    assert [A.classify_module_file(n) for n in ("cx.so", "cx.main.cpp", "k.best_config", ".1.2.tmp", "c.lock")] == [
        "module", "module", "autotune", "temp", "lock"]
    assert A.classify_module_file("README") is None
    assert A.classify_vllm_file("artifact_compile_range_1_8_subgraph_0", True, False) == "vllm-artifact"
    assert A.classify_vllm_file("cache_key_factors.json", True, False) == "vllm-graph"
    assert A.classify_vllm_file("model", True, True) == "aot-model"
    assert A.classify_vllm_file("model", True, False) is None
    assert A.regenerable("c.py") and A.regenerable("c.main.cpp") and not A.regenerable("c.main.so")


def test_content_checks_never_unpickle(torch_cache_master: TorchCache, monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("an artifact was unpickled")

    for name in ("loads", "load", "Unpickler"):  # cache files are untrusted: parsing only
        monkeypatch.setattr(pickle, name, refuse)
    fx = next((torch_cache_master.root / "fxgraph").glob("*/*/*"))
    data = fx.read_bytes()
    assert A.torch_version_in(data) == TORCH
    assert A.check_pickle(data) is None
    assert "truncated" in (A.check_pickle(data[: len(data) // 2]) or "")
    assert A.check_pickle(b"") == "empty file" and A.check_pickle(b"hello") == "not a pickle"
    framed = frame_binary_artifact(b"payload")
    assert A.check_binary_artifact(framed) is None
    assert A.check_binary_artifact(framed[:-1]) is not None and A.check_binary_artifact(b"ab") is not None


def test_index_real_inductor_cache(torch_cache_master: TorchCache, tmp_path: Path, catalog: Catalog) -> None:
    cache = torch_cache_master.copy(tmp_path / "inductor")
    locks = len(list((cache / "locks").iterdir()))
    s = do_index(catalog, cache)
    assert s.modes == ("inductor",) and not s.problems
    counts = kinds_of(catalog)
    assert counts["fxgraph"] == 3 and counts["aotautograd"] == 3  # one per compiled model
    assert counts["module"] >= 6 and set(counts) == {"fxgraph", "aotautograd", "module"}
    assert s.artifacts == sum(counts.values()) and s.to_json()["artifacts_by_kind"] == counts
    assert s.skipped.get("lock") == locks and locks > 0  # classified, never artifacts
    rows = query_artifacts(catalog)
    disk = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file() and f.parent.name != "locks")
    assert sum(r.size for r in rows) == disk  # every byte outside locks/ belongs to exactly one artifact
    for r in rows:
        j = r.to_json()
        assert set(j) >= ARTIFACT_FIELDS and j["vllm"] is None and j["mode"] == "inductor"
        if r.kind in ("fxgraph", "aotautograd"):
            assert j["torch_version"] == TORCH, j
        if r.kind == "module":
            assert all(A.module_stem(name) == r.key for name in j["files"])
            assert all((Path(r.path).parent / name).is_file() for name in j["files"])
    assert any(any(n.endswith(".so") for n in r.files) for r in rows if r.kind == "module")


def test_reindex_reads_only_changed_artifacts(torch_cache_master: TorchCache, tmp_path: Path, catalog: Catalog,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    cache = torch_cache_master.copy(tmp_path / "inductor")
    reads: list[str] = []
    real_read = inductor._read
    monkeypatch.setattr(inductor, "_read", lambda p, *a: reads.append(p) or real_read(p, *a))
    do_index(catalog, cache)
    assert len(reads) == 6  # 3 FX graph + 3 AOTAutograd entries: the only contents read
    reads.clear()
    s = do_index(catalog, cache)
    assert reads == [] and s.artifacts == 6 + kinds_of(catalog)["module"]
    fx = next((cache / "fxgraph").glob("*/*/*"))
    fx.write_bytes(fx.read_bytes())  # rewritten in place: new mtime
    do_index(catalog, cache)
    assert reads == [str(fx)]
    shutil.rmtree(next((cache / "aotautograd").iterdir()))
    do_index(catalog, cache)
    assert kinds_of(catalog)["aotautograd"] == 2


def test_damaged_and_half_written_entries_are_warnings(torch_cache_master: TorchCache, tmp_path: Path,
                                                       catalog: Catalog) -> None:
    cache = torch_cache_master.copy(tmp_path / "inductor")
    fx = sorted((cache / "fxgraph").glob("*/*/*"))
    fx[0].write_bytes(fx[0].read_bytes()[:1000])  # truncated
    aot = sorted((cache / "aotautograd").glob("*/*"))
    aot[0].write_bytes(b"\x80\x04not really a pickle" * 3)  # corrupt
    aot[1].write_bytes(b"")  # empty
    (fx[1].parent / f".{os.getpid()}.1.tmp").write_bytes(b"half")  # a write in progress beside an entry
    half = cache / "fxgraph" / "zz" / ("f" + "z" * 51)
    half.mkdir(parents=True)
    (half / ".99.1.tmp").write_bytes(b"\x80\x04")  # an entry whose only file is half-written
    (cache / "ab" / ".7.7.tmp").parent.mkdir(exist_ok=True)
    (cache / "ab" / ".7.7.tmp").write_bytes(b"x")
    (cache / "stray.bin").write_bytes(b"?")
    headers = cache / "precompiled_headers"  # as in Inductor's default dir: <hash>.h, <hash>.h.gch, locks/
    (headers / "locks").mkdir(parents=True)
    (headers / "cpch.h").write_text("#include <torch/csrc/inductor/cpp_prefix.h>\n")
    (headers / "cpch.h.gch").write_bytes(b"gpch" * 100)
    (headers / "locks" / "cpch.lock").write_bytes(b"")
    os.symlink("/etc", cache / "fxgraph" / "ln")
    s = do_index(catalog, cache)
    problems = {str(p.path): p.kind for p in s.problems}
    assert problems == {str(fx[0].parent): "truncated", str(aot[0].parent): "unparsable",
                        str(aot[1].parent): "truncated"}
    assert s.skipped.get("temp") == 3
    assert str(half) not in {r.path for r in query_artifacts(catalog)}  # no finished file: not an artifact
    assert kinds_of(catalog)["fxgraph"] == 3  # damaged ones still take space: indexed, and warned about
    pch = next(r for r in query_artifacts(catalog) if r.key == "cpch")
    assert pch.kind == "module" and set(pch.files) == {"cpch.h", "cpch.h.gch"}
    assert s.skipped.get("lock", 0) >= 1 + len(list((cache / "locks").iterdir()))
    s2 = do_index(catalog, cache)
    assert {str(p.path) for p in s2.problems} == set(problems)  # warned again, not silently "unchanged"


def _vllm_tree(master: TorchCache, root: Path) -> dict[str, Path]:
    """Legacy, standalone-compile and AOT vLLM layouts around copies of the real Inductor cache."""
    legacy = root / "torch_compile_cache" / "a1b2c3d4e5" / "rank_0_0"
    master.copy(legacy / "inductor_cache")
    (legacy / "vllm_compile_cache.py").write_text("{(None, 0, 'inductor'): ('fxyz', '/x/y.py')}\n")
    (legacy / "computation_graph.py").write_text("class GraphModule(torch.nn.Module): pass\n")
    best = legacy / "inductor_cache" / "q7" / "q7abc.best_config"
    best.parent.mkdir(exist_ok=True)
    best.write_text(json.dumps({"XBLOCK": 1024, "num_warps": 4, "num_stages": 1, "configs_hash": "ab" * 32,
                                "found_by_coordesc": False, "time_taken_ms": 12}))
    new = root / "torch_compile_cache" / "f0e1d2c3b4" / "rank_0_0" / "backbone"
    new.mkdir(parents=True)
    (new / "cache_key_factors.json").write_text(json.dumps({"env": {}, "config_hash": "a", "code_hash": "b",
                                                            "compiler_hash": "c"}))
    binary = new / "artifact_compile_range_1_8_subgraph_0"
    binary.write_bytes(frame_binary_artifact(master.mega.read_bytes()))
    unpacked = master.copy(new / "artifact_compile_range_1_8_subgraph_1")
    broken = new / "artifact_compile_range_9_16_subgraph_0"
    broken.write_bytes(binary.read_bytes()[:5000])
    aot = root / "torch_compile_cache" / "torch_aot_compile" / ("9" * 64)
    master.copy(aot / "inductor_cache")
    (aot / "rank_0_0").mkdir()
    model = aot / "rank_0_0" / "model"
    model.write_bytes(frame_binary_artifact(b"\x80\x04aot model"))
    return {"legacy": legacy, "new": new, "binary": binary, "unpacked": unpacked, "broken": broken, "aot": aot,
            "model": model, "best": best}


def test_vllm_layouts_around_real_artifacts(torch_cache_master: TorchCache, tmp_path: Path,
                                            catalog: Catalog) -> None:
    root = tmp_path / "vllm"
    t = _vllm_tree(torch_cache_master, root)
    s = do_index(catalog, root)
    assert s.modes == ("vllm",)
    assert {str(p.path): p.kind for p in s.problems} == {str(t["broken"]): "truncated"}
    counts = kinds_of(catalog)
    assert counts["fxgraph"] == 6 and counts["aotautograd"] == 6  # legacy inductor_cache + AOT inductor_cache
    assert counts["vllm-graph"] == 3 and counts["vllm-artifact"] == 3 and counts["aot-model"] == 1
    assert counts["autotune"] == 1
    by_path = {r.path: r for r in query_artifacts(catalog)}
    b = by_path[str(t["binary"])].to_json()
    assert b["kind"] == "vllm-artifact" and b["torch_version"] == TORCH
    assert b["vllm"] == {"hash": "f0e1d2c3b4", "rank": "rank_0_0", "prefix": "backbone"}
    u = by_path[str(t["unpacked"])]
    assert u.size == sum(f.stat().st_size for f in t["unpacked"].rglob("*") if f.is_file())
    legacy_fx = [r for r in by_path.values() if r.kind == "fxgraph" and r.vllm_hash == "a1b2c3d4e5"]
    assert len(legacy_fx) == 3 and all(r.vllm_rank == "rank_0_0" for r in legacy_fx)
    aot_fx = [r for r in by_path.values() if r.kind == "fxgraph" and r.vllm_hash == "9" * 64]
    assert len(aot_fx) == 3 and all(r.vllm_rank == "shared" for r in aot_fx)
    assert by_path[str(t["model"])].kind == "aot-model"
    assert by_path[str(t["best"])].kind == "autotune" and by_path[str(t["best"])].key == "q7abc"


def test_cli_list_and_stats_artifacts(torch_cache_master: TorchCache, tmp_path: Path, data_dir: Path) -> None:
    cache = torch_cache_master.copy(tmp_path / "inductor")
    r = runner.invoke(app, ["kernels", "index", "--cache-dir", str(cache)])
    assert r.exit_code == 0 and "artifacts (3 aotautograd, 3 fxgraph," in r.stdout, r.output
    r = runner.invoke(app, ["kernels", "list", "--artifacts", "--kind", "fxgraph", "--format", "json",
                            "--sort", "size:desc"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert len(rows) == 3 and all(set(x) >= ARTIFACT_FIELDS and x["kind"] == "fxgraph" for x in rows)
    assert [x["size"] for x in rows] == sorted((x["size"] for x in rows), reverse=True)
    r = runner.invoke(app, ["kernels", "list", "--artifacts", "--kind", "module", "--limit", "2", "--format", "csv"])
    assert r.exit_code == 0 and len(r.stdout.strip().splitlines()) == 3 and r.stdout.startswith("kind,key,path")
    r = runner.invoke(app, ["kernels", "list", "--artifacts", "--older-than", "1d"])
    assert "0 artifacts" in r.stdout
    assert runner.invoke(app, ["kernels", "list", "--artifacts", "--kind", "nope"]).exit_code == 2
    assert runner.invoke(app, ["kernels", "list", "--kind", "fxgraph"]).exit_code == 2
    assert runner.invoke(app, ["kernels", "list", "--artifacts", "--sort", "warps"]).exit_code == 2
    assert runner.invoke(app, ["kernels", "list", "--artifacts", "--backend", "cuda"]).exit_code == 2
    stats = json.loads(runner.invoke(app, ["kernels", "stats", "--format", "json"]).stdout)
    assert stats["artifacts_by_kind"]["fxgraph"]["entries"] == 3
    assert stats["artifacts_by_kind"]["module"]["total_size"] > 0


def test_cli_bad_artifact_sort_is_refused_before_indexing(tmp_path: Path, data_dir: Path) -> None:
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    r = runner.invoke(app, ["kernels", "list", "--artifacts", "--cache-dir", str(cache), "--sort", "warps"])
    assert r.exit_code == 2 and "warps" in r.output
    with Catalog.open(data_dir) as cat:
        assert cat.roots() == []  # nothing was indexed on the way to the error
