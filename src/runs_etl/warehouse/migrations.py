"""The warehouse's versioned schema: each migration is applied once, in its own transaction.

Migrations are history: once released, a migration's DDL never changes (a new column is a new
migration). The column lists the engine writes are derived from the Arrow schemas in
``engine/normalize.py`` and the ledger's ``SyncResult``; ``tests/test_load.py`` checks that the
migrated tables carry exactly those columns.
"""

from __future__ import annotations

import duckdb

from ..errors import WarehouseError, first_line

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
    (2, "schema drift", "ALTER TABLE sync_runs ADD COLUMN new_fields VARCHAR"),
    # Several workspaces in one warehouse: ``workspace`` is part of every key. Rows that were
    # there before belong to the single workspace of the time, ``default``.
    (3, "workspaces", "".join(f"""
    ALTER TABLE {table} ADD COLUMN workspace VARCHAR DEFAULT 'default';
    ALTER TABLE {table} ALTER COLUMN workspace DROP DEFAULT;
    ALTER TABLE {table} ALTER COLUMN workspace SET NOT NULL;""" for table in (
        "runs", "workflows", "run_nodes", "sync_runs", "rejected_records")) + """
    CREATE TABLE sync_state_v3 (
        workspace VARCHAR NOT NULL, key VARCHAR NOT NULL, value JSON, updated_at TIMESTAMPTZ,
        PRIMARY KEY (workspace, key));
    INSERT INTO sync_state_v3
        SELECT CASE WHEN key = 'stuck_after_seconds' THEN '*' ELSE 'default' END,
               key, value, updated_at
        FROM sync_state;
    DROP TABLE sync_state;
    ALTER TABLE sync_state_v3 RENAME TO sync_state;
    """),
    # Every observed version of a run (see ``load.record_history``). A warehouse that existed
    # before starts with each run's current state, first seen when its row was last written
    # (a deleted run's row was last written by its delete: its version dates from first sight).
    (4, "run history", """
    CREATE TABLE run_history (
        workspace VARCHAR NOT NULL, run_id VARCHAR NOT NULL,
        valid_from TIMESTAMPTZ NOT NULL, valid_to TIMESTAMPTZ,
        status VARCHAR, progress INTEGER, finished_at TIMESTAMPTZ, workflow_id VARCHAR,
        observed_after TIMESTAMPTZ, _last_seen_at TIMESTAMPTZ NOT NULL, _sync_id BIGINT);
    INSERT INTO run_history
        SELECT workspace, id, v.seen, _deleted_at, status, progress, finished_at, workflow_id,
               NULL, v.seen, _sync_id
        FROM runs, LATERAL (SELECT CASE WHEN _deleted_at IS NULL THEN _synced_at
                                        ELSE _first_seen_at END AS seen) v;
    """),
]


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
            raise WarehouseError(f"migration {version} ({name}) failed: {first_line(e)}") from None
        applied.append(version)
    latest = latest_version()
    if done and max(done) > latest:
        raise WarehouseError(f"the warehouse is at schema version {max(done)}, newer than this "
                             f"runs-etl ({latest}): upgrade runs-etl")
    return applied


def latest_version() -> int:
    return max(v for v, _, _ in MIGRATIONS)


def check_readable(con, path) -> None:
    """A reader's file must be at this runs-etl's schema: an older one (published before an
    upgrade) is migrated by the next sync, a newer one needs a newer runs-etl."""
    (version,) = con.execute("SELECT max(version) FROM schema_migrations").fetchall()[0]
    latest = latest_version()
    if version is None or version < latest:
        raise WarehouseError(f"{path} was written by an older runs-etl (schema v{version}, this "
                             f"one reads v{latest}): run `runs-etl sync` once to migrate it")
    if version > latest:
        raise WarehouseError(f"{path} is at schema v{version}, newer than this runs-etl "
                             f"({latest}): upgrade runs-etl")
