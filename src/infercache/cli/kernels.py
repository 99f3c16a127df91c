"""`infercache kernels index|list|prune|stats`: parse flags, call `infercache.kernels`, present."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, TypeVar

import typer

from infercache.cli.common import (
    DRY_RUN,
    FORMAT,
    YES,
    Flags,
    ListFormat,
    OutputFormat,
    bundle_options,
    console,
    err_console,
    global_options,
    handle_errors,
    print_json,
    progress_bar,
)
from infercache.cli.warm import warm_command
from infercache.errors import BadInputError
from infercache.kernels.artifact_prune import plan_artifact_prune
from infercache.kernels.catalog import Catalog
from infercache.kernels.indexer import index
from infercache.kernels.prune import plan_prune
from infercache.kernels.query import (
    ARTIFACT_SORT_FIELDS,
    KernelFilter,
    normalise_kinds,
    parse_sort,
    query,
    query_artifacts,
)
from infercache.kernels.stats import compute_stats, stats_then_zero
from infercache.kernels.triton_entry import KERNEL_FIELDS
from infercache.units import format_size, parse_size

app = typer.Typer(help="Compiled-kernel caches (Triton, vLLM, Inductor): index, list, prune, stats.",
                  no_args_is_help=True)

# Filters shared by list and prune (and the mcm front end).
NAME = typer.Option(None, "-n", "--name", help="Exact kernel name.")
NAME_LIKE = typer.Option(None, "--name-like", help="Kernel name glob, e.g. '*matmul*'.")
BACKEND = typer.Option(None, "-b", "--backend", help="cuda, hip or rocm (= hip).")
ARCH = typer.Option(None, "-a", "--arch", help="80, 90, gfx90a, gfx942...")
OLDER = typer.Option(None, "--older-than", help="Modified longer ago than DUR (30s, 90m, 2h, 7d, 2w).")
YOUNGER = typer.Option(None, "--younger-than", help="Modified within DUR.")
HIT_LOWER = typer.Option(None, "--cache-hit-lower", help="Runtime hits < N.")
HIT_HIGHER = typer.Option(None, "--cache-hit-higher", help="Runtime hits > N.")
CACHE_DIRS = typer.Option(None, "--cache-dir", help="Cache directory (repeatable).")
MODE = typer.Option("auto", "--mode", help="auto, triton, vllm or inductor.")
KIND = typer.Option(None, "--kind", help="Artifact kind (repeatable): fxgraph, aotautograd, module, autotune, "
                                        "vllm-artifact, vllm-graph, aot-model.")


#: The kernel filter flags (KernelFilter.build's keywords, their types and options) of `list` and `prune`.
FILTER_FLAGS: Flags = (
    ("name", Optional[str], NAME),
    ("name_like", Optional[str], NAME_LIKE),
    ("backend", Optional[str], BACKEND),
    ("arch", Optional[str], ARCH),
    ("older_than", Optional[str], OLDER),
    ("younger_than", Optional[str], YOUNGER),
    ("hits_lower", Optional[int], HIT_LOWER),
    ("hits_higher", Optional[int], HIT_HIGHER),
    ("cache_dirs", Optional[List[Path]], CACHE_DIRS),
    ("mode", str, MODE),
)

F = TypeVar("F", bound=Callable[..., Any])


def _build_filter(cache_dirs: Path | Sequence[Path] | None = None, **values: Any) -> KernelFilter:
    dirs = [cache_dirs] if isinstance(cache_dirs, Path) else (cache_dirs or ())
    return KernelFilter.build(cache_dirs=dirs, **values)


def with_filter(flags: Flags = FILTER_FLAGS) -> Callable[[F], F]:
    """Give a command the filter `flags` in place of its `flt` parameter, which gets them as one KernelFilter.

    Why: `kernels list|prune` and `mcm list|prune` filter alike (mcm with one --cache-dir).
    """
    return bundle_options("flt", flags, _build_filter)


def open_catalog(ctx: typer.Context) -> Any:
    return Catalog.open(global_options(ctx).data_dir)


def run_index(catalog: Any, cache_dirs: Optional[Sequence[Path]], mode: str, rescan: bool = False) -> Any:
    """Index with a progress bar; the library does the work."""

    with progress_bar("indexing") as callback:
        return index(catalog, cache_dirs or None, mode=mode, progress=callback, rescan=rescan)


def refresh_if_dirs(catalog: Any, flt: KernelFilter) -> None:
    """`list`/`stats --cache-dir D`: bring D's rows up to date first (incremental, cheap)."""
    if flt.cache_dirs:
        run_index(catalog, flt.cache_dirs, flt.mode or "auto")


