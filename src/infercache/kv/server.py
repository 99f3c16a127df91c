"""The controller HTTP service (`infercache kv serve`): FastAPI over a `LocalController`.

Routes and JSON shapes follow the spec (LMCache's controller API). This module only translates:
request models validate input (422 names the field), `ControllerError.status` becomes the HTTP
status (404 unknown location / instance / event, 413 too many tokens); FastAPI caps the request
size (413 before a huge body is read), and one ASGI wrapper does the bearer-token check (401;
`/health` is open) and the latency metrics. Bad input never yields a 5xx. On shutdown (SIGTERM/SIGINT via
uvicorn) pending moves are finished or reported failed and the engine is closed (disk writes
drained).
"""

from __future__ import annotations

import hmac
import json
import logging
import signal
import socket
import threading
import time
from contextlib import asynccontextmanager
from typing import Annotated, Any, AsyncIterator, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from infercache import __version__
from infercache.kv.client import DEFAULT_MAX_TOKENS, ControllerError, LocalController
from infercache.kv.metrics import CONTENT_TYPE, ControllerMetrics

log = logging.getLogger(__name__)

TokenId = Annotated[int, Field(ge=0, le=2**31 - 1, strict=True)]
Tokens = Annotated[list[TokenId], Field(description="Token ids of the prompt (a prefix is enough).")]
Location = Annotated[str, Field(strict=True, description="hot, disk or remote (gpu and cpu mean hot).")]
Position = Annotated[tuple[Annotated[str, Field(strict=True)], Annotated[str, Field(strict=True)]],
                     Field(description="[INSTANCE, LOCATION]")]
ROUTES = ("/health", "/tokenize", "/lookup", "/move", "/check_finish", "/pin", "/unpin", "/clear", "/metrics",
          "/openapi.json", "/docs")
OPEN_ROUTES = ("/health",)
METHODS = ("GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH")  # others count as "other" (label cardinality)
_BYTES_PER_TOKEN = 24  # generous JSON size of one token id ("2147483647, "), for the body cap


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TokenizeRequest(_Body):
    prompt: Annotated[str, Field(strict=True)]


class TokensRequest(_Body):
    tokens: Tokens


class MoveRequest(_Body):
    old_position: Position
    new_position: Position
    tokens: Tokens
    copy_: Annotated[bool, Field(strict=True, alias="copy")] = False


class CheckFinishRequest(_Body):
    event_id: Annotated[str, Field(strict=True, max_length=200)]


class PinRequest(_Body):
    tokens: Tokens
    location: Optional[Location] = None
    instance_id: Optional[Annotated[str, Field(strict=True)]] = None


class UnpinRequest(_Body):
    tokens: Tokens
    instance_id: Optional[Annotated[str, Field(strict=True)]] = None


class ClearRequest(_Body):
    location: Optional[Location] = None
    instance_id: Optional[Annotated[str, Field(strict=True)]] = None


class LookupResponse(BaseModel):
    found: bool
    matched_tokens: int
    layout_info: dict[str, tuple[str, int]]


class MoveResponse(BaseModel):
    event_id: str
    num_tokens: int


class CheckFinishResponse(BaseModel):
    status: str
    num_tokens: Optional[int] = None
    error: Optional[str] = None


