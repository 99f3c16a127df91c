"""`infercache vault pack|inspect|check|unpack|copy`: parse flags, call `infercache.vault`, present."""

from __future__ import annotations

import contextlib
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

import typer

from infercache.cli.common import OutputFormat, console, err_console, handle_errors, print_json

app = typer.Typer(
    help="Kernel caches as OCI images: pack, inspect, check, unpack, copy (no container daemon needed).",
    no_args_is_help=True,
)


class ImageFormat(str, Enum):
    oci = "oci"
    docker = "docker"


class Compression(str, Enum):
    gzip = "gzip"
    zstd = "zstd"
    none = "none"


class PackMode(str, Enum):
    auto = "auto"
    triton = "triton"
    vllm = "vllm"


TLS = typer.Option(True, "--tls-verify/--no-tls-verify", help="Verify registry TLS certificates (default: verify).")
AUTHFILE = typer.Option(None, "--authfile", help="Registry auth file (docker config.json format).")
CREDS = typer.Option(None, "--creds", help="Registry credentials USER:PASS.")
TARGETS = typer.Option(None, "--target", help="BACKEND:ARCH[:WARP] to use instead of the local GPUs (repeatable).")


def os_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Disk full, permission denied... become a one-line error (exit 1), not a traceback."""
    import functools

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from infercache.errors import InfercacheError

        try:
            return func(*args, **kwargs)
        except OSError as exc:
            raise InfercacheError(str(exc)) from exc

    return wrapper


def _options(tls_verify: bool, authfile: Optional[Path], creds: Optional[str]) -> Any:
    from infercache.errors import BadInputError
    from infercache.vault.transport import RegistryOptions

    if authfile is not None and not authfile.is_file():
        raise BadInputError(f"--authfile {authfile}: no such file")
    if creds is not None and ":" not in creds:
        raise BadInputError("--creds must be USER:PASS")
    return RegistryOptions(tls_verify=tls_verify, authfile=authfile, creds=creds)


@contextlib.contextmanager
def _progress(description: str) -> Iterator[Optional[Callable[[int, int], None]]]:
    """A Rich progress bar on stderr when it is a terminal; no callback otherwise."""
    if not err_console.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    with Progress(
        "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        console=err_console, transient=True,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _size(n: int) -> str:
    from infercache.units import format_size

    return format_size(n)


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
@os_errors
def pack_command(
    cache_dir: Path = typer.Argument(..., help="The cache directory to pack."),
    image_ref: str = typer.Argument(..., help="oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE[:NAME:TAG], docker://HOST/REPO[:TAG]."),
    mode: PackMode = typer.Option(PackMode.auto, "--mode", help="auto, triton or vllm."),
    fmt: ImageFormat = typer.Option(ImageFormat.oci, "--format", help="oci or docker media types."),
    compression: Compression = typer.Option(Compression.gzip, "--compression", help="gzip, zstd or none (docker: gzip only)."),
    name: Optional[str] = typer.Option(None, "--name", help="Image title (org.opencontainers.image.title)."),
    tls_verify: bool = TLS,
    authfile: Optional[Path] = AUTHFILE,
    creds: Optional[str] = CREDS,
) -> None:
    """Pack a Triton or vLLM cache into an image, without any container daemon."""
    from infercache.vault.pack import pack

    options = _options(tls_verify, authfile, creds)
    with _progress("packing") as progress:
        result = pack(cache_dir, image_ref, mode=mode.value, fmt=fmt.value, compression=compression.value,
                      title=name, options=options, progress=progress)
    console.print(f"packed [bold]{result.entries}[/] entries ({_size(result.cache_size)}) into {result.reference}",
                  highlight=False)
    console.print(f"digest  {result.digest}", highlight=False)
    console.print(f"layer   {result.layer.digest} ({_size(result.layer.size)}, {result.layer.media_type})",
                  highlight=False)
    console.print(f"targets {_targets_text(result.targets)}", highlight=False)
    if result.skipped:
        console.print(f"left out {result.skipped} non-kernel item(s) (garbage, launchers, unparsable)", highlight=False)


@app.command("inspect")
@handle_errors
@os_errors
def inspect_command(
    image_ref: str = typer.Argument(..., help="Image reference."),
    format: OutputFormat = typer.Option(OutputFormat.table, "--format", help="table or json."),
    tls_verify: bool = TLS,
    authfile: Optional[Path] = AUTHFILE,
    creds: Optional[str] = CREDS,
) -> None:
    """Show an image's labels, summary and layers (reads the manifest and config only)."""
    from rich.table import Table

    from infercache.vault.inspect import inspect_image

    data = inspect_image(image_ref, _options(tls_verify, authfile, creds))
    if format == OutputFormat.json:
        print_json(data)
        return
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    for key in ("reference", "digest", "media_type", "created", "type", "entry_count"):
        table.add_row(key, str(data.get(key)))
    size = data.get("cache_size_bytes")
    table.add_row("cache_size", _size(size) if isinstance(size, int) else "unknown")
    table.add_row("targets", _targets_text(data["summary"]["targets"]))
    for key, value in sorted(data["annotations"].items()):
        table.add_row(key, value)
    console.print(table)
    layers = Table("layer", "size", "media type")
    for layer in data["layers"]:
        layers.add_row(layer["digest"], _size(layer["size"]), layer["media_type"])
    console.print(layers)
    labels = Table("label", "value")
    for key, value in sorted(data["labels"].items()):
        labels.add_row(key, value)
    console.print(labels)


