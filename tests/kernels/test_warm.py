"""`kernels warm --spec`: real Triton AOT compiles, keys proven against Triton's own launch path.

No GPU here: the key proof swaps Triton's active driver for `FakeGpuDriver`, a stand-in
that only answers "which GPU is current" (device, stream, target); everything else —
argument specialization of real CPU torch tensors, signature packing, options, the
cache key, the cache lookup — is Triton's own code.
"""

from __future__ import annotations

import contextlib
import json
import textwrap
from pathlib import Path
from typing import Any, Iterator

import pytest
from typer.testing import CliRunner

from infercache.cli.app import app

runner = CliRunner()
TARGETS = ("cuda:80", "cuda:90", "hip:gfx942")
SPEC = """
targets: [cuda:75]                       # replaced by --target
kernels:
  - fn: tests.kernels.warm_kernels:add_kernel
    signature: {x_ptr: "*fp32", y_ptr: "*fp32", out_ptr: "*fp32", n: i32}
    constexprs: {BLOCK: 256}
    options: {num_warps: 4}
  - fn: tests.kernels.warm_kernels:scale_kernel
    signature: {x_ptr: "*fp16", out_ptr: "*fp16", alpha: fp32, n: i32}
    constexprs: {BLOCK: 128}
    specialize: {out_ptr: none, n: none}
  - fn: tests.kernels.warm_kernels:arange_kernel
    signature: {out_ptr: "*fp32"}
    constexprs: {BLOCK: [64, 100]}       # 100 is not a power of two: a compiler error
"""


def _warm_cli(spec: Path, cache: Path, *extra: str) -> Any:
    targets = [a for t in TARGETS for a in ("--target", t)]
    return runner.invoke(app, ["kernels", "warm", "--spec", str(spec), *targets, "--cache-dir", str(cache),
                               "--format", "json", *extra])


@pytest.fixture(scope="module")
def warmed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], int]:
    """The spec warmed once for three targets with two worker processes: (cache, JSON report, exit code)."""
    root = tmp_path_factory.mktemp("warm")
    spec = root / "spec.yaml"
    spec.write_text(SPEC)
    result = _warm_cli(spec, root / "cache", "--jobs", "2")
    return root / "cache", json.loads(result.stdout), result.exit_code


class FakeGpuDriver:
    """Fakes the GPU driver (none exists here): reports `target` as the current device's target.

    A deliberate independent copy of `infercache.kernels.warm.TargetDriver`: the key proof must not
    lean on the code it checks (a wrong answer there would make both sides agree).
    """

    def __init__(self, target: str, device: str) -> None:
        from infercache.testing.samples import gpu_target

        self.target = gpu_target(target)
        self.device = device

    def get_current_device(self) -> str:
        return self.device

    def get_current_stream(self, device: Any = None) -> int:
        return 0

    def get_current_target(self) -> Any:
        return self.target


@contextlib.contextmanager
def fake_gpu(target: str, phase: str) -> Iterator[list[bool]]:
    """Triton compiles for `target`; yields the cache_hit flags Triton's listener reports."""
    import triton
    from triton.runtime.driver import driver

    hits: list[bool] = []

    def listener(*, cache_hit: bool, **_: Any) -> None:
        hits.append(cache_hit)

    previous_driver = driver.__dict__.get("_active")
    previous_listener = triton.knobs.compilation.listener
    # A fresh device name per phase: Triton keeps compiled kernels per device in memory.
    driver.set_active(FakeGpuDriver(target, f"fake:{target}:{phase}"))
    triton.knobs.compilation.listener = listener
    try:
        yield hits
    finally:
        triton.knobs.compilation.listener = previous_listener
        driver.__dict__["_active"] = previous_driver


