"""`infercache kernels ...`: filled in by the kernels issue."""

from __future__ import annotations

import typer

app = typer.Typer(help="kernels", no_args_is_help=True)
