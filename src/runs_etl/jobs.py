"""The jobs users run, each whole: take the writer lock, open the warehouse, work, publish, close.

``cli`` (``runs-etl sync`` / ``export``), the scheduler and the demo all call these, so cron, the
daemon and the demo take exactly the same path.
"""

from __future__ import annotations

import logging

import httpx

from .config import Settings
from .engine.sync import sync
from .errors import RunsEtlError
from .ops.console import make_progress
from .ops.lock import writer_lock
from .outputs.export import ExportResult, export_parquet
from .warehouse.connect import connect
from .warehouse.ledger import SyncResult

log = logging.getLogger("runs_etl.jobs")


def run_sync(settings: Settings, *, quiet: bool = False, full_refresh: bool = False,
             allow_mass_delete: bool = False,
             transport: httpx.AsyncBaseTransport | None = None) -> SyncResult:
    """Sync once under the writer lock, then refresh the Parquet export if one is configured.
    Another writer on the same warehouse is ``LockedError`` (exit 75)."""
    settings.api_key()  # a missing key is a config error before any file is locked or created
    wh = settings.warehouse
    with writer_lock(wh.duckdb_path, wh.lock_wait, command="runs-etl sync"):
        con = connect(wh.duckdb_path, memory_limit=wh.memory_limit)
        try:
            with make_progress(quiet=quiet) as progress:
                result = sync(settings, con, transport=transport, progress=progress,
                              full_refresh=full_refresh, allow_mass_delete=allow_mass_delete)
            if settings.export.parquet_dir is not None:
                _export_after_sync(settings, con, result)
            return result
        finally:
            con.close()


def run_export(settings: Settings) -> ExportResult:
    """Write the Parquet export from the warehouse's last commit, under the writer lock."""
    wh = settings.warehouse
    with writer_lock(wh.duckdb_path, wh.lock_wait, command="runs-etl export"):
        return export_parquet(settings)


def _export_after_sync(settings: Settings, con, result: SyncResult) -> None:
    """Refresh the Parquet export from the sync's committed state; the sync itself stands."""
    try:
        exported = export_parquet(settings, con=con)
    except RunsEtlError as e:
        err = RunsEtlError(f"sync {result.sync_id} was committed, but the Parquet export "
                           f"failed: {e}")
        err.exit_code = e.exit_code
        raise err from e
    log.info("%s", exported)
