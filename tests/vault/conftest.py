"""Vault fixtures: images packed once per session from the real 4-target Triton cache."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def oci_image(sample_cache_master: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """`oci:` layout of the sample cache (gzip, OCI format). Read-only for tests."""
    from infercache.vault.pack import pack

    ref = f"oci:{tmp_path_factory.mktemp('oci-image') / 'layout'}:v1"
    pack(sample_cache_master, ref)
    return ref


@pytest.fixture(scope="session")
def cuda90_keys(sample_cache_master: Path) -> set[str]:
    """Keys of the sample cache's cuda:90 entries, from the real parser."""
    from infercache.kernels.triton_entry import TritonEntry, parse_entry

    keys = set()
    for child in sample_cache_master.iterdir():
        entry = parse_entry(child)
        if isinstance(entry, TritonEntry) and entry.backend == "cuda" and entry.arch == "90":
            keys.add(entry.key)
    assert len(keys) == 6
    return keys
