"""Kernels for the tracking and warm tests, importable by path (`tests.kernels.warm_kernels:add_kernel`).

Their source lines are part of Triton's cache key: editing above a kernel changes its keys.
`add_kernel` is a deliberate independent copy of `infercache.testing.samples`' one: a warm spec
names a kernel by file and attribute, so these must live in a file of their own at a stable path.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
import triton
import triton.language as tl


@triton.jit
def add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=m) + tl.load(y_ptr + offs, mask=m), mask=m)


@triton.jit
def scale_kernel(x_ptr, out_ptr, alpha, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=m) * alpha, mask=m)


@triton.jit
def arange_kernel(out_ptr, BLOCK: tl.constexpr):
    # BLOCK must be a power of two: BLOCK=100 is a real compiler error, for the failure tests.
    tl.store(out_ptr + tl.arange(0, BLOCK), 1.0)


@dataclass(frozen=True)
class Compiled:
    key: str


def compile_direct(target: str, block: int = 256) -> Compiled:
    """triton.compile of add_kernel for `target` with the listener left alone (tracking tests)."""
    from triton.compiler import ASTSource

    from infercache.testing.samples import gpu_target

    src = ASTSource(fn=add_kernel, signature={"x_ptr": "*fp32", "y_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32",
                                              "BLOCK": "constexpr"}, constexprs={"BLOCK": block})
    compiled = triton.compile(src, target=gpu_target(target), options={"num_warps": 4})
    key = base64.b32encode(bytes.fromhex(compiled.hash)).decode().rstrip("=")
    return Compiled(key)
