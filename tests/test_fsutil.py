"""Atomic writes: the target shows the old content or the new, never half, and no temp is left."""

import os
from pathlib import Path

import pytest

from infercache.fsutil import atomic_file, atomic_write_bytes, is_within


def test_failure_keeps_old_content_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "catalog.json"
    target.write_bytes(b"old")
    target.chmod(0o600)
    with pytest.raises(RuntimeError):
        with atomic_file(target) as handle:
            handle.write(b"half of the new")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["catalog.json"]


def test_replace_keeps_mode_or_sets_the_given_one(tmp_path: Path) -> None:
    target = tmp_path / "pools.json"
    atomic_write_bytes(target, b"1", mode=0o600)
    assert target.stat().st_mode & 0o777 == 0o600
    atomic_write_bytes(target, b"2")
    assert target.read_bytes() == b"2" and target.stat().st_mode & 0o777 == 0o600
    fresh = tmp_path / "fresh"
    umask = os.umask(0o022)
    try:
        atomic_write_bytes(fresh, b"x")
    finally:
        os.umask(umask)
    assert fresh.stat().st_mode & 0o777 == 0o644, "a new file gets the umask default, like open() would"


def test_is_within_resolves_links(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "inside").touch()
    (root / "escape").symlink_to(tmp_path)
    assert is_within(root / "inside", root)
    assert not is_within(root / "escape" / "x", root)
    assert not is_within(root / ".." / "x", root)


def test_atomic_file_never_touches_the_process_umask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Other threads create files meanwhile: a umask(0) window would leave them world-writable."""
    def no_umask(_mask: int) -> int:
        raise AssertionError("atomic_file changed the process umask")

    old = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", no_umask)
        atomic_write_bytes(tmp_path / "new", b"x")
        atomic_write_bytes(tmp_path / "secret", b"y", mode=0o600)
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "secret").stat().st_mode & 0o777 == 0o600


def test_atomic_file_fsyncs_the_directory_after_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rename lives in the directory: without its fsync a crash can bring the old file back."""
    target = tmp_path / "catalog.json"
    synced: list[tuple[str, bool]] = []  # (what, target existed with the new content at that moment)
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        import stat

        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        synced.append((kind, target.exists() and target.read_bytes() == b"new"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    atomic_write_bytes(target, b"new")
    assert synced == [("file", False), ("dir", True)]
    synced.clear()
    with atomic_file(tmp_path / "bulk", fsync=False) as handle:
        handle.write(b"blob")
    assert synced == []
