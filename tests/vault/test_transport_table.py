"""The transport table: every reference the parser accepts has a reader and a writer, and
`open_source` / `open_destination` hand out the classes the table names."""

from __future__ import annotations

from pathlib import Path

import pytest

from infercache.errors import BadInputError
from infercache.vault.reference import TRANSPORTS, ImageReference, familiar_name
from infercache.vault.transport import TRANSPORT_CLASSES, open_destination, open_source


def test_every_parsed_transport_has_a_row() -> None:
    assert set(TRANSPORT_CLASSES) == set(TRANSPORTS)


@pytest.mark.parametrize("transport", ["oci", "oci-archive", "docker-archive"])
def test_local_round_trip_through_the_table(transport: str, tmp_path: Path) -> None:
    """Write a one-blob image with the table's destination, read it back with its source."""
    import io
    import json

    from infercache.vault.image import OCI_CONFIG, build_manifest, sha256_digest
    from infercache.vault.reference import Descriptor

    where = tmp_path / ("layout" if transport == "oci" else "image.tar")
    ref = f"{transport}:{where}:" + ("name:v1" if transport == "docker-archive" else "v1")
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    desc = Descriptor(OCI_CONFIG, sha256_digest(config), len(config))
    dest = open_destination(ref)
    assert isinstance(dest, TRANSPORT_CLASSES[transport].destination)  # type: ignore[arg-type]
    try:
        dest.put_blob(desc, io.BytesIO(config))
        raw, media_type = build_manifest(desc, [], "docker" if transport == "docker-archive" else "oci")
        dest.put_manifest(raw, media_type)
    finally:
        dest.close()
    source = open_source(ImageReference.parse(ref))
    assert isinstance(source, TRANSPORT_CLASSES[transport].source)  # type: ignore[arg-type]
    try:
        manifest, _ = source.get_manifest()
        read_back = Descriptor.from_json(json.loads(manifest)["config"])
        assert read_back.digest == desc.digest
        with source.open_blob(read_back) as blob:
            assert blob.read() == config
    finally:
        source.close()


def test_local_path_is_only_for_local_references() -> None:
    assert ImageReference.parse("oci:~/x:v1").local_path() == Path("~/x").expanduser()
    with pytest.raises(BadInputError):
        ImageReference.parse("docker://quay.io/a/b:v1").local_path()


@pytest.mark.parametrize(("name", "short"), [
    ("docker.io/library/x:t", "x:t"), ("index.docker.io/team/x:t", "team/x:t"), ("quay.io/a/b:t", "quay.io/a/b:t"),
    ("x:t", "x:t"),
])
def test_familiar_name(name: str, short: str) -> None:
    assert familiar_name(name) == short
