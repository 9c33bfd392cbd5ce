"""One sync, orchestrated: plan, extract (walk the API into staging), load (merge), commit once.

``sync(settings, con)`` is what ``jobs.run_sync`` and the tests call. Fetching is async and
concurrent; pages are validated as they arrive and staged as Parquet by ``staging.StagingSink``
behind a bounded queue, so at most about ``2 * batch_pages`` pages (plus those in flight) are
ever held in memory. Everything the sync writes to the warehouse lands in one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import duckdb
import httpx

from ..config import DEFAULT_WORKSPACE, Settings, redact_url
from ..errors import DataError, DeadlineError, WarehouseError, first_line
from ..warehouse import ledger
from ..warehouse.ledger import SyncResult
from ..warehouse.migrations import migrate
from ..warehouse.views import apply_views, store_view_settings
from . import load, pages
from .client import ApiClient
from .extract import (
    NEWEST_FIRST,
    STATE_LAST_FULL,
    STATE_ORDER,
    Extracted,
    Plan,
    extract,
    plan_sync,
)
from .loop import run_interruptibly
from .models import WALK_GC_THRESHOLD
from .parallel import ValidationPool, default_workers
from .staging import Stage, StagingSink, staging_root
from .walk import NullProgress, Progress, gather_or_cancel

log = logging.getLogger("runs_etl.sync")

# DuckDB running out of memory or disk, in a statement or at commit (a commit fails so when its
# WAL cannot grow): an operating condition, reported by ``_warehouse_failure``.
_WAREHOUSE_FAILURES = (duckdb.OutOfMemoryException, duckdb.IOException,
                       duckdb.TransactionException)


@dataclass
class _Job:
    """One workspace's part of a sync: its settings, cursor, plan, ledger row and staging."""

    name: str
    settings: Settings
    cur: Any  # a cursor of its own: temp views and transactions are per cursor
    plan: Plan
    result: SyncResult
    t_start: float
    started_at: datetime  # the ledger row's start: the time of everything this sync observes
    stage: Stage | None = None
    sink: StagingSink | None = None
    extracted: Extracted | None = None
    error: BaseException | None = None
    recorder: pages.PageRecorder | None = None  # raw page retention, when configured


@dataclass(frozen=True)
class Outcome:
    """What happened to one workspace: its ledger row, and the error if it failed."""

    workspace: str
    result: SyncResult
    error: BaseException | None = None


async def _extract(job: _Job, transport: httpx.AsyncBaseTransport | None, progress: Progress,
                   allow_mass_delete: bool, shared: asyncio.Semaphore | None) -> Extracted:
    settings, result = job.settings, job.result
    assert job.sink is not None and job.stage is not None
    client = ApiClient.from_settings(settings, transport=transport, shared=shared)
    if job.sink.pool is not None:
        client.page_parser = job.sink.pool.parser_for(job.stage.dir)
    if job.recorder is not None:
        client.on_body = lambda *body: _record_body(job, *body)
    limit = settings.sync.max_duration
    reader = job.cur.cursor()  # sees the last commit while the walk stages data
    # A server can stall a sync for hours within every per-request limit (Retry-After, retries,
    # slow pages): the whole extract has one deadline too.
    deadline = asyncio.timeout(limit.total_seconds())
    try:
        try:
            async with deadline:
                return await extract(job.plan, client, job.sink, reader, settings, progress,
                                     allow_mass_delete=allow_mass_delete)
        except TimeoutError:
            if not deadline.expired():
                raise
            raise DeadlineError(f"the sync was still fetching after sync.max_duration ({limit}); "
                                "stopped, nothing was committed") from None
    finally:
        await job.sink.aclose()
        s = client.stats
        result.requests, result.retries, result.bytes = s.requests, s.retries, s.bytes
        result.single_run_requests = s.single_requests
        await client.aclose()
        reader.close()


