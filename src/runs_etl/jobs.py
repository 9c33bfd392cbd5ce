"""The jobs users run, each whole: take the writer lock, open the warehouse, work, publish, close.

``cli`` (``runs-etl sync`` / ``export``), the scheduler and the demo all call these, so cron, the
daemon and the demo take exactly the same path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from .config import Settings
from .engine.sync import sync
from .engine.walk import Progress
from .errors import LockedError, RunsEtlError
from .ops.console import make_progress
from .ops.lock import Holder, note_progress, record_skipped, writer_lock
from .outputs.export import ExportResult, export_parquet
from .warehouse.ledger import SyncResult
from .warehouse.publish import open_working, publish

log = logging.getLogger("runs_etl.jobs")

NOTE_PROGRESS_EVERY = 1.0  # seconds between updates of a running sync's pages in its record


def run_sync(settings: Settings, *, quiet: bool = False, full_refresh: bool = False,
             allow_mass_delete: bool = False,
             transport: httpx.AsyncBaseTransport | None = None) -> SyncResult:
    """Sync once under the writer lock on the private working file, publish the snapshot
    readers open, then refresh the Parquet export if one is configured. Another writer on the
    same warehouse is ``LockedError`` (exit 75)."""
    settings.api_key()  # a missing key is a config error before any file is locked or created
    wh = settings.warehouse
    t0 = time.monotonic()
    with _skips_recorded(wh.duckdb_path), \
            writer_lock(wh.duckdb_path, wh.lock_wait, command="runs-etl sync") as holder:
        con = open_working(wh, wait=max(0.0, wh.lock_wait - (time.monotonic() - t0)))
        try:
            with make_progress(quiet=quiet) as bar:
                progress = _HolderProgress(bar, wh.duckdb_path, holder)
                try:
                    result = sync(settings, con, transport=transport, progress=progress,
                                  full_refresh=full_refresh, allow_mass_delete=allow_mass_delete)
                except BaseException:  # Ctrl-C / SIGTERM included: the ledger says what happened
                    _publish_after_failure(con, settings)  # so status shows the failed attempt
                    raise
            seconds = publish(con, wh)
            log.debug("published %s in %.3fs", wh.duckdb_path, seconds,
                      extra={"event": "published", "seconds": seconds})
            if settings.export.parquet_dir is not None:
                _export_after_sync(settings, con, result)
            return result
        finally:
            con.close()


def run_export(settings: Settings) -> ExportResult:
    """Write the Parquet export from the last published snapshot. Needs no writer lock: it
    reads what readers read, so it runs beside a sync."""
    return export_parquet(settings)


class _HolderProgress:
    """Passes progress on to the console and, about once a second, to the lock's holder record,
    where ``runs-etl status`` reads how far a running sync has got."""

    def __init__(self, inner: Progress, db_path: Path, holder: Holder | None):
        self.inner, self.db_path, self.holder = inner, db_path, holder
        self.pages = 0
        self.noted_at = 0.0

    def start_pass(self, number: int, pages: int | None) -> None:
        self.inner.start_pass(number, pages)

    def advance(self, pages: int, rows: int) -> None:
        self.inner.advance(pages, rows)
        self.pages += pages
        if time.monotonic() - self.noted_at >= NOTE_PROGRESS_EVERY:
            self.noted_at = time.monotonic()
            self.holder = note_progress(self.db_path, self.holder, self.pages)


@contextmanager
def _skips_recorded(db_path: Path) -> Iterator[None]:
    """A sync that gives up because another holds the warehouse leaves a note for status."""
    try:
        yield
    except LockedError as e:
        record_skipped(db_path, str(e))
        raise


def _publish_after_failure(con, settings: Settings) -> None:
    """A failed sync committed nothing but its ledger row; publish that row too, without
    letting a second failure hide the first."""
    try:
        publish(con, settings.warehouse)
    except RunsEtlError as e:
        log.warning("%s", e, extra={"event": "publish_failed"})


def _export_after_sync(settings: Settings, con, result: SyncResult) -> None:
    """Refresh the Parquet export from the sync's committed state; the sync itself stands."""
    try:
        exported = export_parquet(settings, con=con)
    except RunsEtlError as e:
        raise _with_message(e, f"sync {result.sync_id} was committed, but the Parquet export "
                               f"failed: {e}") from e
    log.info("%s", exported)


def _with_message(exc: RunsEtlError, message: str) -> RunsEtlError:
    """A copy of ``exc`` (same class, exit code and context attributes) saying ``message``:
    the log's ``error_type`` and the exit code stay those of the real failure."""
    err = type(exc).__new__(type(exc))
    err.__dict__.update(exc.__dict__)
    err.args = (message,)
    return err
