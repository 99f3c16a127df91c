"""Discovery of Triton cache dirs in Triton, vLLM (legacy, new, AOT) and Inductor layouts.

vLLM's opaque artifacts are not discovery's job: ``inductor.scan_root`` (through
``artifacts.classify_vllm_file``) finds them, and these tests check it finds them in the same trees.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from infercache.errors import BadInputError
from infercache.kernels import discovery, inductor
from infercache.kernels.artifacts import ArtifactRow
from infercache.kernels.discovery import (
    AOT_SHARED_RANK,
    TritonCacheDir,
    VllmInfo,
    default_cache_dirs,
    detect_mode,
    discover,
)
from tests.kernels.layouts import (
    DEFAULT_AOT_SHA,
    copy_entries,
    entry_targets,
    make_inductor,
    make_vllm_aot,
    make_vllm_legacy,
    make_vllm_new,
)


def _dirs(found: list) -> list[TritonCacheDir]:
    return [f for f in found if isinstance(f, TritonCacheDir)]


def _artifacts(root: Path) -> list[ArtifactRow]:
    """The opaque vLLM files (binary compile artifacts, AOT ``model``) the artifact scan finds under `root`."""
    rows = inductor.scan_root(root.resolve(), "vllm").rows
    return [r for r in rows if r.kind in ("vllm-artifact", "aot-model") and Path(r.path).is_file()]


def _entries(path: Path) -> int:
    return sum(1 for p in path.iterdir() if p.is_dir() and any(p.glob("__grp__*.json")))


def test_plain_triton_cache_is_its_own_dir(triton_cache: Path) -> None:
    assert detect_mode(triton_cache) == "triton"
    found = list(discover(triton_cache))
    assert found == [TritonCacheDir(triton_cache.resolve(), "triton", triton_cache.resolve(), None)]


def test_explicit_triton_mode_on_any_dir(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert list(discover(tmp_path / "empty", "triton")) == [
        TritonCacheDir((tmp_path / "empty").resolve(), "triton", (tmp_path / "empty").resolve(), None)
    ]
    assert detect_mode(tmp_path / "empty") == "triton"


def test_vllm_legacy_layout_with_ranks_and_prefix(sample_cache_master: Path, tmp_path: Path) -> None:
    root = tmp_path / "vllm"
    a = make_vllm_legacy(root, sample_cache_master, vllm_hash="aaaaaaaaaa", ranks=("rank_0_0", "rank1_0"))
    b = make_vllm_legacy(root, sample_cache_master, vllm_hash="bbbbbbbbbb", prefix="backbone")
    assert detect_mode(root) == "vllm"
    found = list(discover(root))
    dirs = _dirs(found)
    assert [d.path for d in dirs] == sorted(p.resolve() for p in a.triton_dirs + b.triton_dirs)
    assert all(d.mode == "vllm" and d.cache_root == root.resolve() for d in dirs)
    infos = {d.path: d.vllm for d in dirs}
    assert infos[a.triton_dirs[0].resolve()] == VllmInfo("aaaaaaaaaa", "rank_0_0", None)
    assert infos[a.triton_dirs[1].resolve()] == VllmInfo("aaaaaaaaaa", "rank1_0", None)
    assert infos[b.triton_dirs[0].resolve()] == VllmInfo("bbbbbbbbbb", "rank_0_0", "backbone")
    assert _artifacts(root) == []  # legacy vLLM has no opaque artifacts; inductor_cache noise ignored
    assert all(isinstance(f, TritonCacheDir) for f in found)
    assert sum(_entries(d.path) for d in dirs) == a.entry_count + b.entry_count == 3 * 24


@pytest.mark.parametrize("level", ["torch_compile_cache", "torch_compile_cache/0a1b2c3d4e",
                                   "torch_compile_cache/0a1b2c3d4e/rank_0_0"])
def test_vllm_detected_and_found_from_inner_levels(sample_cache_master: Path, tmp_path: Path, level: str) -> None:
    layout = make_vllm_legacy(tmp_path / "vllm", sample_cache_master, prefix="backbone")
    inner = tmp_path / "vllm" / level
    assert detect_mode(inner) == "vllm"
    dirs = _dirs(list(discover(inner)))
    assert [d.path for d in dirs] == [layout.triton_dirs[0].resolve()]
    assert dirs[0].cache_root == inner.resolve()
    assert dirs[0].vllm == VllmInfo("0a1b2c3d4e", "rank_0_0", "backbone")


def test_vllm_new_layout_unpacked_and_binary_artifacts(sample_cache_master: Path, tmp_path: Path) -> None:
    root = tmp_path / "vllm"
    layout = make_vllm_new(root, sample_cache_master, vllm_hash="cccccccccc", rank="rank_1_0",
                           prefix="backbone", unpacked=2, binary=3)
    assert detect_mode(root) == "vllm"
    found = list(discover(root, "vllm"))
    dirs = _dirs(found)
    assert [d.path for d in dirs] == [p.resolve() for p in layout.triton_dirs]
    assert all(d.path.parts[-2:] == ("triton", "0") for d in dirs)
    assert {d.vllm for d in dirs} == {VllmInfo("cccccccccc", "rank_1_0", "backbone")}
    assert dirs == found  # the binary artifacts are not Triton cache dirs
    arts = _artifacts(root)
    assert sorted(Path(a.path) for a in arts) == sorted(p.resolve() for p in layout.artifacts)
    for art in arts:
        assert art.kind == "vllm-artifact"
        assert art.size == Path(art.path).stat().st_size == 4096
        assert art.modified == pytest.approx(Path(art.path).stat().st_mtime)
        assert art.vllm == VllmInfo("cccccccccc", "rank_1_0", "backbone")
        assert Path(art.cache_root) == root.resolve()


def test_vllm_aot_layout(sample_cache_master: Path, tmp_path: Path) -> None:
    root = tmp_path / "vllm"
    layout = make_vllm_aot(root, sample_cache_master, ranks=("rank_0_0", "rank_1_0"), device="1")
    assert detect_mode(root) == "vllm"
    found = list(discover(root))
    dirs = _dirs(found)
    assert [d.path for d in dirs] == [layout.triton_dirs[0].resolve()]
    assert dirs[0].vllm == VllmInfo(DEFAULT_AOT_SHA, AOT_SHARED_RANK, None)
    assert dirs == found
    arts = _artifacts(root)
    assert sorted(Path(a.path) for a in arts) == sorted(p.resolve() for p in layout.artifacts)
    assert {a.kind for a in arts} == {"aot-model"}
    assert {a.vllm.rank for a in arts} == {"rank_0_0", "rank_1_0"}
    assert {a.vllm.hash for a in arts} == {DEFAULT_AOT_SHA}


def test_all_vllm_layouts_in_one_root(sample_cache_master: Path, tmp_path: Path) -> None:
    root = tmp_path / "vllm"
    layouts = [
        make_vllm_legacy(root, sample_cache_master),
        make_vllm_new(root, sample_cache_master),
        make_vllm_aot(root, sample_cache_master),
    ]
    found = list(discover(root))
    expected_dirs = sorted(p.resolve() for lay in layouts for p in lay.triton_dirs)
    assert sorted(d.path for d in _dirs(found)) == expected_dirs
    assert len(_dirs(found)) == len(expected_dirs)  # each once
    assert sorted(Path(a.path) for a in _artifacts(root)) == sorted(p.resolve() for lay in layouts for p in lay.artifacts)


def test_inductor_layout_with_devices(sample_cache_master: Path, tmp_path: Path) -> None:
    root = tmp_path / "torchinductor_me"
    cuda90 = lambda e: entry_targets(e) == ("cuda", "90")  # noqa: E731
    layout = make_inductor(root, sample_cache_master, devices=("0", "1"), select=cuda90)
    assert layout.entry_count == 2 * 6
    assert detect_mode(root) == "inductor"
    found = list(discover(root))
    assert found == [TritonCacheDir(p.resolve(), "inductor", root.resolve(), None) for p in layout.triton_dirs]
    # Pointing at triton/ itself works too.
    assert [d.path for d in discover(root / "triton", "inductor")] == [p.resolve() for p in layout.triton_dirs]


def test_discovered_entries_are_real_triton_hits(sample_cache_master: Path, tmp_path: Path) -> None:
    """The builders' copies are genuine: Triton hits them at their new location (no compile)."""
    from infercache.testing.samples import compile_sample

    layout = make_vllm_new(tmp_path / "vllm", sample_cache_master, binary=0)
    (cache,) = _dirs(list(discover(tmp_path / "vllm")))
    result = compile_sample(cache.path, "add_kernel", "cuda:90", num_warps=4)
    assert result.cache_hit
    assert result.entry_dir.parent == layout.triton_dirs[0].resolve()


