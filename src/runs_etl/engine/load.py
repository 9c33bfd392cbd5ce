"""Load: merge one sync's staged snapshots into the warehouse tables, inside its transaction.

The freshest snapshot of each run wins (highest arrival ``_seq``; a page holds each run once, see
``models.parse_page``, so (id, _seq) is a key); an unchanged run is not rewritten. Deletes are
soft (``_deleted_at``) and only for runs confirmed gone, behind a mass-delete breaker.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime

from ..errors import DataError
from ..warehouse import ledger
from ..warehouse.connect import column_types
from ..warehouse.ledger import SyncResult
from .models import RUN_FIELDS
from .normalize import RUNS_SCHEMA, WORKFLOWS_SCHEMA, data_columns

log = logging.getLogger("runs_etl.load")

STATE_KNOWN_EXTRA = "known_extra_fields"

RUN_COLUMNS = data_columns(RUNS_SCHEMA)
# The columns ``run_history`` versions: a change to any of them is a new version of the run.
HISTORY_COLUMNS = ("status", "progress", "finished_at", "workflow_id")
# The time rows are stamped with: the load's own transaction, unless a replay passes ``at``.
_NOW = "coalesce($at::TIMESTAMPTZ, now())"
WORKFLOW_COLUMNS = data_columns(WORKFLOWS_SCHEMA)


@dataclass
class MergeCounts:
    rows_new: int = 0
    rows_updated: int = 0
    rows_unchanged: int = 0
    rows_undeleted: int = 0
    workflows_new: int = 0
    workflows_updated: int = 0


def _changed(cols: Sequence[str], a: str, b: str) -> str:
    return " OR ".join(f"{a}.{c} IS DISTINCT FROM {b}.{c}" for c in cols if c != "id")


def _list(cols: Sequence[str], prefix: str = "") -> str:
    return ", ".join(prefix + c for c in cols)


def check_mass_delete(n: int, live: int, max_fraction: float) -> None:
    """The circuit breaker: refuse to mark more than ``max_fraction`` of live runs deleted."""
    if n and n > max_fraction * live:
        raise DataError(
            f"refusing to mark {n} of {live} runs deleted ({n / live:.1%} > "
            f"sync.max_delete_fraction {max_fraction:.1%}); nothing was committed. If the "
            "source really lost them, run again with --allow-mass-delete")


def apply_staged(con, result: SyncResult, workspace: str, gone_ids: list[str], *,
                 max_fraction: float | None, started_at: datetime,
                 at: datetime | None = None) -> None:
    """The load proper, one sequence for a sync and for its replay, inside their transaction:
    merge the staged snapshots, mark the runs confirmed gone deleted, version ``run_history``
    and keep the rejected records; the counts go onto ``result`` (its ``sync_id`` is the
    load's)."""
    sync_id = result.sync_id
    for k, v in asdict(merge(con, workspace, sync_id, at=at)).items():
        setattr(result, k, v)
    result.rows_deleted = mark_deleted(con, workspace, sync_id, gone_ids,
                                       max_fraction=max_fraction, at=at)
    record_history(con, workspace, sync_id, started_at)
    result.rows_rejected = save_rejected(con, workspace, sync_id)


def merge(con, workspace: str, sync_id: int, *, at: datetime | None = None) -> MergeCounts:
    """Upsert the freshest staged snapshot of every run and workflow of ``workspace``. Rows are
    stamped with the transaction's time, or ``at`` (a replay repeats the original load's)."""
    p = {"ws": workspace, "sync": sync_id, "at": at}
    (holds_runs,) = con.execute("SELECT EXISTS (SELECT 1 FROM runs WHERE workspace = $ws)",
                                {"ws": workspace}).fetchall()[0]
    if holds_runs:
        _upsert_runs(con, workspace, p)
    else:
        _insert_first_runs(con, p)
    # One row per element of node_ids of the runs just written, read back from the table (the
    # two set-returning functions advance together: element i at position i - 1).
    con.execute("""
        INSERT INTO run_nodes (workspace, run_id, position, node_id)
        SELECT $ws, r.id, generate_subscripts(r.node_ids, 1) - 1, unnest(r.node_ids)
        FROM runs r JOIN run_changes d ON r.id = d.id
        WHERE r.workspace = $ws AND d.change <> 'unchanged'""", {"ws": workspace})
    new, updated, unchanged, undeleted = con.execute("""
        SELECT count(*) FILTER (change = 'new'), count(*) FILTER (change = 'updated'),
               count(*) FILTER (change = 'unchanged'), count(*) FILTER (undeleted)
        FROM run_changes""").fetchall()[0]
    wf_new, wf_updated = _merge_workflows(con, workspace, sync_id, at)
    return MergeCounts(new, updated, unchanged, undeleted, wf_new, wf_updated)


def _upsert_runs(con, workspace: str, p: dict) -> None:
    """Classify each staged run against the warehouse (``run_changes``: new, updated or
    unchanged), then rewrite the new and updated ones with their nodes removed."""
    cols = RUN_COLUMNS
    # Narrow from the start: each run's latest sighting, and each run the warehouse holds, is
    # reduced to its id, the few columns kept here and a 64-bit hash of its data columns as it
    # is read, so the two sides meet as narrow rows. Joining the rows themselves, every column,
    # ran out of a 64MB memory_limit at 100k runs and of 128MB at 1M (staged files of 5000
    # runs); this takes half the time there. See ``_row_hash`` for what equal hashes mean.
    history = _list(HISTORY_COLUMNS, "s.")
    types = column_types(con, "runs")
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE run_changes AS
        WITH latest AS (SELECT id, max(_seq) AS _seq FROM stage_runs GROUP BY id),
        cur AS (SELECT s.id, s._seq, {history}, {_row_hash(cols, types, "s.")} AS _data
                FROM stage_runs s JOIN latest USING (id, _seq)),
        known AS (SELECT c.*, r._first_seen_at, r._deleted_at, r._data AS _stored,
                         r.id IS NOT NULL AS existing
                  FROM cur c LEFT JOIN (SELECT id, _first_seen_at, _deleted_at,
                                               {_row_hash(cols, types)} AS _data
                                        FROM runs WHERE workspace = $ws) r USING (id))
        SELECT id, _seq, _first_seen_at,
               CASE WHEN NOT existing THEN 'new'
                    WHEN _deleted_at IS NOT NULL OR _data <> _stored THEN 'updated'
                    ELSE 'unchanged' END AS change,
               _deleted_at IS NOT NULL AS undeleted, {_list(HISTORY_COLUMNS)}
        FROM known""", {"ws": workspace})
    con.execute("DELETE FROM runs WHERE workspace = $ws AND id IN "
                "(SELECT id FROM run_changes WHERE change = 'updated')", {"ws": workspace})
    con.execute(f"""
        INSERT INTO runs (workspace, {_list(cols)}, _first_seen_at, _synced_at, _deleted_at,
                          _sync_id)
        SELECT $ws, {_list(cols, 's.')}, coalesce(d._first_seen_at, {_NOW}), {_NOW}, NULL, $sync
        FROM stage_runs s JOIN run_changes d ON s.id = d.id AND s._seq = d._seq
        WHERE d.change <> 'unchanged'""", p)
    con.execute("DELETE FROM run_nodes WHERE workspace = $ws AND run_id IN "
                "(SELECT id FROM run_changes WHERE change = 'updated')", {"ws": workspace})


def _row_hash(cols: Sequence[str], types: dict[str, str], prefix: str = "") -> str:
    """SQL for a 64-bit hash of ``cols`` that is equal for a staged and a stored row exactly
    when their values are (``IS NOT DISTINCT FROM`` column by column), but for a chance of
    2^-64. Each value is first cast to the stored column's type (JSON as its text), so a staged
    column typed otherwise cannot make every run look changed; and the hash covers which
    values are NULL, because DuckDB's ``hash`` (fast, not collision-resistant) gives a NULL
    list and an empty one the same value."""
    values = [f"CAST({prefix}{c} AS {'VARCHAR' if types[c] == 'JSON' else types[c]})"
              for c in cols]
    nulls = ", ".join(f"{prefix}{c} IS NULL" for c in cols)
    return f"hash({', '.join(values)}, [{nulls}])"


def _insert_first_runs(con, p: dict) -> None:
    """A workspace's first load (its warehouse holds none of its runs): every staged run is new,
    so the freshest sighting of each is written straight from the staged files, without the
    join that pairs each one with its classification (~30% of a 100k-run first load)."""
    latest = "FROM stage_runs QUALIFY _seq = max(_seq) OVER (PARTITION BY id)"
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE run_changes AS
        SELECT id, _seq, NULL::TIMESTAMPTZ AS _first_seen_at, 'new' AS change,
               false AS undeleted, {_list(HISTORY_COLUMNS)} {latest}""")
    con.execute(f"""
        INSERT INTO runs (workspace, {_list(RUN_COLUMNS)}, _first_seen_at, _synced_at,
                          _deleted_at, _sync_id)
        SELECT $ws, {_list(RUN_COLUMNS)}, {_NOW}, {_NOW}, NULL, $sync {latest}""", p)


