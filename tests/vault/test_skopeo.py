"""Interop with the real skopeo: it reads what we write, and we read what it writes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from infercache.vault.copy import copy_image
from infercache.vault.inspect import inspect_image
from infercache.vault.pack import pack
from infercache.vault.unpack import unpack
from tests.helpers import require_tool


def skopeo(*args: str) -> str:
    binary = require_tool("skopeo")
    result = subprocess.run([binary, "--insecure-policy", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"skopeo {' '.join(args)} failed: {result.stderr}"
    return result.stdout


@pytest.mark.parametrize("fmt", ["oci", "docker"])
@pytest.mark.parametrize(
    "transport", ["oci:{d}/layout:v1", "oci-archive:{d}/image.tar:v1", "docker-archive:{d}/image.tar:cache/triton:v1"]
)
def test_skopeo_inspects_our_images(sample_cache_master: Path, tmp_path: Path, transport: str, fmt: str) -> None:
    ref = transport.format(d=tmp_path)
    result = pack(sample_cache_master, ref, fmt=fmt)
    info = json.loads(skopeo("inspect", ref))
    labels = info["Labels"]
    assert labels["model.cache.image/type"] == "triton"
    assert labels["model.cache.image/entry-count"] == "24"
    assert json.loads(labels["model.cache.image/summary"]) == {"targets": result.targets}
    assert info["Os"] == "linux"
    if not ref.startswith("docker-archive:"):
        assert info["Digest"] == result.digest
        raw = json.loads(skopeo("inspect", "--raw", ref))
        if fmt == "oci":
            assert raw["annotations"]["org.opencontainers.image.title"] == "triton kernel cache"
    else:
        assert info["Name"] == "docker.io/cache/triton"  # skopeo found the image by our RepoTags


def test_zstd_layout_readable_by_skopeo(sample_cache_master: Path, tmp_path: Path) -> None:
    ref = f"oci:{tmp_path / 'z'}:v1"
    pack(sample_cache_master, ref, compression="zstd")
    raw = json.loads(skopeo("inspect", "--raw", ref))
    assert raw["layers"][0]["mediaType"] == "application/vnd.oci.image.layer.v1.tar+zstd"
    assert json.loads(skopeo("inspect", ref))["Labels"]["model.cache.image/entry-count"] == "24"


@pytest.mark.parametrize("dst", ["docker-archive:{d}/sk.tar:x/y:v1", "oci-archive:{d}/sk-oci.tar:v1", "oci:{d}/sk:v1"])
def test_we_unpack_what_skopeo_copied(oci_image: str, cuda90_keys: set[str], tmp_path: Path, dst: str) -> None:
    ref = dst.format(d=tmp_path)
    skopeo("copy", oci_image, ref)
    report = unpack(ref, tmp_path / "dest", ["cuda:90"])
    assert set(report.extracted) == cuda90_keys
    assert inspect_image(ref)["labels"]["model.cache.image/entry-count"] == "24"


def test_skopeo_reads_our_copies(oci_image: str, tmp_path: Path) -> None:
    """Our copy from a skopeo-written docker-archive into OCI layouts is readable by skopeo."""
    skopeo("copy", oci_image, f"docker-archive:{tmp_path / 'sk.tar'}:x/y:v1")
    copy_image(f"docker-archive:{tmp_path / 'sk.tar'}", f"oci:{tmp_path / 'ours'}:v2")
    copy_image(f"oci:{tmp_path / 'ours'}:v2", f"oci-archive:{tmp_path / 'ours.tar'}:v3")
    for ref in (f"oci:{tmp_path / 'ours'}:v2", f"oci-archive:{tmp_path / 'ours.tar'}:v3"):
        assert json.loads(skopeo("inspect", ref))["Labels"]["model.cache.image/type"] == "triton"
