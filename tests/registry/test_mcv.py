"""`mcv` front end, run as a user would (subprocess), against a real registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infercache.errors import BadInputError
from infercache.vault.reference import ImageReference
from tests.registry.conftest import PASSWORD, USER, Registry, skopeo


def mcv(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "infercache.cli.mcv", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


@pytest.mark.parametrize(("given", "expected"), [
    ("quay.io/x/y:tag", "docker://quay.io/x/y:tag"),
    ("127.0.0.1:5000/a/b", "docker://127.0.0.1:5000/a/b:latest"),
    ("localhost/a", "docker://localhost/a:latest"),
    ("team/img:1", "docker://docker.io/team/img:1"),
    ("img", "docker://docker.io/library/img:latest"),
    ("oci:/tmp/x:v1", "oci:/tmp/x:v1"),
    ("docker-archive:/tmp/a.tar", "docker-archive:/tmp/a.tar"),
])
def test_image_names_read_with_dockers_rules(given: str, expected: str) -> None:
    assert str(ImageReference.from_image_name(given)) == expected


@pytest.mark.parametrize("bad", [" ", "UPPER/case", "quay.io/"])
def test_bad_image_names(bad: str) -> None:
    with pytest.raises(BadInputError):
        ImageReference.from_image_name(bad)


@pytest.mark.parametrize(("flags", "message"), [
    (["--creds", "no-colon"], "USER:PASS"),
    (["--authfile", "/nonexistent/auth.json"], "/nonexistent/auth.json"),
])
def test_bad_credentials_flags_are_bad_input(flags: list[str], message: str) -> None:
    """mcv checks --creds and --authfile as `vault` does: exit 2 before any transfer."""
    result = mcv("--check-compat", "-i", "oci:/nonexistent/layout", *flags)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_flags_need_exactly_one_action() -> None:
    assert mcv().returncode in (0, 2)  # no args: help
    both = mcv("-c", "-e", "-i", "x/y")
    assert both.returncode == 2 and "exactly one" in both.stderr
    missing = mcv("-e")
    assert missing.returncode == 2 and "-i/--image" in missing.stderr


def test_gpu_and_hw_info_are_json() -> None:
    gpus = mcv("--gpu-info")
    assert gpus.returncode == 0, gpus.stderr
    assert isinstance(json.loads(gpus.stdout), list)
    hw = mcv("--hw-info", "-l", "debug")
    assert hw.returncode == 0, hw.stderr
    data = json.loads(hw.stdout)
    assert data["host"]["cpus"] >= 1 and isinstance(data["gpus"], list)


def test_create_pushes_bare_registry_name(registry: Registry, triton_cache: Path) -> None:
    image = f"{registry.host}/mcv/triton:v1"  # no docker:// prefix: a registry push
    result = mcv("-c", "-i", image, "-d", str(triton_cache))
    assert result.returncode == 0, result.stderr
    info = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{image}").stdout)
    assert info["Labels"]["model.cache.image/type"] == "triton"
    assert info["Digest"] in result.stdout
    ok = mcv("--check-compat", "-i", image, "--target", "cuda:90")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["compatible"] is True
    bad = mcv("--check-compat", "-i", image, "--target", "cuda:75")
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["compatible"] is False


def test_create_with_creds_and_wrong_creds(auth_registry: Registry, triton_cache: Path, tmp_path: Path) -> None:
    image = f"{auth_registry.host}/mcv/auth:v1"
    env = {"HOME": str(tmp_path), "REGISTRY_AUTH_FILE": "", "XDG_RUNTIME_DIR": ""}
    wrong = "N0t-The-Passw0rd"
    denied = mcv("-c", "-i", image, "-d", str(triton_cache), "--creds", f"{USER}:{wrong}", "-l", "debug", env=env)
    assert denied.returncode == 1
    assert "authentication" in denied.stderr and USER in denied.stderr
    assert wrong not in denied.stderr + denied.stdout
    missing = mcv("-c", "-i", image, "-d", str(triton_cache), env=env)
    assert missing.returncode == 1 and "--creds" in missing.stderr
    authfile = tmp_path / "auth.json"
    import base64

    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    authfile.write_text(json.dumps({"auths": {auth_registry.host: {"auth": token}}}))
    ok = mcv("-c", "-i", image, "-d", str(triton_cache), "--authfile", str(authfile), "-l", "debug", env=env)
    assert ok.returncode == 0, ok.stderr
    assert PASSWORD not in ok.stderr + ok.stdout and token not in ok.stderr + ok.stdout


def _keys_by_target(cache: Path) -> dict[tuple[str, str], set[str]]:
    from infercache.kernels.triton_entry import TritonEntry, scan_entry

    out: dict[tuple[str, str], set[str]] = {}
    for path in cache.iterdir():
        entry, _ = scan_entry(path)
        if isinstance(entry, TritonEntry):
            out.setdefault((entry.backend, entry.arch), set()).add(entry.key)
    return out


def test_extract_modes(registry: Registry, triton_cache: Path, tmp_path: Path) -> None:
    image = f"{registry.host}/mcv/extract:v1"
    assert mcv("-c", "-i", image, "-d", str(triton_cache)).returncode == 0
    source = _keys_by_target(triton_cache)

    one = mcv("-e", "-i", image, "-d", str(tmp_path / "one"), "--target", "hip:gfx90a", "-b")
    assert one.returncode == 0, one.stderr
    data = json.loads(one.stdout)
    assert set(data["entries"]["extracted"]) == source[("hip", "gfx90a")]
    assert data["baremetal_check"] == {"checked": len(source[("hip", "gfx90a")]), "removed": []}
    assert _keys_by_target(tmp_path / "one") == {("hip", "gfx90a"): source[("hip", "gfx90a")]}

    everything = mcv("-e", "-i", image, "-d", str(tmp_path / "all"), "--no-gpu")
    assert everything.returncode == 0, everything.stderr
    assert _keys_by_target(tmp_path / "all") == source

    again = mcv("-e", "-i", image, "-d", str(tmp_path / "all"), "--no-gpu")
    assert json.loads(again.stdout)["already_present"] == sum(len(v) for v in source.values())


def test_extract_without_gpu_or_target_refuses(registry: Registry, triton_cache: Path, tmp_path: Path) -> None:
    """This machine has no GPU: without --target/--no-gpu nothing may be installed."""
    from infercache.gpu.detect import detect_gpus

    if detect_gpus():
        pytest.skip("a GPU is present here")
    image = f"{registry.host}/mcv/nogpu:v1"
    assert mcv("-c", "-i", image, "-d", str(triton_cache)).returncode == 0
    result = mcv("-e", "-i", image, "-d", str(tmp_path / "dest"))
    assert result.returncode == 1 and "no GPU" in result.stderr
    assert not (tmp_path / "dest").exists()


def test_baremetal_check_removes_only_incompatible(triton_cache: Path) -> None:
    """-b's post-extraction check, given entries of several targets, removes only the foreign ones."""
    from infercache.vault.baremetal import baremetal_check

    by_target = _keys_by_target(triton_cache)
    keys = sorted(k for v in by_target.values() for k in v)
    result = baremetal_check(triton_cache, [*keys, ".", "..", "../x"], ["cuda:80"]).to_json()
    assert result["checked"] == len(keys)
    assert sorted(result["removed"]) == sorted(keys_ for t, v in by_target.items() if t != ("cuda", "80") for keys_ in v)
    assert _keys_by_target(triton_cache) == {("cuda", "80"): by_target[("cuda", "80")]}


def test_baremetal_check_never_follows_a_link(triton_cache: Path, tmp_path: Path) -> None:
    """A key that is a link (to an entry outside dest, or inside it) is neither checked nor removed,
    so the plan reports only what execution really removes."""
    import shutil

    from infercache.vault.baremetal import baremetal_check

    by_target = _keys_by_target(triton_cache)
    foreign = sorted(k for t, v in by_target.items() if t != ("cuda", "80") for k in v)
    outside = tmp_path / "outside"
    shutil.copytree(triton_cache / foreign[0], outside / foreign[0])
    dest = tmp_path / "dest"
    dest.mkdir()
    shutil.copytree(triton_cache / foreign[1], dest / foreign[1])
    (dest / "out-link").symlink_to(outside / foreign[0])
    (dest / "in-link").symlink_to(dest / foreign[1])
    result = baremetal_check(dest, ["out-link", "in-link", foreign[1]], ["cuda:80"]).to_json()
    assert result == {"checked": 1, "removed": [foreign[1]]}
    assert (outside / foreign[0]).is_dir() and (dest / "out-link").is_symlink() and (dest / "in-link").is_symlink()
    assert not (dest / foreign[1]).exists()
