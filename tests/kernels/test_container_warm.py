"""`kernels warm --model` and `mcm warm`: the container command, the token, metadata and tarball.

No container engine runs on these machines: `tests.kernels.fake_engine` puts a stand-in
`podman`/`docker` executable on PATH that fakes the container engine (records its argv and
environment, writes a vLLM-shaped cache with real Triton entries into the mounted dir).
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from infercache.cli.app import app
from infercache.cli.mcm import app as mcm_app
from infercache.kernels.container_warm import CUDA_IMAGE, METADATA_NAME, ROCM_IMAGE
from tests.kernels import fake_engine

runner = CliRunner()
TOKEN = "hf_TopSecret0123456789"


@pytest.fixture()
def engine_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sample_cache_master: Path) -> Path:
    """PATH holds only the stand-in engines' dir (and the system's); returns the argv/env log path."""
    bin_dir = tmp_path / "bin"
    fake_engine.install(bin_dir, "podman")
    fake_engine.install(bin_dir, "docker")
    log = tmp_path / "engine.json"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_ENGINE_LOG", str(log))
    monkeypatch.setenv("FAKE_ENGINE_SEED", str(sample_cache_master))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    return log


def _recorded(log: Path) -> dict[str, Any]:
    return json.loads(log.read_text())


def test_mcm_warm_cuda_token_by_env_and_tarball_at_output(engine_env: Path, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    host, out_dir = tmp_path / "host", tmp_path / "out"
    out_dir.mkdir()
    caplog.set_level(logging.DEBUG)
    r = runner.invoke(mcm_app, ["-vvv", "warm", "--model", "org/private", "--hugging-face-token", TOKEN,
                                "--host-cache-dir", str(host), "--vllm_cache_dir", "/root/.cache/vllm/",
                                "--tarball", "--output", str(out_dir / "mine.tgz")])
    assert r.exit_code == 0, r.output
    rec = _recorded(engine_env)
    argv = rec["argv"]
    assert rec["engine"] == "podman" and argv[:2] == ["run", "--rm"]
    assert argv[argv.index("--device") + 1] == "nvidia.com/gpu=all"
    assert argv[argv.index("-v") + 1] == f"{host.resolve()}:/root/.cache/vllm/:Z"
    assert "MODEL=org/private" in argv and argv[-1] == CUDA_IMAGE
    assert "HF_TOKEN" in argv  # the name only: the engine reads the value from its environment
    assert rec["env"] == {"HF_TOKEN": TOKEN, "HUGGING_FACE_HUB_TOKEN": TOKEN}
    assert not any(TOKEN in a for a in argv)
    assert TOKEN not in r.output and TOKEN not in caplog.text
    # Metadata beside the cache, listing the real Triton entries the "container" left.
    meta_text = (host / METADATA_NAME).read_text()
    assert TOKEN not in meta_text
    meta = json.loads(meta_text)
    assert meta["model"] == "org/private" and meta["image"] == CUDA_IMAGE and len(meta["triton_entries"]) == 24
    assert all(e["path"].startswith("torch_compile_cache/0123456789/rank_0_0/triton_cache/")
               for e in meta["triton_entries"])
    # Exactly the asked path, nothing else beside it.
    assert [p.name for p in out_dir.iterdir()] == ["mine.tgz"]
    with tarfile.open(out_dir / "mine.tgz") as tar:
        names = tar.getnames()
    assert METADATA_NAME in names
    assert "torch_compile_cache/0123456789/rank_0_0/backbone/vllm_compile_cache.py" in names


def test_kernels_warm_model_rocm_docker_json_default_tarball_not_inside_itself(
        engine_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Defaults: host dir and tarball both in the current dir; the tarball does not contain itself."""
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["kernels", "warm", "--model", "EleutherAI/gpt-neo-125M", "--rocm", "--engine", "docker",
                            "--tarball", "--format", "json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["tarball"] == str(tmp_path / "warmed_cache.tar.gz") and report["triton_entries"] == 24
    argv = _recorded(engine_env)["argv"]
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "--device"]
    assert devices == ["/dev/kfd", "/dev/dri"] and argv[argv.index("--group-add") + 1] == "video"
    assert argv[-1] == ROCM_IMAGE and "HF_TOKEN" not in argv
    assert _recorded(engine_env)["env"] == {}
    with tarfile.open(tmp_path / "warmed_cache.tar.gz") as tar:
        names = tar.getnames()
    assert not any("warmed_cache.tar.gz" in n for n in names) and METADATA_NAME in names


def test_token_from_environment_only(engine_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    r = runner.invoke(app, ["kernels", "warm", "--model", "m", "--host-cache-dir", str(tmp_path / "h"),
                            "--format", "json"])
    assert r.exit_code == 0, r.output
    rec = _recorded(engine_env)
    assert rec["env"]["HF_TOKEN"] == TOKEN and not any(TOKEN in a for a in rec["argv"])
    assert TOKEN not in r.output


def test_engine_missing_is_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    r = runner.invoke(mcm_app, ["warm", "--model", "m", "--host-cache-dir", str(tmp_path / "h")])
    assert r.exit_code == 2 and "podman not found" in r.output
    r = runner.invoke(app, ["kernels", "warm", "--model", "m", "--engine", "docker"])
    assert r.exit_code == 2 and "docker not found" in r.output
    r = runner.invoke(app, ["kernels", "warm", "--model", "m", "--engine", "lxc"])
    assert r.exit_code == 2 and "podman or docker" in r.output
    assert not (tmp_path / "h").exists()


def test_engine_failure_is_exit_1_and_no_tarball(engine_env: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_ENGINE_RC", "3")
    out = tmp_path / "cache.tgz"
    r = runner.invoke(mcm_app, ["warm", "--model", "m", "--host-cache-dir", str(tmp_path / "h"), "--tarball",
                                "--output", str(out)])
    assert r.exit_code == 1 and "exited with status 3" in r.output
    assert not out.exists() and not (tmp_path / "h" / METADATA_NAME).exists()
