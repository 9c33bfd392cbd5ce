"""The jobs users run, each whole: take the writer lock, open the warehouse, work, publish, close.

``cli`` (``runs-etl sync`` / ``export``), the scheduler and the demo all call these, so cron, the
daemon and the demo take exactly the same path.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import httpx

from .config import Settings
from .engine import pages, replay
from .engine.sync import Outcome, sync_workspaces
from .engine.walk import Progress
from .errors import ConfigError, LakeError, LockedError, RunsEtlError, WorkspacesFailed
from .ops.console import make_progress
from .ops.lock import Holder, note_progress, record_skipped, writer_lock
from .outputs.export import ExportResult, export_parquet
from .warehouse.ledger import SyncResult
from .warehouse.publish import new_database, open_working, publish, remove_db_files

log = logging.getLogger("runs_etl.jobs")

NOTE_PROGRESS_EVERY = 1.0  # seconds between updates of a running sync's pages in its record


def run_sync(settings: Settings, *, quiet: bool = False, full_refresh: bool = False,
             allow_mass_delete: bool = False,
             transport: httpx.AsyncBaseTransport | None = None) -> SyncResult:
    """``run_syncs`` for a single-workspace configuration: its ledger row, or its error."""
    [outcome] = run_syncs(settings, settings.workspace_names()[:1], quiet=quiet,
                          full_refresh=full_refresh, allow_mass_delete=allow_mass_delete,
                          transports=None if transport is None else {"*": transport})
    return outcome.result


def run_syncs(settings: Settings, workspaces: Sequence[str] | None = None, *,
              quiet: bool = False, full_refresh: bool = False, allow_mass_delete: bool = False,
              transports: Mapping[str, httpx.AsyncBaseTransport] | None = None
              ) -> list[Outcome]:
    """Sync ``workspaces`` (all by default) once, under the writer lock on the private working
    file, publish the snapshot readers open, then refresh the Parquet export if configured.

    Another writer on the same warehouse is ``LockedError`` (exit 75). A failed workspace
    leaves the others committed and published, then raises: its own error when it was the only
    one, else ``WorkspacesFailed`` naming each."""
    names = settings.select_workspaces(workspaces)
    settings.check_keys(names)  # a config error before any file is locked or created
    wh = settings.warehouse
    t0 = time.monotonic()
    with _skips_recorded(wh.duckdb_path), \
            writer_lock(wh.duckdb_path, wh.lock_wait, command="runs-etl sync") as holder:
        con = open_working(wh, wait=max(0.0, wh.lock_wait - (time.monotonic() - t0)))
        try:
            with make_progress(quiet=quiet) as bar:
                progress = _HolderProgress(bar, wh.duckdb_path, holder)
                try:
                    outcomes = sync_workspaces(
                        settings, con, names, transports=transports, progress=progress,
                        full_refresh=full_refresh, allow_mass_delete=allow_mass_delete)
                except BaseException:  # Ctrl-C / SIGTERM included: the ledger says what happened
                    _publish_after_failure(con, settings)  # so status shows the failed attempt
                    raise
            synced = [o for o in outcomes if o.error is None]
            if not synced:  # nothing committed but ledger rows: their failure is the news
                _publish_after_failure(con, settings)
                _raise_failures(outcomes)
            seconds = publish(con, wh)
            log.debug("published %s in %.3fs", wh.duckdb_path, seconds,
                      extra={"event": "published", "seconds": seconds})
            # At least one workspace committed here (none would have raised above).
            lake_failure = _write_lake(settings, con) if settings.lake.uri else None
            if settings.export.parquet_dir is not None:
                _export_after_sync(settings, con, synced[-1].result)
            if lake_failure is not None:  # after the export, which does not need the lake
                raise lake_failure
        finally:
            con.close()
    _raise_failures(outcomes)
    return outcomes


def _raise_failures(outcomes: list[Outcome]) -> None:
    failed = {o.workspace: o.error for o in outcomes if o.error is not None}
    if not failed:
        return
    if len(outcomes) == 1:
        raise next(iter(failed.values()))
    errors = {n: e if isinstance(e, RunsEtlError) else RunsEtlError(str(e) or type(e).__name__)
              for n, e in failed.items()}
    raise WorkspacesFailed(errors, [o.workspace for o in outcomes if o.error is None])


def run_replay(settings: Settings, *, since: datetime | None = None, in_place: bool = False,
               out: Path | None = None, quiet: bool = False) -> tuple[Path, replay.ReplayResult]:
    """Rebuild the warehouse's runs, workflows, run_nodes and run_history from the retained raw
    pages, without the API: into ``out`` (a new file, default ``<name>.replayed.duckdb``), or
    with ``in_place`` into the warehouse itself, under the writer lock, in one transaction, then
    published. Returns where it went and what was replayed."""
    wh = settings.warehouse
    db = Path(wh.duckdb_path)
    root = pages.pages_root(db)
    if in_place:
        target = db.with_name(f".{db.name}.replay")
        remove_db_files(target)  # a killed replay's, with its WAL
    else:
        target = out or db.with_name(f"{db.stem}.replayed{db.suffix}")
        if target.exists():
            raise ConfigError([f"--out: {target} exists; remove it or name another file"])
    with contextlib.ExitStack() as stack:
        if in_place:  # no sync may write between the replay and the swap
            stack.enter_context(writer_lock(db, wh.lock_wait, command="runs-etl replay"))
        with new_database(wh, target, target.with_name(f".{target.name}.partial")) as con, \
                make_progress(quiet=quiet) as bar:
            result = replay.replay(con, root, since=since, progress=bar)
        if not in_place:
            return target, result
        try:
            con = open_working(wh)
            try:
                replay.replace_tables(con, target)
                publish(con, wh)
            finally:
                con.close()
        finally:
            remove_db_files(target)
    return db, result


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


def _write_lake(settings: Settings, con) -> LakeError | None:
    """Bring the Delta lake up to the committed, published warehouse; the error to raise when
    that failed. A failure leaves the lake at its previous version and the sync standing: the
    next sync catches the lake up."""
    from .outputs.lake import write_lake  # only a sync with a lake imports it (start-up time)

    try:
        result = write_lake(settings, con)
    except RunsEtlError as e:
        return LakeError(f"sync committed, lake write failed: {e} (the next sync catches the "
                         "lake up)")
    log.info("%s", result, extra={"event": "lake_written", "seconds": result.seconds,
                                  "sync_id": result.sync_id})
    return None


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
