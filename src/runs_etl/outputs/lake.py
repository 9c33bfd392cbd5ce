"""Delta Lake tables beside the warehouse: ``runs``, ``workflows``, ``run_nodes``, ``sync_runs``
under ``lake.uri`` (a local folder or ``s3://bucket/prefix``), for Spark, Trino, Databricks and
any Delta reader.

The lake is written after the warehouse commit, by MERGE on each table's key, with only the rows
whose ``_sync_id`` is newer than the sync the table last applied. Every commit records that sync
in its commit metadata (``runs_etl.sync_id``), so the lake knows where it stands from its own
history: a failed write leaves the previous version, and the next write catches up every change
since, however many syncs it missed. ``sync_runs`` is written last: its sync id is the lake's.

Data goes DuckDB -> Arrow record batches -> delta-rs; no row passes through Python.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from ..config import Settings, redact_url
from ..errors import LakeError
from ..warehouse.connect import open_read_only, select_list, sql_string

log = logging.getLogger("runs_etl.lake")

TABLES = ("runs", "workflows", "run_nodes", "sync_runs")
KEYS = {"runs": ("workspace", "id"), "workflows": ("workspace", "id"),
        "run_nodes": ("workspace", "run_id", "position"), "sync_runs": ("sync_id",)}
SYNC_ID_KEY = "runs_etl.sync_id"  # in every commit's metadata: the warehouse sync it reflects
MONTH_COLUMN = "created_month"  # runs' partition column: the UTC month of created_at, 'YYYY-MM'
BATCH_ROWS = 65_536  # Arrow batch size out of DuckDB: memory stays flat whatever the table size
COMMIT_ATTEMPTS = 3  # a MERGE that lost a race with `lake optimize` is recomputed and retried
HISTORY_PEEK = 20  # commits read before the whole history, looking for SYNC_ID_KEY
HELD_FILTER_ROWS = 1_000_000  # lake node rows gathered before one is_in filter over them
PRUNE_VALUES_MAX = 1_000  # partition values named in a MERGE predicate; beyond, no pruning
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

T = TypeVar("T")


@dataclass
class LakeResult:
    """What one lake write did; ``str()`` is its log line."""

    uri: str
    sync_id: int
    rows: dict[str, int] = field(default_factory=dict)  # rows merged (or written) per table
    versions: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    verb: str = "merged"  # "rebuilt" for ``rebuild_lake``

    def __str__(self) -> str:
        rows = ", ".join(f"{t} {n}" for t, n in self.rows.items())
        return (f"lake {self.uri} at sync {self.sync_id} (runs version "
                f"{self.versions.get('runs')}): {self.verb} {rows} in {self.seconds:.2f}s")


# --- settings -> delta-rs ---------------------------------------------------------------------

def _deltalake() -> Any:
    try:
        import deltalake
    except ImportError:
        raise LakeError("lake.uri is set but the deltalake package is missing: "
                        "pip install 'runs-etl[lake]'") from None
    return deltalake


def _root(settings: Settings) -> str:
    uri = settings.lake.uri
    if uri is None:
        raise LakeError("no lake configured: set RUNS_ETL_LAKE_URI or [lake] uri")
    if "://" in uri:
        return uri
    return str(Path(uri).expanduser().resolve())  # relative to where the command runs


def table_uri(settings: Settings, table: str) -> str:
    return f"{_root(settings)}/{table}"


def _describe(e: BaseException, settings: Settings) -> str:
    """delta-rs errors span several coloured lines: one plain line, secrets replaced."""
    text = " ".join(_ANSI.sub("", str(e)).replace("↳", " ").split()) or type(e).__name__
    for secret in settings.lake.storage().values():
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return redact_url(text[:400])


@contextmanager
def _lake_errors(settings: Settings, doing: str) -> Iterator[None]:
    """delta-rs and object-store failures (DeltaError, OSError for I/O, Arrow errors) become
    one LakeError; anything else is a bug and keeps its traceback."""
    dl = _deltalake()
    try:
        yield
    except (dl.exceptions.DeltaError, OSError, pa.ArrowException) as e:
        raise LakeError(f"{doing} {redact_url(_root(settings))}: "
                        f"{_describe(e, settings)}") from None


def _open(settings: Settings, table: str) -> Any:
    """The Delta table, or None when it does not exist yet."""
    dl = _deltalake()
    try:
        return dl.DeltaTable(table_uri(settings, table), storage_options=settings.lake.storage())
    except dl.exceptions.TableNotFoundError:
        return None


def _commit(sync_id: int, **extra: str) -> Any:
    return _deltalake().CommitProperties(custom_metadata={SYNC_ID_KEY: str(sync_id), **extra})


# Commits that rewrite files without applying a sync.
MAINTENANCE = frozenset({"OPTIMIZE", "VACUUM START", "VACUUM END"})


def applied_sync_id(dt: Any) -> int | None:
    """The sync the table last applied, from the newest commit that applied one. Maintenance
    commits (optimize, vacuum) are passed over: one that raced a MERGE may carry the sync id
    from before it."""
    for limit in (HISTORY_PEEK, None):
        commits = dt.history(limit)
        for commit in commits:  # newest first
            if SYNC_ID_KEY in commit and commit.get("operation") not in MAINTENANCE:
                return int(commit[SYNC_ID_KEY])
        if limit is None or len(commits) < limit:
            return None
    return None


def _retrying(fn: Callable[[], T]) -> T:
    """A commit that conflicts with a concurrent one (optimize, another writer) is redone on
    the new version of the table."""
    conflict = _deltalake().exceptions.CommitFailedError
    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        try:
            return fn()
        except conflict:
            if attempt == COMMIT_ATTEMPTS:
                raise
            log.info("lake commit conflicted with another writer; retrying")
    raise AssertionError("unreachable")


# --- DuckDB -> Arrow ------------------------------------------------------------------------------

def _source_sql(con, table: str, settings: Settings) -> str:
    cols = select_list(con, table)
    if table == "runs" and settings.lake.partition_by_month:
        cols += (f", strftime(created_at AT TIME ZONE 'UTC', '%Y-%m') AS {MONTH_COLUMN}")
    return f"SELECT {cols} FROM {table}"


def _reader(con, sql: str, params: dict | None = None) -> pa.RecordBatchReader:
    rel = con.sql(sql, params=params) if params else con.sql(sql)
    if hasattr(rel, "to_arrow_reader"):  # DuckDB 2
        return rel.to_arrow_reader(BATCH_ROWS)
    return rel.fetch_arrow_reader(BATCH_ROWS)  # DuckDB 1.x


def _count(con, sql: str, params: dict | None = None) -> int:
    return con.execute(f"SELECT count(*) FROM ({sql})", params or {}).fetchall()[0][0]


def _changes(con, table: str, settings: Settings, since: int) -> tuple[str, dict]:
    """Rows of ``table`` written by syncs after ``since``."""
    base = _source_sql(con, table, settings)
    if table == "sync_runs":
        return f"{base} WHERE sync_id > $since", {"since": since}
    return f"{base} WHERE _sync_id > $since", {"since": since}


def _partitions(table: str, settings: Settings) -> list[str] | None:
    if table == "runs":
        return ["workspace", MONTH_COLUMN] if settings.lake.partition_by_month else ["workspace"]
    return None


def _check_layout(settings: Settings, dt: Any, table: str) -> None:
    """A table partitioned otherwise than these settings write it (``partition_by_month``
    changed without a rebuild) cannot be merged into: the MERGE names its partitions."""
    want = _partitions(table, settings) or []
    have = list(dt.metadata().partition_columns)
    if have != want:
        raise LakeError(f"{table_uri(settings, table)} is partitioned by {have or 'nothing'}, "
                        f"this runs-etl writes it partitioned by {want or 'nothing'}: run "
                        "`runs-etl lake rebuild` to rewrite the lake in this layout")


# --- writing ----------------------------------------------------------------------------------

def _create(settings: Settings, con, table: str, sync_id: int) -> int:
    """Write the whole table as version 0."""
    sql = _source_sql(con, table, settings)
    _deltalake().write_deltalake(
        table_uri(settings, table), _reader(con, sql), mode="error",
        partition_by=_partitions(table, settings), storage_options=settings.lake.storage(),
        commit_properties=_commit(sync_id))
    return _count(con, sql)


def _partition_values(con, sql: str, params: dict,
                      columns: list[str]) -> dict[str, list[str | None]]:
    """The values each partition column takes in the rows of ``sql``; a column with more than
    PRUNE_VALUES_MAX of them is left out (it would not prune)."""
    out = {}
    for c in columns:
        values = [v for (v,) in con.execute(f'SELECT DISTINCT "{c}" FROM ({sql})',
                                            params).fetchall()]
        if len(values) <= PRUNE_VALUES_MAX:
            out[c] = values
    return out


def _partition_filter(values: dict[str, list[str | None]]) -> str:
    """`` AND t.<col> IN (...)`` per partition column, listing the values the change set holds,
    so that delta-rs reads and rewrites only those partitions: a MERGE streams its source, so
    delta-rs derives no such pruning from the source by itself and would scan every file of the
    table. Joining on the key alone stays correct because a run never changes partition:
    ``workspace`` is part of the key and ``created_month`` comes from ``created_at``, which the
    API sets when the run is created (the walk is ordered by it)."""
    out = ""
    for c, vals in values.items():
        listed = [sql_string(str(v)) for v in vals if v is not None]
        terms = [f"t.{c} IN ({', '.join(listed)})"] if listed else []
        if None in vals:
            terms.append(f"t.{c} IS NULL")
        out += f" AND ({' OR '.join(terms) or 'FALSE'})"
    return out


def _merge_rows(settings: Settings, con, dt: Any, table: str, since: int, sync_id: int) -> int:
    sql, params = _changes(con, table, settings, since)
    n = _count(con, sql, params)
    if n == 0:
        return 0
    on = " AND ".join(f"t.{k} = s.{k}" for k in KEYS[table])
    on += _partition_filter(_partition_values(con, sql, params,
                                              _partitions(table, settings) or []))
    (dt.merge(_reader(con, sql, params), on, source_alias="s", target_alias="t",
              merge_schema=True, commit_properties=_commit(sync_id))
       .when_matched_update_all().when_not_matched_insert_all().execute())
    return n


def _held_nodes(dt: Any, run_ids: pa.ChunkedArray) -> pa.Table:
    """The lake's (workspace, run_id, position) rows of ``run_ids``, filtered batch by batch
    rather than in the scan: delta-rs writes strings as ``string_view``, and pyarrow cannot test
    a filter against such a file's statistics (``greater_equal`` has no (string, string_view)
    kernel), so a pushed-down filter fails once the lake holds a file whose range covers an id.
    The MERGE that follows reads every file of the table anyway."""
    dataset = dt.to_pyarrow_dataset()
    columns = ["workspace", "run_id", "position"]
    schema = pa.schema([dataset.schema.field(c) for c in columns])  # Delta's types: string
    wanted = run_ids.cast(schema.field("run_id").type)
    parts, rows = [schema.empty_table()], 0
    pending: list[pa.RecordBatch] = []

    def flush() -> None:  # is_in hashes ``wanted`` on each call: once per HELD_FILTER_ROWS
        part = pa.Table.from_batches(pending).cast(schema)
        parts.append(part.filter(pc.is_in(part["run_id"], value_set=wanted)))
        pending.clear()

    for batch in dataset.to_batches(columns=columns):
        pending.append(batch)
        rows += batch.num_rows
        if rows >= HELD_FILTER_ROWS:
            flush()
            rows = 0
    if pending:
        flush()
    return pa.concat_tables(parts)


def _merge_nodes(settings: Settings, con, dt: Any, since: int, sync_id: int) -> int:
    """A run's nodes are rewritten when its run row changed: its current nodes are upserted and
    positions the lake holds beyond them (the list shrank) deleted, in one MERGE."""
    changed = "SELECT workspace, id FROM runs WHERE _sync_id > $since"
    ids = _reader(con, f"SELECT DISTINCT id FROM ({changed})", {"since": since}).read_all()
    if ids.num_rows == 0:
        return 0
    con.register("lake_held_nodes", _held_nodes(dt, ids.column(0)))
    try:
        sql = f"""
            WITH changed AS ({changed}),
            cur AS (SELECT n.workspace, n.run_id, n.position, n.node_id FROM run_nodes n
                    JOIN changed c ON n.workspace = c.workspace AND n.run_id = c.id)
            SELECT *, 'u' AS _op FROM cur
            UNION ALL
            SELECT h.workspace, h.run_id, h.position, NULL, 'd' FROM lake_held_nodes h
            JOIN changed c ON h.workspace = c.workspace AND h.run_id = c.id
            WHERE NOT EXISTS (SELECT 1 FROM cur WHERE cur.workspace = h.workspace
                              AND cur.run_id = h.run_id AND cur.position = h.position)"""
        n = _count(con, sql, {"since": since})
        if n == 0:
            return 0
        cols = {c: f"s.{c}" for c in ("workspace", "run_id", "position", "node_id")}
        on = " AND ".join(f"t.{k} = s.{k}" for k in KEYS["run_nodes"])
        (dt.merge(_reader(con, sql, {"since": since}), on, source_alias="s", target_alias="t",
                  commit_properties=_commit(sync_id))
           .when_matched_delete("s._op = 'd'")
           .when_matched_update({"node_id": "s.node_id"}, "s._op = 'u'")
           .when_not_matched_insert(cols, "s._op = 'u'")
           .execute())
        return n
    finally:
        con.unregister("lake_held_nodes")


def _write_table(settings: Settings, con, table: str, sync_id: int) -> tuple[int, int]:
    """Bring one table up to ``sync_id``; (rows merged, table version)."""

    def attempt() -> tuple[int, int]:
        dt = _open(settings, table)
        if dt is None:
            n = _create(settings, con, table, sync_id)
            return n, 0
        since = applied_sync_id(dt)
        if since is None:  # a table runs-etl did not write: only a rebuild may replace it
            raise LakeError(f"{table_uri(settings, table)} has no {SYNC_ID_KEY} in its history: "
                            "not written by runs-etl; run `runs-etl lake rebuild` to replace it")
        if since >= sync_id:
            return 0, dt.version()
        if table == "runs":
            _check_layout(settings, dt, table)
        if table == "run_nodes":
            n = _merge_nodes(settings, con, dt, since, sync_id)
        else:
            n = _merge_rows(settings, con, dt, table, since, sync_id)
        if n:
            dt.update_incremental()
        return n, dt.version()

    return _retrying(attempt)


def _warehouse_sync_id(con) -> int:
    """The newest sync the connection's warehouse holds: every row it wrote is final here."""
    return con.execute("SELECT coalesce(max(sync_id), 0) FROM sync_runs").fetchall()[0][0]