def create_app(
    controller: LocalController,
    token: str | None = None,
    max_body_bytes: int | None = None,
    shutdown_timeout: float = 30.0,
    on_ready: Callable[[], None] | None = None,
) -> "GuardedApp":
    """The ASGI app serving `controller` (`.app` is the FastAPI inside); `token` set → Bearer auth
    on every route but /health."""
    metrics = ControllerMetrics(
        controller.instance_id,
        controller.engine.stats,
        controller.pending_moves,
        lambda: dict(controller.move_outcomes),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if on_ready is not None:
            on_ready()
        yield
        summary = controller.close(timeout=shutdown_timeout)
        log.info("controller stopped: %d move(s) finished, %d failed; engine closed", summary["finished"],
                 summary["failed"])
        app.state.shutdown_summary = summary

    app = FastAPI(
        title="infercache KV controller",
        version=__version__,
        description="Where a prompt's KV lives, and moving it between tiers (LMCache's controller API).",
        lifespan=lifespan,
        max_body_size=max_body_bytes if max_body_bytes is not None else _body_cap(controller.max_tokens),
    )
    app.state.controller = controller
    app.state.metrics = metrics

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()[:20]
        ]
        fields = ", ".join(".".join(e["loc"][1:] if e["loc"][:1] == ["body"] else e["loc"]) or "body" for e in errors)
        return JSONResponse(status_code=422, content={"detail": errors, "error": f"invalid field(s): {fields}"})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400:  # a body FastAPI could not even decode (bad UTF-8...): malformed JSON
            return JSONResponse(status_code=422, content={
                "detail": [{"loc": ["body"], "msg": str(exc.detail), "type": "json_invalid"}],
                "error": "invalid field(s): body (not a JSON document)"})  # fmt: skip
        return await http_exception_handler(request, exc)

    @app.exception_handler(ControllerError)
    async def _controller_error(request: Request, exc: ControllerError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content={"detail": str(exc)})

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return JSONResponse(status_code=500, content={"detail": f"internal error: {type(exc).__name__}"})

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {**controller.health(), "version": __version__}

    @app.post("/tokenize")
    def tokenize(req: TokenizeRequest) -> dict[str, list[int]]:
        return {"tokens": controller.tokenize(req.prompt)}

    local_only = "remote" not in controller.locations

    @app.post("/lookup", response_model=LookupResponse)
    async def lookup(req: TokensRequest) -> dict[str, Any]:
        # Hot/disk lookups are memory reads (~0.3 ms for 8k tokens): run them here, without a thread
        # hop, unless a move may hold the engine's lock or a Redis round trip could stall the loop.
        if local_only and not controller.pending_moves():
            return controller.lookup(req.tokens)
        return await run_in_threadpool(controller.lookup, req.tokens)

    @app.post("/move", response_model=MoveResponse)
    def move(req: MoveRequest) -> dict[str, Any]:
        return controller.move(list(req.old_position), list(req.new_position), req.tokens, copy=req.copy_)

    @app.post("/check_finish", response_model=CheckFinishResponse, response_model_exclude_none=True)
    def check_finish(req: CheckFinishRequest) -> dict[str, Any]:
        return controller.check_finish(req.event_id)

    @app.post("/pin")
    def pin(req: PinRequest) -> dict[str, Any]:
        return controller.pin(req.tokens, location=req.location, instance_id=req.instance_id)

    @app.post("/unpin")
    def unpin(req: UnpinRequest) -> dict[str, Any]:
        return controller.unpin(req.tokens, instance_id=req.instance_id)

    @app.post("/clear")
    def clear(req: Optional[ClearRequest] = None) -> dict[str, Any]:
        req = req or ClearRequest()
        return controller.clear(location=req.location, instance_id=req.instance_id)

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(content=metrics.render(), media_type=CONTENT_TYPE)

    return GuardedApp(app, token=token, metrics=metrics)


def _body_cap(max_tokens: int) -> int:
    """Request bodies beyond what max_tokens ids could need are refused (413) before being read."""
    return max_tokens * _BYTES_PER_TOKEN + (1 << 20)


class GuardedApp:
    """ASGI wrapper: bearer auth (401) and per-route latency metrics. Wrapping the whole app makes
    it cover FastAPI's own routes too (/openapi.json, /docs)."""

    def __init__(self, app: FastAPI, token: str | None, metrics: ControllerMetrics) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.metrics = metrics
        self.state = app.state
        self.openapi = app.openapi

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path = scope.get("path", "")
        route = path if path in ROUTES else "other"
        status_box = [500]

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = int(message["status"])
            await send(message)

        try:
            if self.token is not None and path not in OPEN_ROUTES and not self._authorized(scope):
                await _reply(send_wrapper, 401, {"detail": "missing or wrong bearer token"},
                             {"www-authenticate": "Bearer"})
                return
            await self.app(scope, receive, send_wrapper)
        finally:
            method = scope.get("method", "")
            self.metrics.observe(route, method if method in METHODS else "other", status_box[0],
                                 time.perf_counter() - started)

    def _authorized(self, scope: dict[str, Any]) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, given = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token or b"")
        return False


async def _reply(
    send: Callable[..., Any], status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> None:
    payload = json.dumps(body).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw_headers += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


def bind(host: str = "127.0.0.1", port: int = 9000) -> socket.socket:
    """A listening socket (port 0 → a free port); binding first lets the caller print the real port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit this; without it a keep-alive client waits out a 40 ms
    # delayed ACK on every response uvicorn sends in two writes (headers, body).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(
    controller: LocalController,
    sock: socket.socket,
    token: str | None = None,
    on_ready: Callable[[], None] | None = None,
    shutdown_timeout: float = 30.0,
    log_level: str = "warning",
) -> dict[str, int]:
    """Run the controller on `sock` until SIGTERM/SIGINT; returns the shutdown summary of moves."""
    import uvicorn

    app = create_app(controller, token=token, on_ready=on_ready, shutdown_timeout=shutdown_timeout)
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=int(shutdown_timeout) + 5)
    server = uvicorn.Server(config)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal into the handler it
    # found; a no-op handler there makes a graceful stop return here (exit 0, summary printed).
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, _noted) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return dict(getattr(app.state, "shutdown_summary", {}) or {})


def _noted(sig: int, frame: Any) -> None:
    log.info("signal %d after a graceful shutdown", sig)


__all__ = ["create_app", "serve", "bind", "DEFAULT_MAX_TOKENS"]
