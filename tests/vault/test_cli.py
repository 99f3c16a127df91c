"""`infercache vault ...` as a user runs it: output shapes per the spec and exit codes 0/1/2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from infercache.cli.app import app
from tests.helpers import run_cli

runner = CliRunner()


def invoke(*args: str):  # noqa: ANN201
    return runner.invoke(app, list(args), env={"COLUMNS": "200"})


def test_pack_then_inspect_json(sample_cache_master: Path, tmp_path: Path) -> None:
    ref = f"oci-archive:{tmp_path / 'img.tar'}:v1"
    packed = invoke("vault", "pack", str(sample_cache_master), ref, "--compression", "zstd", "--name", "my cache")
    assert packed.exit_code == 0, packed.output
    assert "packed 24 entries" in packed.stdout and "cuda:90" in packed.stdout
    result = invoke("vault", "inspect", ref, "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {"reference", "digest", "media_type", "labels", "annotations", "summary", "layers"} <= set(data)
    assert data["annotations"]["org.opencontainers.image.title"] == "my cache"
    assert data["layers"][0]["media_type"] == "application/vnd.oci.image.layer.v1.tar+zstd"
    assert set(data["layers"][0]) == {"digest", "size", "media_type"}
    assert len(data["summary"]["targets"]) == 4
    table = invoke("vault", "inspect", ref)
    assert table.exit_code == 0 and "model.cache.image/entry-count" in table.stdout


def test_check_exit_codes_and_json(oci_image: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ok = invoke("vault", "check", oci_image, "--target", "cuda:90", "--format", "json")
    assert ok.exit_code == 0, ok.output
    data = json.loads(ok.stdout)
    assert data["compatible"] is True
    gpu = data["gpus"][0]
    assert {"name", "backend", "arch", "warp_size", "compatible", "reasons"} <= set(gpu)
    assert (gpu["backend"], gpu["arch"], gpu["warp_size"], gpu["compatible"]) == ("cuda", "90", 32, True)

    bad = invoke("vault", "check", oci_image, "--target", "cuda:75", "--target", "hip:gfx1100:32", "--format", "json")
    assert bad.exit_code == 1
    data = json.loads(bad.stdout)
    assert data["compatible"] is False and len(data["gpus"]) == 2
    assert all(g["reasons"] and not g["compatible"] for g in data["gpus"])

    assert invoke("vault", "check", oci_image, "--target", "nonsense").exit_code == 2
    assert invoke("vault", "check", "nope:x", "--target", "cuda:90").exit_code == 2


def test_check_without_gpu_or_target_says_so(oci_image: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Detection forced empty, so this also holds on a machine with a GPU."""
    import infercache.gpu.detect as detect

    monkeypatch.setattr(detect, "detect_gpus", lambda *a, **k: [])
    result = invoke("vault", "check", oci_image, "--format", "json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["compatible"] is False and data["gpus"] == [] and "no GPU" in data["message"]
    table = invoke("vault", "check", oci_image)
    assert table.exit_code == 1 and "no GPU detected" in table.output


def test_unpack_and_copy(oci_image: str, cuda90_keys: set[str], tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    result = invoke("vault", "unpack", oci_image, "--dest", str(dest), "--target", "cuda:90", "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["extracted"], report["skipped_incompatible"], report["already_present"]) == (6, 18, 0)
    assert set(report["entries"]["extracted"]) == cuda90_keys
    again = invoke("vault", "unpack", oci_image, "--dest", str(dest), "--target", "cuda:90")
    assert again.exit_code == 0 and "6 already present" in again.stdout
    refused = invoke("vault", "unpack", oci_image, "--dest", str(tmp_path / "x"), "--target", "hip:gfx1100:32")
    assert refused.exit_code == 1 and "--force" in refused.output
    copied = invoke("vault", "copy", oci_image, f"docker-archive:{tmp_path / 'd.tar'}:a/b:c")
    assert copied.exit_code == 0, copied.output
    assert (tmp_path / "d.tar").is_file()


def test_bad_usage_exit_2(tmp_path: Path, sample_cache_master: Path) -> None:
    assert invoke("vault", "pack", str(tmp_path / "missing"), f"oci:{tmp_path / 'o'}").exit_code == 2
    assert invoke("vault", "pack", str(sample_cache_master), f"oci:{tmp_path / 'o'}", "--compression", "lz4").exit_code == 2
    docker_zstd = invoke("vault", "pack", str(sample_cache_master), f"docker-archive:{tmp_path / 'o.tar'}",
                         "--format", "docker", "--compression", "zstd")
    assert docker_zstd.exit_code == 2 and "gzip only" in docker_zstd.output
    assert invoke("vault", "inspect", "docker:/bad").exit_code == 2
    assert invoke("vault", "copy", f"oci:{tmp_path / 'none'}", f"oci:{tmp_path / 'o2'}").exit_code == 2
    creds = invoke("vault", "inspect", f"oci:{tmp_path}", "--creds", "nocolon")
    assert creds.exit_code == 2 and "USER:PASS" in creds.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()


def test_real_entry_point_json_only_on_stdout(oci_image: str) -> None:
    result = run_cli("vault", "inspect", oci_image, "--format", "json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["labels"]["model.cache.image/type"] == "triton"