def _launch(kernel: str, cache: Path, target: str, phase: str, monkeypatch: pytest.MonkeyPatch,
            aligned_out: bool = False) -> tuple[str, bool]:
    """Triton's launch path with real CPU torch tensors (warmup=True: compile or look up, no run)."""
    import base64

    import torch

    from tests.kernels import warm_kernels

    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    with fake_gpu(target, phase) as hits:
        if kernel == "add_kernel":
            x, y, out = torch.empty(4096), torch.empty(4096), torch.empty(4096)
            compiled = warm_kernels.add_kernel.warmup(x, y, out, 4096, BLOCK=256, num_warps=4, grid=(1,))
        else:
            x = torch.empty(1001, dtype=torch.float16)
            out = torch.empty(1002, dtype=torch.float16)
            out = out[:1001] if aligned_out else out[1:]  # an offset view: not 16-byte aligned
            compiled = warm_kernels.scale_kernel.warmup(x, out, 0.5, 1001, BLOCK=128, grid=(1,))
    assert len(hits) == 1
    return base64.b32encode(bytes.fromhex(compiled.hash)).decode().rstrip("="), hits[0]


@pytest.mark.slow
def test_warm_json_report_and_failures_reported(warmed: tuple[Path, dict[str, Any], int]) -> None:
    cache, report, code = warmed
    assert code == 1  # one kernel failed for every target; the others went on
    assert set(report) >= {"compiled", "cached", "failed", "entries"}
    assert (report["compiled"], report["cached"]) == (9, 0)
    assert sorted(f["target"] for f in report["failed"]) == sorted(TARGETS)
    for failure in report["failed"]:
        assert failure["kernel"] == "tests.kernels.warm_kernels:arange_kernel[BLOCK=100]"
        assert "arange's range must be a power of 2" in failure["error"]
    assert {(e["name"], e["target"]) for e in report["entries"]} == {
        (n, t) for n in ("add_kernel", "scale_kernel", "arange_kernel") for t in TARGETS}
    for entry in report["entries"]:
        assert next((cache / entry["key"]).glob("__grp__*.json")).is_file()
    assert not list(cache.glob("*/tmp.pid_*"))


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_warmed_key_is_the_launch_path_key(warmed: tuple[Path, dict[str, Any], int], target: str,
                                           monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A launch with real tensors derives the warmed key and hits; the spec's `specialize` matters."""
    cache, report, _ = warmed
    keys = {(e["name"], e["target"]): e["key"] for e in report["entries"]}
    for kernel in ("add_kernel", "scale_kernel"):
        key, hit = _launch(kernel, cache, target, f"{kernel}-key", monkeypatch)
        assert key == keys[(kernel, target)] and hit
    # The same launch with an aligned `out` is another specialization: another key, a miss.
    other = tmp_path / "other"
    key, hit = _launch("scale_kernel", other, target, "aligned", monkeypatch, aligned_out=True)
    assert key != keys[("scale_kernel", target)] and not hit


@pytest.mark.slow
def test_vault_round_trip_hits_for_each_target(warmed: tuple[Path, dict[str, Any], int], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from infercache.vault.pack import pack
    from infercache.vault.unpack import unpack

    cache, report, _ = warmed
    ref = f"oci:{tmp_path / 'layout'}:warm"
    pack(cache, ref)
    dest = tmp_path / "elsewhere" / "cache"
    unpacked = unpack(ref, dest, list(TARGETS))
    assert set(unpacked.extracted) == {e["key"] for e in report["entries"]}
    before = {p.name for p in dest.iterdir()}
    for target in TARGETS:
        for kernel in ("add_kernel", "scale_kernel"):
            key, hit = _launch(kernel, dest, target, f"vault-{kernel}", monkeypatch)
            assert hit and key in before
    assert {p.name for p in dest.iterdir()} == before  # hits wrote nothing


@pytest.mark.slow
def test_second_warm_finds_everything_cached(warmed: tuple[Path, dict[str, Any], int], tmp_path: Path) -> None:
    cache, first, _ = warmed
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.replace("BLOCK: [64, 100]", "BLOCK: 64"))
    result = _warm_cli(spec, cache, "--jobs", "1")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["compiled"], report["cached"], report["failed"]) == (0, 9, [])
    assert {e["key"] for e in report["entries"]} == {e["key"] for e in first["entries"]}


