"""What every command shares: global options, logging set-up, error → exit-code mapping, output."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console

from infercache.errors import InfercacheError

# Piped tables are read by grep and people alike: don't squeeze them into 80 columns.
_PIPE_WIDTH = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160
console = Console(width=_PIPE_WIDTH)
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


class OutputFormat(str, Enum):
    table = "table"
    json = "json"


class ListFormat(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


@dataclass
class GlobalOptions:
    """Options given before the sub-command (`infercache -v --data-dir D kernels ...`)."""

    data_dir: Path | None = None
    verbosity: int = 0


def global_options(ctx: typer.Context | None) -> GlobalOptions:
    """The root's options, found by walking up the Click context chain."""
    while ctx is not None:
        if isinstance(ctx.obj, GlobalOptions):
            return ctx.obj
        ctx = ctx.parent
    return GlobalOptions()


def setup_logging(verbosity: int) -> None:
    """-v/-vv/-vvv → WARNING/INFO/DEBUG; warnings (corrupt entries...) show even without -v."""
    level = logging.WARNING if verbosity <= 1 else logging.INFO if verbosity == 2 else logging.DEBUG
    from rich.logging import RichHandler

    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = RichHandler(console=err_console, show_time=False, show_path=verbosity >= 3)
    root.addHandler(handler)
    root.setLevel(level)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print an error on stderr and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def handle_errors(func: F) -> F:
    """Turn library exceptions into a one-line message and the spec's exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except InfercacheError as exc:
            raise fail(str(exc), exc.exit_code) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None

    return wrapper  # type: ignore[return-value]


def print_json(obj: Any) -> None:
    """One JSON document on stdout and nothing else there."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str))
    sys.stdout.write("\n")
    sys.stdout.flush()
