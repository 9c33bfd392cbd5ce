"""Staging: fetched pages become Arrow batches written as Parquet beside the warehouse while
the walk runs; ``load`` merges them once at the end.

Staging on disk keeps memory flat however many runs a sync sees: Python holds one batch at a
time, and DuckDB reads the staged files column by column. Views ``stage_runs`` /
``stage_workflows`` / ``stage_rejected`` over the staged files also drive walk
verification, delete candidates and the merge.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, cast

import pyarrow as pa

from ..config import DEFAULT_WORKSPACE
from ..warehouse.connect import sql_glob
from . import load
from .batches import BatchFiles, staging_failure
from .client import FetchedPage
from .models import TERMINAL_STATUSES, PageDigest, ParsedPage
from .normalize import STAGED_SCHEMAS, staged_tables
from .walk import PassStats

if TYPE_CHECKING:
    from .parallel import ValidationPool
# Folders being written (a sync's staged batches, an export version) start with this prefix: one
# left behind by a killed process is removed by the next one that holds the lock.
STAGING_PREFIX = ".staging-"


def staging_root(con) -> Path | None:
    """``<database>.staging/`` beside a DuckDB file (None for an in-memory database), after
    removing what a killed sync left there. Only called by the warehouse's single writer."""
    (path,) = con.execute("SELECT path FROM duckdb_databases() "
                          "WHERE database_name = current_database()").fetchall()[0]
    if not path:
        return None
    root = Path(path).with_name(Path(path).name + ".staging")
    if root.is_dir():  # the folder is the writer's alone: anything in it is a killed sync's
        for stale in root.iterdir():
            shutil.rmtree(stale, ignore_errors=True)
    root.mkdir(exist_ok=True)
    return root


class Stage:
    """One sync's staged batches: Parquet files in a private folder, read as views."""

    def __init__(self, con, sync_id: int, directory: Path | None = None, *,
                 workspace: str = DEFAULT_WORKSPACE):
        self.con = con
        self.sync_id = sync_id
        self.workspace = workspace
        try:
            self.dir = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory))
        except OSError as e:
            raise staging_failure(directory or Path(tempfile.gettempdir()), e) from None
        self._files = BatchFiles(self.dir)
        # An empty file per kind, so the views below always have something to read.
        self.add({k: s.empty_table() for k, s in STAGED_SCHEMAS.items()}, empty_too=True)
        for kind, view in (("runs", "stage_runs"), ("workflows", "stage_workflows"),
                           ("rejected", "stage_rejected")):
            # The folder derives from the database path, which may hold glob characters.
            con.execute(f"CREATE OR REPLACE TEMP VIEW {view} AS "
                        f"SELECT * FROM read_parquet({sql_glob(self.dir, f'{kind}-*.parquet')})")

    def add(self, tables: dict[str, pa.Table], *, empty_too: bool = False) -> None:
        """Stage one batch (``normalize.staged_tables``); nothing touches the warehouse tables
        until ``merge``."""
        try:
            self._files.write(tables, empty_too=empty_too)
        except OSError as e:
            raise staging_failure(self.dir, e) from None

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

    def unstaged_live_ids(self, *, open_only: bool = False) -> list[str]:
        """Live warehouse runs this sync has not staged (``open_only``: not terminal either):
        delete candidates after a full walk, refresh candidates after a head walk."""
        terminal = list(TERMINAL_STATUSES)
        return [r[0] for r in self.con.execute(
            "SELECT id FROM runs WHERE workspace = $ws AND _deleted_at IS NULL "
            "AND (NOT $open_only OR status NOT IN (SELECT unnest($terminal))) "
            "AND id NOT IN (SELECT id FROM stage_runs)",
            {"ws": self.workspace, "open_only": open_only, "terminal": terminal}).fetchall()]

    def live_count(self) -> int:
        """Live runs of this workspace in the warehouse."""
        return load.live_count(self.con, self.workspace)

    def close(self) -> None:
        """Drop the views and delete the staged files."""
        for view in ("stage_runs", "stage_workflows", "stage_rejected"):
            self.con.execute(f"DROP VIEW IF EXISTS {view}")
        shutil.rmtree(self.dir, ignore_errors=True)