def check_kinds(kind: Optional[Sequence[str]], artifacts: bool) -> tuple[str, ...]:
    """--kind only goes with --artifacts; the kinds, normalised (a bad one is exit 2 before any work)."""
    if kind and not artifacts:
        raise BadInputError("--kind applies to artifacts: add --artifacts")
    return normalise_kinds(kind)


@app.command("index")
@handle_errors
def index_command(
    ctx: typer.Context,
    cache_dir: Optional[List[Path]] = CACHE_DIRS,
    mode: str = MODE,
    rescan: bool = typer.Option(False, "--rescan", help="Re-read every entry, not only changed ones."),
    fmt: OutputFormat = FORMAT,
) -> None:
    """Scan cache dirs into the catalog (incremental: only changed entries are re-read)."""
    with open_catalog(ctx) as catalog:
        summary = run_index(catalog, cache_dir, mode, rescan)
    if fmt == OutputFormat.json:
        print_json(summary.to_json())
        return
    # Each skipped problem entry was already logged as a warning (with its path) on stderr.
    console.print(summary.line(), highlight=False)


def _short_time(iso_text: Optional[str]) -> str:
    return iso_text[:19].replace("T", " ") if iso_text else "-"


def _records_table(records: Sequence[Any], title: Optional[str] = None) -> Any:
    from rich.table import Table


    table = Table(title=title, header_style="bold")
    right = {"justify": "right", "no_wrap": True}
    for col, kw in (("Key", {"no_wrap": True}), ("Name", {"overflow": "fold"}), ("Backend", {}), ("Arch", {}),
                    ("Warps", right), ("Triton", {}), ("Size", right), ("Hits", right), ("Misses", right),
                    ("Modified", {}), ("Last access", {})):
        table.add_column(col, **kw)
    for r in records:
        j = r.to_json()
        table.add_row(
            r.key[:12], r.name, r.backend, r.arch, str(r.num_warps if r.num_warps is not None else "-"),
            r.triton_version or "-", format_size(r.total_size), str(r.hits), str(r.misses), _short_time(j["modified"]),
            _short_time(j["last_access"]),
        )
    return table


CSV_COLUMNS = ("key", *KERNEL_FIELDS, "mode", "path", "cache_root", "total_size", "modified",
               "hits", "misses", "last_access", "vllm_hash", "vllm_rank", "vllm_prefix")


def write_csv(records: Sequence[Any]) -> None:
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in records:
        j = r.to_json()
        vllm = j.pop("vllm") or {}
        j.update(vllm_hash=vllm.get("hash"), vllm_rank=vllm.get("rank"), vllm_prefix=vllm.get("prefix"))
        writer.writerow(["" if j.get(c) is None else j.get(c) for c in CSV_COLUMNS])


def footer(records: Sequence[Any]) -> str:
    total = sum(r.total_size for r in records)
    return f"{len(records)} kernel{'s' if len(records) != 1 else ''}, {format_size(total)} ({total} bytes)"


