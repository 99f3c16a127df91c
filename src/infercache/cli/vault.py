"""`infercache vault pack|inspect|check|unpack|copy`: parse flags, call `infercache.vault`, present."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.table import Table

from infercache.cli.common import (
    FORMAT,
    Flags,
    OutputFormat,
    bundle_options,
    console,
    err_console,
    handle_errors,
    print_json,
    progress_bar,
)
from infercache.kernels.discovery import MODES
from infercache.units import format_size
from infercache.vault.auth import registry_options
from infercache.vault.check import check_image
from infercache.vault.copy import copy_image
from infercache.vault.inspect import inspect_image
from infercache.vault.pack import COMPRESSIONS, FORMATS, pack
from infercache.vault.reference import RegistryOptions
from infercache.vault.unpack import unpack

app = typer.Typer(
    help="Kernel caches as OCI images: pack, inspect, check, unpack, copy (no container daemon needed).",
    no_args_is_help=True,
)


#: The choices pack accepts, as Typer enums (the lists themselves live in infercache.vault.pack).
ImageFormat = Enum("ImageFormat", {name: name for name in FORMATS}, type=str)  # type: ignore[misc]
Compression = Enum("Compression", {name: name for name in COMPRESSIONS}, type=str)  # type: ignore[misc]


PackMode = Enum("PackMode", {name: name for name in ("auto", *MODES)}, type=str)  # type: ignore[misc]


TLS = typer.Option(True, "--tls-verify/--no-tls-verify", help="Verify registry TLS certificates (default: verify).")
AUTHFILE = typer.Option(None, "--authfile", help="Registry auth file (docker config.json format).")
CREDS = typer.Option(None, "--creds", help="Registry credentials USER:PASS.")
#: The registry-access flags of every command that reads or writes an image (vault's and mcv's).
REGISTRY_FLAGS: Flags = (("tls_verify", bool, TLS), ("authfile", Optional[Path], AUTHFILE), ("creds", Optional[str], CREDS))
#: Gives a command REGISTRY_FLAGS in place of its keyword-only `options`, checked (bad --creds/--authfile: exit 2).
with_registry = bundle_options("options", REGISTRY_FLAGS, registry_options)
TARGETS = typer.Option(None, "--target", help="BACKEND:ARCH[:WARP] to use instead of the local GPUs (repeatable).")


def _targets_text(targets: list[dict[str, Any]]) -> str:
    out = []
    for t in targets:
        text = f"{t.get('backend')}:{t.get('arch')}"
        if t.get("warp_size") is not None:
            text += f" (warp {t['warp_size']})"
        out.append(text)
    return ", ".join(out) or "none"


@app.command("pack")
@handle_errors
@with_registry
def pack_command(
    cache_dir: Path = typer.Argument(..., help="The cache directory to pack."),
    image_ref: str = typer.Argument(..., help="oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE[:NAME:TAG], docker://HOST/REPO[:TAG]."),
    mode: PackMode = typer.Option(PackMode.auto, "--mode", help="auto, triton, vllm or inductor."),  # type: ignore[valid-type]
    fmt: ImageFormat = typer.Option("oci", "--format", help="oci or docker media types."),  # type: ignore[valid-type]
    compression: Compression = typer.Option(  # type: ignore[valid-type]
        "gzip", "--compression", help="gzip, zstd or none (docker: gzip only)."),
    name: Optional[str] = typer.Option(None, "--name", help="Image title (org.opencontainers.image.title)."),
    *,
    options: RegistryOptions,
) -> None:
    """Pack a Triton or vLLM cache into an image, without any container daemon."""
    with progress_bar("packing", in_bytes=True) as progress:
        result = pack(cache_dir, image_ref, mode=mode.value, fmt=fmt.value, compression=compression.value,
                      title=name, options=options, progress=progress)
    console.print(f"packed [bold]{result.entries}[/] entries ({format_size(result.cache_size)}) into {result.reference}",
                  highlight=False)
    console.print(f"digest  {result.digest}", highlight=False)
    console.print(f"layer   {result.layer.digest} ({format_size(result.layer.size)}, {result.layer.media_type})",
                  highlight=False)
    console.print(f"targets {_targets_text(result.targets)}", highlight=False)
    if result.skipped:
        console.print(f"left out {result.skipped} non-kernel item(s) (garbage, launchers, unparsable)", highlight=False)


@app.command("inspect")
@handle_errors
@with_registry
def inspect_command(
    image_ref: str = typer.Argument(..., help="Image reference."),
    format: OutputFormat = FORMAT,
    *,
    options: RegistryOptions,
) -> None:
    """Show an image's labels, summary and layers (reads the manifest and config only)."""
    data = inspect_image(image_ref, options)
    if format == OutputFormat.json:
        print_json(data)
        return
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    for key in ("reference", "digest", "media_type", "created", "type", "entry_count"):
        table.add_row(key, str(data.get(key)))
    size = data.get("cache_size_bytes")
    table.add_row("cache_size", format_size(size) if isinstance(size, int) else "unknown")
    table.add_row("targets", _targets_text(data["summary"]["targets"]))
    for key, value in sorted(data["annotations"].items()):
        table.add_row(key, value)
    console.print(table)
    layers = Table("layer", "size", "media type")
    for layer in data["layers"]:
        layers.add_row(layer["digest"], format_size(layer["size"]), layer["media_type"])
    console.print(layers)
    labels = Table("label", "value")
    for key, value in sorted(data["labels"].items()):
        labels.add_row(key, value)
    console.print(labels)