async def _extract_all(jobs: list[_Job], transports: Mapping[str, Any], progress: Progress,
                       allow_mass_delete: bool, max_in_flight: int,
                       pool: ValidationPool | None) -> None:
    """Every workspace's walk at once, within one bound on requests in flight; a workspace that
    fails does not stop the others (an interruption stops them all). The validation workers
    (``pool``) stop once every walk has ended, before the merges need the memory."""
    shared = asyncio.Semaphore(max_in_flight) if len(jobs) > 1 else None

    async def one(job: _Job) -> None:
        t0 = time.perf_counter()
        try:
            job.extracted = await _extract(job, transports.get(job.name), progress,
                                           allow_mass_delete, shared)
        except (duckdb.OutOfMemoryException, duckdb.IOException) as exc:
            job.error = _warehouse_failure(job.settings, exc)
        except Exception as exc:  # this workspace's failure, recorded as its own
            job.error = exc
        finally:
            job.result.seconds_extract = time.perf_counter() - t0

    try:
        await gather_or_cancel(one(job) for job in jobs)
    finally:
        if pool is not None:
            await pool.aclose()


@contextmanager
def _fewer_gc_passes():
    """The cycle collector runs less often during the walk (``models.WALK_GC_THRESHOLD``)."""
    before = gc.get_threshold()
    gc.set_threshold(WALK_GC_THRESHOLD, before[1], before[2])
    try:
        yield
    finally:
        gc.set_threshold(*before)


def sync(settings: Settings, con, *, transport: httpx.AsyncBaseTransport | None = None,
         progress: Progress | None = None, full_refresh: bool = False,
         allow_mass_delete: bool = False) -> SyncResult:
    """Sync a single-workspace configuration; raises the workspace's error if it failed."""
    [outcome] = sync_workspaces(settings, con, settings.workspace_names()[:1],
                                transports={} if transport is None else {"*": transport},
                                progress=progress, full_refresh=full_refresh,
                                allow_mass_delete=allow_mass_delete)
    if outcome.error is not None:
        raise outcome.error
    return outcome.result


def sync_workspaces(settings: Settings, con, names: Sequence[str], *,
                    transports: Mapping[str, Any] | None = None,
                    progress: Progress | None = None, full_refresh: bool = False,
                    allow_mass_delete: bool = False) -> list[Outcome]:
    """Mirror each workspace of ``names`` into ``con``: walks run concurrently, merges one
    after another, each in its own transaction with its own ledger row, so a workspace that
    fails leaves the others committed. Returns one ``Outcome`` per workspace, in order."""
    settings.check_keys(names)  # fail on a missing key before touching the warehouse
    transports = dict(transports or {})
    if "*" in transports:
        transports = {n: transports["*"] for n in names}
    t_start = time.perf_counter()
    try:
        migrate(con)
        ledger.mark_abandoned(con)
    except _WAREHOUSE_FAILURES as exc:
        raise _warehouse_failure(settings, exc) from exc
    jobs = [_open_job(settings, con, name, full_refresh, t_start) for name in names]
    try:
        root = staging_root(con)
        workers = settings.sync.parse_workers
        workers = default_workers() if workers is None else workers
        pool = ValidationPool(workers, settings.sync.batch_pages) if workers else None
        for job in jobs:
            job.stage = Stage(job.cur, job.result.sync_id, root, workspace=job.name)
            job.sink = StagingSink(job.stage, settings.sync.batch_pages, pool)
            job.recorder = _open_recorder(job)
        with _fewer_gc_passes():
            run_interruptibly(_extract_all(jobs, transports, progress or NullProgress(),
                              allow_mass_delete, settings.sync.max_requests_in_flight, pool))
        for job in jobs:
            _load(job, allow_mass_delete)
    except BaseException as exc:  # an interruption (or a bug): every open attempt failed
        for job in jobs:
            if job.result.outcome == "running":
                _fail(job, exc, in_transaction=False)
        raise
    finally:
        for job in jobs:
            _close_job(job)
    return [Outcome(job.name, job.result, job.error) for job in jobs]


def _open_job(settings: Settings, con, name: str, full_refresh: bool, t_start: float) -> _Job:
    ws_settings = settings.for_workspace(name)
    cur = con.cursor()
    plan = plan_sync(cur, ws_settings, full_refresh=full_refresh, workspace=name)
    # The time of everything this sync observes, as its ledger row records it.
    started_at = datetime.now(UTC)
    # The URL may carry credentials (https://user:pass@host): the ledger keeps it without them.
    sync_id = ledger.open_attempt(cur, name, redact_url(ws_settings.api.url), started_at)
    result = SyncResult(sync_id=sync_id, mode=plan.mode, mode_reason=plan.reason)
    return _Job(name, ws_settings, cur, plan, result, t_start, started_at)


