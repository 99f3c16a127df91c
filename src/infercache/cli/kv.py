"""`infercache kv ...`: manage shared-memory KV pools like any other system resource.

Only parsing and presentation live here; `infercache.kv.Pool` does the work, so every
command is also a Python call.
"""

from __future__ import annotations

import functools
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

import typer
from rich.table import Table

from infercache.cli.common import (
    OutputFormat,
    console,
    err_console,
    global_options,
    handle_errors,
    print_json,
)
from infercache.cli.kv_serve import serve_command
from infercache.errors import BadInputError, InfercacheError
from infercache.units import format_size, parse_size

if TYPE_CHECKING:  # the pool library is imported lazily: keep `infercache --help` fast
    from infercache.kv import Pool

app = typer.Typer(
    help="Shared-memory KV-cache pools: create, inspect, evict, persist, restore, check.",
    no_args_is_help=True,
)

_TIERS = ("cpu", "disk", "gpu")
F = TypeVar("F", bound=Callable[..., Any])


def _os_errors(func: F) -> F:
    """An OSError (permission denied, disk full...) becomes a one-line error, exit 1, not a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except OSError as exc:
            where = f": {exc.filename}" if exc.filename else ""
            raise InfercacheError(f"{exc.strerror or exc}{where}") from None

    return wrapper  # type: ignore[return-value]


def _data_dir(ctx: typer.Context) -> Optional[Path]:
    return global_options(ctx).data_dir


def _pool_api() -> "type[Pool]":
    from infercache.kv import Pool

    return Pool


def _open(ctx: typer.Context, name: str) -> "Pool":
    return _pool_api().open(name, data_dir=_data_dir(ctx))


def _pct(value: Any) -> str:
    try:
        return f"{float(value) * 100:.1f}%"
    except (TypeError, ValueError):
        return "-"


def _size(value: Any) -> str:
    return format_size(value) if isinstance(value, (int, float)) else "-"


def _cell(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "-"
    return "-" if value is None else str(value)


@app.command("create")
@handle_errors
@_os_errors
def create(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Pool name (unique on this host)."),
    size: str = typer.Option(..., "--size", "-s", help="Pool size: 512M, 16G, ..."),
    tier: str = typer.Option("cpu", "--tier", help="cpu (/dev/shm), disk (mmap of --path) or gpu."),
    path: Optional[Path] = typer.Option(None, "--path", help="Backing file for --tier disk."),
    policy: str = typer.Option("lru", "--policy", help="Eviction policy (see `kv policies`)."),
    block_size: str = typer.Option("4K", "--block-size", help="Allocation block size."),
) -> None:
    """Create a named pool that any process on this host can attach to."""
    from infercache.kv import POLICIES

    if tier not in _TIERS:
        raise BadInputError(f"unknown tier {tier!r} (expected one of: {', '.join(_TIERS)})")
    if policy not in POLICIES:
        raise BadInputError(f"unknown policy {policy!r} (expected one of: {', '.join(POLICIES)})")
    size_bytes = parse_size(size)
    if size_bytes <= 0:
        raise BadInputError(f"pool size must be positive, got {size!r}")
    block_bytes = parse_size(block_size)
    if block_bytes <= 0:
        raise BadInputError(f"block size must be positive, got {block_size!r}")
    if path is not None and tier != "disk":
        raise BadInputError("--path is only for --tier disk")
    pool = _pool_api().create(
        name,
        size=size_bytes,
        tier=tier,
        path=str(path) if path is not None else None,
        policy=policy,
        block_size=block_bytes,
        data_dir=_data_dir(ctx),
    )
    try:
        stats = pool.stats()
    finally:
        pool.close()
    console.print(
        f"created pool [bold]{name}[/]: {format_size(stats['size_bytes'])}, tier {stats['tier']}, "
        f"policy {stats['policy']}, at {stats.get('path')}",
        highlight=False,
    )


def _pools_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for column in ("name", "tier", "size", "used", "util", "entries", "policy", "attached", "path"):
        numeric = column in ("size", "used", "util", "entries", "attached")
        table.add_column(column, justify="right" if numeric else "left", no_wrap=column != "path",
                         overflow="fold")  # fmt: skip
    for row in rows:
        attached = row.get("attached")
        if isinstance(attached, (list, tuple)):
            attached = len(attached)
        table.add_row(
            _cell(row.get("name")),
            _cell(row.get("tier")),
            _size(row.get("size_bytes")),
            _size(row.get("used_bytes")),
            _pct(row.get("utilization")),
            _cell(row.get("entries")),
            _cell(row.get("policy")),
            _cell(attached),
            _cell(row.get("path")),
        )
    return table


@app.command("list")
@handle_errors
@_os_errors
def list_pools(
    ctx: typer.Context,
    format: OutputFormat = typer.Option(OutputFormat.table, "--format", help="table or json."),
) -> None:
    """Every pool registered on this host."""
    rows = _pool_api().list_pools(data_dir=_data_dir(ctx))
    if format is OutputFormat.json:
        print_json(rows)
        return
    if not rows:
        console.print("no pools")
        return
    console.print(_pools_table(rows, "KV pools"))


def _all_stats(ctx: typer.Context) -> list[dict[str, Any]]:
    """Stats of every registered pool (plus attached pids); one that cannot be opened carries `error`."""
    return list(_pool_api().list_pools(data_dir=_data_dir(ctx)))


_STATUS_FIELDS = (
    ("name", None),
    ("tier", None),
    ("path", None),
    ("policy", None),
    ("size_bytes", "size"),
    ("used_bytes", "size"),
    ("free_bytes", "size"),
    ("utilization", "pct"),
    ("entries", None),
    ("capacity_entries", None),
    ("block_size", "size"),
    ("hits", None),
    ("misses", None),
    ("evictions", None),
    ("bytes_in", "size"),
    ("bytes_out", "size"),
    ("attached", None),
)


def _status_table(stats: dict[str, Any]) -> Table:
    table = Table(title=f"KV pool {stats.get('name')}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    shown = set()
    for key, kind in _STATUS_FIELDS:
        if key not in stats:
            continue
        shown.add(key)
        value = stats[key]
        text = _size(value) if kind == "size" else _pct(value) if kind == "pct" else _cell(value)
        table.add_row(key, text)
    if "hit_rate" in stats:
        shown.add("hit_rate")
        table.add_row("hit_rate", _pct(stats["hit_rate"]))
    for key, value in stats.items():
        if key in shown:
            continue
        if key.endswith("_bytes") and isinstance(value, int):
            text = f"{format_size(value)} ({value})"
        elif key == "created" and isinstance(value, (int, float)):
            text = datetime.fromtimestamp(value, tz=timezone.utc).isoformat(timespec="seconds")
        else:
            text = _cell(value)
        table.add_row(key, text)
    return table


@app.command("status")
@handle_errors
@_os_errors
def status(
    ctx: typer.Context,
    name: Optional[str] = typer.Argument(None, help="Pool name; all pools when left out."),
    format: OutputFormat = typer.Option(OutputFormat.table, "--format", help="table or json."),
) -> None:
    """Details of one pool (or of every pool): size, use, entries, counters."""
    if name is None:
        every = _all_stats(ctx)
        if format is OutputFormat.json:
            print_json(every)
        elif not every:
            console.print("no pools")
        else:
            for stats in every:
                console.print(_status_table(stats))
        return
    pool = _open(ctx, name)
    try:
        stats = pool.stats()
    finally:
        pool.close()
    from infercache.kv.pool import attached_pids

    stats["attached"] = attached_pids(stats["path"])  # after close: this process is not counted
    if format is OutputFormat.json:
        print_json(stats)
    else:
        console.print(_status_table(stats))


@app.command("evict")
@handle_errors
@_os_errors
def evict(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Pool name."),
    percent: Optional[float] = typer.Option(
        None, "--percent", help="Evict until this percentage of the bytes in use is freed (or nothing evictable is left)."
    ),
    bytes_: Optional[str] = typer.Option(None, "--bytes", help="Evict at least this many bytes (e.g. 64M)."),
    expired: bool = typer.Option(False, "--expired", help="Evict the entries whose TTL has passed."),
) -> None:
    """Evict entries by the pool's policy (pinned entries stay)."""
    chosen = sum(x for x in (percent is not None, bytes_ is not None, expired))
    if chosen != 1:
        raise BadInputError("give exactly one of --percent P, --bytes SIZE, --expired")
    if percent is not None and not 0 < percent <= 100:
        raise BadInputError(f"--percent must be in (0, 100], got {percent:g}")
    nbytes = parse_size(bytes_) if bytes_ is not None else None
    if nbytes is not None and nbytes <= 0:
        raise BadInputError(f"--bytes must be positive, got {bytes_!r}")
    pool = _open(ctx, name)
    try:
        before = pool.stats()
        count = pool.evict(percent=percent, bytes=nbytes, expired=expired)
        after = pool.stats()
    finally:
        pool.close()
    freed = max(0, int(before.get("used_bytes", 0)) - int(after.get("used_bytes", 0)))
    console.print(
        f"evicted {count} entries from {name}, {format_size(freed)} freed; "
        f"{after.get('entries')} entries, {format_size(after.get('used_bytes', 0))} used",
        highlight=False,
    )


