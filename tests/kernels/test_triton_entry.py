"""The entry parser on real Triton 3.9 entries, and on every kind of bad or foreign content."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from infercache.testing.samples import compile_sample
from infercache.kernels.triton_entry import (
    NotAKernel,
    TritonEntry,
    group_children,
    group_file_bytes,
    parse_entry,
    write_group_file,
)
from tests.kernels.kutil import SAMPLE_ENTRIES, entries, group_of


def _one(cache: Path, backend: str, arch: str, name: str = "add_kernel", warps: int = 4) -> TritonEntry:
    for e in entries(cache):
        if (e.backend, e.arch, e.name, e.num_warps) == (backend, arch, name, warps):
            return e
    raise AssertionError(f"no {name} for {backend}:{arch} w{warps}")


def test_parses_every_real_entry(sample_cache_master: Path) -> None:
    parsed = entries(sample_cache_master)
    assert len(parsed) == SAMPLE_ENTRIES
    targets = {(e.backend, e.arch, e.warp_size) for e in parsed}
    assert targets == {("cuda", "80", 32), ("cuda", "90", 32), ("hip", "gfx90a", 64), ("hip", "gfx942", 64)}
    assert {e.name for e in parsed} == {"add_kernel", "matmul_kernel", "row_sum_kernel"}
    assert {e.num_warps for e in parsed} == {4, 8}
    for e in parsed:
        assert len(e.key) == 52 and e.key == e.path.name
        assert e.hash and len(e.hash) == 64
        assert e.triton_version == "3.9.0"
        assert e.num_stages == 3 and e.num_ctas == 1 and isinstance(e.shared, int)
        types = {f.type for f in e.files}
        assert {"ttir", "ttgir", "llir", "json", "group"} <= types
        assert ({"cubin", "ptx"} if e.backend == "cuda" else {"hsaco", "amdgcn"}) <= types
        assert e.total_size == sum(f.size for f in e.files) == sum(p.stat().st_size for p in e.path.iterdir())
        assert e.metadata["name"] == e.name and e.metadata["hash"] == e.hash
        assert e.group_file is not None and e.group_file.name == f"__grp__{e.name}.json"
        assert set(e.children) == {f.name for f in e.files if f.type != "group"}
        assert e.orphans == ()


def test_list_form_group_file(triton_cache: Path) -> None:
    """Older Triton / the remote cache manager write child_paths as a list of names."""
    e = _one(triton_cache, "cuda", "90")
    data = group_of(e.path)
    assert isinstance(data["child_paths"], dict)
    dict_names = group_children(data)
    e.group_file.write_text(json.dumps({"child_paths": sorted(data["child_paths"])}))
    again = parse_entry(e.path)
    assert isinstance(again, TritonEntry)
    assert sorted(again.children) == sorted(dict_names)
    assert group_children({"child_paths": ["/abs/x/a.cubin", "b.json"]}) == ["a.cubin", "b.json"]
    assert group_children({"nothing": 1}) == [] and group_children({"child_paths": 3}) == []


def test_metadata_fields_that_come_and_go(triton_cache: Path) -> None:
    """No `target`, no num_ctas/shared, arch only as 'sm90': still parsed, missing fields None."""
    e = _one(triton_cache, "cuda", "90")
    meta_path = e.path / f"{e.name}.json"
    meta = json.loads(meta_path.read_text())
    for field in ("target", "num_ctas", "shared", "triton_version"):
        meta.pop(field)
    meta["extra_future_field"] = {"x": 1}
    meta_path.write_text(json.dumps(meta))
    got = parse_entry(e.path)
    assert isinstance(got, TritonEntry)
    assert (got.backend, got.arch, got.warp_size) == ("cuda", "90", 32)
    assert got.num_ctas is None and got.shared is None and got.triton_version is None
    assert got.metadata["extra_future_field"] == {"x": 1}
    # Even without backend_name, the binary's type tells the backend.
    meta.pop("backend_name")
    meta.pop("arch")
    meta_path.write_text(json.dumps(meta))
    got = parse_entry(e.path)
    assert isinstance(got, TritonEntry) and got.backend == "cuda" and got.arch == "unknown"


def test_hip_arch_is_a_string_cuda_arch_an_int_in_metadata(sample_cache_master: Path) -> None:
    hip = _one(sample_cache_master, "hip", "gfx942")
    cuda = _one(sample_cache_master, "cuda", "80")
    assert hip.metadata["target"]["arch"] == "gfx942" and hip.arch == "gfx942"
    assert cuda.metadata["target"]["arch"] == 80 and cuda.arch == "80"


def test_binary_only_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TRITON_STORE_BINARY_ONLY=1 (a real compile) keeps only the binary and JSON files."""
    monkeypatch.setenv("TRITON_STORE_BINARY_ONLY", "1")
    result = compile_sample(tmp_path / "bin", "add_kernel", "hip:gfx90a", num_warps=4)
    got = parse_entry(result.entry_dir)
    assert isinstance(got, TritonEntry), got
    types = {f.type for f in got.files}
    assert {"hsaco", "json", "group"} <= types  # 3.9 also keeps the .source
    assert types.isdisjoint({"ttir", "ttgir", "llir", "amdgcn"})
    assert (got.backend, got.arch) == ("hip", "gfx90a")


def _bad(path: Path) -> NotAKernel:
    got = parse_entry(path)
    assert isinstance(got, NotAKernel), got
    return got


