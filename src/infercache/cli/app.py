"""The `infercache` command: global options and the sub-command groups."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from infercache import __version__
from infercache.cli import gpu, kernels, kv, vault
from infercache.cli.common import GlobalOptions, setup_logging

app = typer.Typer(
    name="infercache",
    help="Caches that LLM inference depends on: kernel caches, cache images, KV pools.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(kernels.app, name="kernels")
app.add_typer(vault.app, name="vault")
app.add_typer(kv.app, name="kv")
app.command("gpu")(gpu.gpu_command)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"infercache {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    verbose: int = typer.Option(0, "-v", "--verbose", count=True, help="-v warnings, -vv info, -vvv debug."),
    data_dir: Optional[Path] = typer.Option(
        None, "--data-dir", envvar="INFERCACHE_DATA_DIR", help="Where the catalog lives."
    ),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    setup_logging(verbose)
    ctx.obj = GlobalOptions(data_dir=data_dir, verbosity=verbose)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
