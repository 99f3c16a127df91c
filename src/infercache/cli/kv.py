"""`infercache kv ...`: filled in by the kv issue."""

from __future__ import annotations

import typer

app = typer.Typer(help="kv", no_args_is_help=True)
