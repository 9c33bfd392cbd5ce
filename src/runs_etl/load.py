"""Load: stage Arrow batches as Parquet on disk while the walk runs, then merge once in DuckDB.

Staging on disk keeps memory flat however many runs a sync sees: Python holds one batch at a
time, and DuckDB reads the staged files column by column. The merge then applies the freshest
snapshot of each run (highest arrival ``_seq``; a page holds each run once, see
``models.parse_page``, so (id, _seq) is a key) with a few set-based statements inside the sync's
transaction; an unchanged run is not rewritten. Views ``stage_runs`` / ``stage_workflows`` /
``stage_nodes`` over the staged files also drive walk verification and delete candidates.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import DataError
from .normalize import RUN_NODES_SCHEMA, RUNS_SCHEMA, WORKFLOWS_SCHEMA, Batch

RUN_COLUMNS = ["id", "group_id", "workflow_id", "input", "node_ids", "status", "progress",
               "definitions", "created_at", "finished_at", "source", "extra"]
WORKFLOW_COLUMNS = ["id", "group_id", "name", "type", "definition", "last_updated_at",
                    "last_run_at", "created_at", "deleted_at", "runs_count", "author_name",
                    "description", "saved", "error_handler", "extra"]
REJECTED_SCHEMA = pa.schema([("page", pa.int32()), ("item_index", pa.int32()),
                             ("run_id", pa.string()), ("error", pa.string()),
                             ("raw", pa.string()), ("_seq", pa.int64())])
_KINDS = {"runs": RUNS_SCHEMA, "workflows": WORKFLOWS_SCHEMA, "nodes": RUN_NODES_SCHEMA,
          "rejected": REJECTED_SCHEMA}
STAGING_PREFIX = "runs-etl-stage-"


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


def _list(cols: list[str], prefix: str = "") -> str:
    return ", ".join(prefix + c for c in cols)


def check_mass_delete(n: int, live: int, max_fraction: float) -> None:
    """The circuit breaker: refuse to mark more than ``max_fraction`` of live runs deleted."""
    if n and n > max_fraction * live:
        raise DataError(
            f"refusing to mark {n} of {live} runs deleted ({n / live:.1%} > "
            f"sync.max_delete_fraction {max_fraction:.1%}); nothing was committed. If the "
            "source really lost them, run again with --allow-mass-delete")


def staging_root(con) -> Path | None:
    """``<database>.staging/`` beside a DuckDB file (None for an in-memory database), after
    removing what a killed sync left there. Only called by the warehouse's single writer."""
    (path,) = con.execute("SELECT path FROM duckdb_databases() "
                          "WHERE database_name = current_database()").fetchall()[0]
    if not path:
        return None
    root = Path(path).with_name(Path(path).name + ".staging")
    for stale in root.glob(STAGING_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    root.mkdir(exist_ok=True)
    return root


class Stage:
    """One sync's staged batches (Parquet files in a private folder) and their merge."""

    def __init__(self, con, sync_id: int, directory: Path | None = None):
        self.con = con
        self.sync_id = sync_id
        self.dir = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory))
        self._files = 0
        # An empty file per kind, so the views below always have something to read.
        self._write({k: s.empty_table() for k, s in _KINDS.items()})
        for kind, view in (("runs", "stage_runs"), ("workflows", "stage_workflows"),
                           ("nodes", "stage_nodes"), ("rejected", "stage_rejected")):
            glob = str(self.dir / f"{kind}-*.parquet").replace("'", "''")
            con.execute(f"CREATE OR REPLACE TEMP VIEW {view} AS "
                        f"SELECT * FROM read_parquet('{glob}')")

    def _write(self, tables: dict[str, pa.Table]) -> None:
        n = self._files
        self._files += 1
        for kind, table in tables.items():
            if table.num_rows or n == 0:
                pq.write_table(table, self.dir / f"{kind}-{n:06d}.parquet",
                               compression="snappy")

    def add(self, batch: Batch, rejected: pa.Table | None = None) -> None:
        """Stage one batch; nothing touches the warehouse tables until ``merge``."""
        tables = {"runs": batch.runs, "workflows": batch.workflows, "nodes": batch.run_nodes}
        if rejected is not None:
            tables["rejected"] = rejected
        self._write(tables)

    def distinct_between(self, lo: int, hi: int, not_newer_than: datetime | None = None) -> int:
        """Distinct runs among the sightings with arrival seq in [lo, hi] (one walk pass),
        optionally only those created at or before ``not_newer_than``."""
        return self.con.execute(
            "SELECT count(DISTINCT id) FROM stage_runs WHERE _seq BETWEEN ? AND ? "
            "AND (?::TIMESTAMPTZ IS NULL OR created_at <= ?::TIMESTAMPTZ)",
            [lo, hi, not_newer_than, not_newer_than]).fetchall()[0][0]

    def old_discoveries(self, lo: int, hi: int, newest_before: datetime | None = None) -> int:
        """Runs first sighted in [lo, hi] that are not newer than ``newest_before`` (default:
        the newest run sighted before ``lo``): runs an earlier pass skipped, as opposed to runs
        created while the sync was walking."""
        return self.con.execute("""
            WITH before AS (SELECT id, created_at FROM stage_runs WHERE _seq < $lo)
            SELECT count(DISTINCT id) FROM stage_runs
            WHERE _seq BETWEEN $lo AND $hi
              AND created_at <= coalesce($newest, (SELECT max(created_at) FROM before))
              AND id NOT IN (SELECT id FROM before)""",
                                {"lo": lo, "hi": hi, "newest": newest_before}).fetchall()[0][0]

    def merge(self) -> MergeCounts:
        """Upsert the freshest staged snapshot of every run and workflow."""
        con, cols = self.con, RUN_COLUMNS
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE run_changes AS
            WITH latest AS (SELECT id, max(_seq) AS _seq FROM stage_runs GROUP BY id),
            cur AS (SELECT s.* FROM stage_runs s JOIN latest USING (id, _seq))
            SELECT c.id, c._seq, r._first_seen_at,
                   CASE WHEN r.id IS NULL THEN 'new'
                        WHEN r._deleted_at IS NOT NULL OR {_changed(cols, 'c', 'r')}
                        THEN 'updated' ELSE 'unchanged' END AS change,
                   r._deleted_at IS NOT NULL AS undeleted
            FROM cur c LEFT JOIN runs r USING (id)""")
        con.execute("DELETE FROM runs WHERE id IN "
                    "(SELECT id FROM run_changes WHERE change = 'updated')")
        con.execute(f"""
            INSERT INTO runs ({_list(cols)}, _first_seen_at, _synced_at, _deleted_at, _sync_id)
            SELECT {_list(cols, 's.')}, coalesce(d._first_seen_at, now()), now(), NULL, ?
            FROM stage_runs s JOIN run_changes d ON s.id = d.id AND s._seq = d._seq
            WHERE d.change <> 'unchanged'""", [self.sync_id])
        con.execute("DELETE FROM run_nodes WHERE run_id IN "
                    "(SELECT id FROM run_changes WHERE change = 'updated')")
        con.execute("""
            INSERT INTO run_nodes (run_id, position, node_id)
            SELECT n.run_id, n.position, n.node_id
            FROM stage_nodes n JOIN run_changes d ON n.run_id = d.id AND n._seq = d._seq
            WHERE d.change <> 'unchanged'""")
        new, updated, unchanged, undeleted = con.execute("""
            SELECT count(*) FILTER (change = 'new'), count(*) FILTER (change = 'updated'),
                   count(*) FILTER (change = 'unchanged'), count(*) FILTER (undeleted)
            FROM run_changes""").fetchall()[0]
        wf_new, wf_updated = self._merge_workflows()
        return MergeCounts(new, updated, unchanged, undeleted, wf_new, wf_updated)

    def _merge_workflows(self) -> tuple[int, int]:
        con, cols = self.con, WORKFLOW_COLUMNS
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE wf_changes AS
            WITH cur AS (SELECT * FROM stage_workflows
                         QUALIFY row_number() OVER (PARTITION BY id ORDER BY _seq DESC) = 1)
            SELECT c.*, w._first_seen_at AS _prev_first_seen, w.id IS NULL AS _is_new
            FROM cur c LEFT JOIN workflows w USING (id)
            WHERE w.id IS NULL OR {_changed(cols, 'c', 'w')}""")
        con.execute("DELETE FROM workflows WHERE id IN "
                    "(SELECT id FROM wf_changes WHERE NOT _is_new)")
        con.execute(f"""
            INSERT INTO workflows ({_list(cols)}, _first_seen_at, _synced_at, _sync_id)
            SELECT {_list(cols)}, coalesce(_prev_first_seen, now()), now(), ?
            FROM wf_changes""", [self.sync_id])
        return con.execute("SELECT count(*) FILTER (_is_new), count(*) FILTER (NOT _is_new) "
                           "FROM wf_changes").fetchall()[0]

    def save_rejected(self) -> int:
        (n,) = self.con.execute("SELECT count(*) FROM stage_rejected").fetchall()[0]
        self.con.execute("INSERT INTO rejected_records SELECT ?, page, item_index, run_id, "
                         "error, raw, now() FROM stage_rejected", [self.sync_id])
        return n

    def mark_deleted(self, ids: list[str], *, max_fraction: float | None) -> int:
        """Soft-delete the live runs among ``ids`` (confirmed gone: 404 by id). Refuses with
        DataError beyond ``max_fraction`` of the live runs (None = no limit)."""
        con = self.con
        con.execute("CREATE OR REPLACE TEMP TABLE gone AS SELECT unnest($ids::VARCHAR[]) AS id",
                    {"ids": ids})
        (n,) = con.execute("SELECT count(DISTINCT id) FROM runs WHERE _deleted_at IS NULL "
                           "AND id IN (SELECT id FROM gone)").fetchall()[0]
        (live,) = con.execute("SELECT count(*) FROM runs WHERE _deleted_at IS NULL").fetchall()[0]
        if max_fraction is not None:
            check_mass_delete(n, live, max_fraction)
        if n:
            con.execute("UPDATE runs SET _deleted_at = now(), _synced_at = now(), _sync_id = ? "
                        "WHERE _deleted_at IS NULL AND id IN (SELECT id FROM gone)",
                        [self.sync_id])
        return n

    def close(self) -> None:
        """Drop the views and temp tables and delete the staged files."""
        for view in ("stage_runs", "stage_workflows", "stage_nodes", "stage_rejected"):
            self.con.execute(f"DROP VIEW IF EXISTS {view}")
        for table in ("run_changes", "wf_changes", "gone"):
            self.con.execute(f"DROP TABLE IF EXISTS {table}")
        shutil.rmtree(self.dir, ignore_errors=True)
