"""`infercache kernels ...` and `mcm ...` as a user runs them: output shapes, exit codes, prompts."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from infercache.cli.app import app
from infercache.cli.mcm import app as mcm_app
from infercache.testing.samples import compile_sample
from tests.helpers import run_cli
from tests.kernels.kutil import SAMPLE_ENTRIES, du, entries

runner = CliRunner()

LIST_FIELDS = {"key", "name", "backend", "arch", "warp_size", "num_warps", "num_stages", "num_ctas", "shared",
               "ptx_version", "triton_version", "mode", "path", "cache_root", "total_size", "files", "modified",
               "hits", "misses", "last_access", "vllm"}
STATS_FIELDS = {"entries", "total_size", "by_backend", "by_arch", "by_triton_version", "by_file_type",
                "reclaimable_ir_bytes", "hits", "misses", "hit_rate"}
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)$")


def cli(*args: str, input: str | None = None):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args), input=input)


def mcm(*args: str, input: str | None = None):  # type: ignore[no-untyped-def]
    return runner.invoke(mcm_app, list(args), input=input)


def test_index_then_list_json_shape(triton_cache: Path, data_dir: Path) -> None:
    r = cli("kernels", "index", "--cache-dir", str(triton_cache))
    assert r.exit_code == 0, r.output
    assert "24 new" in r.stdout
    r = cli("kernels", "list", "--format", "json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert isinstance(rows, list) and len(rows) == SAMPLE_ENTRIES
    on_disk = {e.key: e for e in entries(triton_cache)}
    for row in rows:
        assert LIST_FIELDS <= set(row)
        e = on_disk[row["key"]]
        assert len(row["key"]) == 52
        assert row["backend"] in ("cuda", "hip") and isinstance(row["arch"], str)
        assert (row["name"], row["arch"], row["warp_size"], row["num_warps"]) == (e.name, e.arch, e.warp_size,
                                                                                   e.num_warps)
        assert all(isinstance(row[k], int) for k in ("warp_size", "num_warps", "num_stages", "num_ctas", "shared"))
        assert row["mode"] == "triton" and row["vllm"] is None
        assert row["path"] == str(e.path) and row["cache_root"] == str(triton_cache.resolve())
        assert row["total_size"] == e.total_size == sum(row["files"].values())
        assert ("cubin" in row["files"]) == (row["backend"] == "cuda")
        assert ISO.match(row["modified"]) and row["last_access"] is None
        assert (row["hits"], row["misses"]) == (0, 0)


def test_index_json_and_vllm_list(sample_cache_master: Path, tmp_path: Path, data_dir: Path) -> None:
    from tests.kernels import layouts

    root = tmp_path / "vllm"
    layouts.make_vllm_legacy(root, sample_cache_master)
    r = cli("kernels", "index", "--cache-dir", str(root), "--mode", "vllm", "--format", "json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["new"] == SAMPLE_ENTRIES and summary["modes"] == ["vllm"]
    rows = json.loads(cli("kernels", "list", "--format", "json", "--mode", "vllm").stdout)
    assert {(row["vllm"]["hash"], row["vllm"]["rank"]) for row in rows} == {(layouts.DEFAULT_VLLM_HASH, "rank_0_0")}


def test_list_table_csv_and_footer(triton_cache: Path, data_dir: Path) -> None:
    cli("kernels", "index", "--cache-dir", str(triton_cache))
    r = cli("kernels", "list", "-b", "rocm", "-a", "gfx90a")
    assert r.exit_code == 0
    total = sum(e.total_size for e in entries(triton_cache) if e.arch == "gfx90a")
    assert "6 kernels" in r.stdout and f"({total} bytes)" in r.stdout
    r = cli("kernels", "list", "--format", "csv", "--sort", "size:desc", "--limit", "5")
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(rows) == 5
    sizes = [int(x["total_size"]) for x in rows]
    assert sizes == sorted(sizes, reverse=True)
    assert {"key", "name", "backend", "arch", "path"} <= set(rows[0])


def test_list_cache_dir_indexes_on_the_fly(triton_cache: Path, data_dir: Path) -> None:
    r = cli("kernels", "list", "--cache-dir", str(triton_cache), "--name-like", "matmul*", "--format", "json")
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)) == 8


def test_stats_json_shape_and_zero(triton_cache: Path, data_dir: Path) -> None:
    from infercache.kernels.catalog import Catalog

    cli("kernels", "index", "--cache-dir", str(triton_cache))
    with Catalog.open(data_dir) as cat:
        cat.record_usage(entries(triton_cache)[0].key, hits=3, misses=1)
    r = cli("kernels", "stats", "--format", "json")
    assert r.exit_code == 0, r.output
    stats = json.loads(r.stdout)
    assert STATS_FIELDS <= set(stats)
    assert stats["entries"] == SAMPLE_ENTRIES
    assert stats["total_size"] == sum(e.total_size for e in entries(triton_cache))
    assert set(stats["by_backend"]) == {"cuda", "hip"} and set(stats["by_arch"]) == {"80", "90", "gfx90a", "gfx942"}
    assert len(stats["by_triton_version"]) == 1
    assert sum(stats["by_file_type"].values()) == stats["total_size"]
    ir = sum(v for k, v in stats["by_file_type"].items() if k in ("ttir", "ttgir", "llir", "source"))
    assert stats["reclaimable_ir_bytes"] == ir > 0
    assert (stats["hits"], stats["misses"], stats["hit_rate"]) == (3, 1, 0.75)
    # The sample cache was compiled by the installed Triton.
    assert stats["installed_triton_version"] == next(iter(stats["by_triton_version"]))
    assert stats["other_triton_entries"] == 0
    r = cli("kernels", "stats", "--zero")
    assert r.exit_code == 0 and "Hit rate" in r.stdout
    stats = json.loads(cli("kernels", "stats", "--format", "json", "--cache-dir", str(triton_cache)).stdout)
    assert (stats["hits"], stats["misses"]) == (0, 0)


def test_prune_dry_run_confirm_and_yes(triton_cache: Path, data_dir: Path) -> None:
    cli("kernels", "index", "--cache-dir", str(triton_cache))
    before = du(triton_cache)
    r = cli("kernels", "prune", "--dry-run", "--format", "json", "-n", "add_kernel")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["dry_run"] is True and plan["count"] == 8 and plan["strategy"] == "ir"
    assert plan["bytes_freed"] == sum(a["bytes"] for a in plan["actions"]) > 0
    r = cli("kernels", "prune", "--dry-run", "-n", "add_kernel")
    assert f"({plan['bytes_freed']} bytes)" in r.stdout
    assert du(triton_cache) == before
    # No -y: the answer "n" aborts and changes nothing.
    r = cli("kernels", "prune", "-n", "add_kernel", input="n\n")
    assert r.exit_code == 1 and du(triton_cache) == before
    r = cli("kernels", "prune", "-n", "add_kernel", input="y\n")
    assert r.exit_code == 0, r.output
    assert before - du(triton_cache) == plan["bytes_freed"]
    r = cli("kernels", "prune", "--full", "-y", "-a", "80", "--format", "json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["result"]["entries_removed"] == 6
    assert compile_sample(triton_cache, "add_kernel", "cuda:90", num_warps=8).cache_hit is True


@pytest.mark.parametrize(
    "args,needle",
    [
        (["kernels", "list", "--backend", "metal"], "'metal'"),
        (["kernels", "list", "--older-than", "7 days"], "'7 days'"),
        (["kernels", "list", "--younger-than", "-1d"], "'-1d'"),
        (["kernels", "list", "--sort", "colour"], "'colour'"),
        (["kernels", "list", "--mode", "tpu"], "'tpu'"),
        (["kernels", "prune", "--max-size", "lots"], "'lots'"),
        (["kernels", "prune", "--full", "--garbage"], "--full and --garbage"),
        (["kernels", "index", "--cache-dir", "/nonexistent/cache"], "/nonexistent/cache"),
        (["kernels", "list", "--cache-dir", "/nonexistent/cache"], "/nonexistent/cache"),
        (["kernels", "stats", "--cache-dir", "/nonexistent/cache"], "/nonexistent/cache"),
        (["kernels", "index", "--mode", "tpu", "--cache-dir", "/tmp"], "'tpu'"),
    ],
)
def test_bad_input_exits_2_naming_the_value(args: list[str], needle: str, data_dir: Path) -> None:
    r = cli(*args)
    assert r.exit_code == 2, r.output
    assert needle in r.stderr


def test_cli_as_a_subprocess(triton_cache: Path, data_dir: Path) -> None:
    """The real entry point: exit codes and one JSON document on stdout."""
    assert run_cli("kernels", "index", "--cache-dir", str(triton_cache / "missing")).returncode == 2
    bad = run_cli("kernels", "list", "-b", "tpu")
    assert bad.returncode == 2 and "tpu" in bad.stderr
    run_cli("kernels", "index", "--cache-dir", str(triton_cache), check=True)
    out = run_cli("kernels", "list", "--format", "json", check=True)
    assert len(json.loads(out.stdout)) == SAMPLE_ENTRIES


def test_mcm_flags(triton_cache: Path, data_dir: Path) -> None:
    """Every flag of the MCM seed is accepted and maps to the same library code."""
    r = mcm("-vv", "index", "--cache-dir", str(triton_cache), "--mode", "triton")
    assert r.exit_code == 0, r.output
    assert "24 new" in r.stdout
    r = mcm("list", "--backend", "rocm", "--arch", "gfx90a", "--younger-than", "7d")
    assert r.exit_code == 0, r.output
    assert "6 kernels" in r.stdout and "Hash" in r.stdout
    r = mcm("-v", "list", "-n", "add_kernel", "-b", "cuda", "-a", "80", "--older-than", "0d",
            "--cache-hit-lower", "5", "--cache-hit-higher", "0", "--cache-dir", str(triton_cache),
            "--mode", "triton")
    assert r.exit_code == 0, r.output
    assert "0 kernels" in r.stdout  # no kernel has more than 0 hits
    r = mcm("list", "-n", "add_kernel", "-b", "cuda", "-a", "80", "--cache-hit-lower", "5")
    assert "2 kernels" in r.stdout
    before = du(triton_cache)
    r = mcm("prune", "--name", "row_sum_kernel", "--older-than", "0d", input="n\n")
    assert r.exit_code == 1 and du(triton_cache) == before
    r = mcm("-vvv", "prune", "--name", "row_sum_kernel", "-y")
    assert r.exit_code == 0, r.output
    assert du(triton_cache) < before
    r = mcm("prune", "--deduplicate", "-y", "--cache-dir", str(triton_cache))
    assert r.exit_code == 0 and "nothing to prune" in r.stdout
    r = mcm("prune", "--full", "-y", "-b", "hip", "-a", "gfx942")
    assert r.exit_code == 0
    assert not any(e.arch == "gfx942" for e in entries(triton_cache))
    assert mcm("list", "-b", "rocmx").exit_code == 2
    assert mcm("prune", "--full", "--deduplicate").exit_code == 2


def test_list_vllm_artifacts(sample_cache_master: Path, tmp_path: Path, data_dir: Path) -> None:
    from tests.kernels import layouts

    root = tmp_path / "vllm"
    lay = layouts.make_vllm_new(root, sample_cache_master, binary=3)
    cli("kernels", "index", "--cache-dir", str(root))
    r = cli("kernels", "list", "--artifacts", "--kind", "vllm-artifact", "--format", "json")
    assert r.exit_code == 0, r.output
    arts = [a for a in json.loads(r.stdout) if a["size"] == 4096]  # the binary ones (the unpacked dir is one too)
    assert sorted(a["path"] for a in arts) == sorted(str(p.resolve()) for p in lay.artifacts)
    for a in arts:
        assert a["size"] == 4096 and a["kind"] == "vllm-artifact" and ISO.match(a["modified"])
        assert a["vllm"]["rank"] == "rank_0_0" and a["vllm"]["prefix"] == "backbone"
    r = cli("kernels", "list", "--artifacts", "--kind", "vllm-graph")
    assert "1 artifact, " in r.stdout  # cache_key_factors.json
    r = cli("kernels", "list", "--format", "json")
    assert len(json.loads(r.stdout)) == lay.entry_count  # kernels only
    stats = json.loads(cli("kernels", "stats", "--format", "json").stdout)
    assert stats["artifacts_by_kind"]["vllm-artifact"]["entries"] == 4  # 3 binary + 1 unpacked


def test_stats_flags_kernels_of_another_triton(triton_cache: Path, data_dir: Path) -> None:
    e = entries(triton_cache)[0]
    meta = e.path / f"{e.name}.json"
    data = json.loads(meta.read_text())
    data["triton_version"] = "3.3.1"
    meta.write_text(json.dumps(data))
    cli("kernels", "index", "--cache-dir", str(triton_cache))
    stats = json.loads(cli("kernels", "stats", "--format", "json").stdout)
    assert stats["by_triton_version"]["3.3.1"]["entries"] == 1 and stats["other_triton_entries"] == 1
    r = cli("kernels", "stats")
    assert "another Triton version" in r.stderr
