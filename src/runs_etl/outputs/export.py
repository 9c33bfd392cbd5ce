"""Parquet exports for BI tools, published atomically by switching one symlink.

Layout under ``export.parquet_dir`` (point BI tools at ``<root>/current/<table>/``)::

    current -> versions/<version>          relative symlink, replaced in one rename
    versions/<version>/runs/workspace=<name>/year=YYYY/month=MM/part-<version>-<i>.parquet
    versions/<version>/<table>/part-<version>.parquet   workflows, run_nodes, sync_runs,
                                           sync_state and every view of ``sql/``, materialized
    versions/<version>/_manifest.json      rows and files per table, last sync id
    analytics.duckdb, analytics.sql        views named like the warehouse's, over ``current``

``runs`` holds live runs only (soft-deleted runs are left out), one row per run in its latest
state, Hive-partitioned by workspace and the UTC month of ``created_at`` (the ``workspace``
column lives in the folder names, as Hive readers expect); ``run_nodes`` follows the same runs;
``workflows`` holds every workflow (soft-deleted ones keep their ``deleted_at``); every other
table and view carries ``workspace`` as a column. JSON columns
are written as strings, timestamps as UTC instants, zstd-compressed.

A version is written under ``.staging-<version>/``, renamed into ``versions/`` and only then
made ``current`` by ``os.replace`` of a symlink, which is atomic on POSIX: a reader resolves
``current`` to the previous complete version or to the new one, never to a partial one. The
two previous versions stay on disk (``KEEP_VERSIONS``): a reader that resolved ``current`` just
before a switch can still read every file of its version after one more export; older ones are
removed. File names carry the version, so a listing that straddles a switch fails
loudly instead of mixing versions.

``analytics.duckdb`` (DuckDB 1.x storage, so any 1.x CLI or BI driver opens it) holds no data: the
tables are views over ``<root>/current`` (absolute paths: DuckDB resolves relative ones against the
reader's working directory) and the ``sql/`` views on top, so a second machine or a BI tool gets the
warehouse's catalogue without touching the warehouse. It is replaced only when its SQL changes, so
a reader's open connection is not pulled from under it by every export.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import duckdb
from filelock import FileLock, Timeout

from ..config import Settings
from ..engine.staging import STAGING_PREFIX
from ..errors import ConfigError, LockedError, WarehouseError, first_line
from ..warehouse.connect import open_read_only, select_list, sql_glob, sql_string
from ..warehouse.views import sql_files, view_sql

CURRENT = "current"
VERSIONS = "versions"
LOCK_FILE = ".export.lock"
MANIFEST = "_manifest.json"
ANALYTICS_DB = "analytics.duckdb"
ANALYTICS_SQL = "analytics.sql"
# The newest storage format DuckDB 1.x reads (2.x writes one that 1.x CLIs and drivers refuse).
ANALYTICS_STORAGE_VERSION = "v1.4.0"
LOCK_WAIT_SECONDS = 600.0  # a second exporter waits for the first instead of racing it
# The new version plus two previous: a reader that resolved ``current`` before a switch keeps
# every file of its version through one more export.
KEEP_VERSIONS = 3
# Internal bookkeeping that means nothing outside the warehouse.
DROP_COLUMNS = {"runs": {"_deleted_at", "_sync_id"}, "workflows": {"_sync_id"}, "run_nodes": set(),
                "sync_runs": set(), "sync_state": set(), "run_history": set()}
CORE_TABLES = ("runs", "workflows", "run_nodes")
# runs/workspace=<name>/year=YYYY/month=MM/: one workspace's month is one folder.
RUNS_PARTITIONS = "(workspace, year, month)"
LEDGER_TABLES = ("sync_runs", "sync_state")
HISTORY_TABLES = ("run_history",)  # every observed version of a run, deleted runs' included
VIEW_NAME = re.compile(r"^\s*CREATE\s+OR\s+REPLACE\s+VIEW\s+(\w+)", re.IGNORECASE | re.MULTILINE)


@dataclass
class ExportResult:
    """What one export published; ``str()`` is the one line the CLI prints."""

    root: Path
    version: str
    rows: dict[str, int] = field(default_factory=dict)
    files: int = 0
    bytes: int = 0
    removed_versions: list[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        """The published version folder (what ``<root>/current`` points at)."""
        return self.root / VERSIONS / self.version

    def __str__(self) -> str:
        tables = ", ".join(f"{self.rows[t]:,} {t}" for t in CORE_TABLES if t in self.rows)
        others = len(self.rows) - sum(t in self.rows for t in CORE_TABLES)
        return (f"exported {tables} (+ {others} views and ledger tables; {self.files} Parquet "
                f"files, {self.bytes / 1e6:,.1f} MB) to {self.root / CURRENT} -> "
                f"{VERSIONS}/{self.version}; views over it in {self.root / ANALYTICS_DB}")


def export_root(settings: Settings) -> Path:
    if settings.export.parquet_dir is None:
        raise ConfigError(["export.parquet_dir is not set: set RUNS_ETL_PARQUET_DIR, "
                           "--parquet-dir or [export] parquet_dir in the config"])
    return Path(settings.export.parquet_dir)


def current_version(root: Path) -> Path | None:
    """The version folder ``<root>/current`` points at now: resolve once to pin a snapshot."""
    link = Path(root) / CURRENT
    return link.resolve() if link.is_symlink() else None


def export_parquet(settings: Settings, con=None) -> ExportResult:
    """Write runs, workflows and run_nodes as a new Parquet version and make it current.

    Without ``con`` the DuckDB file is opened read-only. With ``con`` the export reads through a
    cursor of it, so it sees the last committed state, never a transaction still in progress.
    """
    root = export_root(settings)
    owned = con is None
    con = open_read_only(settings.warehouse, views=True) if owned else con
    try:
        lock = _prepare(root)
        try:
            return _export_locked(con, root)
        finally:
            lock.release()
    finally:
        if owned:
            con.close()


def _prepare(root: Path) -> FileLock:
    """Create the export root, check ``current`` is ours, and take the exporters' lock."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WarehouseError(f"cannot create export folder {root}: {e.strerror}") from None
    link = root / CURRENT
    if link.exists() and not link.is_symlink():
        raise WarehouseError(f"{link} exists and is not the link runs-etl maintains: move it "
                             "away (BI tools should read through that link)")
    lock = FileLock(str(root / LOCK_FILE), timeout=LOCK_WAIT_SECONDS)
    try:
        lock.acquire()
    except Timeout:
        raise LockedError(f"another export into {root} has been running for more than "
                          f"{LOCK_WAIT_SECONDS:.0f} s") from None
    return lock