@app.command("list")
@handle_errors
@with_filter()
def list_command(
    ctx: typer.Context,
    flt: KernelFilter,
    sort: Optional[str] = typer.Option(None, "--sort", help="FIELD[:asc|desc]: name, size, modified, hits, "
                                                               "last_access, backend, arch, warps, version, key."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most N rows."),
    fmt: ListFormat = typer.Option(ListFormat.table, "--format", help="table, json or csv."),
    artifacts: bool = typer.Option(False, "--artifacts", help="List compile-cache artifacts (Inductor, vLLM) "
                                                                 "instead of kernels."),
    kind: Optional[List[str]] = KIND,
) -> None:
    """List kernels in the catalog, filtered and sorted."""
    kinds = check_kinds(kind, artifacts)
    if artifacts:
        flt.check_for_artifacts()
        parse_sort(sort, ARTIFACT_SORT_FIELDS, " for artifacts")  # bad sort field → exit 2 before any work
        _list_artifacts(ctx, flt, limit, fmt, kinds, sort)
        return
    parse_sort(sort)  # bad sort field → exit 2 before any work
    with open_catalog(ctx) as catalog:
        refresh_if_dirs(catalog, flt)
        records = query(catalog, flt, sort=sort, limit=limit)
        empty_catalog = not records and not catalog.roots()
    if fmt == ListFormat.json:
        # One line, not print_json's indent: json's C encoder only runs without indent (10,000 rows: 5x faster).
        sys.stdout.write(json.dumps([r.to_json() for r in records]))
        sys.stdout.write("\n")
        sys.stdout.flush()
    elif fmt == ListFormat.csv:
        write_csv(records)
    else:
        if records:
            console.print(_records_table(records))
        console.print(footer(records), highlight=False)
        if empty_catalog:
            err_console.print("the catalog is empty: run `infercache kernels index` first", highlight=False)


def _list_artifacts(ctx: typer.Context, flt: KernelFilter, limit: Optional[int], fmt: ListFormat,
                    kinds: Sequence[str] = (), sort: Optional[str] = None) -> None:
    from rich.table import Table


    with open_catalog(ctx) as catalog:
        refresh_if_dirs(catalog, flt)
        records = query_artifacts(catalog, flt, limit, kinds=kinds, sort=sort)
    if fmt == ListFormat.json:
        sys.stdout.write(json.dumps([r.to_json() for r in records]) + "\n")
    elif fmt == ListFormat.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(("kind", "key", "path", "cache_root", "mode", "size", "modified", "last_access",
                         "torch_version", "vllm_hash", "vllm_rank", "vllm_prefix"))
        for r in records:
            j = r.to_json()
            writer.writerow((r.kind, j["key"], r.path, r.cache_root, r.mode or "", r.size, j["modified"],
                             j["last_access"] or "", r.torch_version or "", r.vllm_hash or "", r.vllm_rank or "",
                             r.vllm_prefix or ""))
    else:
        table = Table(header_style="bold")
        for col in ("Kind", "Key", "Torch", "vLLM hash", "Rank", "Size", "Modified", "Path"):
            table.add_column(col, overflow="fold")
        for r in records:
            j = r.to_json()
            table.add_row(r.kind, j["key"][:16], r.torch_version or "-", r.vllm_hash or "-", r.vllm_rank or "-",
                          format_size(r.size), _short_time(j["modified"]), r.path)
        if records:
            console.print(table)
        total = sum(r.size for r in records)
        console.print(f"{len(records)} artifact{'s' if len(records) != 1 else ''}, {format_size(total)} "
                      f"({total} bytes)", highlight=False)


def _plan_table(plan: Any, limit: int = 50) -> Any:
    from rich.table import Table


    table = Table(header_style="bold")
    for col in ("Action", "Key / path", "Name", "Bytes", "Why"):
        table.add_column(col, justify="right" if col == "Bytes" else "left")
    for a in plan.actions[:limit]:
        what = {"ir": "remove IR", "dir": "remove entry", "path": "remove", "files": "remove files"}[a.kind]
        table.add_row(what, a.key[:12] if a.key else str(a.path), a.name or "-", format_size(a.bytes),
                      a.reason if a.kind != "ir" else ", ".join(f.rsplit(".", 1)[-1] for f in a.files))
    if len(plan.actions) > limit:
        table.add_row("...", f"{len(plan.actions) - limit} more", "", "", "")
    return table


def choose_strategy(full: bool, deduplicate: bool, max_size: Optional[str], garbage: bool) -> tuple[str, Optional[int]]:
    chosen = [n for n, on in (("--full", full), ("--deduplicate", deduplicate), ("--max-size", max_size is not None),
                              ("--garbage", garbage)) if on]
    if len(chosen) > 1:
        raise BadInputError(f"choose one prune strategy, not {' and '.join(chosen)}")
    if max_size is not None:
        return "max_size", parse_size(max_size)
    if full:
        return "full", None
    if deduplicate:
        return "deduplicate", None
    if garbage:
        return "garbage", None
    return "ir", None


def run_prune(ctx: typer.Context, flt: Any, strategy: str, max_size: Optional[int], dry_run: bool, yes: bool,
              fmt: OutputFormat, artifacts: bool = False, kinds: Sequence[str] = ()) -> None:
    """Plan, show, confirm, execute: shared by `infercache kernels prune` and `mcm prune`."""

    with open_catalog(ctx) as catalog:
        if not catalog.roots() and not flt.cache_dirs:
            raise BadInputError("nothing indexed yet: run `infercache kernels index` or pass --cache-dir")
        if artifacts:

            plan = plan_artifact_prune(catalog, flt, {"ir": "free"}.get(strategy, strategy), kinds=kinds,
                                       max_size=max_size)
        else:
            plan = plan_prune(catalog, flt, strategy, max_size=max_size)
        freed = f"{format_size(plan.bytes_freed)} ({plan.bytes_freed} bytes)"
        if fmt == OutputFormat.table:
            if plan.actions:
                console.print(_plan_table(plan))
            for note in plan.notes:
                console.print(note, highlight=False)
        if dry_run:
            if fmt == OutputFormat.json:
                print_json({"dry_run": True, **plan.to_json()})
            else:
                console.print(f"dry run: would prune {len(plan.actions)} item(s), freeing {freed}", highlight=False)
            return
        if not plan.actions:
            if fmt == OutputFormat.json:
                print_json({"dry_run": False, **plan.to_json(), "result": None})
            else:
                console.print("nothing to prune", highlight=False)
            return
        if not yes and not typer.confirm(f"Prune {len(plan.actions)} item(s), freeing {freed}?", default=False,
                                         err=True):
            raise typer.Exit(1)
        result = plan.execute(catalog)
    for path, why in result.skipped:
        err_console.print(f"[yellow]warning:[/] left {path} alone: {why}", highlight=False)
    if fmt == OutputFormat.json:
        print_json({"dry_run": False, **plan.to_json(), "result": result.to_json()})
    elif artifacts:
        console.print(f"freed {format_size(result.bytes_freed)} ({result.bytes_freed} bytes): {result.entries_removed} "
                      f"artifact(s) pruned, {result.paths_removed} file(s) removed", highlight=False)
    else:
        console.print(result.line(), highlight=False)


@app.command("prune")
@handle_errors
@with_filter()
def prune_command(
    ctx: typer.Context,
    flt: KernelFilter,
    full: bool = typer.Option(False, "--full", help="Delete whole entry directories."),
    deduplicate: bool = typer.Option(False, "--deduplicate", help="Keep only the newest of identical kernels."),
    max_size: Optional[str] = typer.Option(None, "--max-size", help="Delete least recently used until this fits."),
    garbage: bool = typer.Option(False, "--garbage", help="Stale tmp.pid_* dirs, empty dirs, orphan files."),
    dry_run: bool = DRY_RUN,
    yes: bool = YES,
    fmt: OutputFormat = FORMAT,
    artifacts: bool = typer.Option(False, "--artifacts", help="Prune compile-cache artifacts (Inductor, vLLM): by "
                                   "default only what Inductor rewrites for free; --full whole artifacts; "
                                   "--max-size LRU over kernels and artifacts of each cache dir."),
    kind: Optional[List[str]] = KIND,
) -> None:
    """Reclaim space: IR files only by default (kernels stay cache hits), or another strategy."""

    strategy, size = choose_strategy(full, deduplicate, max_size, garbage)
    kinds = check_kinds(kind, artifacts)
    if artifacts and strategy in ("deduplicate", "garbage"):
        raise BadInputError(f"--{strategy} applies to kernels; with --artifacts use --full or --max-size "
                            "(the default removes stale locks and temp files)")
    run_prune(ctx, flt, strategy, size, dry_run, yes, fmt, artifacts, kinds)


@app.command("stats")
@handle_errors
def stats_command(
    ctx: typer.Context,
    cache_dir: Optional[List[Path]] = CACHE_DIRS,
    mode: str = MODE,
    fmt: OutputFormat = FORMAT,
    zero: bool = typer.Option(False, "--zero", help="Reset the hit/miss counters (after showing them)."),
) -> None:
    """Totals by backend, arch, Triton version and file type; reclaimable IR bytes; hit rate."""

    flt = KernelFilter.build(cache_dirs=cache_dir or (), mode=mode)
    with open_catalog(ctx) as catalog:
        refresh_if_dirs(catalog, flt)
        stats = stats_then_zero(catalog, flt) if zero else compute_stats(catalog, flt)
    if fmt == OutputFormat.json:
        print_json(stats.to_json())
    else:
        _print_stats(stats)
    if zero:
        err_console.print("hit/miss counters reset", highlight=False)


def _print_stats(stats: Any) -> None:
    from rich.table import Table


    rate = "-" if stats.hit_rate is None else f"{stats.hit_rate * 100:.1f} %"
    summary = Table(show_header=False, box=None)
    summary.add_column(style="bold")
    summary.add_column()
    for label, value in (
        ("Kernels", str(stats.entries)),
        ("Total size", f"{format_size(stats.total_size)} ({stats.total_size} bytes)"),
        ("Reclaimable IR", f"{format_size(stats.reclaimable_ir_bytes)} ({stats.reclaimable_ir_bytes} bytes)"),
        ("Hits / misses", f"{stats.hits} / {stats.misses}"),
        ("Hit rate", rate),
        ("Never hit", f"{stats.never_hit.entries} kernel(s), {format_size(stats.never_hit.total_size)} "
                      f"({stats.never_hit.total_size} bytes)"),
        ("Cache dirs", ", ".join(stats.cache_dirs) or "-"),
    ):
        summary.add_row(label, value)
    if stats.artifacts.entries:
        kinds = ", ".join(f"{g.entries} {k}" for k, g in stats.artifacts_by_kind.items())
        summary.add_row("Artifacts", f"{stats.artifacts.entries} ({format_size(stats.artifacts.total_size)}): {kinds}")
    if stats.skipped:
        summary.add_row("Not kernels", ", ".join(f"{g.entries} {k}" for k, g in stats.skipped.items()))
    if stats.installed_triton_version:
        summary.add_row("Installed Triton", stats.installed_triton_version)
    console.print(summary)
    if stats.top_kernels:
        top = Table(title="Most hit kernels", header_style="bold")
        for col in ("Key", "Name", "Target", "Hits", "Misses", "Hit rate", "Last access"):
            top.add_column(col, justify="right" if col in ("Hits", "Misses", "Hit rate") else "left")
        for k in stats.top_kernels:
            j = k.to_json()
            top.add_row(k.key[:12], k.name, f"{k.backend}:{k.arch}", str(k.hits), str(k.misses),
                        "-" if k.hit_rate is None else f"{k.hit_rate * 100:.1f} %", _short_time(j["last_access"]))
        console.print(top)
    if stats.other_triton_entries:
        err_console.print(
            f"[yellow]note:[/] {stats.other_triton_entries} kernel(s) were compiled by another Triton version "
            f"than the installed {stats.installed_triton_version}: Triton can never hit on them here "
            "(its cache key covers the exact install)", highlight=False)
    for title, groups in (("Backend", stats.by_backend), ("Arch", stats.by_arch),
                          ("Triton version", stats.by_triton_version)):
        if not groups:
            continue
        table = Table(header_style="bold")
        table.add_column(title)
        table.add_column("Kernels", justify="right")
        table.add_column("Size", justify="right")
        for key, g in groups.items():
            table.add_row(key, str(g.entries), format_size(g.total_size))
        console.print(table)
    if stats.by_file_type:
        table = Table(header_style="bold")
        table.add_column("File type")
        table.add_column("Size", justify="right")
        for key, size in stats.by_file_type.items():
            table.add_row(key, format_size(size))
        console.print(table)


app.command("warm")(handle_errors(warm_command))
