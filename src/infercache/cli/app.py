"""The `infercache` command: global options and the sub-command groups."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Optional

import typer
from typer.core import TyperGroup

from infercache import __version__
from infercache.cli.common import VERBOSE, data_dir_option, root_app, start_root

#: Sub-command → (module, attribute): a Typer app (a group) or a command function. Data, not
#: imports: `infercache kernels list` loads the kernels CLI only, not the vault's or the KV
#: server's libraries (each command's start-up pays for what it uses).
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "kernels": ("infercache.cli.kernels", "app"),
    "vault": ("infercache.cli.vault", "app"),
    "kv": ("infercache.cli.kv", "app"),
    "gpu": ("infercache.cli.gpu", "gpu_command"),
}


class _SubcommandTable(TyperGroup):
    """The root group: its sub-commands come from :data:`SUBCOMMANDS`, built when first asked for."""

    def list_commands(self, ctx: Any) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(SUBCOMMANDS))

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in SUBCOMMANDS:
            return super().get_command(ctx, cmd_name)
        module, attribute = SUBCOMMANDS[cmd_name]
        target = getattr(importlib.import_module(module), attribute)
        if not isinstance(target, typer.Typer):  # a command function: a one-command app of its own
            single = root_app()
            single.command(cmd_name)(target)
            target = single
        command = typer.main.get_command(target)
        command.name = cmd_name
        return command


app = root_app(
    name="infercache",
    help="Caches that LLM inference depends on: kernel caches, cache images, KV pools.",
    cls=_SubcommandTable,
    no_args_is_help=True,
)


DATA_DIR = data_dir_option()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"infercache {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    verbose: int = VERBOSE,
    data_dir: Optional[Path] = DATA_DIR,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    start_root(ctx, verbose, data_dir)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