def _merge_workflows(con, workspace: str, sync_id: int, at: datetime | None) -> tuple[int, int]:
    cols = WORKFLOW_COLUMNS
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE wf_changes AS
        WITH cur AS (SELECT * FROM stage_workflows
                     QUALIFY row_number() OVER (PARTITION BY id ORDER BY _seq DESC) = 1),
        mine AS (SELECT * FROM workflows WHERE workspace = $ws)
        SELECT c.*, w._first_seen_at AS _prev_first_seen, w.id IS NULL AS _is_new
        FROM cur c LEFT JOIN mine w USING (id)
        WHERE w.id IS NULL OR {_changed(cols, 'c', 'w')}""", {"ws": workspace})
    con.execute("DELETE FROM workflows WHERE workspace = $ws AND id IN "
                "(SELECT id FROM wf_changes WHERE NOT _is_new)", {"ws": workspace})
    con.execute(f"""
        INSERT INTO workflows (workspace, {_list(cols)}, _first_seen_at, _synced_at, _sync_id)
        SELECT $ws, {_list(cols)}, coalesce(_prev_first_seen, {_NOW}), {_NOW}, $sync
        FROM wf_changes""", {"ws": workspace, "sync": sync_id, "at": at})
    return con.execute("SELECT count(*) FILTER (_is_new), count(*) FILTER (NOT _is_new) "
                       "FROM wf_changes").fetchall()[0]


def record_history(con, workspace: str, sync_id: int, valid_from: datetime) -> int:
    """Version the runs this sync saw in ``run_history``, after ``merge`` (whose
    ``run_changes`` it reads) and ``mark_deleted`` in the same transaction; returns the
    versions opened.

    A run whose tracked fields (``HISTORY_COLUMNS``) match its open version only moves that
    version's ``_last_seen_at`` to ``valid_from`` (this sync's start). A changed run closes its
    open version at ``valid_from`` and opens a new one whose ``observed_after`` is the last
    sighting of the old one: the change happened between the two. A run deleted at the source
    closes its open version."""
    p = {"ws": workspace, "t": valid_from}
    con.execute("UPDATE run_history SET valid_to = $t WHERE workspace = $ws AND valid_to IS NULL "
                "AND run_id IN (SELECT id FROM runs WHERE workspace = $ws "
                "AND _deleted_at IS NOT NULL)", p)
    tracked = _list(HISTORY_COLUMNS, "s.")
    # ``run_changes`` (from ``merge``) holds the tracked columns of each run's latest sighting.
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE history_seen AS
        WITH open AS (SELECT * FROM run_history WHERE workspace = $ws AND valid_to IS NULL)
        SELECT s.id AS run_id, {tracked}, h._last_seen_at AS prev_seen,
               h.run_id IS NOT NULL AS has_open,
               h.run_id IS NULL OR {_changed(HISTORY_COLUMNS, 's', 'h')} AS changed
        FROM run_changes s LEFT JOIN open h ON h.run_id = s.id""", {"ws": workspace})
    con.execute("UPDATE run_history SET _last_seen_at = $t WHERE workspace = $ws "
                "AND valid_to IS NULL AND run_id IN "
                "(SELECT run_id FROM history_seen WHERE NOT changed)", p)
    con.execute("UPDATE run_history SET valid_to = $t WHERE workspace = $ws "
                "AND valid_to IS NULL AND run_id IN "
                "(SELECT run_id FROM history_seen WHERE changed AND has_open)", p)
    cols = _list(HISTORY_COLUMNS)
    con.execute(f"""
        INSERT INTO run_history (workspace, run_id, valid_from, valid_to, {cols},
                                 observed_after, _last_seen_at, _sync_id)
        SELECT $ws, run_id, $t, NULL, {cols}, prev_seen, $t, $sync
        FROM history_seen WHERE changed""", {**p, "sync": sync_id})
    return con.execute("SELECT count(*) FROM history_seen WHERE changed").fetchall()[0][0]