def _load(job: _Job, allow_mass_delete: bool) -> None:
    """Merge one workspace's staged walk in its own transaction, or record why it failed."""
    if job.error is not None:
        _fail(job, job.error, in_transaction=False)
        return
    assert job.extracted is not None and job.stage is not None and job.sink is not None
    result, cur = job.result, job.cur
    _record_walk(result, job.extracted)
    t1 = time.perf_counter()
    try:
        # The walk only wrote staging files; the warehouse changes from here on, in one
        # transaction (begun now, so DuckDB's now() in the merge is the time of the load).
        cur.begin()
        try:
            _finish_load(job.stage, job.settings, result, job.extracted, allow_mass_delete,
                         job.started_at)
            result.seconds_load = time.perf_counter() - t1 + job.sink.seconds
            result.seconds_total = time.perf_counter() - job.t_start
            result.outcome = "success"
            ledger.close_attempt(cur, result.sync_id, "success", result.ledger_fields())
            (loaded_at,) = cur.execute("SELECT now()").fetchall()[0]  # the merge's time stamps
            cur.commit()
        except _WAREHOUSE_FAILURES as exc:
            raise _warehouse_failure(job.settings, exc) from exc
    except Exception as exc:  # this workspace's failure; the next one still loads
        job.error = exc
        _fail(job, exc, in_transaction=True)
        return
    _keep_pages(job, loaded_at)
    log.info("%s", summary_line(result, job.name),
             extra={"event": "sync_finished", "sync_id": result.sync_id, "workspace": job.name,
                    "outcome": result.outcome, "sync": result.ledger_fields()})


def _fail(job: _Job, exc: BaseException, *, in_transaction: bool) -> None:
    result = job.result
    result.outcome = "failed"
    result.error = (str(exc) or type(exc).__name__) if not isinstance(
        exc, KeyboardInterrupt) else "interrupted (Ctrl-C or SIGTERM); nothing was committed"
    result.seconds_total = time.perf_counter() - job.t_start
    _record_failure(job.cur, result, in_transaction)


def _open_recorder(job: _Job) -> pages.PageRecorder | None:
    """Raw page retention for this workspace's sync (``[retention] raw_pages``), after removing
    its expired files; None when off or for an in-memory warehouse."""
    keep, db = job.settings.retention.raw_pages, job.settings.warehouse.duckdb_path
    if keep is None or str(db).startswith(":memory:"):
        return None
    root = pages.pages_root(db)
    try:
        pages.prune(root, job.name, keep)
        return pages.PageRecorder(root, job.name, job.result.sync_id,
                                  job.started_at)
    except OSError as e:
        _pages_lost(job, e)
        return None


def _record_body(job: _Job, seq: int, kind: str, ref: int | str, body: bytes) -> None:
    """Keep one body; a full disk under the page files costs the copy, never the sync."""
    if job.recorder is None:
        return
    try:
        job.recorder.record(seq, kind, ref, body)
    except OSError as e:
        job.recorder.discard()
        job.recorder = None
        _pages_lost(job, e)


def _pages_lost(job: _Job, exc: OSError) -> None:
    log.warning("sync %s (workspace %s): its raw pages are not kept (%s); the sync goes on, "
                "and a replay will lack it", job.result.sync_id, job.name,
                exc.strerror or exc, extra={"event": "pages_not_kept", "workspace": job.name})


def _keep_pages(job: _Job, loaded_at: datetime) -> None:
    """Close the committed sync's page file; the sync stands if that fails (it is a copy)."""
    if job.recorder is None:
        return
    assert job.extracted is not None
    try:
        job.recorder.commit(loaded_at, job.extracted.missing_ids)
    except OSError as e:
        job.recorder.discard()
        _pages_lost(job, e)


def _close_job(job: _Job) -> None:
    if job.recorder is not None:
        job.recorder.discard()  # nothing left to remove once committed
    if job.stage is not None:
        job.stage.close()
        with contextlib.suppress(duckdb.Error):
            load.drop_work_tables(job.cur)
    with contextlib.suppress(duckdb.Error):
        job.cur.close()


