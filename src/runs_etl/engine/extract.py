"""Extract: decide how much of the source to read, read it, and say what it proves.

Modes (recorded in the ledger):
- **full**: first sync, ``--full-refresh``, periodic reconciliation (``full_refresh_every``), or
  no full walk verified yet (an unverified one may have skipped old runs, which incremental walks
  never revisit): a complete walk (see ``walk.py``). Only a *verified* full walk may mark runs
  deleted.
- **incremental**: the source was last seen newest-first. Walk from page 1 and stop at the first
  page whose runs are all older than ``high-watermark - lookback``, already in the warehouse and
  terminal there. Open runs the walk did not reach are refreshed one by one (``GET
  /v1/runs/{id}``, 404 = deleted, see ``gone``) when that costs fewer requests than reading the
  remaining pages; otherwise the sync reads everything (a full walk, verified, from page 1
  again: the few head pages it re-reads cost less than tracking where a moving source's pages
  went).
- **fallback**: the order could not be verified (never learnt, or broken during an incremental
  walk): a full walk, with the reason in the log and the ledger.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ..config import DEFAULT_WORKSPACE, Settings
from ..warehouse import ledger
from .client import ApiClient, FetchedPage
from .load import check_mass_delete
from .models import TERMINAL_STATUSES, ParsedPage, utc
from .walk import NullProgress, Progress, WalkReport, full_walk, gather_or_cancel, head_walk

log = logging.getLogger("runs_etl.extract")

STATE_ORDER = "source_order"
STATE_LAST_FULL = "last_verified_full_walk_at"
NEWEST_FIRST = "newest_first"

# An id made of these (and not a dot segment) reaches the server exactly as sent once
# percent-encoded. Anything else ('/', '%', '?', '#', spaces, '..', non-ASCII) may be decoded,
# split or normalised by a proxy or framework on the way: its 404 proves nothing.
_PLAIN_ID = re.compile(r"[A-Za-z0-9._~-]+")


@dataclass
class Plan:
    mode: str  # full | incremental | fallback
    reason: str
    cutoff: datetime | None = None  # incremental: history older than this is settled


@dataclass
class Extracted:
    """What the extract phase proved, for the load phase and the ledger."""

    mode: str
    reason: str
    walk: WalkReport
    walked_all: bool  # every page was walked (deletes may apply if verified)
    missing_ids: list[str] = field(default_factory=list)  # 404 on GET /v1/runs/{id}


def plan_sync(con, settings: Settings, *, full_refresh: bool, now: datetime | None = None,
              workspace: str = DEFAULT_WORKSPACE) -> Plan:
    """Pick the mode from the workspace's history and the settings (see module docstring)."""
    now = now or datetime.now(UTC)
    (last_ok,) = con.execute(
        "SELECT max(finished_at) FROM sync_runs WHERE workspace = ? AND outcome = 'success'",
        [workspace]).fetchall()[0]
    if last_ok is None:
        return Plan("full", "first sync of this workspace")
    if full_refresh:
        return Plan("full", "--full-refresh requested")
    every = settings.sync.full_refresh_every
    if every is not None:
        last_full = ledger.get_state(con, workspace, STATE_LAST_FULL)
        if last_full is None or now - datetime.fromisoformat(last_full) >= every:
            return Plan("full", f"periodic reconciliation (full_refresh_every={every})")
    if ledger.get_state(con, workspace, STATE_LAST_FULL) is None:
        return Plan("full", "no full walk verified yet: earlier walks may have missed runs")
    order = ledger.get_state(con, workspace, STATE_ORDER)
    if order != NEWEST_FIRST:
        return Plan("fallback", "source order not verified newest-first"
                    + (f" (last seen: {order})" if order else ""))
    (watermark,) = con.execute(
        "SELECT max(created_at) FROM runs WHERE workspace = ? AND _deleted_at IS NULL",
        [workspace]).fetchall()[0]
    if watermark is None:
        return Plan("fallback", "the warehouse holds no live runs of this workspace")
    cutoff = watermark - settings.sync.lookback
    return Plan("incremental", f"newest-first source; settled before {cutoff.isoformat()}",
                cutoff)


