"""`mcv`: compatibility front end accepting the old Model Cache Vault's flags.

Maps MCV's single-command flags onto the vault library (pack / unpack / check)
and the gpu package. Differences from MCV, on purpose: no container daemon or
buildah; `-c` pushes to the registry itself; extraction is always per entry
(only entries compatible with the local GPUs are installed) and safe.
"""

from __future__ import annotations

import logging
import os
import platform
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional

import typer

from infercache.cli.common import console, err_console, handle_errors, print_json
from infercache.errors import BadInputError

app = typer.Typer(name="mcv", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
log = logging.getLogger("infercache.mcv")

_PREFIXES = ("docker://", "oci:", "oci-archive:", "docker-archive:")


class LogLevel(str, Enum):
    debug = "debug"
    info = "info"
    warning = "warning"
    warn = "warn"
    error = "error"


def normalize_image(image: str) -> str:
    """A transport reference for `image`: bare names mean a registry (docker's naming rules).

    `quay.io/x/y:tag` → `docker://quay.io/x/y:tag`; `x/y` → `docker://docker.io/x/y`;
    `y` → `docker://docker.io/library/y`; references with a transport prefix are kept.
    """
    image = image.strip()
    if not image:
        raise BadInputError("-i/--image must not be empty")
    if image.startswith(_PREFIXES):
        return image
    first, slash, _rest = image.partition("/")
    if not slash:
        return f"docker://docker.io/library/{image}"
    if "." in first or ":" in first or first == "localhost":
        return f"docker://{image}"
    return f"docker://docker.io/{image}"


def _setup_logging(level: LogLevel) -> None:
    from rich.logging import RichHandler

    name = "WARNING" if level == LogLevel.warn else level.value.upper()
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(RichHandler(console=err_console, show_time=False, show_path=False))
    root.setLevel(name)


def _registry_options(tls_verify: bool, authfile: Optional[Path], creds: Optional[str]) -> Any:
    from infercache.vault.transport import RegistryOptions

    return RegistryOptions(tls_verify=tls_verify, authfile=authfile, creds=creds)


def _hw_info() -> dict[str, Any]:
    from infercache.gpu.compat import installed_triton_version
    from infercache.gpu.detect import detect_gpus

    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = None
    return {
        "host": {
            "hostname": platform.node(),
            "os": platform.system(),
            "kernel": platform.release(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "memory_bytes": memory,
        },
        "triton_version": installed_triton_version(),
        "gpus": [gpu.to_json() for gpu in detect_gpus()],
    }


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
@handle_errors
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
    tls_verify: bool = typer.Option(True, "--tls-verify/--no-tls-verify", help="Verify registry TLS certificates."),
    authfile: Optional[Path] = typer.Option(None, "--authfile", help="Registry auth file (auth.json format)."),
    creds: Optional[str] = typer.Option(None, "--creds", help="USER:PASSWORD for the registry."),
) -> None:
    """Model Cache Vault: package GPU kernel caches as OCI images, check and extract them."""
    _setup_logging(log_level)
    actions = [name for name, on in (("-c", create), ("-e", extract), ("--check-compat", check_compat),
                                     ("--gpu-info", gpu_info), ("--hw-info", hw_info)) if on]
    if len(actions) != 1:
        raise BadInputError("give exactly one of -c/--create, -e/--extract, --check-compat, --gpu-info, --hw-info"
                            + (f" (got {' '.join(actions)})" if actions else ""))
    if gpu_info:
        print_json(_hw_info()["gpus"])
        return
    if hw_info:
        print_json(_hw_info())
        return
    if not image:
        raise BadInputError(f"{actions[0]} needs -i/--image IMAGE")
    reference = normalize_image(image)
    options = _registry_options(tls_verify, authfile, creds)
    if create:
        _create(reference, dir, fmt, compression, options)
    elif check_compat:
        _check(reference, target, options)
    else:
        _extract(reference, dir, target, no_gpu, baremetal, options)


def _create(reference: str, cache_dir: Optional[Path], fmt: str, compression: str, options: Any) -> None:
    from infercache.paths import triton_cache_dir
    from infercache.vault.pack import pack

    source = cache_dir or triton_cache_dir()
    if not source.is_dir():
        raise BadInputError(f"cache dir {source} does not exist (give -d DIR)")
    result = pack(source, reference, fmt=fmt, compression=compression, options=options)
    targets = ", ".join(f"{t['backend']}:{t['arch']}" for t in result.targets) or "none"
    console.print(f"Created {result.reference}", highlight=False)
    console.print(f"  digest  {result.digest}", highlight=False)
    console.print(f"  entries {result.entries}   targets {targets}", highlight=False)


def _check(reference: str, targets: Optional[List[str]], options: Any) -> None:
    from infercache.vault.check import check_image

    result = check_image(reference, targets or None, options)
    print_json(result.to_json())
    if not result.compatible:
        raise typer.Exit(1)


def _extract(reference: str, dest: Optional[Path], targets: Optional[List[str]], no_gpu: bool, baremetal: bool,
             options: Any) -> None:
    from infercache.vault.unpack import unpack

    if no_gpu:
        # MCV's --no-gpu skips the GPU checks: every target the image holds counts as local.
        targets = _image_targets(reference, options)
    report = unpack(reference, dest=dest, targets=targets or None, force=no_gpu, options=options)
    data = report.to_json()
    if baremetal and not no_gpu:
        data["baremetal_check"] = baremetal_check(report.dest, report.extracted, targets)
    print_json(data)


def _image_targets(reference: str, options: Any) -> list[str]:
    from infercache.vault.inspect import inspect_image

    summary = inspect_image(reference, options).get("summary") or {}
    found = [f"{t['backend']}:{t['arch']}:{t['warp_size']}" if t.get("warp_size") else f"{t['backend']}:{t['arch']}"
             for t in summary.get("targets", []) if t.get("backend") and t.get("arch")]
    if not found:
        raise BadInputError(f"{reference} lists no targets in its summary label")
    return list(dict.fromkeys(found))


def baremetal_check(dest: Path, keys: tuple[str, ...] | list[str], targets: Optional[List[str]]) -> dict[str, Any]:
    """MCV's full manifest check after extraction: parse each installed entry's own metadata and
    remove only the entries no local GPU (or --target) can use."""
    import shutil

    from infercache.fsutil import is_within
    from infercache.gpu.compat import compatible_with_any, installed_triton_version
    from infercache.gpu.targets import GpuTarget
    from infercache.kernels.triton_entry import TritonEntry, scan_entry
    from infercache.vault.check import local_targets

    gpus, _source = local_targets(targets or None)
    local_triton = installed_triton_version()
    removed: list[str] = []
    checked = 0
    for key in keys:
        path = Path(dest) / key
        if not is_within(path, dest) or not path.is_dir():
            continue
        entry, _raw = scan_entry(path)
        if not isinstance(entry, TritonEntry):
            continue
        checked += 1
        target = GpuTarget.from_entry({"backend": entry.backend, "arch": entry.arch, "warp_size": entry.warp_size,
                                       "ptx_version": entry.ptx_version, "triton_version": entry.triton_version})
        if not compatible_with_any(target, gpus, local_triton):
            shutil.rmtree(path)
            removed.append(key)
    if removed:
        log.warning("removed %d incompatible entries after extraction", len(removed))
    return {"checked": checked, "removed": removed}


def main() -> None:
    app()


if __name__ == "__main__":
    main()