@app.command("persist")
@handle_errors
@_os_errors
def persist(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Pool name."),
    path: Path = typer.Option(..., "--path", help="Snapshot file to write (written to a temp name, then renamed)."),
) -> None:
    """Write a binary snapshot of the pool (only the allocated data)."""
    if path.is_dir():
        raise BadInputError(f"--path {path} is a directory; give a file name")
    if not path.parent.is_dir():
        raise BadInputError(f"directory {path.parent} does not exist")
    pool = _open(ctx, name)
    try:
        written = pool.persist(str(path))
        entries = pool.stats().get("entries")
    finally:
        pool.close()
    console.print(f"persisted {name}: {entries} entries, {format_size(written)} to {path}", highlight=False)


@app.command("restore")
@handle_errors
@_os_errors
def restore(
    ctx: typer.Context,
    file: Path = typer.Argument(..., help="Snapshot written by `kv persist`."),
    name: Optional[str] = typer.Option(None, "--name", help="Name for the restored pool (default: the saved name)."),
) -> None:
    """Create a pool from a snapshot (verified before anything is created)."""
    if not file.is_file():
        raise BadInputError(f"snapshot {file} does not exist or is not a file")
    pool = _pool_api().restore(str(file), name=name, data_dir=_data_dir(ctx))
    try:
        stats = pool.stats()
    finally:
        pool.close()
    console.print(
        f"restored pool [bold]{stats['name']}[/]: {stats.get('entries')} entries, "
        f"{format_size(stats.get('used_bytes', 0))} used of {format_size(stats['size_bytes'])}",
        highlight=False,
    )