def test_symlinks_are_never_followed(sample_cache_master: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    make_vllm_legacy(outside, sample_cache_master, vllm_hash="ffffffffff")
    root = tmp_path / "vllm"
    layout = make_vllm_legacy(root, sample_cache_master)
    rank = root / "torch_compile_cache" / "0a1b2c3d4e" / "rank_0_0"
    # A link to a whole foreign vLLM tree, a link named like a cache dir, a loop.
    (root / "torch_compile_cache" / "ffffffffff").symlink_to(outside / "torch_compile_cache" / "ffffffffff")
    (rank / "extra").mkdir()
    (rank / "extra" / "triton_cache").symlink_to(outside, target_is_directory=True)
    (rank / "loop").symlink_to(rank, target_is_directory=True)
    (rank / "artifact_compile_range_1_2_subgraph_9").symlink_to(outside / "torch_compile_cache")
    found = list(discover(root))
    assert [d.path for d in _dirs(found)] == [layout.triton_dirs[0].resolve()]
    assert _artifacts(root) == []
    assert all(str(f.path).startswith(str(root.resolve())) for f in found)


def test_unreadable_dir_is_a_warning(sample_cache_master: Path, tmp_path: Path,
                                     caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Permission denied on one rank dir: warned and skipped, other ranks still found.

    Tests run as root (CI) where chmod cannot deny reading, so the denial is faked by making
    ``os.scandir`` raise PermissionError for that one directory, as the kernel would.
    """
    root = tmp_path / "vllm"
    layout = make_vllm_legacy(root, sample_cache_master, ranks=("rank_0_0", "rank_1_0"))
    denied = (root / "torch_compile_cache" / "0a1b2c3d4e" / "rank_1_0").resolve()
    if os.geteuid() != 0:
        denied.chmod(0)
    else:
        real_scandir = os.scandir

        def scandir(path: object = ".") -> object:
            if Path(str(path)).resolve() == denied:
                raise PermissionError(13, "Permission denied", str(path))
            return real_scandir(path)  # type: ignore[arg-type]

        monkeypatch.setattr(discovery.os, "scandir", scandir)
    try:
        with caplog.at_level(logging.WARNING, logger="infercache.kernels.discovery"):
            found = list(discover(root))
    finally:
        denied.chmod(0o755)
    assert [d.path for d in _dirs(found)] == [layout.triton_dirs[0].resolve()]
    assert any("rank_1_0" in r.getMessage() and "permission denied" in r.getMessage() for r in caplog.records)


def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="does not exist"):
        list(discover(tmp_path / "missing"))
    with pytest.raises(BadInputError, match="does not exist"):
        detect_mode(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BadInputError, match="not a directory"):
        list(discover(tmp_path / "file"))
    with pytest.raises(BadInputError, match="unknown cache mode 'tensorrt'"):
        list(discover(tmp_path, "tensorrt"))
    with pytest.raises(BadInputError, match="unknown cache mode"):
        default_cache_dirs("bogus")


def test_default_cache_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "t"))
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "v"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "i"))
    assert default_cache_dirs("triton") == [tmp_path / "t"]
    assert default_cache_dirs("vllm") == [tmp_path / "v"]
    assert default_cache_dirs("inductor") == [tmp_path / "i"]
    assert default_cache_dirs("auto") == []  # none exists yet
    (tmp_path / "t").mkdir()
    (tmp_path / "i").mkdir()
    assert default_cache_dirs("auto") == [tmp_path / "t", tmp_path / "i"]
    monkeypatch.delenv("VLLM_CACHE_ROOT")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dirs("vllm") == [tmp_path / "xdg" / "vllm"]


def test_copy_entries_subset(sample_cache_master: Path, tmp_path: Path) -> None:
    n = copy_entries(sample_cache_master, tmp_path / "c", select=lambda e: entry_targets(e) == ("hip", "gfx942"))
    assert n == 6
    assert {entry_targets(e) for e in (tmp_path / "c").iterdir()} == {("hip", "gfx942")}


@pytest.mark.parametrize(
    ("builder", "inner", "mode"),
    [
        (make_vllm_new, "torch_compile_cache/e4d3c2b1a0/rank_0_0", "vllm"),  # prefix/cache_key_factors.json below
        (make_vllm_new, "torch_compile_cache/e4d3c2b1a0/rank_0_0/backbone", "vllm"),
        (make_vllm_aot, "torch_compile_cache/torch_aot_compile", "vllm"),
        (make_vllm_legacy, "torch_compile_cache/0a1b2c3d4e/rank_0_0/triton_cache", "vllm"),
    ],
)
def test_detect_mode_at_any_level(sample_cache_master: Path, tmp_path: Path, builder, inner: str, mode: str) -> None:
    select = lambda e: entry_targets(e) == ("cuda", "80")  # noqa: E731
    layout = builder(tmp_path / "vllm", sample_cache_master, select=select)
    assert detect_mode(tmp_path / "vllm" / inner) == mode
    dirs = _dirs(list(discover(tmp_path / "vllm" / inner)))
    assert [d.path for d in dirs] == [p.resolve() for p in layout.triton_dirs]


def test_inductor_detected_from_device_dirs_alone(sample_cache_master: Path, tmp_path: Path) -> None:
    root = tmp_path / "ind"
    copy_entries(sample_cache_master, root / "triton" / "3", select=lambda e: entry_targets(e) == ("cuda", "90"))
    assert detect_mode(root) == "inductor"
    assert [d.path for d in discover(root)] == [(root / "triton" / "3").resolve()]


def test_empty_default_dirs_keep_their_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh vLLM root (no compile cache yet, other vLLM files) is not mistaken for a Triton cache."""
    vllm_root = tmp_path / "vllm"
    (vllm_root / "modelinfos").mkdir(parents=True)
    (vllm_root / "usage_stats.json").write_text("{}")
    inductor_root = tmp_path / "torchinductor_me"
    inductor_root.mkdir()
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(vllm_root))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(inductor_root))
    assert detect_mode(vllm_root) == "vllm"
    assert list(discover(vllm_root)) == []
    assert detect_mode(inductor_root) == "inductor"
    monkeypatch.delenv("VLLM_CACHE_ROOT")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "elsewhere"))
    assert detect_mode(vllm_root) == "triton"  # no longer the vLLM root, nothing says vLLM


@pytest.mark.parametrize("depth", ["hash", "rank"])
def test_detect_mode_outside_torch_compile_cache(sample_cache_master: Path, tmp_path: Path, depth: str) -> None:
    """A vLLM hash or rank dir copied elsewhere (no torch_compile_cache in its path) is still vLLM."""
    select = lambda e: entry_targets(e) == ("hip", "gfx90a")  # noqa: E731
    make_vllm_new(tmp_path / "vllm", sample_cache_master, vllm_hash="1234567890", binary=1, select=select)
    src = tmp_path / "vllm" / "torch_compile_cache" / "1234567890"
    moved = tmp_path / "moved" / "1234567890"
    moved.parent.mkdir()
    src.rename(moved)
    root = moved if depth == "hash" else moved / "rank_0_0"
    assert detect_mode(root) == "vllm"
    found = list(discover(root))
    assert [d.vllm for d in _dirs(found)] == [VllmInfo("1234567890", "rank_0_0", "backbone")]
    assert [a.vllm for a in _artifacts(root)] == [VllmInfo("1234567890", "rank_0_0", "backbone")]
