"""Real Triton cache entries made on a machine without a GPU.

Triton compiles ahead of time for any CUDA or AMD target on a CPU-only host;
`make demo`, the tests and the benchmarks use this to build genuine caches
(real cubins / hsacos, real metadata and group files) instead of fakes, and
to prove that an entry is still a cache hit after we touched it.

Requires the ``triton`` extra. The kernels' source lines are part of Triton's
cache key: moving these definitions changes every key (harmless, but keep it
in mind when comparing caches made by different versions of this file).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from infercache.kernels.triton_entry import key_for_hash
from infercache.kernels.warm import compile_outcomes

logger = logging.getLogger(__name__)

#: The targets the reference says compile without a GPU on Triton 3.x.
DEFAULT_TARGETS: tuple[str, ...] = ("cuda:80", "cuda:90", "hip:gfx90a", "hip:gfx942")
#: Kernel names available to :func:`compile_sample`.
SAMPLE_KERNELS: tuple[str, ...] = ("add_kernel", "matmul_kernel", "row_sum_kernel")


@dataclass(frozen=True)
class CompileResult:
    """What one compile did: the entry directory and whether Triton's cache hit."""

    kernel: str
    target: str
    cache_hit: bool
    key: str
    entry_dir: Path


def _kernels() -> dict[str, tuple[Any, dict[str, str], dict[str, int]]]:
    """Define the sample kernels lazily: importing triton costs ~1 s, never at import time."""
    import triton
    import triton.language as tl

    @triton.jit
    def add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=m) + tl.load(y_ptr + offs, mask=m), mask=m)

    @triton.jit
    def matmul_kernel(a_ptr, b_ptr, c_ptr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        rm = tl.arange(0, BM)
        rn = tl.arange(0, BN)
        rk = tl.arange(0, BK)
        a = tl.load(a_ptr + rm[:, None] * BK + rk[None, :])
        b = tl.load(b_ptr + rk[:, None] * BN + rn[None, :])
        tl.store(c_ptr + rm[:, None] * BN + rn[None, :], tl.dot(a, b))

    @triton.jit
    def row_sum_kernel(x_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * n_cols + cols, mask=cols < n_cols, other=0.0)
        tl.store(out_ptr + row, tl.sum(x, axis=0))

    return {
        "add_kernel": (
            add_kernel,
            {"x_ptr": "*fp32", "y_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"},
            {"BLOCK": 1024},
        ),
        "matmul_kernel": (
            matmul_kernel,
            {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"},
            {"BM": 32, "BN": 32, "BK": 32},
        ),
        "row_sum_kernel": (
            row_sum_kernel,
            {"x_ptr": "*fp32", "out_ptr": "*fp32", "n_cols": "i32", "BLOCK": "constexpr"},
            {"BLOCK": 256},
        ),
    }


_KERNEL_CACHE: dict[str, tuple[Any, dict[str, str], dict[str, int]]] = {}


def _kernel(name: str) -> tuple[Any, dict[str, str], dict[str, int]]:
    if not _KERNEL_CACHE:
        _KERNEL_CACHE.update(_kernels())
    try:
        return _KERNEL_CACHE[name]
    except KeyError:
        raise ValueError(f"unknown sample kernel {name!r}; choose from {', '.join(SAMPLE_KERNELS)}") from None


def gpu_target(spec: str) -> Any:
    """'cuda:90' / 'hip:gfx942' / 'rocm:gfx90a' [':WARP'] → triton GPUTarget."""
    from triton.backends.compiler import GPUTarget

    parts = spec.split(":")
    backend = "hip" if parts[0] in ("hip", "rocm") else parts[0]
    if backend not in ("cuda", "hip") or len(parts) < 2:
        raise ValueError(f"bad target {spec!r}: expected cuda:ARCH or hip:GFX[:WARP]")
    arch: int | str = int(parts[1]) if backend == "cuda" else parts[1]
    warp = int(parts[2]) if len(parts) > 2 else (32 if backend == "cuda" else 64)
    return GPUTarget(backend, arch, warp)


@contextlib.contextmanager
def _cache_dir(cache_dir: Path) -> Iterator[None]:
    """Point Triton at `cache_dir` for the duration (Triton reads the env var on each compile)."""
    old = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = str(cache_dir)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = old


def compile_sample(
    cache_dir: str | os.PathLike[str],
    kernel: str = "add_kernel",
    target: str = "cuda:90",
    num_warps: int = 4,
    num_stages: int = 3,
) -> CompileResult:
    """Compile one sample kernel into `cache_dir` and report whether it was a cache hit."""
    import triton
    from triton.compiler import ASTSource

    fn, signature, constexprs = _kernel(kernel)
    cache_path = Path(cache_dir).resolve()
    cache_path.mkdir(parents=True, exist_ok=True)
    with _cache_dir(cache_path), compile_outcomes() as hits:
        compiled = triton.compile(
            ASTSource(fn=fn, signature=signature, constexprs=constexprs),
            target=gpu_target(target),
            options={"num_warps": num_warps, "num_stages": num_stages},
        )
    key = key_for_hash(compiled.hash)
    return CompileResult(kernel, target, bool(hits and hits[-1]), key, cache_path / key)


def build_sample_cache(
    cache_dir: str | os.PathLike[str],
    targets: Sequence[str] = DEFAULT_TARGETS,
    kernels: Sequence[str] = SAMPLE_KERNELS,
    warps: Sequence[int] = (4, 8),
) -> list[CompileResult]:
    """Fill `cache_dir` with every kernel × target × num_warps: a small, varied, real cache."""
    results = []
    for target in targets:
        for kernel in kernels:
            for num_warps in warps:
                result = compile_sample(cache_dir, kernel, target, num_warps=num_warps)
                logger.info("compiled %s for %s (num_warps=%d) → %s", kernel, target, num_warps, result.key)
                results.append(result)
    return results
