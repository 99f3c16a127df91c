"""`infercache gpu`: local GPUs and their Triton targets."""

from __future__ import annotations

from rich.table import Table

from infercache.cli.common import (
    FORMAT,
    OutputFormat,
    console,
    handle_errors,
    print_json,
)
from infercache.gpu import detect
from infercache.gpu.compat import installed_triton_version
from infercache.gpu.targets import format_ptx_version


@handle_errors
def gpu_command(
    format: OutputFormat = FORMAT,
) -> None:
    """Show local GPUs and their Triton targets (what `vault check`/`unpack` match against)."""
    gpus = detect.detect_gpus()
    if format == OutputFormat.json:
        print_json([gpu.to_json() for gpu in gpus])
        return
    if not gpus:
        console.print("No GPU found (looked at NVML, amdsmi, amd-smi, rocm-smi, the KFD topology and torch).")
        console.print("Use --target BACKEND:ARCH[:WARP] (e.g. cuda:90, hip:gfx942) with `vault check`/`unpack`.")
        return
    table = Table(title=f"Local GPUs (Triton {installed_triton_version() or 'not installed'})")
    for column in ("#", "Name", "Target", "Backend", "Arch", "Warp", "Driver", "CUDA", "Max PTX", "Source"):
        table.add_column(column, justify="right" if column in ("#", "Warp") else "left")
    for gpu in gpus:
        table.add_row(
            str(gpu.index),
            gpu.name,
            str(gpu.target),
            gpu.target.backend,
            gpu.target.arch,
            str(gpu.target.warp_size),
            gpu.driver_version or "-",
            gpu.cuda_version or "-",
            format_ptx_version(gpu.max_ptx_version) or "-",
            gpu.source,
        )
    console.print(table)
