"""extract_layer's threaded writer and its forward-only layer reader: the parallel path must give
exactly what the serial path gives (same files, same bytes, same hashes), keep layer order for
duplicates and links, surface a failure on a writer thread and leave no thread behind."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import threading
from pathlib import Path

import pytest

from infercache.vault import extract as X
from infercache.vault.extract import ExtractLimits, UnsafeImageError, extract_layer
from tests.vault.imagekit import Member, tar_bytes

TOP = ("io.triton.cache", "io.triton.manifest", "io.vllm.cache")


def _members(entries: int = 40) -> list[Member]:
    out = [Member("io.triton.cache/", tarfile.DIRTYPE)]
    for i in range(entries):
        key = f"K{i:03d}"
        out.append(Member(f"io.triton.cache/{key}/", tarfile.DIRTYPE))
        for j, size in enumerate((10, 3000, 70_000 + i)):
            block = hashlib.sha256(f"{i}-{j}".encode()).digest()
            out.append(Member(f"io.triton.cache/{key}/f{j}.bin", data=(block * (size // 32 + 1))[:size]))
    # vLLM-style deep paths whose directories are only implied by the files
    out += [Member(f"io.vllm.cache/rank_0/{d}/sub/x{n}.py", data=f"print({d}{n})".encode() * 50)
            for d in ("a", "b", "c") for n in range(3)]
    out.append(Member("io.triton.manifest/manifest.json", data=b"{}"))
    return out


def _extract(tmp: Path, data: bytes, threads: int, **kwargs) -> tuple[Path, dict]:
    staging = tmp / f"staging-{threads}"
    staging.mkdir()
    return staging, extract_layer(io.BytesIO(data), len(data), staging, TOP, threads=threads, **kwargs)


def _tree(root: Path) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root)] = None
        for name in filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = Path(path).read_bytes()
    return out


@pytest.fixture()
def no_thread_leak():
    before = set(threading.enumerate())
    yield
    assert set(threading.enumerate()) <= before, "writer threads left running"


def test_threaded_matches_serial(tmp_path: Path, no_thread_leak: None) -> None:
    data = tar_bytes(_members())
    serial_root, serial = _extract(tmp_path, data, threads=1)
    parallel_root, parallel = _extract(tmp_path, data, threads=3)
    assert parallel == serial
    assert _tree(parallel_root) == _tree(serial_root)
    for rel, info in parallel.items():
        content = (parallel_root / rel).read_bytes()
        assert info.size == len(content) and info.sha256 == hashlib.sha256(content).hexdigest()
    assert len(parallel) == 40 * 3 + 9 + 1


def test_large_file_written_on_caller_thread_after_its_queued_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_thread_leak: None) -> None:
    """A file over the threaded size goes through the caller's thread: its directory, queued on a
    writer thread, must exist first."""
    monkeypatch.setattr(X, "_PARALLEL_MAX_FILE", 1000)
    data = tar_bytes(_members(entries=5))
    root, written = _extract(tmp_path, data, threads=2)
    assert (root / "io.triton.cache/K004/f2.bin").stat().st_size == 70_004
    assert written["io.triton.cache/K004/f2.bin"].size == 70_004


def test_duplicate_path_keeps_the_last_member(tmp_path: Path, no_thread_leak: None) -> None:
    members = _members(entries=3) + [Member("io.triton.cache/K001/f0.bin", data=b"second")]
    root, written = _extract(tmp_path, tar_bytes(members), threads=2)
    assert (root / "io.triton.cache/K001/f0.bin").read_bytes() == b"second"
    assert written["io.triton.cache/K001/f0.bin"].sha256 == hashlib.sha256(b"second").hexdigest()


def test_hard_link_to_a_file_still_queued(tmp_path: Path, no_thread_leak: None) -> None:
    members = _members(entries=3) + [Member("io.triton.cache/K002/same.bin", tarfile.LNKTYPE,
                                            linkname="io.triton.cache/K002/f1.bin")]
    root, written = _extract(tmp_path, tar_bytes(members), threads=2)
    linked = root / "io.triton.cache/K002/same.bin"
    assert linked.read_bytes() == (root / "io.triton.cache/K002/f1.bin").read_bytes()
    assert written["io.triton.cache/K002/same.bin"] == written["io.triton.cache/K002/f1.bin"]


def test_failure_on_a_writer_thread_is_raised(tmp_path: Path, no_thread_leak: None) -> None:
    def rewrite(rel: str):
        if rel != "io.triton.cache/K007/f1.bin":
            return None

        def boom(_data: bytes) -> bytes:
            raise UnsafeImageError("group file K007 is not valid JSON")

        return boom

    with pytest.raises(UnsafeImageError, match="K007"):
        _extract(tmp_path, tar_bytes(_members()), threads=2, rewrite=rewrite)
    assert not (tmp_path / "staging-2/io.triton.cache/K007/f1.bin").exists()


def test_refusal_on_the_caller_thread_stops_the_writers(tmp_path: Path, no_thread_leak: None) -> None:
    members = _members() + [Member("io.triton.cache/K001/dev", tarfile.CHRTYPE)]
    with pytest.raises(UnsafeImageError, match="device node"):
        _extract(tmp_path, tar_bytes(members), threads=2)


def test_truncated_member_data(tmp_path: Path, no_thread_leak: None) -> None:
    data = tar_bytes(_members(entries=2))
    cut = data[: data.index(b"f2.bin") + 512 + 1000]  # inside the first 70 KB file's data
    with pytest.raises(UnsafeImageError, match="truncated"):
        _extract(tmp_path, cut, threads=2)


def test_counting_reader_reads_exactly_across_chunks_and_seeks_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(X, "_CHUNK", 7)
    payload = bytes(range(256)) * 4
    reader = X._CountingReader(io.BytesIO(payload), len(payload), ExtractLimits())
    assert reader.read(3) == payload[:3]
    assert reader.read(20) == payload[3:23]  # spans several 7-byte pulls
    assert reader.tell() == 23
    assert reader.seek(100) == 100
    assert reader.read(5) == payload[100:105]
    with pytest.raises(tarfile.ReadError):
        reader.seek(50)
    assert reader.seek(5000) == len(payload)  # past the end: stops there, the next read says so
    assert reader.read(10) == b""
    assert reader.count == len(payload)