def save_rejected(con, workspace: str, sync_id: int) -> int:
    (n,) = con.execute("SELECT count(*) FROM stage_rejected").fetchall()[0]
    con.execute("INSERT INTO rejected_records (workspace, sync_id, page, item_index, run_id, "
                "error, raw, rejected_at) SELECT $ws, $sync, page, item_index, run_id, error, "
                "raw, now() FROM stage_rejected", {"ws": workspace, "sync": sync_id})
    return n


def live_count(con, workspace: str) -> int:
    """Live runs of ``workspace`` in the warehouse (the mass-delete breaker's denominator)."""
    return con.execute("SELECT count(*) FROM runs WHERE workspace = ? AND _deleted_at IS NULL",
                       [workspace]).fetchall()[0][0]


def mark_deleted(con, workspace: str, sync_id: int, ids: list[str], *,
                 max_fraction: float | None, at: datetime | None = None) -> int:
    """Soft-delete the live runs of ``workspace`` among ``ids`` (confirmed gone: 404 by id).
    Refuses with DataError beyond ``max_fraction`` of the workspace's live runs (None = no
    limit)."""
    con.execute("CREATE OR REPLACE TEMP TABLE gone AS SELECT unnest($ids::VARCHAR[]) AS id",
                {"ids": ids})
    live_runs = "FROM runs WHERE workspace = $ws AND _deleted_at IS NULL"
    (n,) = con.execute(f"SELECT count(DISTINCT id) {live_runs} AND id IN (SELECT id FROM gone)",
                       {"ws": workspace}).fetchall()[0]
    live = live_count(con, workspace)
    if max_fraction is not None:
        check_mass_delete(n, live, max_fraction)
    if n:
        con.execute(f"UPDATE runs SET _deleted_at = {_NOW}, _synced_at = {_NOW}, "
                    "_sync_id = $sync WHERE workspace = $ws AND _deleted_at IS NULL "
                    "AND id IN (SELECT id FROM gone)",
                    {"ws": workspace, "sync": sync_id, "at": at})
    return n