@app.command("check")
@handle_errors
@os_errors
def check_command(
    image_ref: str = typer.Argument(..., help="Image reference."),
    target: Optional[List[str]] = TARGETS,
    format: OutputFormat = typer.Option(OutputFormat.table, "--format", help="table or json."),
    tls_verify: bool = TLS,
    authfile: Optional[Path] = AUTHFILE,
    creds: Optional[str] = CREDS,
) -> None:
    """Is the image usable here? Exit 0 compatible, 1 not (or no GPU and no --target), 2 bad input."""
    from rich.table import Table

    from infercache.vault.check import check_image

    result = check_image(image_ref, target or None, _options(tls_verify, authfile, creds))
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
        console.print("compatible" if result.compatible else "NOT compatible", highlight=False)
    raise typer.Exit(0 if result.compatible else 1)


@app.command("unpack")
@handle_errors
@os_errors
def unpack_command(
    image_ref: str = typer.Argument(..., help="Image reference."),
    dest: Optional[Path] = typer.Option(None, "--dest", help="Where to install (default: the Triton cache dir, or the vLLM root for vLLM images)."),
    target: Optional[List[str]] = TARGETS,
    force: bool = typer.Option(False, "--force", help="Unpack the compatible entries even if the image summary says it does not fit."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace entries that already exist."),
    format: OutputFormat = typer.Option(OutputFormat.table, "--format", help="table or json report."),
    tls_verify: bool = TLS,
    authfile: Optional[Path] = AUTHFILE,
    creds: Optional[str] = CREDS,
) -> None:
    """Verify an image and install only the entries compatible with the local GPUs / --target."""
    from infercache.vault.unpack import unpack

    options = _options(tls_verify, authfile, creds)
    with _progress("unpacking") as progress:
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
@os_errors
def copy_command(
    src_ref: str = typer.Argument(..., help="Source image reference."),
    dst_ref: str = typer.Argument(..., help="Destination image reference."),
    tls_verify: bool = TLS,
    authfile: Optional[Path] = AUTHFILE,
    creds: Optional[str] = CREDS,
) -> None:
    """Copy an image between any two transports (a push or a pull is a copy)."""
    from infercache.vault.copy import copy_image

    options = _options(tls_verify, authfile, creds)
    with _progress("copying") as progress:
        result = copy_image(src_ref, dst_ref, src_options=options, dst_options=options, progress=progress)
    console.print(
        f"copied {result.source} → {result.destination}: {result.blobs_copied} blob(s) "
        f"({_size(result.bytes_copied)}), {result.blobs_skipped} already there",
        highlight=False,
    )
    console.print(f"digest {result.digest}", highlight=False)
