"""`mcm`: compatibility front end accepting Model Cache Manager's flags (seed 000_8fce7333515cd602).

`mcm index|list|prune` map onto the same library code as `infercache kernels ...`;
the catalog is infercache's (`--data-dir` / `INFERCACHE_DATA_DIR`). Unlike MCM,
`--backend rocm` matches HIP kernels, durations take any unit, and IR-only prune
keeps kernels cache hits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from infercache.cli import kernels as k
from infercache.cli.common import (
    DRY_RUN,
    VERBOSE,
    YES,
    OutputFormat,
    console,
    data_dir_option,
    handle_errors,
    root_app,
    start_root,
)
from infercache.cli.warm import run_container_warm
from infercache.kernels.container_warm import (
    DEFAULT_MODEL,
    DEFAULT_OUTPUT,
    DEFAULT_VLLM_CACHE_DIR,
)
from infercache.kernels.query import KernelFilter, iso, query
from infercache.units import format_size

app = root_app(
    name="mcm",
    help="Model Cache Manager compatible front end: index, list, prune and warm GPU kernel caches.",
    no_args_is_help=True,
)

CACHE_DIR = typer.Option(None, "--cache-dir", help="Cache directory (default: the mode's default cache dir).")
MODE = typer.Option("auto", "--mode", help="triton or vllm (auto-detected if not given; inductor also accepted).")


@app.callback()
def root(
    ctx: typer.Context,
    verbose: int = VERBOSE,
    data_dir: Optional[Path] = data_dir_option(hidden=True),
) -> None:
    start_root(ctx, verbose, data_dir)


def _dirs(cache_dir: Optional[Path]) -> Optional[list[Path]]:
    return [cache_dir] if cache_dir is not None else None


@app.command("index")
@handle_errors
def index_command(ctx: typer.Context, cache_dir: Optional[Path] = CACHE_DIR, mode: str = MODE) -> None:
    """Scan a Triton or vLLM cache directory into the catalog."""
    with k.open_catalog(ctx) as catalog:
        summary = k.run_index(catalog, _dirs(cache_dir), mode)
    console.print(summary.line(), highlight=False)


#: MCM's filter flags: kernels' without --name-like, one --cache-dir and MCM's --mode wording.
FILTER_FLAGS = tuple(f for f in k.FILTER_FLAGS if f[0] not in ("name_like", "cache_dirs", "mode")) + (
    ("cache_dirs", Optional[Path], CACHE_DIR), ("mode", str, MODE))


@app.command("list")
@handle_errors
@k.with_filter(FILTER_FLAGS)
def list_command(ctx: typer.Context, flt: KernelFilter) -> None:
    """List kernels (MCM's columns: Hash, Name, Hits, Last Access, Backend, Arch, Version, Warps, Total Size, Dir)."""
    with k.open_catalog(ctx) as catalog:
        k.refresh_if_dirs(catalog, flt)
        records = query(catalog, flt)
    table = Table(header_style="bold")
    for col in ("Hash", "Name", "Hits", "Last Access", "Backend", "Arch", "Version", "Warps", "Total Size", "Dir"):
        table.add_column(col, overflow="fold", no_wrap=col not in ("Name", "Dir"))
    for r in records:
        last = iso(r.last_access)
        table.add_row((r.hash or r.key)[:12], r.name, str(r.hits), last[:19].replace("T", " ") if last else "-",
                      r.backend, r.arch, r.triton_version or "-", str(r.num_warps or "-"),
                      format_size(r.total_size), str(r.cache_root))
    console.print(table)
    console.print(k.footer(records), highlight=False)


@app.command("prune")
@handle_errors
@k.with_filter(FILTER_FLAGS)
def prune_command(
    ctx: typer.Context,
    flt: KernelFilter,
    full: bool = typer.Option(False, "--full", help="Delete entire kernel directories (default: only IR files)."),
    deduplicate: bool = typer.Option(False, "--deduplicate", help="Keep only the newest copy of duplicate kernels."),
    yes: bool = YES,
    dry_run: bool = DRY_RUN,
) -> None:
    """Prune kernels: IR files by default, `--full` directories, or `--deduplicate`."""
    strategy, _ = k.choose_strategy(full, deduplicate, None, False)
    k.run_prune(ctx, flt, strategy, None, dry_run, yes, OutputFormat.table)


@app.command("warm")
@handle_errors
def warm_command(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Hugging Face model ID."),
    output: Path = typer.Option(Path(DEFAULT_OUTPUT), "--output", "-o", help="Output tarball path."),
    host_cache_dir: Path = typer.Option(Path("./"), "--host-cache-dir", help="Host directory for the cache."),
    hugging_face_token: Optional[str] = typer.Option(None, "--hugging-face-token", envvar="HF_TOKEN",
                                                     show_envvar=False, help="Token for private models."),
    vllm_cache_dir: str = typer.Option(DEFAULT_VLLM_CACHE_DIR, "--vllm_cache_dir", "--vllm-cache-dir",
                                       help="Cache path inside the container."),
    tarball: bool = typer.Option(False, "--tarball", help="Create a gzipped tarball after warming."),
    rocm: bool = typer.Option(False, "--rocm", help="Use the ROCm image instead of the CUDA one."),
    engine: str = typer.Option("podman", "--engine", help="podman or docker."),
    image: Optional[str] = typer.Option(None, "--image", help="Container image (default: MCM's CUDA/ROCm image)."),
) -> None:
    """Pre-warm a vLLM cache by running the model in a container (podman or docker with GPU access)."""
    run_container_warm(model, rocm=rocm, engine=engine, image=image, host_cache_dir=host_cache_dir,
                       vllm_cache_dir=vllm_cache_dir, token=hugging_face_token, tarball=tarball, output=output)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
