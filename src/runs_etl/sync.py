"""One sync: walk the API, stage pages as Arrow batches, merge, and commit once.

``sync(settings, con)`` is what the CLI, the scheduler and the tests call. Fetching is async and
concurrent; validation happens as pages arrive; staging into DuckDB runs in a worker thread
behind a lock, so at most ``batch_pages`` pages (plus those in flight) are ever held in memory.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass, field

import httpx
import pyarrow as pa

from . import ledger, warehouse
from .client import ApiClient, FetchedPage
from .config import Settings
from .errors import DataError
from .normalize import normalize
from .walk import NullProgress, PassStats, Progress, WalkReport, full_walk

log = logging.getLogger("runs_etl.sync")


@dataclass
class SyncResult:
    """What one sync did; mirrors its ``sync_runs`` row."""

    sync_id: int
    outcome: str = "running"
    mode: str = "full"
    mode_reason: str = ""
    verified: bool = False
    walk_passes: int = 0
    pages: int = 0
    requests: int = 0
    single_run_requests: int = 0
    retries: int = 0
    bytes: int = 0
    total_start: int | None = None
    total_end: int | None = None
    runs_seen: int = 0
    rows_new: int = 0
    rows_updated: int = 0
    rows_unchanged: int = 0
    rows_deleted: int = 0
    rows_undeleted: int = 0
    rows_rejected: int = 0
    workflows_new: int = 0
    workflows_updated: int = 0
    seconds_extract: float = 0.0
    seconds_load: float = 0.0
    seconds_total: float = 0.0
    error: str | None = None
    phases: dict = field(default_factory=dict)

    def ledger_fields(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k in ledger.LEDGER_FIELDS}


REJECTED_SCHEMA = pa.schema([("page", pa.int32()), ("item_index", pa.int32()),
                             ("run_id", pa.string()), ("error", pa.string()),
                             ("raw", pa.string()), ("_seq", pa.int64())])


class StagingSink:
    """Collects fetched pages and stages them into DuckDB ``batch_pages`` at a time."""

    def __init__(self, stage: warehouse.Stage, batch_pages: int):
        self.stage = stage
        self.batch_pages = batch_pages
        self.buffer: list[FetchedPage] = []
        self.lock = asyncio.Lock()
        self.seconds = 0.0

    async def put(self, page: FetchedPage) -> None:
        self.buffer.append(page)
        if len(self.buffer) >= self.batch_pages:
            await self.flush()

    async def flush(self) -> None:
        async with self.lock:
            pages, self.buffer = self.buffer, []
            if pages:
                await asyncio.to_thread(self._stage, pages)

    def _stage(self, pages: list[FetchedPage]) -> None:
        t0 = time.perf_counter()
        runs, seqs, rejected = [], [], []
        for p in pages:
            runs.extend(p.parsed.runs)
            seqs.extend([p.seq] * len(p.parsed.runs))
            rejected.extend((p.number, r.index, r.run_id, r.error, r.raw, p.seq)
                            for r in p.parsed.rejected)
        self.stage.add(normalize(runs, seqs))
        if rejected:
            cols = list(zip(*rejected))
            self.stage.add_rejected(pa.table(
                {name: list(col) for name, col in zip(REJECTED_SCHEMA.names, cols)},
                schema=REJECTED_SCHEMA))
        self.seconds += time.perf_counter() - t0

    async def pass_stats(self, first_seq: int, last_seq: int) -> PassStats:
        return await asyncio.to_thread(self._pass_stats, first_seq, last_seq)

    def _pass_stats(self, lo: int, hi: int) -> PassStats:
        con = self.stage.con
        rows, distinct = con.execute(
            "SELECT count(*), count(DISTINCT id) FROM stage_runs WHERE _seq BETWEEN ? AND ?",
            [lo, hi]).fetchone()
        (rejected,) = con.execute(
            "SELECT count(*) FROM stage_rejected WHERE _seq BETWEEN ? AND ?", [lo, hi]).fetchone()
        (old,) = con.execute("""
            SELECT count(DISTINCT id) FROM stage_runs
            WHERE _seq BETWEEN $lo AND $hi
              AND created_at <= (SELECT max(created_at) FROM stage_runs WHERE _seq < $lo)
              AND id NOT IN (SELECT id FROM stage_runs WHERE _seq < $lo)
        """, {"lo": lo, "hi": hi}).fetchone()
        return PassStats(rows, distinct, rejected, old)


async def _extract(settings: Settings, sink: StagingSink, result: SyncResult,
                   transport: httpx.AsyncBaseTransport | None,
                   progress: Progress) -> WalkReport:
    client = ApiClient.from_settings(settings, transport=transport)
    try:
        return await full_walk(client, sink, workers=settings.api.concurrency,
                               max_pages=settings.api.max_pages,
                               max_passes=settings.sync.max_walk_passes, progress=progress)
    finally:
        s = client.stats
        result.requests, result.retries, result.bytes = s.requests, s.retries, s.bytes
        result.single_run_requests = s.single_requests
        await client.aclose()


def sync(settings: Settings, con, *, transport: httpx.AsyncBaseTransport | None = None,
         progress: Progress | None = None, full_refresh: bool = False) -> SyncResult:
    """Mirror the API into ``con`` in one transaction; the ledger records success or failure."""
    settings.api_key()  # fail on a missing key before touching the warehouse
    t_start = time.perf_counter()
    warehouse.migrate(con)
    ledger.mark_abandoned(con)
    result = SyncResult(sync_id=ledger.open_attempt(con, settings.api.url))
    con.begin()
    try:
        stage = warehouse.Stage(con)
        sink = StagingSink(stage, settings.sync.batch_pages)
        t0 = time.perf_counter()
        report = asyncio.run(_extract(settings, sink, result, transport,
                                      progress or NullProgress()))
        result.seconds_extract = time.perf_counter() - t0
        _record_walk(result, report)
        t1 = time.perf_counter()
        _load(con, settings, result)
        stage.drop()
        result.seconds_load = time.perf_counter() - t1 + sink.seconds
        result.seconds_total = time.perf_counter() - t_start
        result.outcome = "success"
        ledger.close_attempt(con, result.sync_id, "success", result.ledger_fields())
        con.commit()
    except BaseException as exc:
        con.rollback()
        result.outcome = "failed"
        result.error = str(exc) or type(exc).__name__
        result.seconds_total = time.perf_counter() - t_start
        ledger.close_attempt(con, result.sync_id, "failed", result.ledger_fields())
        raise
    log.info("sync %s done", result.sync_id, extra={"sync": result.ledger_fields()})
    return result


def _record_walk(result: SyncResult, report: WalkReport) -> None:
    result.walk_passes, result.pages = report.passes, report.pages
    result.verified, result.mode_reason = report.verified, report.reason
    result.total_start, result.total_end = report.total_start, report.total_end


def _load(con, settings: Settings, result: SyncResult) -> None:
    """Everything after the walk, inside the sync's transaction."""
    (seen,) = con.execute("SELECT count(DISTINCT id) FROM stage_runs").fetchone()
    (rejected,) = con.execute("SELECT count(*) FROM stage_rejected").fetchone()
    result.runs_seen, result.rows_rejected = seen, rejected
    received = seen + rejected
    if received and rejected / received > settings.sync.max_reject_fraction:
        raise DataError(
            f"{rejected} of {received} records failed validation "
            f"({rejected / received:.1%} > sync.max_reject_fraction "
            f"{settings.sync.max_reject_fraction:.1%}); nothing was committed. First problem: "
            + con.execute("SELECT error FROM stage_rejected LIMIT 1").fetchone()[0])
    counts = warehouse.merge(con, result.sync_id)
    for k, v in asdict(counts).items():
        setattr(result, k, v)
    warehouse.save_rejected(con, result.sync_id)
    warehouse.apply_views(con)
