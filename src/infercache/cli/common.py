"""What every command shares: global options, logging set-up, error → exit-code mapping, output."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

from infercache.errors import InfercacheError
from infercache.paths import DATA_DIR_ENV
from infercache.units import ProgressCallback

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


#: The options several commands share, declared once (Typer reads an OptionInfo as a default, so one
#: object can serve every command). `--format table|json` of every command that prints one result:
FORMAT = typer.Option(OutputFormat.table, "--format", help="table or json.")
#: `--dry-run` of every command that plans a change before it makes it.
DRY_RUN = typer.Option(False, "--dry-run", help="Print the plan and the bytes it frees; change nothing.")
#: `--yes` of every command that asks before it deletes.
YES = typer.Option(False, "-y", "--yes", help="Do not ask for confirmation.")


@dataclass
class GlobalOptions:
    """Options given before the sub-command (`infercache -v --data-dir D kernels ...`)."""

    data_dir: Path | None = None
    verbosity: int = 0


def data_dir_option(hidden: bool = False) -> Any:
    """`--data-dir` (env INFERCACHE_DATA_DIR) of a root command; `hidden` where a compatible front end's help omits it."""
    return typer.Option(None, "--data-dir", envvar=DATA_DIR_ENV, hidden=hidden, help="Where the catalog lives.")


#: `-v/-vv/-vvv` of a root command (see setup_logging).
VERBOSE = typer.Option(0, "-v", "--verbose", count=True, help="-v warnings, -vv info, -vvv debug.")


def root_app(**settings: Any) -> typer.Typer:
    """A command's top-level Typer app (`infercache`, `mcm`, `mcv`): no completion installer, and no
    Rich tracebacks (they print local variables, which may hold credentials; handle_errors prints one line)."""
    return typer.Typer(add_completion=False, pretty_exceptions_enable=False, **settings)


def start_root(ctx: typer.Context, verbose: int, data_dir: Optional[Path]) -> None:
    """What a root command (`infercache`, `mcm`) does with its global options before any sub-command."""
    setup_logging(verbose)
    ctx.obj = GlobalOptions(data_dir=data_dir, verbosity=verbose)


#: A group of flags given as one value: (parameter name, annotation, typer.Option) each.
Flags = Sequence[tuple[str, Any, Any]]


def bundle_options(param: str, flags: Flags, build: Callable[..., Any]) -> Callable[[F], F]:
    """Give a command the options `flags` in place of its parameter `param`, which gets `build(**their values)`.

    Why: flags that several commands share (kernel filters, registry access) and their mapping
    onto one library value are declared once. Typer reads the command's `__signature__`.
    """

    def decorate(func: F) -> F:
        sig = inspect.signature(func, eval_str=True)
        params = list(sig.parameters.values())
        at = [p.name for p in params].index(param)
        added = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=opt, annotation=t)
                 for n, t, opt in flags]
        names = [n for n, _t, _o in flags]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            kwargs[param] = build(**{n: kwargs.pop(n) for n in names})
            return func(*args, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=params[:at] + added + params[at + 1:])  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


def global_options(ctx: typer.Context | None) -> GlobalOptions:
    """The root's options, found by walking up the Click context chain."""
    while ctx is not None:
        if isinstance(ctx.obj, GlobalOptions):
            return ctx.obj
        ctx = ctx.parent
    return GlobalOptions()


def setup_logging(verbosity: int = 0, *, level: int | str | None = None) -> None:
    """The one logging set-up of every command: library records on stderr through Rich.

    -v/-vv/-vvv → WARNING/INFO/DEBUG (warnings such as corrupt entries show even without -v);
    `level` (a logging level or its name, as mcv's --log-level gives it) overrides the count.
    """
    if level is None:
        level = logging.WARNING if verbosity <= 1 else logging.INFO if verbosity == 2 else logging.DEBUG
    elif isinstance(level, str):
        level = logging.getLevelName(level.upper())
        if not isinstance(level, int):
            raise ValueError(f"unknown log level {level!r}")
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(RichHandler(console=err_console, show_time=False, show_path=level <= logging.DEBUG))
    root.setLevel(level)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print an error on stderr and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def os_error_message(exc: OSError) -> str:
    """'Permission denied: /path' rather than "[Errno 13] Permission denied: '/path'"."""
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


def handle_errors(func: F) -> F:
    """Turn library exceptions into a one-line message and the spec's exit code.

    An OSError that reaches here (permission denied, disk full...) is the operation failing
    (exit 1), not a bug: one line, no traceback.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except InfercacheError as exc:
            raise fail(str(exc), exc.exit_code) from None
        except OSError as exc:
            raise fail(os_error_message(exc), 1) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def progress_bar(description: str, *, in_bytes: bool = False) -> Iterator[ProgressCallback | None]:
    """A transient Rich progress bar on stderr when it is a terminal (else no callback): the callback
    takes (done, total); `in_bytes` shows sizes and speed, otherwise counts and elapsed time."""
    if not err_console.is_terminal:
        yield None
        return
    columns = (DownloadColumn(), TransferSpeedColumn()) if in_bytes else (MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(TextColumn(description), BarColumn(), *columns, console=err_console, transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def print_json(obj: Any) -> None:
    """One JSON document on stdout and nothing else there."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str))
    sys.stdout.write("\n")
    sys.stdout.flush()
