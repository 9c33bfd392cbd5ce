"""Walking every page of a live, unordered source and knowing whether the walk was complete.

Offset paging over data that changes underneath shifts runs across page boundaries. An insert
ahead of a page repeats a run on the next page read (harmless: runs are deduplicated by id, the
freshest snapshot wins). A delete ahead of a page skips one. And under concurrency pages are
served in any order, so even inserts can push a run past a boundary that was already read. The
algorithm:

1. **Pass 1** fetches page 1, then pages 2..N with ``concurrency`` workers, then keeps going past
   N until a short or empty page (the source may have grown). Every response carries ``total``.
2. **Clean**: every response reported the same ``total``, no run appeared twice, and the
   distinct runs (+ rejected records) equal that total. Nothing moved: the pass is a snapshot.
3. **Counted** (newest-first sources, the order being verified page by page): page 1's response
   carries both the total T and the newest run H at the instant the pass began. Runs created
   later are newer than H; so if the pass saw T distinct runs not newer than H, it saw *every*
   run that existed when it began, whatever moved meanwhile. Page 1 is then read again (and on,
   while needed) so runs created during the pass land too.
4. Otherwise another **pass** walks the source again. On a newest-first source re-walks go one
   page at a time: a sequential walk can then only miss a run through a delete, and check 3 is
   made afresh against that pass's own T and H. Elsewhere (unordered or null-total servers) a
   pass *converges* when it discovers no run that earlier passes missed and that is older than
   the newest run they saw (newer ones were created during the sync), and its totals never went
   down in arrival order (no sign of a delete while it walked).
5. A clean, counted or converged pass makes the walk **verified**; after ``max_passes`` it is
   recorded as unverified and no delete is applied from it. So is a walk in which any response
   reported a nonsensical total (negative, beyond int64, 0 beside runs, or ``pages`` that does
   not match it): a count that cannot be believed verifies nothing. Even after a verified walk,
   deletes never rest on the walk alone: each candidate is confirmed with ``GET /v1/runs/{id}``
   (404).

The bookkeeping (distinct ids per pass, discoveries) is done in DuckDB over the staged batches,
so memory stays flat however many runs there are.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from ..errors import WalkError
from .client import ApiClient, FetchedPage
from .models import INT64_MAX, INT64_MIN, not_newer, utc


@dataclass(frozen=True)
class PassStats:
    distinct: int  # distinct run ids in the pass
    old_discoveries: int  # runs earlier passes missed that are not newer than what they saw
    present_at_start: int = 0  # distinct runs of the pass not newer than ``head``


class PageSink(Protocol):
    def expect(self, pages: int | None) -> None: ...
    async def put(self, page: FetchedPage) -> None: ...
    async def flush(self) -> None: ...
    async def pass_stats(self, first_seq: int, last_seq: int,
                         newest_before: datetime | None = None,
                         head: datetime | None = None) -> PassStats: ...


class Progress(Protocol):
    def start_pass(self, number: int, pages: int | None) -> None: ...
    def advance(self, pages: int, rows: int) -> None: ...


class NullProgress:
    """Progress that shows nothing (quiet runs, cron, tests); also a context manager, like the
    console's bar."""

    def __enter__(self) -> NullProgress:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def start_pass(self, number: int, pages: int | None) -> None:
        pass

    def advance(self, pages: int, rows: int) -> None:
        pass


@dataclass
class WalkReport:
    passes: int = 0
    pages: int = 0
    verified: bool = False
    reason: str = ""
    total_start: int | None = None
    total_end: int | None = None
    newest_first: bool | None = None  # did every page walked run newest-first?
    pass_ranges: list[tuple[int, int]] = field(default_factory=list)
    bad_total: str | None = None  # why a response's total could not be believed, if one could not


def storable(total: int | None) -> int | None:
    """A total as the ledger's BIGINT can hold it (None beyond)."""
    return total if total is not None and INT64_MIN <= total <= INT64_MAX else None


