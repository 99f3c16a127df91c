"""A corpus of hand-built malicious images: each is refused with a clear message, nothing is written
outside the staging dir, and nothing is left in the destination."""

from __future__ import annotations

import gzip
import json
import os
import tarfile
from pathlib import Path
from typing import Callable

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


def _gzip_cut(layer: bytes) -> bytes:
    """A gzip stream that ends early (its digest is right: the attacker published it like that)."""
    return gzip.compress(layer, mtime=0)[:-64]


def _gzip_corrupt(layer: bytes) -> bytes:
    data = bytearray(gzip.compress(layer, mtime=0))
    data[len(data) // 2] ^= 0xFF
    return bytes(data)


def _cut_in_member(layer: bytes) -> bytes:
    """A plain tar cut inside the data of its k.cubin member."""
    import io

    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        cubin = next(m for m in tar.getmembers() if m.name.endswith("k.cubin"))
    return layer[: cubin.offset_data + 10]


def _cut_in_header(layer: bytes) -> bytes:
    """A plain tar cut in the middle of a member's header block."""
    import io

    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        cubin = next(m for m in tar.getmembers() if m.name.endswith("k.cubin"))
    return layer[: cubin.offset + 100]


def _cut_at(name: str, where: str, back: int) -> Callable[[bytes], bytes]:
    """A plain-tar editor that cuts the archive `back` bytes before member `name`'s `where` offset."""
    import io

    def cut(layer: bytes) -> bytes:
        with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
            member = next(m for m in tar.getmembers() if m.name == name)
        return layer[: getattr(member, where) - back]

    return cut


LONG = f"{E}/" + "L" * 120  # over 100 characters: tarfile writes a PAX header block before its own
BIG = f"{E}/big.bin"  # over 4 MiB: streamed to disk, not handed to the writer threads
# Attacks on the layer stream itself (build kwarg `edit_layer` turns the plain tar into the published blob).
CORPUS.update({
    "replaces-directory": (
        valid_entry(extra=[Member(f"{E}/sub/", tarfile.DIRTYPE), Member(f"{E}/sub", data=b"file")]), {},
        "would replace a directory", {}),
    "hardlink-to-nothing": (valid_entry(extra=[Member(f"{E}/h", tarfile.LNKTYPE, linkname=f"{E}/absent")]), {},
                            "points to no extracted file", {}),
    "hardlink-other-entry": (valid_entry(extra=[Member(f"{E}/h", tarfile.LNKTYPE, linkname=f"io.triton.manifest/x")]),
                             {}, "leaves its directory", {}),
    "unknown-member-type": (valid_entry(extra=[Member(f"{E}/odd", b"Z")]), {}, "unsupported type", {}),
    "member-over-limit": (valid_entry(), {}, "over the per-file limit", {"limits": ExtractLimits(max_member_bytes=16)}),
    "too-many-members": (valid_entry(), {}, "more than 3 entries", {"limits": ExtractLimits(max_members=3)}),
    "bomb-total-stream": (valid_entry(), {}, "expands beyond 2048 bytes",
                          {"limits": ExtractLimits(max_total_bytes=2048)}),
    "bomb-ratio-stream": (valid_entry(), {}, "expands more than 2x",
                          {"limits": ExtractLimits(max_ratio=2, ratio_floor_bytes=0)}),
    "group-file-too-large": (valid_entry(extra=[Member(f"{E}/__grp__big.json", data=b" " * (17 << 20))]), {},
                             "too large for a group file", {}),
    "not-a-tar": (valid_entry(), {"edit_layer": lambda layer: b"\x01" * 4096}, "not a valid tar archive", {}),
    "tar-cut-in-header": (valid_entry(), {"edit_layer": _cut_in_header, "compression": "none"}, "not a cache image",
                          {}),
    "tar-cut-in-member": (valid_entry(), {"edit_layer": _cut_in_member, "compression": "none"},
                          "truncated", {}),
    "tar-cut-after-pax-header": (valid_entry(extra=[Member(LONG, data=b"x")]),
                                 {"edit_layer": _cut_at(LONG, "offset_data", 200), "compression": "none"},
                                 "not a valid tar archive: truncated header", {}),
    "tar-cut-in-big-member": (valid_entry(extra=[Member(BIG, data=b"\x01" * (5 << 20))]),
                              {"edit_layer": _cut_at(BIG, "offset_data", -(1 << 20)), "compression": "none"},
                              "truncated inside", {}),
    "gzip-cut": (valid_entry(), {"edit_layer": _gzip_cut, "compression": "none"},
                 "compressed stream ends early", {}),
    "gzip-corrupt": (valid_entry(), {"edit_layer": _gzip_corrupt, "compression": "none"}, "corrupt", {}),
})

#: Refusals no hand-built image can reach, each with why (matched on the start of the message).
NOT_REACHABLE_BY_AN_IMAGE = {
    "f'entry {name!r} has a NUL byte in its name'": "tarfile itself cuts member names at a NUL",
    "f'entry {member.name} has no data'": "tarfile gives every regular member a data stream",
    "'layer is truncated (unexpected end of data)'": "tarfile (3.10-3.13) reports a short archive as ReadError "
                                                     "(tar-cut-after-pax-header), not EOFError",
    "f'entry {rel} collides with a link'": "O_EXCL|O_NOFOLLOW guard: staging paths are checked before creation, "
                                           "so only a process racing in the private staging dir trips it",
    "f'entry {rel} would replace a directory'#2": "a path made here as a file or link cannot turn into a directory "
                                                  "unless the staging dir changes under us",
}


def _snapshot(root: Path) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            out.add(os.path.relpath(os.path.join(dirpath, name), root))
    return out


def _refusal_sites() -> dict[tuple[str, int], str]:
    """Every `raise UnsafeImageError(...)` of the extraction code: (file, line) → its message source."""
    import ast

    from infercache.vault import extract, file_writer

    sites: dict[tuple[str, int], str] = {}
    seen: dict[str, int] = {}
    for module in (extract, file_writer):
        tree = ast.parse(Path(module.__file__).read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)
                    and getattr(node.exc.func, "id", "") == "UnsafeImageError"):
                text = ast.unparse(node.exc.args[0]) if node.exc.args else ""
                seen[text] = seen.get(text, 0) + 1
                sites[(module.__file__, node.lineno)] = text if seen[text] == 1 else f"{text}#{seen[text]}"
    return sites


