"""A corpus of hand-built malicious images: each is refused with a clear message, nothing is written
outside the staging dir, and nothing is left in the destination."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
import pytest

from infercache.errors import InfercacheError
from infercache.vault.extract import ExtractLimits, UnsafeImageError
from infercache.vault.unpack import unpack
from tests.vault.imagekit import KEY, Member, build_image, tar_bytes, valid_entry

E = f"io.triton.cache/{KEY}"


def _lie_sha(manifest: dict) -> None:
    manifest["triton"][0]["files"][0]["sha256"] = "0" * 64


def _lie_missing(manifest: dict) -> None:
    manifest["triton"][0]["files"].append({"name": "k.ttir", "size": 3, "sha256": "0" * 64})


def _truncate(blob: Path, _digest: str) -> None:
    data = blob.read_bytes()
    blob.write_bytes(data[: len(data) // 2])


def _flip(blob: Path, _digest: str) -> None:
    data = bytearray(blob.read_bytes())
    data[-20] ^= 0x55
    blob.write_bytes(bytes(data))


# name → (tar members, build kwargs, expected message fragment, unpack kwargs)
CORPUS: dict[str, tuple[list[Member], dict, str, dict]] = {
    "traversal": (valid_entry(extra=[Member("io.triton.cache/../../escaped.txt", data=b"x")]), {}, "'..'", {}),
    "absolute": (valid_entry(extra=[Member("/tmp/infercache-absolute-escape.txt", data=b"x")]), {}, "absolute", {}),
    "symlink-escape": (valid_entry(extra=[Member(f"{E}/evil", tarfile.SYMTYPE, linkname="../../../outside")]),
                       {}, "outside its directory", {}),
    "symlink-absolute": (valid_entry(extra=[Member(f"{E}/evil", tarfile.SYMTYPE, linkname="/etc/passwd")]),
                         {}, "absolute", {}),
    "write-through-symlink": (
        valid_entry(extra=[Member("io.triton.cache/lnk", tarfile.SYMTYPE, linkname=KEY),
                           Member("io.triton.cache/lnk/k.cubin", data=b"overwrite")]),
        {}, "non-directory", {}),
    "hardlink-escape": (valid_entry(extra=[Member(f"{E}/evil", tarfile.LNKTYPE, linkname="../outside/secret")]),
                        {}, "'..'", {}),
    "hardlink-absolute": (valid_entry(extra=[Member(f"{E}/evil", tarfile.LNKTYPE, linkname="/etc/shadow")]),
                          {}, "absolute", {}),
    "device-node": (valid_entry(extra=[Member(f"{E}/null", tarfile.CHRTYPE)]), {}, "device node", {}),
    "block-device": (valid_entry(extra=[Member(f"{E}/sda", tarfile.BLKTYPE)]), {}, "device node", {}),
    "fifo": (valid_entry(extra=[Member(f"{E}/pipe", tarfile.FIFOTYPE)]), {}, "FIFO", {}),
    "outside-top-dirs": (valid_entry(extra=[Member("etc/cron.d/evil", data=b"* * * * * root sh")]), {},
                         "outside the expected top-level dirs", {}),
    "whiteout": (valid_entry(extra=[Member(f"io.triton.cache/.wh.{KEY}", data=b"")]), {}, "whiteout", {}),
    "bomb-ratio": (
        valid_entry(extra=[Member(f"{E}/k.bomb", data=b"\0" * (8 << 20))]), {},
        "decompression bomb", {"limits": ExtractLimits(max_ratio=50, ratio_floor_bytes=1 << 20)}),
    "bomb-total": (
        valid_entry(extra=[Member(f"{E}/k.bomb", data=b"\0" * (4 << 20))]), {},
        "decompression bomb", {"limits": ExtractLimits(max_total_bytes=2 << 20)}),
    "digest-mismatch": (valid_entry(), {"tamper": _flip}, "digest mismatch", {}),
    "truncated-blob": (valid_entry(), {"tamper": _truncate}, "truncated", {}),
    "manifest-lies-sha256": (valid_entry(manifest_override=_lie_sha), {}, "does not match the layer", {}),
    "manifest-lies-missing-file": (valid_entry(manifest_override=_lie_missing), {}, "missing files k.ttir", {}),
    "manifest-hides-entry": (
        valid_entry(extra=[Member("io.triton.cache/" + "Z" * 52 + "/x.cubin", data=b"hidden")]), {},
        "not listed in manifest.json", {}),
    "manifest-unlisted-file": (valid_entry(extra=[Member(f"{E}/payload.so", data=b"\x7fELF")]), {},
                               "unlisted files payload.so", {}),
}


def _snapshot(root: Path) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            out.add(os.path.relpath(os.path.join(dirpath, name), root))
    return out


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 10


def test_valid_hand_built_image_is_accepted(tmp_path: Path) -> None:
    """Control: the same builder without the attack unpacks fine (so refusals are about the attack)."""
    ref = build_image(tmp_path / "img", tar_bytes(valid_entry()))
    report = unpack(ref, tmp_path / "dest", ["cuda:90"])
    assert report.extracted == (KEY,)
    group = json.loads((tmp_path / "dest" / KEY / "__grp__k.json").read_text())["child_paths"]
    assert group["k.cubin"] == str((tmp_path / "dest").resolve() / KEY / "k.cubin")


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_malicious_image_refused(case: str, tmp_path: Path) -> None:
    members, build_kwargs, message, unpack_kwargs = CORPUS[case]
    work = tmp_path / "work"
    work.mkdir()
    ref = build_image(tmp_path / "img", tar_bytes(members), **build_kwargs)
    outside = work / "outside"
    outside.mkdir()
    (outside / "secret").write_text("do not touch")
    dest = work / "dest"
    before = _snapshot(work)
    with pytest.raises(InfercacheError) as info:
        unpack(ref, dest, ["cuda:90"], **unpack_kwargs)
    assert message in str(info.value), str(info.value)
    assert not dest.exists(), f"destination left behind: {_snapshot(dest)}"
    assert _snapshot(work) == before
    assert (outside / "secret").read_text() == "do not touch"
    assert not Path("/tmp/infercache-absolute-escape.txt").exists()


def test_existing_dest_content_untouched_by_refused_image(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    (dest / KEY).mkdir(parents=True)
    (dest / KEY / "mine").write_text("keep")
    ref = build_image(tmp_path / "img", tar_bytes(valid_entry(extra=[Member(f"{E}/fifo", tarfile.FIFOTYPE)])))
    with pytest.raises(UnsafeImageError):
        unpack(ref, dest, ["cuda:90"], overwrite=True)
    assert _snapshot(dest) == {KEY, f"{KEY}/mine"}


def _end_of_members(data: bytes) -> int:
    import io

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return max(m.offset_data + ((m.size + 511) // 512) * 512 for m in tar.getmembers())


def test_bomb_with_default_limits_on_zstd_zeros(tmp_path: Path) -> None:
    """A ~100 KiB zstd layer holding a 4 GiB file of zeros is refused by the default limits before
    anything of that file is written (the declared size already exceeds the ratio bound)."""
    import hashlib

    import zstandard

    size = 4 << 30
    full = tar_bytes(valid_entry())
    head = full[: _end_of_members(full)]  # the valid entry without the end-of-archive blocks
    info = Member(f"{E}/k.bomb").info()
    info.size = size
    header = info.tobuf(tarfile.PAX_FORMAT)
    layout = tmp_path / "img"
    (layout / "blobs" / "sha256").mkdir(parents=True)
    spool = tmp_path / "bomb.zst"
    with open(spool, "wb") as out, zstandard.ZstdCompressor(level=3).stream_writer(out) as writer:
        writer.write(head + header)
        zeros = bytes(16 << 20)
        for _ in range(size // len(zeros)):
            writer.write(zeros)
        writer.write(bytes(1024))
    blob = spool.read_bytes()
    assert len(blob) < (1 << 20)
    digest = hashlib.sha256(blob).hexdigest()
    spool.rename(layout / "blobs" / "sha256" / digest)
    ref = build_image(layout, b"", compression="none")
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((layout / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]).read_text())
    manifest["layers"][0] = {"mediaType": "application/vnd.oci.image.layer.v1.tar+zstd",
                             "digest": "sha256:" + digest, "size": len(blob)}
    raw = json.dumps(manifest).encode()
    mdigest = hashlib.sha256(raw).hexdigest()
    (layout / "blobs" / "sha256" / mdigest).write_bytes(raw)
    index["manifests"][0].update({"digest": "sha256:" + mdigest, "size": len(raw)})
    (layout / "index.json").write_text(json.dumps(index))
    with pytest.raises(UnsafeImageError, match="decompression bomb"):
        unpack(ref, tmp_path / "dest", ["cuda:90"])
    assert not (tmp_path / "dest").exists()
