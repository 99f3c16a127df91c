"""A torch.compile cache through a real registry (Debian's docker-registry): push, copy, pull, still warm.

The registry is the real binary from tests/registry (started once for this module's session);
the cache is the session's real Inductor cache; warmth is judged in a fresh process by the
compile work Inductor does (tests/torchcache.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infercache.vault.check import check_image
from infercache.vault.copy import copy_image
from infercache.vault.pack import pack
from infercache.vault.unpack import unpack
from tests.registry.conftest import Registry, registry, skopeo  # noqa: F401  (the real-registry fixture)
from tests.torchcache import TorchCache, run_fresh


@pytest.mark.slow
def test_registry_round_trip_stays_warm(torch_cache_master: TorchCache, registry: Registry,  # noqa: F811
                                        tmp_path: Path) -> None:
    ref = registry.ref("cache/inductor", "v1")
    pushed = pack(torch_cache_master.root, ref, mode="inductor")
    info = json.loads(skopeo("inspect", "--tls-verify=false", ref).stdout)
    assert info["Digest"] == pushed.digest
    assert info["Labels"]["model.cache.image/type"] == "inductor"
    assert json.loads(info["Labels"]["cache.inductor.image/summary"])["cpu_isa"]
    copied = registry.ref("cache/inductor-copy", "v1")
    copy_image(ref, copied)
    assert check_image(copied).compatible
    dest = tmp_path / "pulled"
    report = unpack(copied, dest)
    assert len(report.extracted) == pushed.entries and not report.skipped_incompatible
    warm = run_fresh(dest)
    assert warm["compile_work"] == 0, warm["build_targets"]
    assert warm["checksum"] == torch_cache_master.cold["checksum"]