@app.command("check")
@handle_errors
@with_registry
def check_command(
    image_ref: str = typer.Argument(..., help="Image reference."),
    target: Optional[List[str]] = TARGETS,
    format: OutputFormat = FORMAT,
    *,
    options: RegistryOptions,
) -> None:
    """Is the image usable here? Exit 0 compatible, 1 not (or no GPU and no --target), 2 bad input."""
    result = check_image(image_ref, target or None, options)
    if format == OutputFormat.json:
        print_json(result.to_json())
    else:
        if result.message:
            err_console.print(f"[yellow]{result.message}[/]", highlight=False)
        table = Table("GPU", "target", "compatible", "reasons / warnings")
        for gpu in result.gpus:
            notes = "\n".join(list(gpu.reasons) + [f"warning: {w}" for w in gpu.warnings])
            table.add_row(gpu.name, f"{gpu.backend}:{gpu.arch} (warp {gpu.warp_size})",
                          "[green]yes[/]" if gpu.compatible else "[red]no[/]", notes)
        if result.gpus:
            console.print(table)
        console.print(f"image targets: {_targets_text(list(result.targets))}", highlight=False)
        ind = result.extra.get("inductor")
        if ind:
            img = ind["image"] or {}
            console.print(f"torch.compile: torch {img.get('torch_version')}, Python {img.get('python_version')}, "
                          f"CPU ISA {img.get('cpu_isa')} ({'usable here' if ind['compatible'] else 'not usable here'})",
                          highlight=False)
        console.print("compatible" if result.compatible else "NOT compatible", highlight=False)
    raise typer.Exit(0 if result.compatible else 1)


@app.command("unpack")
@handle_errors
@with_registry
def unpack_command(
    image_ref: str = typer.Argument(..., help="Image reference."),
    dest: Optional[Path] = typer.Option(None, "--dest", help="Where to install (default: the Triton cache dir, the vLLM root for vLLM images, "
                                                       "the Inductor cache dir for inductor images)."),
    target: Optional[List[str]] = TARGETS,
    force: bool = typer.Option(False, "--force", help="Unpack the compatible entries even if the image summary says it does not fit."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace entries that already exist."),
    format: OutputFormat = FORMAT,
    *,
    options: RegistryOptions,
) -> None:
    """Verify an image and install only the entries compatible with the local GPUs / --target."""
    with progress_bar("unpacking", in_bytes=True) as progress:
        report = unpack(image_ref, dest, target or None, force=force, overwrite=overwrite, options=options,
                        progress=progress)
    if format == OutputFormat.json:
        print_json(report.to_json())
        return
    for warning in report.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    console.print(
        f"unpacked {report.reference} into {report.dest}: [bold]{len(report.extracted)}[/] extracted"
        + (f" ({len(report.replaced)} replaced)" if report.replaced else "")
        + f", {len(report.skipped_incompatible)} skipped (incompatible), "
        f"{len(report.already_present)} already present"
        + (f", {report.other_files} other files" if report.other_files else ""),
        highlight=False,
    )


@app.command("copy")
@handle_errors
@with_registry
def copy_command(
    src_ref: str = typer.Argument(..., help="Source image reference."),
    dst_ref: str = typer.Argument(..., help="Destination image reference."),
    *,
    options: RegistryOptions,
) -> None:
    """Copy an image between any two transports (a push or a pull is a copy)."""
    with progress_bar("copying", in_bytes=True) as progress:
        result = copy_image(src_ref, dst_ref, src_options=options, dst_options=options, progress=progress)
    console.print(
        f"copied {result.source} → {result.destination}: {result.blobs_copied} blob(s) "
        f"({format_size(result.bytes_copied)}), {result.blobs_skipped} already there",
        highlight=False,
    )
    console.print(f"digest {result.digest}", highlight=False)