def total_problem(page: FetchedPage, page_size: int) -> str | None:
    """Why the ``total`` of a response cannot be believed, or None (a null total is no claim)."""
    total, pages = page.parsed.total, page.parsed.pages
    if total is None:
        return None
    if not 0 <= total <= INT64_MAX:
        return f"total {total} is not a count"
    if total == 0 and page.count:
        return f"total 0 beside {page.count} runs on page {page.number}"
    if pages is not None and pages != -(-total // page_size) and not (total == 0 and pages == 1):
        return f"pages {pages} does not match total {total} at {page_size} per page"
    return None


@dataclass
class _Pass:
    """What one pass saw: seq range, reported totals, and each page's created_at bounds."""

    page_size: int  # to judge ``pages`` against ``total``
    first_seq: int = 1 << 62
    last_seq: int = 0
    totals: list = field(default_factory=list)  # (arrival seq, total) per response
    pages: int = 0
    last_total: int | None = None
    last_total_seq: int = 0
    rows: int = 0  # runs received, repeats included
    rejected: int = 0  # records that failed validation
    bounds: dict[int, tuple] = field(default_factory=dict)  # page -> (newest, oldest, total)
    sorted_within: bool = True
    bad_total: str | None = None  # the first response whose total could not be believed

    def record(self, page: FetchedPage) -> None:
        self.first_seq = min(self.first_seq, page.seq)
        self.last_seq = max(self.last_seq, page.seq)
        self.totals.append((page.seq, page.parsed.total))
        self.pages += 1
        self.rows += len(page.parsed.runs)
        self.rejected += len(page.parsed.rejected)
        if page.seq > self.last_total_seq:
            self.last_total, self.last_total_seq = page.parsed.total, page.seq
        if self.bad_total is None:
            self.bad_total = total_problem(page, self.page_size)
        order = page.parsed.order()
        if order is not None:
            newest, oldest, sorted_within = order
            self.sorted_within &= sorted_within
            self.bounds.setdefault(page.number, (newest, oldest, page.parsed.total))

    def constant_total(self) -> int | None:
        """The total every response of the pass reported, if they all agree."""
        values = {t for _, t in self.totals}
        return values.pop() if len(values) == 1 else None

    def never_shrank(self) -> bool:
        """Totals, in arrival order, never went down: no sign of a delete during the pass.
        (A server sending null totals shows no sign either way; deletes are still confirmed by
        id before they are applied.)"""
        seen = [t for _, t in sorted(self.totals) if t is not None]
        return all(a <= b for a, b in zip(seen, seen[1:]))

    def newest_first(self) -> bool:
        """Newest-first within every page and across consecutive pages (ties allowed).

        Runs created between the fetches of page k and k+1 push page k's last runs onto the
        start of page k+1: such a pair may overlap when the source grew in between."""
        if not self.sorted_within:
            return False
        numbers = sorted(self.bounds)
        for a, b in zip(numbers, numbers[1:]):
            if b != a + 1:
                continue
            (_, oldest_a, total_a), (newest_b, _, total_b) = self.bounds[a], self.bounds[b]
            grew = total_a is not None and total_b is not None and total_b > total_a
            if not not_newer(newest_b, oldest_a) and not grew:
                return False
        return True


async def walk_pages(client: ApiClient, sink: PageSink, first: FetchedPage, *, workers: int,
                     max_pages: int, progress: Progress, state: _Pass,
                     stop_after: Callable[[FetchedPage], Awaitable[bool]] | None = None) -> None:
    """Fetch pages 2.. concurrently after ``first``, up to the advertised last page, then past it
    (the source may have grown) until a short or empty page, or a page ``stop_after`` accepts."""
    size = client.page_size
    full: dict[int, bool] = {}
    end = [float("inf")]  # no page after this one can matter
    cursor = [2]
    limit: list[int | None] = [None]

    async def take(page: FetchedPage) -> None:
        state.record(page)
        full[page.number] = page.count >= size
        if page.count < size or (stop_after is not None and await stop_after(page)):
            end[0] = min(end[0], page.number)
        progress.advance(1, page.count)
        await sink.put(page)

    async def worker() -> None:
        while True:
            n = cursor[0]
            if n > end[0] or (limit[0] is not None and n > limit[0]):
                return
            if n > max_pages:
                raise WalkError(f"the server still returns data after {max_pages} pages; raise "
                                "api.max_pages if the workspace really is this large", page=n)
            cursor[0] += 1
            await take(await client.fetch_page(n))

    await take(first)
    if end[0] == 1:
        return
    advertised = first.parsed.pages
    if advertised is not None and advertised > 1:
        limit[0] = advertised
        await gather_or_cancel(worker() for _ in range(workers))
        if end[0] <= advertised or not full.get(advertised, False):
            return
    # The last advertised page was full: the source grew. Probe one page (usually empty),
    # then walk on concurrently if it was not.
    if advertised is not None:
        limit[0] = cursor[0]
        await worker()
        if end[0] < cursor[0]:
            return
    limit[0] = None
    await gather_or_cancel(worker() for _ in range(workers))


async def gather_or_cancel(coros: Iterable[Awaitable[Any]]) -> list[Any]:
    """``asyncio.gather`` whose first failure cancels (and awaits) the others, so no request
    outlives the sync that made it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def full_walk(client: ApiClient, sink: PageSink, *, workers: int, max_pages: int,
                    max_passes: int, progress: Progress | None = None) -> WalkReport:
    """Walk every page until a pass is clean or converges (see module docstring)."""
    progress = progress or NullProgress()
    report = WalkReport()
    newest_before = None  # the newest run when the previous pass began, if the order tells it
    for number in range(1, max_passes + 1):
        first = await client.fetch_page(1)
        if report.total_start is None:
            report.total_start = storable(first.parsed.total)
        sink.expect(first.parsed.pages)  # the pages a full walk will read, as far as known
        progress.start_pass(number, first.parsed.pages)
        state = _Pass(page_size=client.page_size)
        # Re-walks of a newest-first source go one page at a time: a sequential walk of such
        # a source can only skip a run through a delete (pages served out of order under
        # concurrency let runs created in between slip past a page boundary).
        pass_workers = 1 if number > 1 and report.newest_first else workers
        await walk_pages(client, sink, first, workers=pass_workers, max_pages=max_pages,
                         progress=progress, state=state)
        await sink.flush()
        _account(report, state, number)
        if report.bad_total is not None:
            report.reason = f"not verified: the server's count is nonsense ({report.bad_total})"
            return report
        # On a newest-first source page 1 shows the newest run as the pass begins, in the same
        # response as the total: runs not newer than it are the ones that total counts.
        head = state.bounds[1][0] if state.newest_first() and 1 in state.bounds else None
        stats = await sink.pass_stats(state.first_seq, state.last_seq, newest_before, head)
        # Anything newer than this pass's head that a later pass discovers was created during
        # the sync, not skipped.
        newest_before = head if report.newest_first else None
        total = state.constant_total()
        if total is not None and state.rows == stats.distinct \
                and stats.distinct + state.rejected == total:
            report.verified = True
            report.reason = "clean walk" if number == 1 else f"clean walk on pass {number}"
            return report
        start_total = first.parsed.total
        if head is not None and start_total is not None \
                and stats.present_at_start + state.rejected >= start_total:
            report.verified = True
            report.reason = f"all {start_total} runs present when pass {number} began were seen"
            report.pages += await _catch_up_head(client, sink, head, max_pages, progress)
            return report
        if number > 1 and stats.old_discoveries == 0 and state.never_shrank():
            report.verified = True
            report.reason = f"converged after {number} passes"
            return report
    report.reason = f"source kept moving: not verified after {max_passes} passes"
    return report


async def _catch_up_head(client: ApiClient, sink: PageSink, head: datetime, max_pages: int,
                         progress: Progress) -> int:
    """Runs created while a newest-first pass walked sit above its page 1: read from page 1
    again until a page reaches back to ``head``, so they land in this sync too."""
    for number in range(1, max_pages + 1):
        page = await client.fetch_page(number)
        progress.advance(1, page.count)
        await sink.put(page)
        runs = page.parsed.runs
        if page.count < client.page_size or not runs or utc(runs[-1].created_at) <= head:
            await sink.flush()
            return number
    raise WalkError(f"runs are created faster than they can be read ({max_pages} pages)",
                    page=max_pages)


def _account(report: WalkReport, state: _Pass, number: int) -> None:
    report.passes, report.pages = number, report.pages + state.pages
    report.total_end = storable(state.last_total)
    report.bad_total = report.bad_total or state.bad_total
    report.pass_ranges.append((state.first_seq, state.last_seq))
    ordered = state.newest_first()
    report.newest_first = ordered if report.newest_first is None else (
        report.newest_first and ordered)


async def head_walk(client: ApiClient, sink: PageSink, *, workers: int, max_pages: int,
                    stop_after: Callable[[FetchedPage], Awaitable[bool]],
                    progress: Progress | None = None) -> WalkReport:
    """Incremental walk: pages from the newest until ``stop_after`` accepts a page.

    Pages are fetched a few at a time (the stop is usually within the first pages) and the
    newest-first order is re-verified on everything walked; the caller falls back to a full
    walk when it does not hold.
    """
    progress = progress or NullProgress()
    report = WalkReport()
    first = await client.fetch_page(1)
    report.total_start = storable(first.parsed.total)
    progress.start_pass(1, None)
    state = _Pass(page_size=client.page_size)
    await walk_pages(client, sink, first, workers=max(1, min(workers, 4)), max_pages=max_pages,
                     progress=progress, state=state, stop_after=stop_after)
    await sink.flush()
    _account(report, state, 1)
    return report