def _export_locked(con, root: Path) -> ExportResult:
    _remove_leftovers(root)
    version = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ") + "-" + secrets.token_hex(3)
    staging = root / f"{STAGING_PREFIX}{version}"
    result = ExportResult(root=root, version=version)
    try:
        staging.mkdir()
        manifest = _write_tables(con, staging, version, result)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n",
                                        encoding="utf-8")
        (root / VERSIONS).mkdir(exist_ok=True)
        os.rename(staging, result.path)
    except WarehouseError:  # a COPY that failed, already naming its table
        shutil.rmtree(staging, ignore_errors=True)
        raise
    except duckdb.Error as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise WarehouseError(f"Parquet export failed: {first_line(e)}") from None
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise WarehouseError(f"Parquet export to {root} failed: {e}") from None
    previous = current_version(root)
    _switch(root, version)
    write_analytics_db(root)
    result.removed_versions = _prune(root, version, previous)
    return result


def _columns(con, table: str) -> str:
    """The exported select list: JSON as text (readable by any Parquet tool), no internals."""
    return select_list(con, table, alias="t.", drop=DROP_COLUMNS[table])


def sql_view_names() -> list[str]:
    """The views ``sql/`` defines, in the order ``apply_views`` creates them."""
    return [m.group(1) for _, text in sql_files() for m in VIEW_NAME.finditer(text)]


