"""DuckDB warehouse: opening the file, the versioned schema, and the views in ``sql/``.

Upserts live in ``load.py``; both run inside the sync's single transaction, so a kill at any
instant leaves the previous good commit.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import duckdb

from .errors import ConfigError, LockedError, WarehouseError

MIGRATIONS: list[tuple[int, str, str]] = [
    (1, "core tables", """
    CREATE TABLE runs (
        id VARCHAR NOT NULL, group_id VARCHAR, workflow_id VARCHAR, input JSON,
        node_ids VARCHAR[], status VARCHAR, progress INTEGER, definitions JSON,
        created_at TIMESTAMPTZ, finished_at TIMESTAMPTZ, source VARCHAR, extra JSON,
        _first_seen_at TIMESTAMPTZ NOT NULL, _synced_at TIMESTAMPTZ NOT NULL,
        _deleted_at TIMESTAMPTZ, _sync_id BIGINT);
    CREATE TABLE workflows (
        id VARCHAR NOT NULL, group_id VARCHAR, name VARCHAR, type VARCHAR, definition JSON,
        last_updated_at TIMESTAMPTZ, last_run_at TIMESTAMPTZ, created_at TIMESTAMPTZ,
        deleted_at TIMESTAMPTZ, runs_count BIGINT, author_name VARCHAR, description VARCHAR,
        saved BOOLEAN, error_handler VARCHAR, extra JSON,
        _first_seen_at TIMESTAMPTZ NOT NULL, _synced_at TIMESTAMPTZ NOT NULL, _sync_id BIGINT);
    CREATE TABLE run_nodes (run_id VARCHAR NOT NULL, position INTEGER NOT NULL, node_id VARCHAR);
    CREATE TABLE sync_runs (
        sync_id BIGINT PRIMARY KEY, started_at TIMESTAMPTZ NOT NULL, finished_at TIMESTAMPTZ,
        outcome VARCHAR NOT NULL, mode VARCHAR, mode_reason VARCHAR, verified BOOLEAN,
        walk_passes INTEGER, pages INTEGER, requests INTEGER, single_run_requests INTEGER,
        retries INTEGER, bytes BIGINT, total_start BIGINT, total_end BIGINT, runs_seen BIGINT,
        rows_new BIGINT, rows_updated BIGINT, rows_unchanged BIGINT, rows_deleted BIGINT,
        rows_undeleted BIGINT, rows_rejected BIGINT, workflows_new BIGINT,
        workflows_updated BIGINT, seconds_extract DOUBLE, seconds_load DOUBLE,
        seconds_total DOUBLE, error VARCHAR, api_url VARCHAR);
    CREATE TABLE rejected_records (
        sync_id BIGINT NOT NULL, page INTEGER, item_index INTEGER, run_id VARCHAR,
        error VARCHAR, raw JSON, rejected_at TIMESTAMPTZ NOT NULL);
    CREATE TABLE sync_state (key VARCHAR PRIMARY KEY, value JSON, updated_at TIMESTAMPTZ);
    """),
]



def connect(path: Path, *, memory_limit: str = "256MB", read_only: bool = False):
    """Open (creating its folder) the warehouse; a file held by another process is LockedError."""
    path = Path(path)
    try:
        if not read_only:
            path.parent.mkdir(parents=True, exist_ok=True)
        con = duckdb.connect(str(path), read_only=read_only)
    except duckdb.IOException as e:
        raise LockedError(
            f"cannot open {path}: another process has the database open ({_first_line(e)}). "
            "Close DuckDB shells / notebooks on this file, or point analysts at the Parquet export"
        ) from None
    except (duckdb.Error, OSError) as e:
        raise WarehouseError(f"cannot open {path}: {_first_line(e)}") from None
    try:
        con.execute(f"SET memory_limit = '{memory_limit}'")
        con.execute("SET preserve_insertion_order = false")
        con.execute("SET TimeZone = 'UTC'")  # analysts see UTC, whatever the host's zone
    except duckdb.Error as e:
        con.close()
        raise ConfigError([f"warehouse.memory_limit: {memory_limit!r} is not a DuckDB memory "
                           f"size ({_first_line(e)})"]) from None
    return con


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def migrate(con) -> list[int]:
    """Apply pending migrations, each in its own transaction; return the versions applied."""
    con.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                "version INTEGER PRIMARY KEY, name VARCHAR, applied_at TIMESTAMPTZ)")
    done = {v for (v,) in con.execute("SELECT version FROM schema_migrations").fetchall()}
    applied = []
    for version, name, ddl in MIGRATIONS:
        if version in done:
            continue
        con.begin()
        try:
            con.execute(ddl)
            con.execute("INSERT INTO schema_migrations VALUES (?, ?, now())", [version, name])
            con.commit()
        except duckdb.Error as e:
            con.rollback()
            raise WarehouseError(f"migration {version} ({name}) failed: {_first_line(e)}") from None
        applied.append(version)
    latest = max(v for v, _, _ in MIGRATIONS)
    if done and max(done) > latest:
        raise WarehouseError(f"the warehouse is at schema version {max(done)}, newer than this "
                             f"runs-etl ({latest}): upgrade runs-etl")
    return applied


def apply_views(con, *, settings=None) -> list[str]:
    """(Re)create every view in ``sql/`` in file-name order; returns the file names.

    With ``settings``, also stores ``analytics.stuck_after`` in ``sync_state`` (key
    ``stuck_after_seconds``), the threshold the ``stuck_runs`` view reads (24 h while unset).
    """
    if settings is not None:
        from . import ledger

        ledger.set_state(con, "stuck_after_seconds",
                         settings.analytics.stuck_after.total_seconds())
    names = []
    files = sorted((f for f in importlib.resources.files("runs_etl.sql").iterdir()
                    if f.name.endswith(".sql")), key=lambda f: f.name)
    for f in files:
        con.execute(f.read_text(encoding="utf-8"))
        names.append(f.name)
    return names
