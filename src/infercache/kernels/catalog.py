"""The kernel catalog: one SQLite file (`catalog.db` in the data dir).

Why SQLite: `list` on 10,000 kernels must answer in milliseconds and several
processes (two `index` runs, `index` during `prune`, a runtime hit tracker)
must share it safely. WAL mode lets readers run during a write, the busy
timeout makes writers queue instead of failing with "database is locked",
and `PRAGMA user_version` carries the schema version for migrations.

Tables: `entries` (one row per Triton kernel entry, all spec fields plus the
full metadata JSON and the directory signature used by incremental indexing),
`files` (type, name, size of each file of an entry), `usage` (runtime hits /
misses / last access / compile time keyed by the entry key, so re-indexing never loses
them and kernels not indexed yet keep theirs),
`artifacts` (compile-cache artifacts: Inductor, vLLM; see kernels/artifacts.py), `skipped` (what the last scan found that is
not a kernel, for `prune --garbage` and the index summary) and `roots` (the
cache dirs indexed: prune never deletes outside them).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from infercache import paths
from infercache.errors import InfercacheError

logger = logging.getLogger(__name__)

CATALOG_NAME = "catalog.db"
BUSY_TIMEOUT_MS = 120_000
#: WAL pages between checkpoints during bulk writes (32 MiB; SQLite's default is 1000 pages).
BULK_CHECKPOINT_PAGES = 8192
#: Rows changed by a bulk run above which it checkpoints at its end.
BULK_CHECKPOINT_ROWS = 5000

_V1 = """
CREATE TABLE roots (
    path        TEXT PRIMARY KEY,
    mode        TEXT NOT NULL,
    indexed_at  REAL NOT NULL
);
CREATE TABLE entries (
    id              INTEGER PRIMARY KEY,
    path            TEXT NOT NULL UNIQUE,
    parent          TEXT NOT NULL,
    key             TEXT NOT NULL,
    cache_root      TEXT NOT NULL,
    mode            TEXT NOT NULL,
    name            TEXT NOT NULL,
    backend         TEXT NOT NULL,
    arch            TEXT NOT NULL,
    warp_size       INTEGER,
    num_warps       INTEGER,
    num_stages      INTEGER,
    num_ctas        INTEGER,
    shared          INTEGER,
    maxnreg         INTEGER,
    ptx_version     INTEGER,
    enable_fp_fusion INTEGER,
    triton_version  TEXT,
    hash            TEXT,
    total_size      INTEGER NOT NULL,
    modified        REAL NOT NULL,
    files_json      TEXT NOT NULL,
    group_file      TEXT,
    dedup_key       TEXT NOT NULL,
    vllm_hash       TEXT,
    vllm_rank       TEXT,
    vllm_prefix     TEXT,
    signature       TEXT NOT NULL,
    indexed_at      REAL NOT NULL,
    metadata        TEXT NOT NULL
);
CREATE INDEX entries_name ON entries(name);
CREATE INDEX entries_backend_arch ON entries(backend, arch);
CREATE INDEX entries_modified ON entries(modified);
CREATE INDEX entries_root ON entries(cache_root, parent, total_size);
CREATE INDEX entries_parent ON entries(parent, path, signature);
CREATE TABLE files (
    entry_id    INTEGER NOT NULL REFERENCES entries(id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    type        TEXT NOT NULL,
    size        INTEGER NOT NULL,
    PRIMARY KEY (entry_id, name)
) WITHOUT ROWID;
CREATE TABLE skipped (
    path        TEXT PRIMARY KEY,
    parent      TEXT NOT NULL,
    cache_root  TEXT NOT NULL,
    kind        TEXT NOT NULL,
    reason      TEXT NOT NULL,
    size        INTEGER NOT NULL,
    modified    REAL NOT NULL,
    signature   TEXT NOT NULL,
    owner       TEXT
);
CREATE INDEX skipped_parent ON skipped(parent);
CREATE INDEX skipped_root ON skipped(cache_root);
CREATE INDEX skipped_owner ON skipped(owner);
CREATE TABLE artifacts (
    path        TEXT PRIMARY KEY,
    cache_root  TEXT NOT NULL,
    kind        TEXT NOT NULL,
    size        INTEGER NOT NULL,
    modified    REAL NOT NULL,
    vllm_hash   TEXT,
    vllm_rank   TEXT,
    vllm_prefix TEXT,
    indexed_at  REAL NOT NULL
);
CREATE INDEX artifacts_root ON artifacts(cache_root);
"""

_V2 = """
CREATE TABLE usage (
    key          TEXT PRIMARY KEY,
    hits         INTEGER NOT NULL DEFAULT 0,
    misses       INTEGER NOT NULL DEFAULT 0,
    last_access  REAL
);
"""

#: Compile time of the last compile seen by the runtime tracker (Triton's listener, 3.4+).
_V3_USAGE_COMPILE_TIME = """
ALTER TABLE usage ADD COLUMN compile_time_s REAL;
"""

#: Compile-cache artifacts of every kind (issue 11): key, mode, files, last access, torch version and
#: the stat signature that makes re-indexing incremental; the old vLLM-only kinds get the spec's names.
_V4_ARTIFACTS = """
ALTER TABLE artifacts ADD COLUMN key TEXT;
ALTER TABLE artifacts ADD COLUMN mode TEXT;
ALTER TABLE artifacts ADD COLUMN files_json TEXT;
ALTER TABLE artifacts ADD COLUMN last_access REAL;
ALTER TABLE artifacts ADD COLUMN torch_version TEXT;
ALTER TABLE artifacts ADD COLUMN signature TEXT;
UPDATE artifacts SET kind = 'vllm-artifact' WHERE kind = 'artifact';
UPDATE artifacts SET kind = 'aot-model' WHERE kind = 'aot_model';
CREATE INDEX artifacts_kind ON artifacts(kind, cache_root)
"""

#: Rows from before V4 (vLLM-only, indexed by size and time) get the key and mode new rows have, so
#: `list --artifacts --name/--mode` find them before the next index rewrites them (key: the basename).
_V5_OLD_ARTIFACT_ROWS = """
UPDATE artifacts SET mode = coalesce((SELECT r.mode FROM roots r WHERE r.path = artifacts.cache_root), 'vllm')
    WHERE mode IS NULL;
UPDATE artifacts SET key = substr(path, length(rtrim(path, replace(path, '/', ''))) + 1) WHERE key IS NULL
"""


def _script(sql: str) -> Callable[[sqlite3.Connection], None]:
    def apply(conn: sqlite3.Connection) -> None:
        for statement in sql.split(";"):
            if statement.strip():
                conn.execute(statement)

    return apply


#: MIGRATIONS[i] takes the schema from version i to i+1. Append, never edit.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (
    _script(_V1), _script(_V2), _script(_V3_USAGE_COMPILE_TIME), _script(_V4_ARTIFACTS),
    _script(_V5_OLD_ARTIFACT_ROWS),
)
SCHEMA_VERSION = len(MIGRATIONS)


def catalog_path(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """`catalog.db` inside the data dir (flag, env, platform default)."""
    return paths.data_dir(data_dir) / CATALOG_NAME


class Catalog:
    """A connection to the catalog; cheap to open, close it (or use `with`) when done."""

    def __init__(self, path: str | os.PathLike[str], *, upto: int | None = None,
                 busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
        """`busy_timeout_ms`: the longest any statement waits for another writer (the runtime
        tracker passes a short one: its counts can wait for the next flush, a program's exit cannot)."""
        self.path = Path(path)
        self.busy_timeout_ms = busy_timeout_ms
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not self.path.exists():
                # Create it 0600 ourselves: SQLite would use the umask (and copies the main
                # file's mode onto -wal/-shm, so those follow).
                fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
                os.close(fd)
            self.conn = sqlite3.connect(
                self.path, timeout=busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
            )
            self.conn.row_factory = sqlite3.Row
            self.conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            self._retry(lambda: self.conn.execute("PRAGMA journal_mode=WAL"))
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute("PRAGMA cache_size=-32768")  # 32 MiB: a 10,000-entry catalog stays in memory
            self.conn.execute("PRAGMA foreign_keys=ON")
        except (OSError, sqlite3.Error) as exc:
            raise InfercacheError(f"cannot open the catalog {self.path}: {exc}") from exc
        self._migrate(SCHEMA_VERSION if upto is None else upto)

    @classmethod
    def open(cls, data_dir: str | os.PathLike[str] | None = None) -> "Catalog":
        """The catalog of the data dir (created on first use)."""
        return cls(catalog_path(data_dir))

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.conn.close()

    @property
    def schema_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def _retry(self, fn: Callable[[], object]) -> object:
        """Some statements (journal_mode switch) report SQLITE_BUSY without waiting: retry them."""
        deadline = time.monotonic() + self.busy_timeout_ms / 1000
        delay = 0.01
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc) or time.monotonic() > deadline:
                    raise InfercacheError(f"catalog {self.path}: {exc}") from exc
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

    def _migrate(self, target: int) -> None:
        current = self.schema_version
        if current > SCHEMA_VERSION:
            raise InfercacheError(
                f"catalog {self.path} has schema version {current}, newer than this infercache "
                f"understands ({SCHEMA_VERSION}); upgrade infercache or use another --data-dir"
            )
        if current >= target:
            return
        with self.transaction():
            # Re-read inside the write lock: another process may have migrated meanwhile.
            current = self.schema_version
            for version in range(current, target):
                logger.info("migrating catalog %s to schema version %d", self.path, version + 1)
                MIGRATIONS[version](self.conn)
            if current < target:
                self.conn.execute(f"PRAGMA user_version={target}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction taken up front (BEGIN IMMEDIATE), so it waits rather than deadlocks.

        Nested use joins the outer transaction (prune changes the disk and the rows in one).
        """
        if self.conn.in_transaction:
            yield self.conn
            return
        self._retry(lambda: self.conn.execute("BEGIN IMMEDIATE"))
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self._retry(lambda: self.conn.execute("COMMIT"))

    @contextmanager
    def bulk_writes(self) -> Iterator[None]:
        """Many write transactions in a row (a first index): checkpoint the WAL rarely, then once.

        Why: every checkpoint syncs the database file; with SQLite's default of one per
        1000 WAL pages, indexing 10,000 kernels pays for a dozen syncs, and on a busy disk
        each can take as long as parsing a thousand entries.
        """
        previous = self.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
        changes = self.conn.total_changes
        self.conn.execute(f"PRAGMA wal_autocheckpoint={BULK_CHECKPOINT_PAGES}")
        try:
            yield
        finally:
            self.conn.execute(f"PRAGMA wal_autocheckpoint={previous}")
            # A run that changed little (a re-index) leaves its few pages to the usual checkpoints.
            if not self.conn.in_transaction and self.conn.total_changes - changes > BULK_CHECKPOINT_ROWS:
                try:  # PASSIVE: never waits for readers; what it cannot copy now, a later one will
                    self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:
                    logger.debug("checkpoint after bulk writes: %s", exc)

    # --- runtime usage (hit tracking) -------------------------------------------------------
    def record_usage(self, key: str, hits: int = 0, misses: int = 0, last_access: float | None = None) -> None:
        """Add hits/misses for one entry key (the runtime tracker uses :meth:`record_usage_batch`)."""
        self.record_usage_batch([(key, hits, misses, last_access, None)])

    def record_usage_batch(self, rows: Iterable[tuple[str, int, int, float | None, float | None]]) -> None:
        """Add many (key, hits, misses, last_access, compile_time_s) in one transaction.

        Why one: the runtime tracker flushes a whole interval's counts at once, so N hits
        cost one commit, and 8 worker processes queue on the lock rather than thrash it.
        Keys need no `entries` row: counts of kernels not indexed yet wait here for `index`.
        """
        with self.transaction() as conn:
            conn.executemany(
                "INSERT INTO usage(key, hits, misses, last_access, compile_time_s) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET hits = hits + excluded.hits, misses = misses + excluded.misses, "
                "last_access = max(coalesce(last_access, 0), coalesce(excluded.last_access, 0)), "
                "compile_time_s = coalesce(excluded.compile_time_s, compile_time_s)",
                list(rows),
            )

    def zero_usage(self, keys: list[str] | None = None) -> int:
        """Reset hit/miss counters (all, or those of `keys`); returns rows reset."""
        with self.transaction() as conn:
            if keys is None:
                return conn.execute("UPDATE usage SET hits = 0, misses = 0").rowcount
            total = 0
            for key in keys:
                total += conn.execute("UPDATE usage SET hits = 0, misses = 0 WHERE key = ?", (key,)).rowcount
            return total

    def roots(self) -> list[tuple[Path, str]]:
        """Cache dirs that have been indexed, with their mode."""
        return [(Path(r["path"]), r["mode"]) for r in self.conn.execute("SELECT path, mode FROM roots ORDER BY path")]
