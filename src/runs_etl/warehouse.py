"""DuckDB warehouse: versioned schema, staging from Arrow, set-based upsert, and views.

A sync stages every batch into temp tables inside one transaction, then ``merge`` applies the
freshest snapshot of each run with a few set-based statements. Data, ledger row and sync state
commit together, so a kill at any instant leaves the previous good commit.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

from .errors import LockedError, WarehouseError
from .normalize import Batch

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

RUN_COLUMNS = ["id", "group_id", "workflow_id", "input", "node_ids", "status", "progress",
               "definitions", "created_at", "finished_at", "source", "extra"]
WORKFLOW_COLUMNS = ["id", "group_id", "name", "type", "definition", "last_updated_at",
                    "last_run_at", "created_at", "deleted_at", "runs_count", "author_name",
                    "description", "saved", "error_handler", "extra"]


def connect(path: Path, *, memory_limit: str = "1GB", read_only: bool = False):
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
        raise WarehouseError(f"invalid warehouse.memory_limit {memory_limit!r}: {_first_line(e)}")
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


def apply_views(con) -> list[str]:
    """(Re)create every view in ``sql/`` in file-name order; returns the file names."""
    names = []
    files = sorted((f for f in importlib.resources.files("runs_etl.sql").iterdir()
                    if f.name.endswith(".sql")), key=lambda f: f.name)
    for f in files:
        con.execute(f.read_text(encoding="utf-8"))
        names.append(f.name)
    return names


# --- staging -------------------------------------------------------------------------------

class Stage:
    """Temp tables that collect a sync's batches; dropped with the transaction."""

    def __init__(self, con):
        self.con = con
        for name, like in (("stage_runs", "runs"), ("stage_workflows", "workflows")):
            cols = RUN_COLUMNS if like == "runs" else WORKFLOW_COLUMNS
            con.execute(f"CREATE OR REPLACE TEMP TABLE {name} AS "
                        f"SELECT {', '.join(cols)}, 0::BIGINT AS _seq FROM {like} LIMIT 0")
        con.execute("CREATE OR REPLACE TEMP TABLE stage_nodes AS SELECT run_id, position, "
                    "node_id, 0::BIGINT AS _seq FROM run_nodes LIMIT 0")
        con.execute("CREATE OR REPLACE TEMP TABLE stage_rejected AS "
                    "SELECT page, item_index, run_id, error, raw, 0::BIGINT AS _seq "
                    "FROM rejected_records LIMIT 0")

    def add(self, batch: Batch) -> None:
        for table, arrow in (("stage_runs", batch.runs), ("stage_workflows", batch.workflows),
                             ("stage_nodes", batch.run_nodes)):
            if arrow.num_rows:
                self._insert(table, arrow)

    def add_rejected(self, rows: pa.Table) -> None:
        if rows.num_rows:
            self._insert("stage_rejected", rows)

    def _insert(self, table: str, arrow: pa.Table) -> None:
        self.con.register("_arrow_batch", arrow)
        try:
            cols = ", ".join(arrow.column_names)
            self.con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _arrow_batch")
        finally:
            self.con.unregister("_arrow_batch")

    def drop(self) -> None:
        for t in ("stage_runs", "stage_workflows", "stage_nodes", "stage_rejected",
                  "run_changes"):
            self.con.execute(f"DROP TABLE IF EXISTS {t}")


@dataclass
class MergeCounts:
    rows_new: int = 0
    rows_updated: int = 0
    rows_unchanged: int = 0
    rows_undeleted: int = 0
    workflows_new: int = 0
    workflows_updated: int = 0


def _changed(cols: list[str], a: str, b: str) -> str:
    return " OR ".join(f"{a}.{c} IS DISTINCT FROM {b}.{c}" for c in cols if c != "id")