def _write_tables(con, staging: Path, version: str, result: ExportResult) -> dict:
    """Every COPY in one read transaction of a cursor: one consistent, committed snapshot."""
    cur = con.cursor()
    try:
        cur.begin()
        opts = "FORMAT parquet, COMPRESSION zstd"
        queries = {
            "runs": (f"SELECT {_columns(cur, 'runs')}, "
                     "year(timezone('UTC', t.created_at)) AS year, "
                     "strftime(timezone('UTC', t.created_at), '%m') AS month "
                     "FROM runs AS t WHERE t._deleted_at IS NULL"),
            "workflows": f"SELECT {_columns(cur, 'workflows')} FROM workflows AS t",
            "run_nodes": (f"SELECT {_columns(cur, 'run_nodes')} FROM run_nodes AS t "
                          "JOIN runs AS r ON r.workspace = t.workspace AND r.id = t.run_id "
                          "AND r._deleted_at IS NULL"),
        }
        for name in (*LEDGER_TABLES, *HISTORY_TABLES):
            queries[name] = f"SELECT {_columns(cur, name)} FROM {name} AS t"
        for name in sql_view_names():  # materialized as of this snapshot (ages: at export time)
            queries[name] = f"SELECT * FROM {name}"
        tables = {}
        for name, query in queries.items():
            folder = staging / name
            folder.mkdir()
            if name == "runs":
                target = (f"{sql_string(str(folder))} ({opts}, PARTITION_BY {RUNS_PARTITIONS}, "
                          f"FILENAME_PATTERN 'part-{version}-{{i}}')")
            else:
                target = f"{sql_string(str(folder / f'part-{version}.parquet'))} ({opts})"
            try:
                (rows,) = cur.execute(f"COPY ({query}) TO {target}").fetchall()[0]
            except duckdb.Error as e:  # name the table: the fix may be for that one alone
                hint = ("; raise warehouse.memory_limit"
                        if isinstance(e, duckdb.OutOfMemoryException) else "")
                raise WarehouseError(f"Parquet export failed writing {name}: {first_line(e)}"
                                     f"{hint}") from None
            if name == "runs" and rows == 0:  # no partition, no file: readers' globs need one
                empty = folder / f"part-{version}-empty.parquet"
                cur.execute(f"COPY ({query} LIMIT 0) TO {sql_string(str(empty))} ({opts})")
            files = sorted(p for p in folder.rglob("*.parquet"))
            result.rows[name] = rows
            result.files += len(files)
            result.bytes += sum(p.stat().st_size for p in files)
            tables[name] = {"rows": rows, "path": name,
                            "kind": "table" if name in DROP_COLUMNS else "view",
                            "files": [str(p.relative_to(staging)) for p in files]}
        tables["runs"]["partitioning"] = ("hive: workspace=<name>/year=YYYY/month=MM (UTC month "
                                          "of created_at)")
        last_sync = cur.execute("SELECT sync_id, finished_at FROM sync_runs WHERE outcome = "
                                "'success' ORDER BY sync_id DESC LIMIT 1").fetchone()
        cur.rollback()
    finally:
        cur.close()
    return {"version": version, "exported_at": datetime.now(UTC).isoformat(),
            "format": "parquet", "compression": "zstd",
            "last_sync_id": last_sync[0] if last_sync else None,
            "last_sync_finished_at": last_sync[1].isoformat() if last_sync else None,
            "tables": tables}


def _switch(root: Path, version: str) -> None:
    """Point ``current`` at the new version with one atomic rename of a fresh symlink."""
    tmp = root / f".{CURRENT}-{version}"
    try:
        os.symlink(Path(VERSIONS) / version, tmp, target_is_directory=True)
        os.replace(tmp, root / CURRENT)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WarehouseError(f"cannot switch {root / CURRENT} to version {version}: {e}") from None


