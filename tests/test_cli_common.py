"""cli/common: the one error mapping, logging set-up and progress helper every command uses."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from infercache.cli import common
from infercache.errors import BadInputError


def _app(body: typer.models.CommandFunctionType) -> typer.Typer:  # type: ignore[name-defined]
    app = typer.Typer()
    app.command()(common.handle_errors(body))
    return app


def test_os_error_is_one_line_exit_1(tmp_path: Path) -> None:
    """A real OSError (ENOENT from the kernel) becomes 'No such file or directory: PATH', no traceback."""
    missing = tmp_path / "nope" / "file"

    def command() -> None:
        missing.read_bytes()

    result = CliRunner().invoke(_app(command), [])
    assert result.exit_code == 1
    assert f"No such file or directory: {missing}" in " ".join(result.output.split())  # Rich wraps long lines
    assert "Traceback" not in result.output and "Errno" not in result.output


def test_library_errors_keep_their_exit_code() -> None:
    def command() -> None:
        raise BadInputError("bad size '12Q'")

    result = CliRunner().invoke(_app(command), [])
    assert result.exit_code == 2 and "bad size '12Q'" in result.output


@pytest.mark.parametrize(("verbosity", "level", "expected"), [
    (0, None, logging.WARNING), (2, None, logging.INFO), (3, None, logging.DEBUG),
    (0, "debug", logging.DEBUG), (3, "error", logging.ERROR), (0, "warn", logging.WARNING),
])
def test_setup_logging(verbosity: int, level: str | None, expected: int) -> None:
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        common.setup_logging(verbosity, level=level)
        assert root.level == expected and len(root.handlers) == 1
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]


def test_progress_bar_only_on_a_terminal() -> None:
    """Piped stderr (as here): no bar and no callback, so library code skips the bookkeeping."""
    assert not common.err_console.is_terminal or os.environ.get("TERM") == "dumb"
    with common.progress_bar("indexing") as callback:
        assert callback is None
