"""Real torch.compile caches for tests and the bench, and the compile-work counter that judges them.

Run as a script in a FRESH process (Inductor keeps in-memory caches, so only a new
process tells a warm start from a cold one):

    python tests/torchcache.py --cache-dir DIR [--save-mega FILE] [--load-mega FILE]

It compiles three small models with ``torch.compile`` on CPU (an MLP, a small
attention block, a function with dynamic shapes) with ``TORCHINDUCTOR_CACHE_DIR=DIR``
and prints one JSON line: the C++ builds Inductor ran (``CppBuilder.build`` calls,
in-process because ``TORCHINDUCTOR_COMPILE_THREADS=1``), the Triton compiles
(``triton.compile`` calls; none on CPU, counted so GPU hosts are judged the same
way), Inductor's own counters, the seconds to the first compiled call and a
checksum of the outputs.

``compile_work`` counts builds whose output lies in the cache dir plus Triton
compiles: the work a warm start must not do. The one build every process runs
(preprocessing ``cpp_prefix.h`` in a temp dir to hash the precompiled header) is
outside the cache dir and listed apart in ``other_builds``.

No imports from the project: the bench runs this file with any interpreter that has torch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _models() -> list[tuple[str, Any, Any]]:
    import torch

    torch.manual_seed(0)

    class MLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = torch.nn.Linear(16, 32)
            self.gate = torch.nn.Linear(16, 32)
            self.down = torch.nn.Linear(32, 8)

        def forward(self, x: Any) -> Any:
            return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))

    class Attention(torch.nn.Module):
        def __init__(self, dim: int = 16, heads: int = 2) -> None:
            super().__init__()
            self.heads = heads
            self.qkv = torch.nn.Linear(dim, 3 * dim)
            self.out = torch.nn.Linear(dim, dim)
            self.norm = torch.nn.LayerNorm(dim)

        def forward(self, x: Any) -> Any:
            b, t, d = x.shape
            q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
            q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
            att = (q @ k.transpose(-1, -2)) * (d // self.heads) ** -0.5
            y = att.softmax(dim=-1) @ v
            return x + self.out(y.transpose(1, 2).reshape(b, t, d))

    def dynamic_fn(x: Any) -> Any:
        return torch.sin(x) * x.sum(dim=-1, keepdim=True) + torch.cos(x).amax(dim=0)

    return [
        ("mlp", torch.compile(MLP().eval()), [torch.randn(4, 16)]),
        ("attention", torch.compile(Attention().eval()), [torch.randn(2, 8, 16)]),
        ("dynamic", torch.compile(dynamic_fn, dynamic=True), [torch.randn(5, 8), torch.randn(11, 8)]),
    ]


def _count_compile_work(cache_dir: str) -> tuple[list[str], list[str], list[str]]:
    """Wrap Inductor's C++ builder and Triton's compile entry points; return the live lists."""
    from torch._inductor import cpp_builder

    in_cache: list[str] = []
    other: list[str] = []
    triton_compiles: list[str] = []
    original = cpp_builder.CppBuilder.build
    prefix = os.path.realpath(cache_dir).rstrip("/") + "/"

    def build(self: Any, *args: Any, **kwargs: Any) -> Any:
        target = os.path.realpath(self.get_target_file_path())
        (in_cache if target.startswith(prefix) else other).append(target)
        return original(self, *args, **kwargs)

    cpp_builder.CppBuilder.build = build  # type: ignore[method-assign]
    try:
        import triton
        import triton.compiler.compiler as tcc

        original_compile = tcc.compile

        def compile(*args: Any, **kwargs: Any) -> Any:
            triton_compiles.append(repr(args[0])[:80] if args else "?")
            return original_compile(*args, **kwargs)

        tcc.compile = compile
        triton.compile = compile
    except ImportError:
        pass
    return in_cache, other, triton_compiles


def run(cache_dir: str, save_mega: str | None = None, load_mega: str | None = None) -> dict[str, Any]:
    """Compile and call every model once in this process; what it cost (see the module doc)."""
    started = time.perf_counter()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
    import torch

    in_cache, other, triton_compiles = _count_compile_work(cache_dir)
    loaded = None
    if load_mega:
        loaded = torch.compiler.load_cache_artifacts(Path(load_mega).read_bytes()) is not None
    checksum = 0.0
    first_call = None
    with torch.no_grad():
        for _name, fn, inputs in _models():
            for x in inputs:
                checksum += float(fn(x).double().sum())
            if first_call is None:
                first_call = time.perf_counter() - started
    if save_mega:
        saved = torch.compiler.save_cache_artifacts()
        if saved is not None:
            Path(save_mega).write_bytes(saved[0])
    from torch._dynamo.utils import counters

    return {
        "builds": len(in_cache),
        "build_targets": sorted(in_cache),
        "other_builds": len(other),
        "triton_compiles": len(triton_compiles),
        "compile_work": len(in_cache) + len(triton_compiles),
        "counters": {k: v for k, v in counters["inductor"].items() if "cache" in k},
        "first_call_s": round(first_call or 0.0, 3),
        "total_s": round(time.perf_counter() - started, 3),
        "checksum": round(checksum, 4),
        "mega_loaded": loaded,
        "torch_version": torch.__version__,
    }


def run_fresh(cache_dir: str | os.PathLike[str], *, save_mega: str | os.PathLike[str] | None = None,
              load_mega: str | os.PathLike[str] | None = None, python: str | None = None,
              timeout: float = 600) -> dict[str, Any]:
    """`run` in a new interpreter (the only honest warm-start measurement); its JSON result."""
    cmd = [python or sys.executable, str(Path(__file__).resolve()), "--cache-dir", str(cache_dir)]
    if save_mega:
        cmd += ["--save-mega", str(save_mega)]
    if load_mega:
        cmd += ["--load-mega", str(load_mega)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHINDUCTOR_", "TORCH_COMPILE"))}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    env["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"torch.compile run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@dataclass(frozen=True)
class TorchCache:
    """A real Inductor cache made by one cold `run` (the session's master: copy it before changing it)."""

    root: Path
    cold: dict[str, Any]  # the cold run's result (compile_work > 0: the counter sees real work)
    mega: Path  # torch.compiler.save_cache_artifacts() of the same run

    def copy(self, dest: str | os.PathLike[str]) -> Path:
        """A private copy (Inductor's cache is relocatable: a copy is as warm as the original)."""
        import shutil

        shutil.copytree(self.root, dest, symlinks=True)
        return Path(dest)


def build_master(base: Path) -> TorchCache:
    """Compile the three models cold into `base/inductor` (about 10-30 s on CPU); once per session."""
    root = base / "inductor"
    mega = base / "mega.bin"
    cold = run_fresh(root, save_mega=mega)
    if cold["compile_work"] == 0:
        raise RuntimeError(f"a cold torch.compile did no compile work: {cold}")
    return TorchCache(root, cold, mega)


def frame_binary_artifact(payload: bytes, key: str = "artifact") -> bytes:
    """`payload` in torch's binary artifact framing (`CompiledArtifact.save(format="binary")`, torch 2.13):
    CRC32 of the rest, then length-prefixed CACHE_HEADER, torch key (a hash; zeros here), base64 key and
    the artifact bytes. A real one saved by `standalone_compile(...).save(format="binary")` passes the same
    checks (checked by hand: a cold standalone_compile costs ~30 s, too much for every test session)."""
    import base64
    import zlib

    def framed(b: bytes) -> bytes:
        return len(b).to_bytes(8, "big") + b

    body = (framed(b"CacheCompiledArtifact") + framed(b"\0" * 32) + framed(base64.b64encode(key.encode()))
            + framed(payload))
    return zlib.crc32(body).to_bytes(4, "big") + body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--save-mega")
    parser.add_argument("--load-mega")
    args = parser.parse_args()
    print(json.dumps(run(args.cache_dir, args.save_mega, args.load_mega)))


if __name__ == "__main__":
    main()