def write_lake(settings: Settings, con) -> LakeResult:
    """Merge into every lake table the rows changed since the sync it last applied, up to the
    newest sync of ``con``'s warehouse. ``sync_runs`` goes last: once it names a sync, every
    table holds that sync's rows. LakeError when the lake cannot be read or written."""
    t0 = time.monotonic()
    sync_id = _warehouse_sync_id(con)
    result = LakeResult(redact_url(_root(settings)), sync_id)
    with _lake_errors(settings, "lake write to"):
        for table in TABLES:
            result.rows[table], result.versions[table] = _write_table(settings, con, table,
                                                                      sync_id)
    result.seconds = time.monotonic() - t0
    return result


def rebuild_lake(settings: Settings) -> LakeResult:
    """Write every lake table afresh (a new version replacing all rows) from the published
    warehouse snapshot; also the way to change ``partition_by_month``."""
    t0 = time.monotonic()
    con = open_read_only(settings.warehouse)
    try:
        sync_id = _warehouse_sync_id(con)
        result = LakeResult(redact_url(_root(settings)), sync_id, verb="rebuilt")
        with _lake_errors(settings, "lake rebuild of"):
            for table in TABLES:
                sql = _source_sql(con, table, settings)
                _deltalake().write_deltalake(
                    table_uri(settings, table), _reader(con, sql), mode="overwrite",
                    schema_mode="overwrite", partition_by=_partitions(table, settings),
                    storage_options=settings.lake.storage(),
                    commit_properties=_commit(sync_id, **{"runs_etl.operation": "rebuild"}))
                result.rows[table] = _count(con, sql)
                result.versions[table] = _open(settings, table).version()
    finally:
        con.close()
    result.seconds = time.monotonic() - t0
    return result


