"""The root command: every sub-command is reachable, and each loads only its own libraries."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from infercache.cli.app import SUBCOMMANDS, app


def test_every_subcommand_is_listed_and_has_help() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in SUBCOMMANDS:
        assert name in result.output
        sub = CliRunner().invoke(app, [name, "--help"])
        assert sub.exit_code == 0 and f"infercache {name}" in sub.output


def test_unknown_subcommand_is_bad_usage() -> None:
    assert CliRunner().invoke(app, ["nope"]).exit_code == 2


@pytest.mark.parametrize(("argv", "absent"), [
    (["kernels", "--help"], ["infercache.vault.pack", "infercache.vault.registry_client", "infercache.kv.pool"]),
    (["gpu", "--help"], ["infercache.vault.pack", "infercache.kernels.indexer", "infercache.kv.pool"]),
])
def test_a_subcommand_loads_only_its_own_libraries(argv: list[str], absent: list[str]) -> None:
    """Start-up cost is per command: `kernels` does not import the vault or the KV engine."""
    code = (
        "import sys, json\nfrom typer.testing import CliRunner\nfrom infercache.cli.app import app\n"
        f"r = CliRunner().invoke(app, {argv!r})\nassert r.exit_code == 0, r.output\n"
        f"print(json.dumps([m for m in {absent!r} if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
