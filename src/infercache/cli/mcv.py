"""`mcv`: compatibility front end accepting the old Model Cache Vault's flags.

Maps MCV's single-command flags onto the vault library (pack / unpack / check)
and the gpu package. Differences from MCV, on purpose: no container daemon or
buildah; `-c` pushes to the registry itself; extraction is always per entry
(only entries compatible with the local GPUs are installed) and safe.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from infercache.cli.common import (
    console,
    handle_errors,
    print_json,
    root_app,
    setup_logging,
)
from infercache.cli.vault import with_registry
from infercache.errors import BadInputError
from infercache.gpu.hardware import hardware_info
from infercache.paths import triton_cache_dir
from infercache.vault.baremetal import baremetal_check
from infercache.vault.check import check_image
from infercache.vault.inspect import image_targets
from infercache.vault.pack import pack
from infercache.vault.reference import ImageReference, RegistryOptions
from infercache.vault.unpack import unpack

app = root_app(name="mcv", no_args_is_help=True)


class LogLevel(str, Enum):
    debug = "debug"
    info = "info"
    warning = "warning"
    warn = "warn"
    error = "error"


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
@handle_errors
@with_registry
def main_command(
    create: bool = typer.Option(False, "-c", "--create", help="Pack the cache in -d DIR into -i IMAGE (pushes)."),
    extract: bool = typer.Option(False, "-e", "--extract", help="Extract -i IMAGE into -d DIR (compatible entries)."),
    image: Optional[str] = typer.Option(None, "-i", "--image", help="quay.io/x/y:tag (registry) or oci:DIR:TAG ..."),
    dir: Optional[Path] = typer.Option(None, "-d", "--dir", help="Cache dir (default: the Triton cache dir)."),
    log_level: LogLevel = typer.Option(
        LogLevel.warning, "-l", "--log-level", case_sensitive=False, help="debug, info, warning, error."
    ),
    baremetal: bool = typer.Option(
        False, "-b", "--baremetal",
        help="After extraction, check every extracted entry against the local GPUs (full manifest check) "
        "and remove only incompatible ones; prints the per-entry report.",
    ),
    no_gpu: bool = typer.Option(False, "--no-gpu", help="Skip GPU checks: extract every entry."),
    hw_info: bool = typer.Option(False, "--hw-info", help="Print host and GPU facts as JSON."),
    gpu_info: bool = typer.Option(False, "--gpu-info", help="Print local GPUs and their Triton targets as JSON."),
    check_compat: bool = typer.Option(False, "--check-compat", help="Check -i IMAGE against the local GPUs."),
    target: Optional[List[str]] = typer.Option(
        None, "--target", help="BACKEND:ARCH[:WARP] to check/extract for instead of local GPUs (repeatable)."
    ),
    fmt: str = typer.Option("oci", "--format", help="Image media types for -c: oci or docker."),
    compression: str = typer.Option("gzip", "--compression", help="Layer compression for -c: gzip, zstd, none."),
    *,
    options: RegistryOptions,
) -> None:
    """Model Cache Vault: package GPU kernel caches as OCI images, check and extract them."""
    setup_logging(level=log_level.value)
    actions = [name for name, on in (("-c", create), ("-e", extract), ("--check-compat", check_compat),
                                     ("--gpu-info", gpu_info), ("--hw-info", hw_info)) if on]
    if len(actions) != 1:
        raise BadInputError("give exactly one of -c/--create, -e/--extract, --check-compat, --gpu-info, --hw-info"
                            + (f" (got {' '.join(actions)})" if actions else ""))
    if gpu_info:
        print_json(hardware_info().to_json()["gpus"])
        return
    if hw_info:
        print_json(hardware_info().to_json())
        return
    if not image:
        raise BadInputError(f"{actions[0]} needs -i/--image IMAGE")
    reference = ImageReference.from_image_name(image)
    if create:
        _create(reference, dir, fmt, compression, options)
    elif check_compat:
        _check(reference, target, options)
    else:
        _extract(reference, dir, target, no_gpu, baremetal, options)


def _create(reference: ImageReference, cache_dir: Optional[Path], fmt: str, compression: str,
            options: RegistryOptions) -> None:
    source = cache_dir or triton_cache_dir()
    if not source.is_dir():
        raise BadInputError(f"cache dir {source} does not exist (give -d DIR)")
    result = pack(source, reference, fmt=fmt, compression=compression, options=options)
    targets = ", ".join(f"{t['backend']}:{t['arch']}" for t in result.targets) or "none"
    console.print(f"Created {result.reference}", highlight=False)
    console.print(f"  digest  {result.digest}", highlight=False)
    console.print(f"  entries {result.entries}   targets {targets}", highlight=False)


def _check(reference: ImageReference, targets: Optional[List[str]], options: RegistryOptions) -> None:
    result = check_image(reference, targets or None, options)
    print_json(result.to_json())
    if not result.compatible:
        raise typer.Exit(1)


def _extract(reference: ImageReference, dest: Optional[Path], targets: Optional[List[str]], no_gpu: bool,
             baremetal: bool, options: RegistryOptions) -> None:
    if no_gpu:
        # MCV's --no-gpu skips the GPU checks: every target the image holds counts as local.
        targets = [str(t) for t in image_targets(reference, options)]
    report = unpack(reference, dest=dest, targets=targets or None, force=no_gpu, options=options)
    data = report.to_json()
    if baremetal and not no_gpu:
        data["baremetal_check"] = baremetal_check(report.dest, report.extracted, targets).to_json()
    print_json(data)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
