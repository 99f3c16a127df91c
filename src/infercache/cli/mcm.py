"""`mcm`: compatibility front end accepting the old tool's flags."""

from __future__ import annotations

import typer

app = typer.Typer(name="mcm", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def main() -> None:
    app()
