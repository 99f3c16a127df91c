"""`kernels warm --spec`: compile Triton kernels ahead of time for GPUs this machine does not have.

Why Triton's launch path and not `triton.compile`: the cache key covers what a launch
observes about its arguments (see :mod:`infercache.kernels.warm_spec`). Calling
`triton.compile` with a hand-built signature risks a key no launch ever looks up.
So each worker gives Triton a stand-in driver that answers "which GPU is current"
with the warm target (the only thing a GPU-less machine lacks), then calls the
kernel's own ``JITFunction.run(..., warmup=True)`` with stand-in arguments that have
the spec's properties: Triton's binder specializes them, packs the signature and
attributes, derives the options and compiles, exactly as on the GPU, and its
``FileCacheManager`` writes the entry atomically (an interrupted warm leaves only
``tmp.pid_*`` dirs, which `prune --garbage` removes).

Work is a plan (one task per kernel × grid point × target), executed by spawned
worker processes (``--jobs``); a failed task carries the compiler's message and the
others go on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from infercache import paths
from infercache.errors import BadInputError, InfercacheError
from infercache.gpu.targets import GpuTarget, cuda_arch_base
from infercache.kernels.triton_entry import key_for_hash
from infercache.kernels.warm_spec import (
    KernelSpec,
    WarmSpec,
    check_against_fn,
    check_launch_types,
    check_options,
    launch_kwargs,
    parse_target,
    resolve_fn,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WarmTask:
    """One compile: a kernel at one grid point for one target."""

    kernel: KernelSpec
    target: str
    constexprs: Mapping[str, Any]
    options: Mapping[str, Any]
    base_dir: str | None = None

    @property
    def label(self) -> str:
        point = ", ".join(f"{k}={v}" for k, v in {**self.constexprs, **self.options}.items())
        return f"{self.kernel.fn}[{point}]" if point else self.kernel.fn


@dataclass(frozen=True)
class WarmEntry:
    key: str
    name: str
    target: str
    kernel: str
    cached: bool

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "name": self.name, "target": self.target}


@dataclass(frozen=True)
class WarmFailure:
    kernel: str
    target: str
    error: str

    def to_json(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "target": self.target, "error": self.error}


@dataclass(frozen=True)
class WarmReport:
    """What a warm did (the spec's `--format json` shape via to_json)."""

    cache_dir: Path
    entries: tuple[WarmEntry, ...] = ()
    failed: tuple[WarmFailure, ...] = ()

    @property
    def compiled(self) -> int:
        return sum(not e.cached for e in self.entries)

    @property
    def cached(self) -> int:
        return sum(e.cached for e in self.entries)

    def to_json(self) -> dict[str, Any]:
        return {
            "compiled": self.compiled,
            "cached": self.cached,
            "failed": [f.to_json() for f in self.failed],
            "entries": [e.to_json() for e in self.entries],
            "cache_dir": str(self.cache_dir),
        }

    def line(self) -> str:
        return (f"{self.compiled} compiled, {self.cached} already cached, {len(self.failed)} failed "
                f"in {self.cache_dir}")


@dataclass(frozen=True)
class WarmPlan:
    """Validated tasks; `execute` runs them."""

    tasks: tuple[WarmTask, ...]
    targets: tuple[str, ...] = field(default=())

    def execute(self, cache_dir: str | os.PathLike[str] | None = None, jobs: int = 1,
                progress: Callable[[int, int, WarmEntry | WarmFailure], None] | None = None) -> WarmReport:
        return execute(self, cache_dir, jobs, progress)


def triton_target(target: str) -> Any:
    """'cuda:90' → GPUTarget('cuda', 90, 32); 'hip:gfx942' → GPUTarget('hip', 'gfx942', 64)."""
    from triton.backends.compiler import GPUTarget

    t = GpuTarget.parse(target)
    arch: int | str = int(cuda_arch_base(t.arch)) if t.backend == "cuda" else t.arch
    return GPUTarget(t.backend, arch, t.warp_size)


class TargetDriver:
    """A stand-in for Triton's GPU driver that reports the warm target as the current GPU.

    Triton's launch path asks the active driver three things before compiling: the
    current device (a key of the kernel's per-device caches), its stream and its target.
    Nothing else is used when ``warmup=True`` (no launch happens).
    """

    def __init__(self, target: str) -> None:
        self.target = triton_target(target)
        self.device = f"infercache-warm:{target}"  # distinct per target: Triton caches binders per device

    def get_current_device(self) -> str:
        return self.device

    def get_current_stream(self, device: Any = None) -> int:
        return 0

    def get_current_target(self) -> Any:
        return self.target


@contextlib.contextmanager
def target_driver(target: str) -> Iterator[TargetDriver]:
    """Make Triton compile for `target` on this GPU-less machine for the duration."""
    from triton.runtime.driver import driver

    stand_in = TargetDriver(target)
    previous = driver.__dict__.get("_active")  # reset_active() would probe for a real GPU
    driver.set_active(stand_in)
    try:
        yield stand_in
    finally:
        driver.__dict__["_active"] = previous


def plan_warm(spec: WarmSpec, targets: Sequence[str] = ()) -> WarmPlan:
    """Validate the spec against Triton (imports, names, options, types) and expand it into tasks.

    `targets` (from --target) replace the spec's own list.
    """
    chosen = tuple(dict.fromkeys(parse_target(t) for t in targets)) or spec.targets
    if not chosen:
        raise BadInputError("no targets: pass --target BACKEND:ARCH (e.g. cuda:90) or list `targets:` in the spec")
    backends = {t: _backend(t) for t in chosen}
    tasks = []
    for kspec in spec.kernels:
        fn = resolve_fn(kspec, spec.base_dir)
        check_against_fn(kspec, fn)
        for target in chosen:
            check_options(kspec, backends[target], target)
            check_launch_types(kspec, fn, backends[target])
        for constexprs, options in kspec.variants():
            for target in chosen:
                _check_option_values(kspec, backends[target], target, options)
                tasks.append(WarmTask(kspec, target, constexprs, options, spec.base_dir))
    return WarmPlan(tuple(tasks), chosen)


def _check_option_values(kspec: KernelSpec, backend: Any, target: str, options: Mapping[str, Any]) -> None:
    """Triton's own option parsing (num_warps a power of two...) before any worker starts."""
    try:
        backend.parse_options(dict(options))
    except Exception as exc:  # noqa: BLE001 - Triton asserts; the message is all we have
        point = ", ".join(f"{k}={v}" for k, v in options.items())
        raise kspec.error("options", f"{point} rejected by Triton for {target}: {exc or type(exc).__name__}") from None


def _backend(target: str) -> Any:
    from triton.compiler import make_backend

    try:
        return make_backend(triton_target(target))
    except Exception as exc:  # noqa: BLE001 - Triton says "0 compatible backends..."
        raise BadInputError(f"target {target}: Triton cannot compile for it here: {exc}") from None


@contextlib.contextmanager
def compile_outcomes() -> Iterator[list[bool]]:
    """Triton's `cache_hit` of each compile in the block, in order (its compilation listener, put back after).

    Why: Triton says whether a compile hit its cache only through this listener.
    """
    import triton

    hits: list[bool] = []

    def listener(*, cache_hit: bool, **_: Any) -> None:
        hits.append(cache_hit)

    previous = triton.knobs.compilation.listener
    triton.knobs.compilation.listener = listener
    try:
        yield hits
    finally:
        triton.knobs.compilation.listener = previous


def run_task(task: WarmTask, cache_dir: str) -> WarmEntry | WarmFailure:
    """Compile one task through Triton's launch path (in a worker process)."""
    os.environ["TRITON_CACHE_DIR"] = cache_dir  # Triton reads it at each compile
    try:
        fn = resolve_fn(task.kernel, task.base_dir)
        kwargs = launch_kwargs(task.kernel, fn, task.constexprs, task.options)
        with target_driver(task.target), compile_outcomes() as hits:
            compiled = fn.run(grid=(1,), warmup=True, **kwargs)
        hit = hits[-1] if hits else True  # no compile at all: found in Triton's in-memory cache
        return WarmEntry(key_for_hash(compiled.hash), compiled.name, task.target, task.label, hit)
    except Exception as exc:  # noqa: BLE001 - reported with the compiler's message; the others go on
        message = str(exc).strip() or type(exc).__name__
        return WarmFailure(task.label, task.target, f"{type(exc).__name__}: {message}")


def _worker_init() -> None:
    logging.getLogger("triton").setLevel(logging.ERROR)
    _skip_torch_probe()


def _skip_torch_probe() -> None:
    """Spare each worker a 2-3 s `import torch` that no warm needs.

    Triton's AMD backend imports torch on its first pointer argument only to ask whether a
    ``torch.Tensor`` fits in 2 GiB; our stand-ins answer through ``ptr_range()``, which it
    consults first. Left alone when torch is already loaded (a kernel module imported it).
    """
    try:
        from triton.backends.amd.compiler import HIPBackend
    except Exception:  # noqa: BLE001 - a Triton without the AMD backend
        return
    if getattr(HIPBackend, "_torch_available", False) is None and "torch" not in sys.modules:
        HIPBackend._torch_available = False


def execute(plan: WarmPlan, cache_dir: str | os.PathLike[str] | None = None, jobs: int = 1,
            progress: Callable[[int, int, WarmEntry | WarmFailure], None] | None = None) -> WarmReport:
    """Run the plan in `jobs` spawned worker processes; results in plan order.

    Why processes: compiles hold the GIL for most of their time; why spawn: forking a
    process that has Triton's (or the caller's) threads can deadlock.
    """
    import multiprocessing

    if jobs < 1:
        raise BadInputError(f"--jobs must be at least 1, not {jobs}")
    root = Path(cache_dir).expanduser() if cache_dir else paths.triton_cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InfercacheError(f"cannot create the cache dir {root}: {exc.strerror or exc}") from exc
    root = root.resolve()
    results: list[WarmEntry | WarmFailure | None] = [None] * len(plan.tasks)
    if not plan.tasks:
        return WarmReport(root)
    ctx = multiprocessing.get_context("spawn")
    workers = min(jobs, len(plan.tasks))
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init) as pool:
        futures: dict[Future, int] = {pool.submit(run_task, task, str(root)): i for i, task in enumerate(plan.tasks)}
        done_count = 0
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    i = futures[fut]
                    try:
                        result = fut.result()
                    except Exception as exc:  # noqa: BLE001 - a worker died (OOM, segfault in LLVM)
                        task = plan.tasks[i]
                        result = WarmFailure(task.label, task.target, f"worker failed: {exc}")
                    results[i] = result
                    done_count += 1
                    if progress is not None:
                        progress(done_count, len(plan.tasks), result)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    entries = tuple(r for r in results if isinstance(r, WarmEntry))
    failed = tuple(r for r in results if isinstance(r, WarmFailure))
    for f in failed:
        logger.info("warm: %s for %s failed: %s", f.kernel, f.target, f.error)
    return WarmReport(root, entries, failed)


def warm(spec: WarmSpec, targets: Sequence[str] = (), cache_dir: str | os.PathLike[str] | None = None,
         jobs: int = 1, progress: Callable[[int, int, WarmEntry | WarmFailure], None] | None = None) -> WarmReport:
    """Plan and execute (the library entry point of `kernels warm --spec`)."""
    return plan_warm(spec, targets).execute(cache_dir, jobs, progress)
