"""`vault copy` between every pair of local transports, and its failure behaviour."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from infercache.errors import BadInputError, InfercacheError
from infercache.vault.copy import copy_image
from infercache.vault.inspect import inspect_image
from infercache.vault.unpack import unpack

TRANSPORTS = {
    "oci": "oci:{d}/layout-{n}:t{n}",
    "oci-archive": "oci-archive:{d}/archive-{n}.tar:t{n}",
    "docker-archive": "docker-archive:{d}/docker-{n}.tar:cache/img:t{n}",
}


@pytest.mark.parametrize("src_kind,dst_kind", list(itertools.product(TRANSPORTS, TRANSPORTS)))
def test_copy_between_transports(oci_image: str, cuda90_keys: set[str], tmp_path: Path, src_kind: str,
                                 dst_kind: str) -> None:
    src = TRANSPORTS[src_kind].format(d=tmp_path, n=1)
    dst = TRANSPORTS[dst_kind].format(d=tmp_path, n=2)
    copy_image(oci_image, src)
    result = copy_image(src, dst)
    assert result.blobs_copied == 2
    before, after = inspect_image(src), inspect_image(dst)
    assert after["labels"] == before["labels"]
    if "docker-archive" not in (src_kind, dst_kind):
        assert result.digest == before["digest"] == after["digest"] == inspect_image(oci_image)["digest"]
    report = unpack(dst, tmp_path / "dest", ["cuda:90"])
    assert set(report.extracted) == cuda90_keys


def test_copy_into_existing_layout_keeps_other_tags_and_skips_blobs(oci_image: str, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    copy_image(oci_image, f"oci:{layout}:a")
    again = copy_image(oci_image, f"oci:{layout}:b")
    assert again.blobs_skipped == 2 and again.blobs_copied == 0
    assert inspect_image(f"oci:{layout}:a")["digest"] == inspect_image(f"oci:{layout}:b")["digest"]
    with pytest.raises(BadInputError, match="holds 2 images"):
        inspect_image(f"oci:{layout}")


def test_failed_copy_leaves_no_destination(oci_image: str, tmp_path: Path) -> None:
    import json
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(oci_image.split(":")[1], broken)
    index = json.loads((broken / "index.json").read_text())
    manifest = json.loads((broken / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]).read_text())
    (broken / "blobs" / "sha256" / manifest["layers"][0]["digest"][7:]).write_bytes(b"not the layer")
    for dst in (f"oci:{tmp_path / 'out'}", f"oci-archive:{tmp_path / 'out.tar'}", f"docker-archive:{tmp_path / 'd.tar'}"):
        with pytest.raises(InfercacheError):
            copy_image(f"oci:{broken}:v1", dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]
    with pytest.raises(BadInputError):
        copy_image(f"oci:{tmp_path / 'nothing'}", f"oci:{tmp_path / 'out'}")