GOOD = {"fn": "tests.kernels.warm_kernels:add_kernel",
        "signature": '{x_ptr: "*fp32", y_ptr: "*fp32", out_ptr: "*fp32", n: i32}',
        "constexprs": "{BLOCK: 256}"}


def _spec(**fields: str) -> str:
    item = {**GOOD, **fields}
    body = "\n".join(f"    {k}: {v}" for k, v in item.items() if v is not None)
    return "kernels:\n  - " + body.lstrip()


@pytest.mark.parametrize("text, expected", [
    (_spec(fn="tests.kernels.no_such_module:add_kernel"), "kernels[0] (tests.kernels.no_such_module:add_kernel): fn:"),
    (_spec(fn="tests.kernels.warm_kernels:nope"), "fn: tests.kernels.warm_kernels has no attribute 'nope'"),
    (_spec(fn="add_kernel"), "kernels[0] (add_kernel): fn: expected 'package.module:function'"),
    (_spec(signature='{x_ptr: "*fp33", y_ptr: "*fp32", out_ptr: "*fp32", n: i32}'), "signature.x_ptr: unknown type"),
    (_spec(signature='{x_ptr: "*fp32", y_ptr: "*fp32", out_ptr: "*fp32", n: i8}'),
     "(tests.kernels.warm_kernels:add_kernel): signature.n: a launch derives 'i32', not 'i8'"),
    (_spec(signature='{x_ptr: "*fp32", y_ptr: "*fp32", out_ptr: "*fp32"}'), "signature: missing the type of argument n"),
    (_spec(signature='{x_ptr: "*fp32", y_ptr: "*fp32", out_ptr: "*fp32", n: i32, m: i32}'), "signature.m: no such argument"),
    (_spec(constexprs=None), "constexprs: missing a value for the tl.constexpr BLOCK"),
    (_spec(options="{num_warpz: 4}"), "options.num_warpz: unknown option for cuda:90"),
    (_spec(options="{num_warps: [4, 3]}"), "options: num_warps=3 rejected by Triton for cuda:90: num_warps must be"),
    (_spec(specialize="{n: aligned16}"), "specialize.n: 'aligned16' is not one of divisible16, one, none"),
    (_spec(colour="blue"), "kernels[0] (tests.kernels.warm_kernels:add_kernel): unknown field(s) colour"),
    ("targets: [tpu:1]\n" + _spec(), "targets[0]: bad GPU target 'tpu:1'"),
    ("kernels: []", "kernels: expected a non-empty list"),
    ("kernels: [", "is not valid YAML"),
])
def test_bad_spec_exits_2_naming_kernel_and_field(text: str, expected: str, tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent(text))
    result = runner.invoke(app, ["kernels", "warm", "--spec", str(spec), "--target", "cuda:90",
                                 "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split()), result.output
    assert not (tmp_path / "c").exists()  # nothing compiled, nothing created


def test_bad_target_flag_and_no_target(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(_spec())
    result = runner.invoke(app, ["kernels", "warm", "--spec", str(spec), "--target", "cuda:abc"])
    assert result.exit_code == 2 and "bad GPU target 'cuda:abc'" in result.output
    result = runner.invoke(app, ["kernels", "warm", "--spec", str(spec)])
    assert result.exit_code == 2 and "no targets" in result.output
    result = runner.invoke(app, ["kernels", "warm"])
    assert result.exit_code == 2 and "--spec FILE" in result.output


def test_grid_and_default_specialization() -> None:
    from infercache.kernels.warm_spec import parse_spec

    spec = parse_spec({"kernels": [{"fn": "m:f", "signature": {"p": "*bf16", "n": "i64", "a": "fp32"},
                                    "constexprs": {"B": [16, 32]}, "options": {"num_warps": [4, 8], "num_stages": 2},
                                    "specialize": {"n": "one"}}]})
    (k,) = spec.kernels
    assert len(k.variants()) == 4
    assert ({"B": 32}, {"num_warps": 8, "num_stages": 2}) in k.variants()
    assert [k.specialization(n, t) for n, t in k.signature.items()] == ["aligned16", "one", "none"]