# --- maintenance ------------------------------------------------------------------------------

def _existing(settings: Settings) -> Iterator[tuple[str, Any]]:
    found = False
    for table in TABLES:
        dt = _open(settings, table)
        if dt is not None:
            found = True
            yield table, dt
    if not found:
        raise LakeError(f"no lake tables under {redact_url(_root(settings))}: run `runs-etl "
                        "sync` or `runs-etl lake rebuild` first")


def optimize_lake(settings: Settings, *, zorder: bool = False) -> dict[str, dict]:
    """Compact small files of every table (``zorder``: also cluster ``runs`` by created_at).
    Each commit keeps naming the sync the table reflects."""
    out: dict[str, dict] = {}
    with _lake_errors(settings, "lake optimize of"):
        for table, dt in _existing(settings):
            props = _commit(applied_sync_id(dt) or 0)
            metrics = _retrying(partial(_optimize_one, dt, props, zorder and table == "runs"))
            out[table] = {"files_added": metrics.get("numFilesAdded", 0),
                          "files_removed": metrics.get("numFilesRemoved", 0)}
    return out


def _optimize_one(dt: Any, props: Any, zorder: bool) -> dict:
    if zorder:
        return dt.optimize.z_order(["created_at"], commit_properties=props)
    return dt.optimize.compact(commit_properties=props)