def _table_views(cur: Path) -> list[str]:
    """The warehouse's tables as views over the Parquet files of ``cur`` (the current link)."""
    stmts = [
        # Soft-deleted runs are not exported, so ``_deleted_at`` is NULL for every row, and the
        # ``sql/`` views' ``WHERE _deleted_at IS NULL`` reads as it does in the warehouse.
        # ``workspace`` comes from the folder names (always text, even for a name like 2024);
        # year and month are the layout's, not the warehouse's.
        "CREATE OR REPLACE VIEW runs AS SELECT * EXCLUDE (year, month), "
        "CAST(NULL AS TIMESTAMPTZ) AS _deleted_at "
        f"FROM read_parquet({sql_glob(cur / 'runs', '**/*.parquet')}, "
        "hive_partitioning = true, hive_types_autocast = false);",
    ]
    for name in ("workflows", "run_nodes", *LEDGER_TABLES, *HISTORY_TABLES):
        stmts.append(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM "
                     f"read_parquet({sql_glob(cur / name, '*.parquet')});")
    return stmts


def analytics_sql(root: Path) -> str:
    """The statements of ``analytics.duckdb``: the tables over ``current``, then ``sql/``."""
    cur = Path(os.path.abspath(root)) / CURRENT
    header = (f"-- runs-etl: the warehouse's catalogue over the Parquet export {cur}.\n"
              "-- Another machine: replace that path, then run this file in any DuckDB.\n")
    return header + "\n".join(_table_views(cur)) + "\n\n" + "\n".join(
        view_sql(text) for _, text in sql_files())


def write_analytics_db(root: Path) -> Path:
    """(Re)write ``analytics.duckdb`` and ``analytics.sql`` when their SQL changed; a new file
    is renamed into place, so a reader that has the old one open keeps a working catalogue."""
    target, sql_file = root / ANALYTICS_DB, root / ANALYTICS_SQL
    text = analytics_sql(root)
    try:
        if target.is_file() and sql_file.is_file() and \
                sql_file.read_text(encoding="utf-8") == text:
            return target
        tmp = root / f".analytics-{secrets.token_hex(3)}.duckdb"
        try:
            con = duckdb.connect(str(tmp), config={
                "storage_compatibility_version": ANALYTICS_STORAGE_VERSION})
            try:
                con.execute(text)  # the tables over current, then sql/: what apply_views runs
            finally:
                con.close()
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        tmp_sql = root / f".analytics-{secrets.token_hex(3)}.sql"
        tmp_sql.write_text(text, encoding="utf-8")
        os.replace(tmp_sql, sql_file)
    except duckdb.Error as e:
        raise WarehouseError(f"cannot write {target}: {first_line(e)}") from None
    except OSError as e:
        raise WarehouseError(f"cannot write {target}: {e}") from None
    return target


def _prune(root: Path, version: str, previous: Path | None) -> list[str]:
    """Keep the new version and the ``KEEP_VERSIONS - 1`` newest others (the previous current
    among them, whatever its name); remove the rest and return their names."""
    others = sorted(p.name for p in (root / VERSIONS).iterdir() if p.name != version)
    keep = {version, *others[-(KEEP_VERSIONS - 1):]}
    if previous is not None:
        keep.add(previous.name)
    removed = []
    for p in sorted((root / VERSIONS).iterdir()):
        if p.name not in keep and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def _remove_leftovers(root: Path) -> None:
    """Staging folders and temp links of exports that were killed (we hold the lock)."""
    for p in root.iterdir():
        if p.name.startswith(STAGING_PREFIX) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(f".{CURRENT}-") and p.is_symlink():
            p.unlink(missing_ok=True)
        elif p.name.startswith(".analytics-") and p.is_file():
            p.unlink(missing_ok=True)
