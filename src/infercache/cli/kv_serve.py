"""`infercache kv serve`: the KV controller HTTP service (parsing and presentation only).

The work is in `infercache.kv.server` (app, socket, uvicorn) and `infercache.kv.client.LocalController`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer

from infercache.cli.common import console, err_console, global_options, handle_errors
from infercache.errors import InfercacheError
from infercache.kv.client import DEFAULT_MAX_TOKENS, DEFAULT_PORT, LocalController
from infercache.kv.config import EngineConfig
from infercache.kv.engine import Engine
from infercache.kv.server import bind, serve
from infercache.kv.tokenizer import load_tokenizer
from infercache.net import is_loopback


@handle_errors
def serve_command(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(
        None, "--config", help="Engine settings (YAML); default: INFERCACHE_KV_* variables, else built-in defaults."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default)."),
    port: int = typer.Option(DEFAULT_PORT, "--port", min=0, max=65535, help="Port to listen on (0: a free port)."),
    token: Optional[str] = typer.Option(
        None, "--token", envvar="INFERCACHE_API_TOKEN", show_envvar=True, show_default=False,
        help="Require 'Authorization: Bearer TOKEN' on every route but /health.",
    ),
    tokenizer: Optional[str] = typer.Option(
        None, "--tokenizer", envvar="INFERCACHE_KV_TOKENIZER",
        help="tokenizer.json file or transformers tokenizer directory for /tokenize (default: byte-level).",
    ),
    max_tokens: int = typer.Option(
        DEFAULT_MAX_TOKENS, "--max-tokens", min=1, help="Largest token list a request may carry (else 413)."
    ),
    shutdown_timeout: float = typer.Option(
        30.0, "--shutdown-timeout", min=0.0, help="Seconds to let pending moves finish on SIGTERM."
    ),
) -> None:
    """Serve one KV engine over HTTP: /health /tokenize /lookup /move /check_finish /pin /clear /metrics."""
    cfg = EngineConfig.from_file(config) if config is not None else EngineConfig.from_env()
    data_dir = global_options(ctx).data_dir
    if cfg.data_dir is None and data_dir is not None:
        cfg = dataclasses.replace(cfg, data_dir=str(data_dir))
    tok = load_tokenizer(tokenizer)
    if not token and not is_loopback(host):
        err_console.print(f"[yellow]warning:[/] serving on {host} without --token: anyone who can reach it can "
                          "move and clear your KV cache", highlight=False)
    try:
        sock = bind(host, port)
    except OSError as exc:
        raise InfercacheError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        engine = Engine(cfg)
    except BaseException:
        sock.close()
        raise
    controller = LocalController(engine, tokenizer=tok, max_tokens=max_tokens, own_engine=True)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host

    def ready() -> None:
        console.print(
            f"infercache kv serve: listening on http://{shown}:{bound_port} "
            f"(instance {controller.instance_id}, tiers {', '.join(controller.locations)}, "
            f"tokenizer {tok.name}{', token required' if token else ''})",
            highlight=False, soft_wrap=True,
        )
        console.file.flush()

    summary = serve(controller, sock, token=token, on_ready=ready, shutdown_timeout=shutdown_timeout)
    console.print(
        f"infercache kv serve: stopped ({summary.get('finished', 0)} pending move(s) finished, "
        f"{summary.get('failed', 0)} failed; engine closed)",
        highlight=False, soft_wrap=True,
    )