class StagingSink:
    """Stages fetched (already validated) pages ``batch_pages`` at a time, off the fetching path.

    Fetch workers only enqueue; one consumer task normalizes a batch on the event loop and writes
    its Parquet files in a thread. The bounded queue is the backpressure that keeps memory flat
    when staging is slower than the network. The walk and extract ask their questions about what
    was staged through the async methods at the end.
    """

    def __init__(self, stage: Stage, batch_pages: int, pool: ValidationPool | None = None):
        self.stage = stage
        self.batch_pages = batch_pages
        self.pool = pool  # validation workers, which stage the pages they validate themselves
        self.seconds = 0.0
        self._queue: asyncio.Queue | None = None
        self._consumer: asyncio.Task | None = None

    def _ensure_consumer(self) -> tuple[asyncio.Queue, asyncio.Task]:
        if self._queue is None or self._consumer is None:
            self._queue = asyncio.Queue(maxsize=self.batch_pages)
            self._consumer = asyncio.ensure_future(self._consume(self._queue))
        return self._queue, self._consumer

    def expect(self, pages: int | None) -> None:
        """A full walk of about ``pages`` pages begins (incremental walks never say so): the
        validation workers start if it is long (``ValidationPool.expect``)."""
        if self.pool is not None:
            self.pool.expect(pages)

    async def put(self, page: FetchedPage) -> None:
        """Queue ``page``; raises what staging raised if the consumer has died, also while
        waiting for room (else every worker would wait on a full queue nobody drains)."""
        if isinstance(page.parsed, PageDigest):
            return  # validated and staged by a worker (``parallel``)
        queue, consumer = self._ensure_consumer()
        if consumer.done():  # it failed: surface its error instead of queueing forever
            consumer.result()
        if not queue.full():
            queue.put_nowait(page)
            return
        putter = asyncio.ensure_future(queue.put(page))
        try:
            await asyncio.wait([putter, consumer], return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not putter.done():  # the consumer died, or we were cancelled
                putter.cancel()
        if consumer.done():
            consumer.result()

    async def flush(self) -> None:
        """Wait until everything queued so far is staged (and raise what staging raised)."""
        queue, consumer = self._ensure_consumer()
        done: asyncio.Future = asyncio.get_running_loop().create_future()
        await queue.put(done)
        await asyncio.wait([done, consumer], return_when=asyncio.FIRST_COMPLETED)
        if consumer.done():
            consumer.result()
        await done
        if self.pool is not None:
            await self.pool.flush(self.stage.dir)

    async def aclose(self) -> None:
        if self._consumer is not None:
            self._consumer.cancel()
            await asyncio.gather(self._consumer, return_exceptions=True)

    async def _consume(self, queue: asyncio.Queue) -> None:
        buffer: list[FetchedPage] = []
        while True:
            item = await queue.get()
            if isinstance(item, asyncio.Future):
                if buffer:
                    await self._stage(buffer)
                    buffer = []
                item.set_result(None)
                continue
            buffer.append(item)
            if len(buffer) >= self.batch_pages:
                await self._stage(buffer)
                buffer = []

    async def _stage(self, pages: list[FetchedPage]) -> None:
        """Normalize on the event loop (it needs the GIL anyway: a thread would only add
        switching), then write the Parquet files in a thread (pyarrow releases the GIL)."""
        t0 = time.perf_counter()
        tables = staged_tables([(p.seq, p.number, cast(ParsedPage, p.parsed))  # see put
                                for p in pages])
        await asyncio.to_thread(self.stage.add, tables)
        self.seconds += time.perf_counter() - t0

    async def pass_stats(self, first_seq: int, last_seq: int,
                         newest_before: datetime | None = None,
                         head: datetime | None = None) -> PassStats:
        return await asyncio.to_thread(self._pass_stats, first_seq, last_seq, newest_before,
                                       head)

    def _pass_stats(self, lo: int, hi: int, newest_before: datetime | None,
                    head: datetime | None) -> PassStats:
        return PassStats(self.stage.distinct_between(lo, hi),
                         self.stage.old_discoveries(lo, hi, newest_before),
                         self.stage.distinct_between(lo, hi, not_newer_than=head)
                         if head is not None else 0)

    @property
    def workspace(self) -> str:
        return self.stage.workspace

    async def unstaged_live_ids(self, *, open_only: bool = False) -> list[str]:
        return await asyncio.to_thread(lambda: self.stage.unstaged_live_ids(open_only=open_only))

    async def live_count(self) -> int:
        return await asyncio.to_thread(self.stage.live_count)
