"""`infercache gpu`: table and JSON output, with and without GPUs."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from infercache.cli.app import app
from infercache.gpu import detect
from infercache.gpu.detect import LocalGpu
from infercache.gpu.targets import GpuTarget
from tests.helpers import run_cli

GPUS = [
    LocalGpu(0, "NVIDIA H100 80GB HBM3", GpuTarget("cuda", "90", 32), "550.54.15", "12.4", 84, "nvml"),
    LocalGpu(0, "AMD Instinct MI300X", GpuTarget("hip", "gfx942", 64), "6.7.0", None, None, "amd-smi"),
]


@pytest.fixture()
def fake_gpus(monkeypatch: pytest.MonkeyPatch) -> list[LocalGpu]:
    """No GPU here: detection itself is tested in test_detect.py; this tests presentation only."""
    monkeypatch.setattr(detect, "detect_gpus", lambda sources=None: list(GPUS))
    return GPUS


def test_json_lists_gpus_and_targets(fake_gpus: list[LocalGpu]) -> None:
    result = CliRunner().invoke(app, ["gpu", "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [(g["name"], g["target"], g["backend"], g["arch"], g["warp_size"]) for g in data] == [
        ("NVIDIA H100 80GB HBM3", "cuda:90", "cuda", "90", 32),
        ("AMD Instinct MI300X", "hip:gfx942", "hip", "gfx942", 64),
    ]
    assert data[0]["max_ptx_version"] == 84 and data[0]["max_ptx_isa"] == "8.4"
    assert data[0]["driver_version"] == "550.54.15" and data[0]["cuda_version"] == "12.4"
    assert data[1]["max_ptx_version"] is None and data[1]["source"] == "amd-smi"


def test_table_lists_gpus(fake_gpus: list[LocalGpu]) -> None:
    result = CliRunner().invoke(app, ["gpu"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for text in ("NVIDIA H100 80GB HBM3", "cuda:90", "hip:gfx942", "550.54.15", "8.4", "nvml", "amd-smi"):
        assert text in result.stdout


def test_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(detect, "detect_gpus", lambda sources=None: [])
    table = CliRunner().invoke(app, ["gpu"])
    assert table.exit_code == 0
    assert "No GPU found" in table.stdout
    as_json = CliRunner().invoke(app, ["gpu", "--format", "json"])
    assert as_json.exit_code == 0 and json.loads(as_json.stdout) == []


def test_real_command_prints_one_json_document() -> None:
    """The installed command end to end on this machine (no GPU on CI → [])."""
    result = run_cli("gpu", "--format", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert isinstance(data, list)
    assert all({"name", "backend", "arch", "warp_size", "target"} <= set(g) for g in data)


def test_bad_format_is_usage_error() -> None:
    result = run_cli("gpu", "--format", "xml")
    assert result.returncode == 2