def _record_failure(con, result: SyncResult, in_transaction: bool) -> None:
    """Roll back and write the ledger's ``failed`` row; neither may hide the original error
    (a full disk can fail the row: it then stays ``running`` and the next sync marks it
    abandoned)."""
    if in_transaction:
        # A commit that failed (a full disk under the WAL) has already rolled back: there is
        # nothing left to undo, and the ledger row can still be written.
        with contextlib.suppress(duckdb.TransactionException):
            con.rollback()
    try:
        ledger.close_attempt(con, result.sync_id, "failed", result.ledger_fields())
    except duckdb.Error as e:
        log.warning("could not record sync %s as failed: %s", result.sync_id,
                    first_line(e),
                    extra={"event": "ledger_write_failed"})


def _warehouse_failure(settings: Settings, exc: Exception) -> WarehouseError:
    """DuckDB running out of memory or disk is an operating condition, not a bug."""
    detail = first_line(exc)
    if isinstance(exc, duckdb.OutOfMemoryException):
        return WarehouseError(
            f"DuckDB ran out of memory ({detail}); nothing was committed. Raise "
            f"warehouse.memory_limit (configured: {settings.warehouse.memory_limit})")
    return WarehouseError(f"DuckDB could not read or write its files ({detail}); nothing was "
                          "committed. Check free disk space and permissions beside the database")


def _record_walk(result: SyncResult, extracted: Extracted) -> None:
    report = extracted.walk
    result.mode, result.mode_reason = extracted.mode, extracted.reason
    result.walk_passes, result.pages = report.passes, report.pages
    result.verified = extracted.walked_all and report.verified
    result.total_start, result.total_end = report.total_start, report.total_end


def _finish_load(stage: Stage, settings: Settings, result: SyncResult, extracted: Extracted,
                 allow_mass_delete: bool, started_at: datetime) -> None:
    """Everything after the walk, inside the sync's transaction."""
    con = stage.con
    (rejected,) = con.execute("SELECT count(*) FROM stage_rejected").fetchall()[0]
    (result.runs_seen,) = con.execute("SELECT count(DISTINCT id) FROM stage_runs").fetchall()[0]
    result.rows_rejected = rejected
    received = result.runs_seen + rejected
    if received and rejected / received > settings.sync.max_reject_fraction:
        raise DataError(
            f"{rejected} of {received} records failed validation "
            f"({rejected / received:.1%} > sync.max_reject_fraction "
            f"{settings.sync.max_reject_fraction:.1%}); nothing was committed. First problem: "
            + con.execute("SELECT error FROM stage_rejected LIMIT 1").fetchall()[0][0])
    # Only runs confirmed gone (404 by id) are deleted; see extract.py for how they are found.
    load.apply_staged(
        con, result, stage.workspace, extracted.missing_ids,
        max_fraction=None if allow_mass_delete else settings.sync.max_delete_fraction,
        started_at=started_at)
    result.new_fields = ", ".join(load.new_extra_fields(con, stage.workspace)) or None
    store_view_settings(con, settings)
    apply_views(con)
    if extracted.walked_all and extracted.walk.newest_first is not None:
        ledger.set_state(con, stage.workspace, STATE_ORDER,
                         NEWEST_FIRST if extracted.walk.newest_first else "unordered")
    elif extracted.walk.newest_first is False:
        ledger.set_state(con, stage.workspace, STATE_ORDER, "unordered")
    if result.verified:
        ledger.set_state(con, stage.workspace, STATE_LAST_FULL, datetime.now(UTC).isoformat())


def summary_line(result: SyncResult, workspace: str | None = None) -> str:
    """The one line per sync (and workspace) that cron mails and log search find."""
    # Only a full walk can be verified complete; an incremental one is partial by design.
    if result.mode == "incremental" and not result.verified:
        how = ""
    else:
        how = "verified: " if result.verified else "UNVERIFIED: "
    return (
        f"sync {result.sync_id} {result.outcome}"
        f"{'' if workspace in (None, DEFAULT_WORKSPACE) else f' [{workspace}]'}: "
        f"mode={result.mode} ({how}"
        f"{result.mode_reason}) pages={result.pages} requests={result.requests} "
        f"retries={result.retries} runs={result.runs_seen} new={result.rows_new} "
        f"updated={result.rows_updated} unchanged={result.rows_unchanged} "
        f"deleted={result.rows_deleted} rejected={result.rows_rejected} "
        f"extract={result.seconds_extract:.2f}s load={result.seconds_load:.2f}s "
        f"total={result.seconds_total:.2f}s"
    )