def new_extra_fields(con, workspace: str) -> list[str]:
    """Top-level fields the API sent that no earlier sync of ``workspace`` saw (unknown to
    ``Run``, so kept in ``extra``): logged once and remembered, so schema drift is seen, not
    silently absorbed."""
    rows = con.execute("SELECT DISTINCT unnest(json_keys(extra)) FROM stage_runs "
                       "WHERE extra IS NOT NULL").fetchall()
    baseline = ledger.get_state(con, workspace, STATE_KNOWN_EXTRA)
    known = set(baseline or [])
    new = sorted({k for (k,) in rows} - known - RUN_FIELDS)
    if new:
        ledger.set_state(con, workspace, STATE_KNOWN_EXTRA, sorted(known | set(new)))
        # The first fields a warehouse sees are its baseline, not drift: worth a line, not an
        # alarm. Fields that appear later are the API changing under the warehouse.
        log.log(logging.INFO if baseline is None else logging.WARNING,
                "workspace %s: the API sends fields runs-etl does not know (kept in "
                "runs.extra): %s", workspace, ", ".join(new),
                extra={"event": "new_api_fields", "fields": new, "workspace": workspace})
    return new


def drop_work_tables(con) -> None:
    """The merge's temp tables, once the sync's transaction has ended."""
    for table in ("run_changes", "wf_changes", "gone", "history_seen"):
        con.execute(f"DROP TABLE IF EXISTS {table}")