def vacuum_lake(settings: Settings, *, dry_run: bool = False) -> dict[str, int]:
    """Delete files no version younger than ``lake.vacuum_retention`` needs; files removed (or
    that would be, with ``dry_run``) per table."""
    hours = int(settings.lake.vacuum_retention.total_seconds() // 3600)
    out: dict[str, int] = {}
    with _lake_errors(settings, "lake vacuum of"):
        for table, dt in _existing(settings):
            files = dt.vacuum(retention_hours=hours, dry_run=dry_run,
                              enforce_retention_duration=False,
                              commit_properties=_commit(applied_sync_id(dt) or 0))
            out[table] = len(files)
    return out


def lake_status(settings: Settings, con=None) -> dict | None:
    """Where the lake stands (None when no lake is configured): table versions, the sync it
    last applied (``sync_runs``' commit metadata) and how many successful warehouse syncs it is
    behind. Reads ``con``, or the published snapshot opened here; LakeError when the lake
    cannot be read."""
    if settings.lake.uri is None:
        return None
    owned = con is None
    con = open_read_only(settings.warehouse) if owned else con
    try:
        last_success = con.execute("SELECT max(sync_id) FROM sync_runs "
                                   "WHERE outcome = 'success'").fetchall()[0][0]
        with _lake_errors(settings, "lake status of"):
            tables = {t: _open(settings, t) for t in TABLES}
            versions = {t: None if dt is None else dt.version() for t, dt in tables.items()}
            ledger = tables["sync_runs"]
            applied = None if ledger is None else applied_sync_id(ledger)
        (lag,) = con.execute("SELECT count(*) FROM sync_runs WHERE outcome = 'success' "
                             "AND sync_id > ?", [applied or 0]).fetchall()[0]
    finally:
        if owned:
            con.close()
    return {"uri": redact_url(_root(settings)), "version": versions["runs"],
            "versions": versions, "last_applied_sync_id": applied,
            "warehouse_last_success": last_success, "lag_syncs": lag}
