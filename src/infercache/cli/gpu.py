"""`infercache gpu`: local GPUs and their Triton targets (filled in by the vault issue)."""

from __future__ import annotations

import typer

from infercache.cli.common import OutputFormat


def gpu_command(
    format: OutputFormat = typer.Option(OutputFormat.table, "--format", help="table or json."),
) -> None:
    """Show local GPUs and their Triton targets."""
    raise typer.Exit(1)
