"""`infercache kernels warm` (and `mcm warm`): parse flags, call the warm libraries, present.

Two modes: `--spec FILE` compiles Triton kernels ahead of time for any target
(infercache.kernels.warm); `--model MODEL` runs a vLLM container that warms its caches
(infercache.kernels.container_warm).
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any, List, Optional

import typer

from infercache.cli.common import (
    FORMAT,
    OutputFormat,
    console,
    err_console,
    print_json,
    progress_bar,
)
from infercache.errors import BadInputError
from infercache.kernels.container_warm import (
    DEFAULT_OUTPUT,
    DEFAULT_VLLM_CACHE_DIR,
    plan_container_warm,
)
from infercache.kernels.warm import plan_warm
from infercache.kernels.warm_spec import load_spec

TOKEN_HELP = "Hugging Face token for private models (default: $HF_TOKEN); passed to the container by environment."


def run_spec_warm(spec_file: Path, targets: List[str], cache_dir: Optional[Path], jobs: int,
                  fmt: OutputFormat) -> None:
    if jobs < 1:
        raise BadInputError(f"--jobs must be at least 1, not {jobs}")
    plan = plan_warm(load_spec(spec_file), targets)
    with progress_bar("warming") as callback:
        report = plan.execute(cache_dir, jobs=jobs, progress=callback and (lambda done, total, _r: callback(done, total)))
    if fmt == OutputFormat.json:
        print_json(report.to_json())
    else:
        _print_warm(report)
    if report.failed:
        raise typer.Exit(1)


def _print_warm(report: Any) -> None:
    """Failures as text blocks (compiler messages carry source lines and carets: no table wrapping)."""
    for f in report.failed:
        err_console.print(f"[bold red]failed:[/] {f.kernel} for {f.target}", highlight=False)
        err_console.print(textwrap.indent(f.error, "    "), markup=False, highlight=False, soft_wrap=True)
    console.print(report.line(), highlight=False)


def run_container_warm(model: str, *, rocm: bool, engine: str, image: Optional[str], host_cache_dir: Path,
                       vllm_cache_dir: str, token: Optional[str], tarball: bool, output: Path,
                       fmt: OutputFormat = OutputFormat.table) -> None:
    plan = plan_container_warm(model, rocm=rocm, engine=engine, image=image, host_cache_dir=host_cache_dir,
                               vllm_cache_dir=vllm_cache_dir, tarball=tarball, output=output,
                               pass_token=bool(token))
    if fmt == OutputFormat.table:
        err_console.print(f"warming {model} in {plan.image} with {engine} (cache: {plan.host_cache_dir})",
                          highlight=False)
    report = plan.execute(token)
    if fmt == OutputFormat.json:
        print_json(report.to_json())
    else:
        console.print(report.line(), highlight=False)


def warm_command(
    ctx: typer.Context,
    spec: Optional[Path] = typer.Option(None, "--spec", help="Warm spec (YAML): kernels, signatures, grids."),
    target: Optional[List[str]] = typer.Option(None, "--target", help="BACKEND:ARCH[:WARP], repeatable "
                                                                         "(replaces the spec's targets)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Triton cache to fill "
                                                                       "(default: $TRITON_CACHE_DIR...)."),
    jobs: int = typer.Option(os.cpu_count() or 1, "--jobs", "-j", help="Parallel compile processes."),
    fmt: OutputFormat = FORMAT,
    model: Optional[str] = typer.Option(None, "--model", help="Warm a vLLM cache by running MODEL in a container."),
    rocm: bool = typer.Option(False, "--rocm", help="Use the ROCm image and AMD GPU devices."),
    engine: str = typer.Option("podman", "--engine", help="podman or docker."),
    image: Optional[str] = typer.Option(None, "--image", help="Container image (default: the CUDA or ROCm one)."),
    host_cache_dir: Path = typer.Option(Path("."), "--host-cache-dir", help="Host dir mounted as the vLLM cache."),
    vllm_cache_dir: str = typer.Option(DEFAULT_VLLM_CACHE_DIR, "--vllm-cache-dir", help="The cache dir inside "
                                                                                        "the container."),
    hugging_face_token: Optional[str] = typer.Option(None, "--hugging-face-token", envvar="HF_TOKEN",
                                                     help=TOKEN_HELP, show_envvar=False),
    tarball: bool = typer.Option(False, "--tarball", help="Also write the warmed cache as a .tar.gz."),
    output: Path = typer.Option(Path(DEFAULT_OUTPUT), "--output", "-o", help="The tarball's path."),
) -> None:
    """Warm caches ahead of time: `--spec` compiles Triton kernels for any GPU target; `--model` runs vLLM."""
    if (spec is None) == (model is None):
        raise BadInputError("give either --spec FILE (Triton kernels) or --model MODEL (a vLLM container)")
    if spec is not None:
        run_spec_warm(spec, target or [], cache_dir, jobs, fmt)
        return
    if target or cache_dir is not None:
        raise BadInputError("--target and --cache-dir apply to --spec; with --model use --host-cache-dir")
    assert model is not None
    run_container_warm(model, rocm=rocm, engine=engine, image=image, host_cache_dir=host_cache_dir,
                       vllm_cache_dir=vllm_cache_dir, token=hugging_face_token, tarball=tarball, output=output,
                       fmt=fmt)