@pytest.mark.slow
def test_corpus_is_large_enough(tmp_path: Path) -> None:
    """Every refusal the extraction code can make is reached by some image in the corpus (or is listed,
    with the reason, as unreachable by an image): a new check without a malicious case fails here."""
    import sys
    import threading

    sites = _refusal_sites()
    files = {f for f, _ in sites}
    hit: set[tuple[str, int]] = set()

    def local(frame, event, arg):  # type: ignore[no-untyped-def]
        if event == "line":
            hit.add((frame.f_code.co_filename, frame.f_lineno))
        return local

    def tracer(frame, event, arg):  # type: ignore[no-untyped-def]
        return local if frame.f_code.co_filename in files else None

    previous = sys.gettrace()
    sys.settrace(tracer)
    threading.settrace(tracer)  # refusals raised on the writer threads count too
    try:
        for case in sorted(CORPUS):
            test_malicious_image_refused(case, tmp_path / case)
    finally:
        threading.settrace(None)  # type: ignore[arg-type]
        sys.settrace(previous)
    missing = sorted(text for site, text in sites.items() if site not in hit and text not in NOT_REACHABLE_BY_AN_IMAGE)
    assert not missing, f"refusals no corpus image reaches: {missing}"
    stale = sorted(set(NOT_REACHABLE_BY_AN_IMAGE) - set(sites.values()))
    assert not stale, f"NOT_REACHABLE_BY_AN_IMAGE names refusals that no longer exist: {stale}"


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
    work.mkdir(parents=True)
    kwargs = dict(build_kwargs)
    edit_layer = kwargs.pop("edit_layer", None)
    layer = tar_bytes(members)
    ref = build_image(tmp_path / "img", edit_layer(layer) if edit_layer else layer, **kwargs)
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
