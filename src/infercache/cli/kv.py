"""`infercache kv ...`: manage shared-memory KV pools like any other system resource.

Only parsing and presentation live here; `infercache.kv.Pool` does the work, so every
command is also a Python call.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from infercache.cli.common import (
    DRY_RUN,
    FORMAT,
    OutputFormat,
    console,
    err_console,
    global_options,
    handle_errors,
    print_json,
)
from infercache.cli.kv_serve import serve_command
from infercache.kv.policies import POLICIES
from infercache.kv.pool import Pool
from infercache.units import format_size

app = typer.Typer(
    help="Shared-memory KV-cache pools: create, inspect, evict, persist, restore, check.",
    no_args_is_help=True,
)

def _data_dir(ctx: typer.Context) -> Optional[Path]:
    return global_options(ctx).data_dir


def _open(ctx: typer.Context, name: str) -> Pool:
    return Pool.open(name, data_dir=_data_dir(ctx))


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
def create(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Pool name (unique on this host)."),
    size: str = typer.Option(..., "--size", "-s", help="Pool size: 512M, 16G, ..."),
    tier: str = typer.Option("cpu", "--tier", help="cpu (/dev/shm) or disk (mmap of --path)."),
    path: Optional[Path] = typer.Option(None, "--path", help="Backing file for --tier disk."),
    policy: str = typer.Option("lru", "--policy", help="Eviction policy (see `kv policies`)."),
    block_size: str = typer.Option("4K", "--block-size", help="Allocation block size."),
    prefault: Optional[bool] = typer.Option(
        None, "--prefault/--no-prefault",
        help="Fault every page in now, so first puts run at memory speed (default: on for cpu, off for disk).",
    ),  # fmt: skip
) -> None:
    """Create a named pool that any process on this host can attach to."""
    pool = Pool.create(
        name, size=size, tier=tier, path=path, policy=policy, block_size=block_size, data_dir=_data_dir(ctx),
        prefault=prefault,
    )  # fmt: skip
    with pool:
        stats = pool.stats()
    console.print(
        f"created pool [bold]{name}[/]: {format_size(stats.size_bytes)}, tier {stats.tier}, "
        f"policy {stats.policy}, at {stats.path}",
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
def list_pools(
    ctx: typer.Context,
    format: OutputFormat = FORMAT,
) -> None:
    """Every pool registered on this host."""
    rows = [row.to_json() for row in Pool.list_pools(data_dir=_data_dir(ctx))]
    if format is OutputFormat.json:
        print_json(rows)
        return
    if not rows:
        console.print("no pools")
        return
    console.print(_pools_table(rows, "KV pools"))


def _all_stats(ctx: typer.Context) -> list[dict[str, Any]]:
    """Stats of every registered pool (plus attached pids); one that cannot be opened carries `error`."""
    return [row.to_json() for row in Pool.list_pools(data_dir=_data_dir(ctx))]


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
        elif key in ("created", "next_pin_deadline") and isinstance(value, (int, float)):
            text = datetime.fromtimestamp(value, tz=timezone.utc).isoformat(timespec="seconds")
        else:
            text = _cell(value)
        table.add_row(key, text)
    return table


@app.command("status")
@handle_errors
def status(
    ctx: typer.Context,
    name: Optional[str] = typer.Argument(None, help="Pool name; all pools when left out."),
    format: OutputFormat = FORMAT,
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
    stats = Pool.status(name, data_dir=_data_dir(ctx)).to_json()
    if format is OutputFormat.json:
        print_json(stats)
    else:
        console.print(_status_table(stats))


@app.command("evict")
@handle_errors
def evict(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Pool name."),
    percent: Optional[float] = typer.Option(
        None, "--percent", help="Evict until this percentage of the bytes in use is freed (or nothing evictable is left)."
    ),
    bytes_: Optional[str] = typer.Option(None, "--bytes", help="Evict at least this many bytes (e.g. 64M)."),
    expired: bool = typer.Option(False, "--expired", help="Evict the entries whose TTL has passed."),
    dry_run: bool = DRY_RUN,
    format: OutputFormat = FORMAT,
) -> None:
    """Evict entries by the pool's policy (pinned entries stay): planned, then executed."""
    with _open(ctx, name) as pool:
        plan = pool.plan_eviction(percent=percent, bytes=bytes_, expired=expired)
        result = None if dry_run else pool.execute_eviction(plan)
        after = pool.stats()
    if format is OutputFormat.json:
        print_json({"dry_run": dry_run, **plan.to_json(), "result": result.to_json() if result else None})
        return
    if result is None:
        console.print(f"dry run: {plan.line()}", highlight=False)
        for victim in plan.victims:
            console.print(f"  {victim.key!r}: {format_size(victim.bytes)} ({victim.bytes} bytes)", highlight=False)
        return
    console.print(
        f"{result.line()}; {after.entries} entries, {format_size(after.used_bytes)} used", highlight=False
    )


@app.command("persist")
@handle_errors
def persist(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Pool name."),
    path: Path = typer.Option(..., "--path", help="Snapshot file to write (written to a temp name, then renamed)."),
) -> None:
    """Write a binary snapshot of the pool (only the allocated data)."""
    with _open(ctx, name) as pool:
        written = pool.persist(path)
        entries = pool.stats().entries
    console.print(f"persisted {name}: {entries} entries, {format_size(written)} to {path}", highlight=False)


@app.command("restore")
@handle_errors
def restore(
    ctx: typer.Context,
    file: Path = typer.Argument(..., help="Snapshot written by `kv persist`."),
    name: Optional[str] = typer.Option(None, "--name", help="Name for the restored pool (default: the saved name)."),
) -> None:
    """Create a pool from a snapshot (verified before anything is created)."""
    with Pool.restore(file, name=name, data_dir=_data_dir(ctx)) as pool:
        stats = pool.stats()
    console.print(
        f"restored pool [bold]{stats.name}[/]: {stats.entries} entries, "
        f"{format_size(stats.used_bytes)} used of {format_size(stats.size_bytes)}",
        highlight=False,
    )


@app.command("delete")
@handle_errors
def delete(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Pool name."),
) -> None:
    """Remove a pool: its backing file and its registration."""
    Pool.destroy(name, data_dir=_data_dir(ctx))
    console.print(f"deleted pool {name}", highlight=False)


@app.command("check")
@handle_errors
def check(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Pool name."),
    repair: bool = typer.Option(False, "--repair", help="Rebuild derived state from the entry table."),
    format: OutputFormat = FORMAT,
) -> None:
    """Verify every invariant of the pool; exit 1 when it is inconsistent (after --repair: still)."""
    with _open(ctx, name) as pool:
        report = pool.check(repair=repair)
    ok = report.ok  # after a repair: the verdict of a fresh check
    if format is OutputFormat.json:
        print_json({"name": name, **report.to_json()})
    else:
        for note in report.recovered:
            console.print(f"recovered: {note}", highlight=False)
        for problem in report.problems:
            err_console.print(f"[yellow]problem:[/] {problem}", highlight=False)
        for fix in report.repaired:
            console.print(f"repaired: {fix}", highlight=False)
        console.print(f"{name}: {'consistent' if ok else 'INCONSISTENT'}", highlight=False)
    if not ok:
        raise typer.Exit(1)


@app.command("policies")
@handle_errors
def policies(
    format: OutputFormat = FORMAT,
) -> None:
    """The eviction policies a pool can use."""
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
