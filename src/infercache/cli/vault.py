"""`infercache vault ...`: filled in by the vault issue."""

from __future__ import annotations

import typer

app = typer.Typer(help="vault", no_args_is_help=True)
