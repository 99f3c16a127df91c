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
    with caplog.at_level(logging.INFO, logger="infercache.vault"):  # registry and registry_client
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


KERNELS = ("add_kernel", "matmul_kernel", "row_sum_kernel")


def _entry_targets(cache: Path) -> dict[str, tuple[str, str]]:
    """key → (backend, arch) for every entry dir, read with our Triton entry parser."""
    from infercache.kernels.triton_entry import TritonEntry, scan_entry

    found = {}
    for path in sorted(p for p in cache.iterdir() if p.is_dir()):
        entry, _raw = scan_entry(path)
        if isinstance(entry, TritonEntry):
            found[entry.key] = (entry.backend, entry.arch)
    return found


def test_acceptance_round_trip_through_registry(registry: Registry, triton_cache: Path, tmp_path: Path,
                                                isolated_gpu_env: None) -> None:
    """Issue 3 acceptance: 4-target cache → pack → push → pull into another dir for cuda:90 →
    only cuda:90 entries, and Triton gets a cache hit for each at the new location."""
    from infercache.testing.samples import compile_sample
    from infercache.vault.pack import pack
    from infercache.vault.unpack import unpack

    source_targets = _entry_targets(triton_cache)
    assert {t for t in source_targets.values()} == {("cuda", "80"), ("cuda", "90"), ("hip", "gfx90a"), ("hip", "gfx942")}
    ref = registry.ref("accept/triton", "v1")
    pushed = pack(triton_cache, ref, compression="zstd")
    dest = tmp_path / "elsewhere" / "cache"
    report = unpack(ref, dest=dest, targets=["cuda:90"])
    assert report.digest == pushed.digest

    want = {k for k, t in source_targets.items() if t == ("cuda", "90")}
    assert set(report.extracted) == want and len(want) == len(KERNELS) * 2
    assert len(report.skipped_incompatible) == len(source_targets) - len(want)
    assert set(_entry_targets(dest)) == want  # nothing else landed in the destination
    assert not [p for p in dest.iterdir() if p.name.startswith(".infercache")]  # staging cleaned up
    for group in dest.glob("*/__grp__*.json"):  # rewritten to the new location
        for child in json.loads(group.read_text())["child_paths"].values():
            assert Path(child).parent == group.parent

    for kernel in KERNELS:
        for warps in (4, 8):
            result = compile_sample(dest, kernel, "cuda:90", num_warps=warps)
            assert result.cache_hit, f"{kernel} warps={warps} recompiled at the new location"
    assert set(_entry_targets(dest)) == want  # hits wrote nothing new
    # and the check can fail: a target that was not extracted is a miss
    assert not compile_sample(dest, "add_kernel", "cuda:80", num_warps=4).cache_hit


def test_pull_what_skopeo_copied_from_our_archive(registry: Registry, triton_cache: Path, tmp_path: Path,
                                                  isolated_gpu_env: None) -> None:
    """skopeo moves our oci-archive: into the registry; we unpack skopeo's copy from there."""
    from infercache.vault.pack import pack
    from infercache.vault.unpack import unpack

    archive = tmp_path / "cache.tar"
    pack(triton_cache, f"oci-archive:{archive}:v1")
    skopeo("copy", "--dest-tls-verify=false", f"oci-archive:{archive}:v1", registry.ref("accept/skopeo", "v1"))
    report = unpack(registry.ref("accept/skopeo", "v1"), dest=tmp_path / "out", targets=["hip:gfx942"])
    source = _entry_targets(triton_cache)
    assert set(report.extracted) == {k for k, t in source.items() if t == ("hip", "gfx942")}


def test_copy_between_transports_and_registries(registry: Registry, triton_cache: Path, tmp_path: Path,
                                                isolated_gpu_env: None, fresh_blob_memory: None) -> None:
    """vault copy: oci: → docker:// → docker:// (another repo) → docker-archive:, same image all along."""
    from infercache.vault.copy import copy_image
    from infercache.vault.pack import pack

    local = pack(triton_cache, f"oci:{tmp_path / 'layout'}:v1")
    first = copy_image(f"oci:{tmp_path / 'layout'}:v1", registry.ref("copy/a", "v1"))
    assert first.digest == local.digest and first.blobs_copied == 2
    second = copy_image(registry.ref("copy/a", "v1"), registry.ref("copy/b", "v1"))
    assert second.digest == local.digest
    again = copy_image(registry.ref("copy/a", "v1"), registry.ref("copy/b", "v2"))
    assert again.blobs_skipped == 2 and again.blobs_copied == 0
    copy_image(registry.ref("copy/b", "v1"), f"docker-archive:{tmp_path / 'img.tar'}:copy/b:v1")
    info = json.loads(skopeo("inspect", f"docker-archive:{tmp_path / 'img.tar'}").stdout)
    assert info["Labels"]["model.cache.image/type"] == "triton"


def test_copy_within_a_registry_mounts_blobs(registry: Registry, triton_cache: Path, isolated_gpu_env: None) -> None:
    """docker://R/a → docker://R/c: the blobs are mounted across repositories, no layer bytes move."""
    from infercache.vault.copy import copy_image
    from infercache.vault.pack import pack
    from tests.registry.proxy import FaultyProxy

    pack(triton_cache, registry.ref("mount/src", "v1"))
    with FaultyProxy(registry.host, lambda *_: None) as proxy:
        result = copy_image(f"docker://{proxy.host}/mount/src:v1", f"docker://{proxy.host}/mount/dst:v1")
    assert result.blobs_copied == 0 and result.blobs_skipped == 2
    assert sum(1 for m, p, _ in proxy.log if "mount=" in p and m == "POST") == 2
    assert not [p for m, p, _ in proxy.log if m in ("PATCH", "PUT") and "/blobs/" in p]
    assert not [p for m, p, _ in proxy.log if m == "GET" and "/blobs/" in p]
    info = json.loads(skopeo("inspect", "--tls-verify=false", registry.ref("mount/dst", "v1")).stdout)
    assert info["Labels"]["model.cache.image/type"] == "triton"
    from infercache.vault.registry import RegistrySource
    from infercache.vault.reference import Descriptor, ImageReference

    src = RegistrySource(ImageReference.parse(registry.ref("mount/dst", "v1")))
    layer = Descriptor.from_json(json.loads(src.get_manifest()[0])["layers"][0])
    with src.open_blob(layer) as stream:  # digest-verified read of the mounted layer
        while stream.read(1 << 20):
            pass
    src.close()