async def extract(plan: Plan, client: ApiClient, sink, reader, settings: Settings,
                  progress: Progress | None = None, *,
                  allow_mass_delete: bool = False) -> Extracted:
    """Run the plan; an incremental walk that finds the order broken becomes a fallback."""
    progress = progress or NullProgress()
    walk_kw = dict(workers=settings.api.concurrency, max_pages=settings.api.max_pages)
    extracted = None
    if plan.mode == "incremental":
        assert plan.cutoff is not None
        cutoff = plan.cutoff
        guard = asyncio.Lock()

        async def settled(page: FetchedPage) -> bool:
            runs = page.parsed.runs
            if page.parsed.rejected or not runs:
                return False
            if any(utc(r.created_at) >= cutoff or not r.is_terminal for r in runs):
                return False
            async with guard:  # one query at a time on the reader connection
                known = await asyncio.to_thread(_count_settled, reader, sink.workspace,
                                                [r.id for r in runs])
            return known == len(runs)

        report = await head_walk(client, sink, stop_after=settled, progress=progress, **walk_kw)
        if report.newest_first:
            extracted = await _refresh_open(plan, report, client, sink, settings, progress)
        else:
            plan = Plan("fallback", "incremental walk found the source not newest-first")
            log.warning("%s: falling back to a full walk", plan.reason)
    if extracted is None:
        report = await full_walk(client, sink, max_passes=settings.sync.max_walk_passes,
                                 progress=progress, **walk_kw)
        extracted = Extracted(plan.mode, f"{plan.reason}; {report.reason}", report, True)
    if extracted.walked_all and extracted.walk.verified:
        await _confirm_absent(extracted, client, sink, settings, allow_mass_delete)
    return extracted


async def _confirm_absent(extracted: Extracted, client: ApiClient, sink, settings: Settings,
                          allow_mass_delete: bool) -> None:
    """Live runs a verified walk did not see are deletion candidates; each is confirmed by id
    (404 = gone) before anything is marked, so a walk fooled by the source cannot delete."""
    candidates = await sink.unstaged_live_ids()
    if not candidates:
        return
    if not allow_mass_delete:
        check_mass_delete(len(candidates), await sink.live_count(),
                          settings.sync.max_delete_fraction)
    found, missing = await _fetch_by_id(client, sink, candidates)
    extracted.missing_ids.extend(missing)
    if found:
        log.warning("%d runs missed by the walk still exist (found by id): kept and refreshed",
                    found)
        extracted.reason += f"; {found} runs missed by the walk were found by id"


async def _fetch_by_id(client: ApiClient, sink, ids: list[str]) -> tuple[int, list[str]]:
    """``GET /v1/runs/{id}`` for each of ``ids``; the runs found are staged as one page (one
    seq for all: later than every page, so these snapshots win). Returns how many were found
    and the ids confirmed gone (see ``gone``)."""
    fetched = await gather_or_cancel(client.fetch_run(i) for i in ids)
    found = [r for r in fetched if r is not None]
    missing = gone(ids, fetched)
    if found:
        await sink.put(FetchedPage(0, client.next_seq(), ParsedPage.of(found), None, 0))
        await sink.flush()
    return len(found), missing


def gone(ids: list[str], fetched: list) -> list[str]:
    """The ids whose ``GET /v1/runs/{id}`` answered 404, among those whose 404 can be believed:
    an id the path may have mangled is kept (logged), never deleted on an ambiguous answer."""
    missing = [i for i, r in zip(ids, fetched) if r is None]
    doubtful = [i for i in missing if not _PLAIN_ID.fullmatch(i) or i in (".", "..")]
    if doubtful:
        log.warning("%d runs answered 404 by id but their ids may not survive a URL path "
                    "(%s): kept, not marked deleted", len(doubtful),
                    ", ".join(repr(i) for i in doubtful[:5]))
    return [i for i in missing if i not in doubtful]


def _count_settled(reader, workspace: str, ids: list[str]) -> int:
    (n,) = reader.execute(
        "SELECT count(*) FROM runs WHERE workspace = $ws AND id IN (SELECT unnest($ids)) "
        "AND _deleted_at IS NULL "
        "AND status IN (SELECT unnest($terminal))",
        {"ws": workspace, "ids": ids, "terminal": list(TERMINAL_STATUSES)}).fetchall()[0]
    return n


async def _refresh_open(plan: Plan, report: WalkReport, client: ApiClient, sink,
                        settings: Settings, progress: Progress) -> Extracted:
    """Open runs the head walk did not reach: one request each, or a full walk if cheaper."""
    open_ids = await sink.unstaged_live_ids(open_only=True)
    total = report.total_end if report.total_end is not None else report.total_start
    remaining = (-(-total // client.page_size) - report.pages) \
        if total is not None and report.bad_total is None else math.inf
    if len(open_ids) > min(settings.sync.max_single_refreshes, remaining):
        log.info("%d open runs beyond the walked pages: reading everything", len(open_ids))
        full = await full_walk(client, sink, max_passes=settings.sync.max_walk_passes,
                               progress=progress, workers=settings.api.concurrency,
                               max_pages=settings.api.max_pages)
        full.pages += report.pages
        return Extracted("incremental", f"{plan.reason}; {len(open_ids)} open runs unreached, "
                         f"read everything ({full.reason})", full, True)
    _, missing = await _fetch_by_id(client, sink, open_ids)
    return Extracted("incremental", f"{plan.reason}; walked {report.pages} pages, refreshed "
                     f"{len(open_ids)} open runs ({len(missing)} gone)", report, False, missing)