@app.command("delete")
@handle_errors
@_os_errors
def delete(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Pool name."),
) -> None:
    """Remove a pool: its backing file and its registration."""
    _pool_api().destroy(name, data_dir=_data_dir(ctx))
    console.print(f"deleted pool {name}", highlight=False)


@app.command("check")
@handle_errors
@_os_errors
def check(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Pool name."),
    repair: bool = typer.Option(False, "--repair", help="Rebuild derived state from the entry table."),
    format: OutputFormat = typer.Option(OutputFormat.table, "--format", help="table or json."),
) -> None:
    """Verify every invariant of the pool; exit 1 when it is inconsistent (after --repair: still)."""
    pool = _open(ctx, name)
    try:
        report = pool.check(repair=repair)
        problems = list(report.problems)
        repaired = list(getattr(report, "repaired", []) or [])
        recovered = list(getattr(report, "recovered", []) or [])
        ok = bool(report.ok)
        if repair and not ok:
            # A repair pass reports what it found; a fresh check says whether it worked.
            ok = bool(pool.check(repair=False).ok)
    finally:
        pool.close()
    if format is OutputFormat.json:
        print_json({"name": name, "ok": ok, "problems": problems, "repaired": repaired, "recovered": recovered})
    else:
        for note in recovered:
            console.print(f"recovered: {note}", highlight=False)
        for problem in problems:
            err_console.print(f"[yellow]problem:[/] {problem}", highlight=False)
        for fix in repaired:
            console.print(f"repaired: {fix}", highlight=False)
        console.print(f"{name}: {'consistent' if ok else 'INCONSISTENT'}", highlight=False)
    if not ok:
        raise typer.Exit(1)


@app.command("policies")
@handle_errors
@_os_errors
def policies(
    format: OutputFormat = typer.Option(OutputFormat.table, "--format", help="table or json."),
) -> None:
    """The eviction policies a pool can use."""
    from infercache.kv import POLICIES

    if format is OutputFormat.json:
        print_json([{"name": key, "description": text} for key, text in POLICIES.items()])
        return
    table = Table(title="Eviction policies")
    table.add_column("policy", style="bold")
    table.add_column("description")
    for key, text in POLICIES.items():
        table.add_row(key, text)
    console.print(table)


app.command("serve")(serve_command)
