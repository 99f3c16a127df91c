"""Our packer's images through a real registry: push, inspect with skopeo, pull, unpack.

The cache is a real 4-target Triton cache (tests/conftest.py `triton_cache`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tests.registry.conftest import Registry, skopeo


@pytest.fixture()
def isolated_gpu_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")


def test_pack_direct_to_registry_and_skopeo_reads_labels(registry: Registry, triton_cache: Path,
                                                         isolated_gpu_env: None) -> None:
    from infercache.vault.pack import pack

    result = pack(triton_cache, registry.ref("cache/triton", "direct"))
    info = json.loads(skopeo("inspect", "--tls-verify=false", registry.ref("cache/triton", "direct")).stdout)
    assert info["Digest"] == result.digest
    labels = info["Labels"]
    assert labels["model.cache.image/type"] == "triton"
    assert int(labels["cache.triton.image/entry-count"]) == result.entries > 0
    targets = {(t["backend"], t["arch"]) for t in json.loads(labels["model.cache.image/summary"])["targets"]}
    assert targets == {("cuda", "80"), ("cuda", "90"), ("hip", "gfx90a"), ("hip", "gfx942")}


def test_pack_push_is_reproducible(registry: Registry, triton_cache: Path, tmp_path: Path,
                                   isolated_gpu_env: None, caplog: pytest.LogCaptureFixture) -> None:
    """Same cache packed to oci: and pushed directly gives the same manifest digest; re-push uploads nothing."""
    from infercache.vault.pack import pack

    pushed = pack(triton_cache, registry.ref("cache/docker", "v1"), fmt="docker")
    raw = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", registry.ref("cache/docker", "v1")).stdout)
    assert raw["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="infercache.vault.registry"):
        again = pack(triton_cache, registry.ref("cache/docker", "v2"), fmt="docker")
    assert again.digest == pushed.digest
    skipped = [r for r in caplog.records if "skipping" in r.getMessage()]
    uploaded = [r for r in caplog.records if r.getMessage().startswith("uploaded blob")]
    assert len(skipped) == 2 and not uploaded  # layer and config were already there

    local = pack(triton_cache, f"oci:{tmp_path / 'layout'}:v1", compression="zstd")
    remote = pack(triton_cache, registry.ref("cache/oci", "v1"), compression="zstd")
    assert remote.digest == local.digest
    # skopeo copies our local layout to the registry too, and lands on the same digest
    skopeo("copy", "--dest-tls-verify=false", f"oci:{tmp_path / 'layout'}:v1", registry.ref("cache/oci", "by-skopeo"))
    info = json.loads(skopeo("inspect", "--tls-verify=false", registry.ref("cache/oci", "by-skopeo")).stdout)
    assert info["Digest"] == local.digest
    assert info["Labels"]["model.cache.image/type"] == "triton"
