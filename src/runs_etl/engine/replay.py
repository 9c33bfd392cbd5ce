"""Replay: rebuild ``runs``, ``workflows``, ``run_nodes`` and ``run_history`` from the retained
raw pages (``pages.py``), with no API call.

Each retained sync is replayed as it ran, in commit order: its bodies are parsed by the engine's
own ``parse_page`` / ``parse_run``, staged by ``StagingSink``, merged, its deletes applied and its
history versioned, in one transaction per sync, stamped with the original sync's times. So the
replayed tables equal what the syncs wrote, as the code that replays them would have written it
(a fix to validation or normalization applies to the past).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from ..errors import DataError
from ..warehouse import ledger
from ..warehouse.connect import sql_string
from ..warehouse.ledger import SyncResult
from ..warehouse.migrations import migrate
from ..warehouse.views import apply_views
from . import load, pages
from .client import FetchedPage
from .models import EnvelopeError, parse_page, parse_run
from .staging import Stage, StagingSink, staging_root
from .walk import NullProgress, Progress

log = logging.getLogger("runs_etl.replay")

# The tables a replay rebuilds (the ledger and sync state stay the warehouse's own).
REPLAYED_TABLES = ("runs", "workflows", "run_nodes", "run_history")
BATCH_PAGES = 20


@dataclass
class ReplayResult:
    syncs: int = 0
    pages: int = 0
    runs: int = 0
    sync_ids: list[int] = field(default_factory=list)


def replay(con, root: Path, *, since: datetime | None = None,
           progress: Progress | None = None) -> ReplayResult:
    """Replay every sync retained under ``root`` (started at or after ``since``) into ``con``,
    a warehouse that holds no data of those syncs yet (a new file)."""
    progress = progress or NullProgress()
    syncs = pages.retained(root, since)
    if not syncs:
        raise DataError(f"no retained raw pages in {root}"
                        + (f" since {since.isoformat()}" if since else "")
                        + ": set [retention] raw_pages and let syncs keep them first")
    migrate(con)
    result = ReplayResult()
    stage_dir = staging_root(con)
    progress.start_pass(1, None)
    try:
        for kept in syncs:
            n_pages, n_runs = _replay_one(con, kept, stage_dir, progress)
            result.syncs += 1
            result.pages += n_pages
            result.runs += n_runs
            result.sync_ids.append(kept.sync_id)
            log.info("replayed sync %d [%s]: %d bodies, %d runs", kept.sync_id, kept.workspace,
                     n_pages, n_runs, extra={"event": "sync_replayed", "sync_id": kept.sync_id,
                                             "workspace": kept.workspace})
    finally:
        if stage_dir is not None:
            shutil.rmtree(stage_dir, ignore_errors=True)
    apply_views(con)
    return result


def _fetched(kept: pages.RetainedSync, commit: dict) -> Iterator[FetchedPage]:
    """The retained bodies as the walk saw them, parsed by today's code; ``commit`` receives
    the file's commit record."""
    for rec in pages.records(kept.path):
        kind = rec["kind"]
        if kind == "commit":
            commit.update(rec)
        elif kind in ("page", "run"):
            body = pages.body_of(rec)
            try:
                parsed = parse_page(body) if kind == "page" else parse_run(body)
            except EnvelopeError as e:
                raise DataError(f"{kept.path}: the body of {kind} {rec['ref']} no longer "
                                f"parses: {e}") from None
            yield FetchedPage(rec["ref"] if kind == "page" else 0, rec["seq"], parsed, None,
                              len(body))


def _replay_one(con, kept: pages.RetainedSync, stage_dir: Path | None,
                progress: Progress) -> tuple[int, int]:
    cur = con.cursor()
    stage = Stage(cur, kept.sync_id, stage_dir, workspace=kept.workspace)
    commit: dict = {}
    try:
        n_pages = asyncio.run(_stage_all(StagingSink(stage, BATCH_PAGES),
                                         _fetched(kept, commit), progress))
        if "loaded_at" not in commit:
            raise DataError(f"{kept.path} has no commit record (cut short?)")
        at = datetime.fromisoformat(commit["loaded_at"])
        cur.begin()
        cur.execute("INSERT INTO sync_runs (sync_id, workspace, started_at, outcome, mode, "
                    "mode_reason) VALUES (?, ?, ?, 'running', 'replay', ?)",
                    [kept.sync_id, kept.workspace, kept.started_at,
                     f"replay of {kept.path.name}"])
        result = SyncResult(sync_id=kept.sync_id, mode="replay",
                            mode_reason=f"replay of {kept.path.name}", pages=n_pages)
        (result.runs_seen,) = cur.execute("SELECT count(DISTINCT id) FROM stage_runs"
                                          ).fetchall()[0]
        load.apply_staged(cur, result, kept.workspace, commit.get("deleted", []),
                          max_fraction=None, started_at=kept.started_at, at=at)
        ledger.close_attempt(cur, kept.sync_id, "success", result.ledger_fields())
        cur.commit()
        return n_pages, result.runs_seen
    finally:
        stage.close()
        load.drop_work_tables(cur)
        cur.close()


async def _stage_all(sink: StagingSink, fetched: Iterator[FetchedPage],
                     progress: Progress) -> int:
    n = 0
    try:
        for page in fetched:
            await sink.put(page)
            progress.advance(1, page.count)
            n += 1
        await sink.flush()
    finally:
        await sink.aclose()
    return n


def replace_tables(con, source: Path) -> None:
    """Replace the replayed tables of ``con``'s warehouse with those of the warehouse file
    ``source``, in one transaction: readers see the old tables or the new, never a mix."""
    migrate(con)
    con.execute(f"ATTACH {sql_string(str(source))} AS replayed (READ_ONLY)")
    try:
        con.begin()
        try:
            for table in REPLAYED_TABLES:
                con.execute(f"DELETE FROM {table}")
                con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM replayed.{table}")
            con.commit()
        except Exception:
            con.rollback()
            raise
    finally:
        con.execute("DETACH replayed")