def merge(con, sync_id: int) -> MergeCounts:
    """Upsert the freshest staged snapshot of every run and workflow; unchanged rows stay put."""
    counts = MergeCounts()
    con.execute("""
        CREATE OR REPLACE TEMP TABLE cur_runs AS
        SELECT * FROM stage_runs QUALIFY row_number() OVER (PARTITION BY id ORDER BY _seq DESC) = 1
    """)
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE run_changes AS
        SELECT c.id, c._seq, r._first_seen_at,
               CASE WHEN r.id IS NULL THEN 'new'
                    WHEN r._deleted_at IS NOT NULL OR {_changed(RUN_COLUMNS, 'c', 'r')}
                    THEN 'updated' ELSE 'unchanged' END AS change,
               r._deleted_at IS NOT NULL AS undeleted
        FROM cur_runs c LEFT JOIN runs r USING (id)
    """)
    (counts.rows_new, counts.rows_updated, counts.rows_unchanged,
     counts.rows_undeleted) = con.execute("""
        SELECT count(*) FILTER (change = 'new'), count(*) FILTER (change = 'updated'),
               count(*) FILTER (change = 'unchanged'), count(*) FILTER (undeleted)
        FROM run_changes""").fetchone()
    cols = ", ".join(RUN_COLUMNS)
    ccols = ", ".join(f"c.{c}" for c in RUN_COLUMNS)
    con.execute("DELETE FROM runs WHERE id IN "
                "(SELECT id FROM run_changes WHERE change = 'updated')")
    con.execute(f"""
        INSERT INTO runs ({cols}, _first_seen_at, _synced_at, _deleted_at, _sync_id)
        SELECT {ccols}, coalesce(d._first_seen_at, now()), now(), NULL, ?
        FROM cur_runs c JOIN run_changes d USING (id) WHERE d.change <> 'unchanged'
    """, [sync_id])
    con.execute("DELETE FROM run_nodes WHERE run_id IN "
                "(SELECT id FROM run_changes WHERE change = 'updated')")
    con.execute("""
        INSERT INTO run_nodes (run_id, position, node_id)
        SELECT n.run_id, n.position, n.node_id
        FROM stage_nodes n JOIN run_changes d ON n.run_id = d.id AND n._seq = d._seq
        WHERE d.change <> 'unchanged'
    """)
    _merge_workflows(con, sync_id, counts)
    con.execute("DROP TABLE cur_runs")
    return counts


def _merge_workflows(con, sync_id: int, counts: MergeCounts) -> None:
    con.execute("""
        CREATE OR REPLACE TEMP TABLE cur_wf AS SELECT * FROM stage_workflows
        QUALIFY row_number() OVER (PARTITION BY id ORDER BY _seq DESC) = 1
    """)
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE wf_changes AS
        SELECT c.id, w._first_seen_at,
               CASE WHEN w.id IS NULL THEN 'new'
                    WHEN {_changed(WORKFLOW_COLUMNS, 'c', 'w')} THEN 'updated'
                    ELSE 'unchanged' END AS change
        FROM cur_wf c LEFT JOIN workflows w USING (id)
    """)
    counts.workflows_new, counts.workflows_updated = con.execute(
        "SELECT count(*) FILTER (change = 'new'), count(*) FILTER (change = 'updated') "
        "FROM wf_changes").fetchone()
    cols = ", ".join(WORKFLOW_COLUMNS)
    ccols = ", ".join(f"c.{c}" for c in WORKFLOW_COLUMNS)
    con.execute("DELETE FROM workflows WHERE id IN "
                "(SELECT id FROM wf_changes WHERE change = 'updated')")
    con.execute(f"""
        INSERT INTO workflows ({cols}, _first_seen_at, _synced_at, _sync_id)
        SELECT {ccols}, coalesce(d._first_seen_at, now()), now(), ?
        FROM cur_wf c JOIN wf_changes d USING (id) WHERE d.change <> 'unchanged'
    """, [sync_id])
    con.execute("DROP TABLE cur_wf; DROP TABLE wf_changes")


def save_rejected(con, sync_id: int) -> int:
    (n,) = con.execute("SELECT count(*) FROM stage_rejected").fetchone()
    con.execute("INSERT INTO rejected_records SELECT ?, page, item_index, run_id, error, raw, "
                "now() FROM stage_rejected", [sync_id])
    return n