def test_non_kernels_are_classified(triton_cache: Path, tmp_path: Path) -> None:
    src = entries(triton_cache)[0]
    launcher = triton_cache / ("a" * 64)
    launcher.mkdir()
    (launcher / "cuda_utils.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF")
    (launcher / "cuda_utils.c").write_text("int x;")
    assert _bad(launcher).kind == "launcher"

    autotune = triton_cache / ("b" * 64)
    autotune.mkdir()
    (autotune / "matmul_kernel.autotune.json").write_text('{"configs_timings": []}')
    assert _bad(autotune).kind == "autotune"

    leftover = triton_cache / "tmp.pid_123_abc"
    leftover.mkdir()
    (leftover / "x.cubin").write_bytes(b"12345")
    got = _bad(leftover)
    assert got.kind == "garbage" and got.size == 5

    only_tmp = triton_cache / ("C" * 52)
    (only_tmp / "tmp.pid_9_x").mkdir(parents=True)
    assert _bad(only_tmp).kind == "garbage"

    empty = triton_cache / ("D" * 52)
    empty.mkdir()
    assert _bad(empty).kind == "empty"

    stray = triton_cache / "notes.txt"
    stray.write_text("hello")
    assert _bad(stray).kind == "orphan"

    no_group = triton_cache / ("E" * 52)
    shutil.copytree(src.path, no_group)
    next(no_group.glob("__grp__*")).unlink()
    assert _bad(no_group).kind == "incomplete"

    # A kernel entry with a leftover inside and an unlisted file: still a kernel, extras reported.
    (src.path / "tmp.pid_1_zz").mkdir()
    (src.path / "stray.bin").write_bytes(b"xx")
    got = parse_entry(src.path)
    assert isinstance(got, TritonEntry)
    assert got.leftovers == (src.path / "tmp.pid_1_zz",)
    assert [f.name for f in got.orphans] == ["stray.bin"]


def test_corrupt_and_truncated_entries(triton_cache: Path) -> None:
    es = entries(triton_cache)
    corrupt, truncated, bad_group, not_object = es[0], es[1], es[2], es[3]
    (corrupt.path / f"{corrupt.name}.json").write_text('{"hash": "abc", "name": ')
    got = _bad(corrupt.path)
    assert got.kind == "unparsable" and "corrupt metadata" in got.reason

    binary = next(f for f in truncated.files if f.type in ("cubin", "hsaco"))
    (truncated.path / binary.name).unlink()
    got = _bad(truncated.path)
    assert got.kind == "truncated" and binary.name in got.reason

    bad_group.group_file.write_bytes(b"\x00\xff garbage")
    assert _bad(bad_group.path).kind == "unparsable"

    (not_object.path / f"{not_object.name}.json").write_text("[1, 2, 3]")
    assert _bad(not_object.path).kind == "unparsable"


def test_symlinks_are_never_followed(triton_cache: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    real = entries(triton_cache)[0]
    shutil.copytree(real.path, outside / real.key)
    link = triton_cache / ("F" * 52)
    link.symlink_to(outside / real.key)
    got = _bad(link)
    assert got.kind == "symlink"

    loop = triton_cache / ("G" * 52)
    loop.symlink_to(loop)
    assert _bad(loop).kind == "symlink"

    # A real entry dir whose metadata file is a link to a file outside the cache.
    e = entries(triton_cache)[1]
    meta = e.path / f"{e.name}.json"
    target = outside / "meta.json"
    target.write_bytes(meta.read_bytes())
    meta.unlink()
    meta.symlink_to(target)
    assert _bad(e.path).kind == "symlink"


def _parse_as_nobody(path: Path) -> tuple[str, str]:
    """parse_entry in a forked child that dropped root (root reads anything); result over a pipe."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: modules are already imported, so only `path` is touched as nobody
        try:
            os.close(read_fd)
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            r = parse_entry(path)
            os.write(write_fd, f"{type(r).__name__} {getattr(r, 'kind', '-')}".encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        out = pipe.read().decode()
    os.waitpid(pid, 0)
    name, kind = out.split()
    return name, kind


def test_unreadable_metadata_is_reported(sample_cache_master: Path) -> None:
    """Permission denied, for real: as root, the parse runs in a child that dropped to `nobody`."""
    base = Path(tempfile.mkdtemp(prefix="infercache-perm-"))
    try:
        os.chmod(base, 0o755)
        src = entries(sample_cache_master)[0]
        entry = base / src.key
        shutil.copytree(src.path, entry)
        os.chmod(entry, 0o755)
        for child in entry.iterdir():
            os.chmod(child, 0o644)
        os.chmod(entry / f"{src.name}.json", 0o000)
        assert _parse_as_nobody(entry) == ("NotAKernel", "unreadable")
    finally:
        for dirpath, dirs, files in os.walk(base):
            for name in files:
                os.chmod(os.path.join(dirpath, name), 0o644)
        shutil.rmtree(base)


def test_write_group_file_forms_and_triton_hit(sample_cache_master: Path, tmp_path: Path) -> None:
    """Absolute form under a new base dir makes a moved entry a Triton hit again; relative form parses."""
    result = compile_sample(tmp_path / "c1", "row_sum_kernel", "cuda:80", num_warps=4)
    moved_cache = tmp_path / "moved"
    shutil.copytree(tmp_path / "c1", moved_cache)
    entry = moved_cache / result.key
    group = next(entry.glob("__grp__*.json"))
    children = group_children(json.loads(group.read_text()))

    write_group_file(group, children, None)
    data = json.loads(group.read_text())
    assert data == {"child_paths": {n: n for n in children}}
    assert group.read_bytes() == group_file_bytes(children, None)
    assert isinstance(parse_entry(entry), TritonEntry)

    write_group_file(group, children, entry)
    assert json.loads(group.read_text())["child_paths"] == {n: str(entry / n) for n in children}
    assert compile_sample(moved_cache, "row_sum_kernel", "cuda:80", num_warps=4).cache_hit is True
