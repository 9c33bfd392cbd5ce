"""Walk: every page of a live, unordered source, and an honest verdict on whether it was complete.

Driven by the fake API (tests/fakeapi.py) and the real staging sink, then merged, so the checks
are on what reaches the warehouse.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import duckdb
import httpx
import pytest
from fakeapi import FakeApi, make_run, make_runs, run_id

from runs_etl import warehouse
from runs_etl.engine.load import merge
from runs_etl.engine.staging import Stage, StagingSink
from runs_etl.engine.walk import WalkReport, full_walk
from runs_etl.errors import RetryableApiError, WalkError


@dataclass
class Walked:
    report: WalkReport
    con: duckdb.DuckDBPyConnection
    api: FakeApi

    def seen(self, pass_number: int | None = None) -> set[str]:
        """Distinct run ids staged (in one pass, or in all)."""
        if pass_number is None:
            rows = self.con.execute("SELECT DISTINCT id FROM stage_runs").fetchall()
        else:
            lo, hi = self.report.pass_ranges[pass_number - 1]
            rows = self.con.execute("SELECT DISTINCT id FROM stage_runs "
                                    "WHERE _seq BETWEEN ? AND ?", [lo, hi]).fetchall()
        return {r[0] for r in rows}

    def rows_in_pass(self, pass_number: int) -> int:
        lo, hi = self.report.pass_ranges[pass_number - 1]
        return self.con.execute("SELECT count(*) FROM stage_runs WHERE _seq BETWEEN ? AND ?",
                                [lo, hi]).fetchall()[0][0]

    def warehouse(self) -> tuple[int, set[str]]:
        """(rows, distinct ids) in the ``runs`` table after merging the walk."""
        rows = self.con.execute("SELECT id FROM runs").fetchall()
        return len(rows), {r[0] for r in rows}

    def pass_requests(self, pass_number: int) -> list[int]:
        """Page numbers requested during one pass (a pass starts at each request of page 1)."""
        starts = [i for i, p in enumerate(self.api.pages) if p == 1]
        end = starts[pass_number] if pass_number < len(starts) else len(self.api.pages)
        return self.api.pages[starts[pass_number - 1]:end]


@pytest.fixture
def walk(tmp_path):
    """walk(api, page_size=10, workers=4, max_passes=3, max_pages=10_000) -> Walked."""
    cons = []

    def run(api: FakeApi, *, page_size=10, workers=4, max_passes=3, max_pages=10_000,
            batch_pages=3) -> Walked:
        con = duckdb.connect(":memory:")
        cons.append(con)
        warehouse.migrate(con)
        stage = Stage(con, 1, tmp_path)
        sink = StagingSink(stage, batch_pages)

        async def main():
            client = api.client(page_size=page_size, concurrency=workers)
            try:
                return await full_walk(client, sink, workers=workers, max_pages=max_pages,
                                       max_passes=max_passes)
            finally:
                await sink.aclose()
                await client.aclose()

        report = asyncio.run(main())
        merge(con, "default", 1)
        return Walked(report, con, api)

    yield run
    for con in cons:
        con.close()


def ids(runs) -> set[str]:
    return {r["id"] for r in runs}


# --- a still source ------------------------------------------------------------------------------

def test_clean_walk_fetches_every_page_once_concurrently_and_stops_at_the_last(walk):
    api = FakeApi(make_runs(255), yield_inside=True)
    w = walk(api, workers=4)
    assert api.pages[0] == 1  # page 1 first: it says how many pages there are
    assert sorted(api.pages) == list(range(1, 27))  # 26 pages, each once, nothing past the end
    assert api.max_in_flight == 4
    assert (w.report.passes, w.report.pages, w.report.verified) == (1, 26, True)
    assert w.report.reason == "clean walk"
    assert (w.report.total_start, w.report.total_end) == (255, 255)
    assert w.warehouse() == (255, ids(api.runs))


def test_full_last_page_is_followed_by_a_bounded_probe(walk):
    """When the advertised last page is full, the walk looks past it, but only a few pages."""
    api = FakeApi(make_runs(100))
    w = walk(api, workers=8)
    assert set(range(1, 12)) <= set(api.pages)  # page 11 (empty) proves the end
    assert max(api.pages) <= 10 + 4 and len(api.pages) == len(set(api.pages))
    assert w.report.verified and w.report.passes == 1
    assert w.warehouse() == (100, ids(api.runs))


def test_a_short_first_page_is_the_whole_walk(walk):
    api = FakeApi(make_runs(7))
    w = walk(api)
    assert api.pages == [1]
    assert w.report.verified and w.warehouse() == (7, ids(api.runs))


def test_an_empty_workspace_is_a_verified_walk_of_one_request(walk):
    api = FakeApi([])
    w = walk(api)
    assert api.pages == [1]
    assert (w.report.verified, w.report.total_start, w.report.pages) == (True, 0, 1)
    assert w.warehouse() == (0, set())


def test_single_worker_walks_pages_in_order(walk):
    api = FakeApi(make_runs(45))
    walk(api, workers=1)
    assert api.pages == [1, 2, 3, 4, 5]


def test_rejected_records_count_toward_the_total_of_a_clean_walk(walk):
    runs = make_runs(30)
    del runs[4]["id"]
    api = FakeApi(runs, order="as_is")
    w = walk(api)
    assert w.report.verified and w.report.reason == "clean walk"
    assert w.warehouse()[0] == 29


def test_newest_first_order_is_reported(walk):
    assert walk(FakeApi(make_runs(35))).report.newest_first is True
    assert walk(FakeApi(make_runs(35), order="as_is")).report.newest_first is False


# --- null totals ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [45, 50])
def test_null_totals_walk_until_a_short_page_and_confirm_with_a_second_pass(walk, n):
    api = FakeApi(make_runs(n), null_totals=True)
    w = walk(api, workers=3)
    assert w.report.passes == 2 and w.report.verified
    assert w.report.reason == "converged after 2 passes"
    assert api.pages.count(1) == 2
    for k in (1, 2):
        pages = w.pass_requests(k)
        assert set(range(1, -(-n // 10) + 1)) <= set(pages)
        assert max(pages) <= -(-n // 10) + 1 + 3  # stops soon after the short page
    assert w.report.total_start is None
    assert w.warehouse() == (n, ids(api.runs))


# --- a moving source -----------------------------------------------------------------------------

def test_a_source_that_grows_during_the_walk_is_read_past_its_advertised_end(walk):
    api = FakeApi(make_runs(100))
    newer = make_runs(15, start=1000)
    api.before(2, lambda a: a.insert(*newer))  # right after page 1 said "10 pages"
    w = walk(api, workers=4)
    first_pass = w.pass_requests(1)
    assert {11, 12} <= set(first_pass)  # pages past the advertised end were fetched
    assert ids(make_runs(100)) <= w.seen(1)  # so pass 1 already saw every original run
    assert (w.report.total_start, w.report.total_end) == (100, 115)
    assert w.report.verified
    assert w.warehouse() == (115, ids(api.runs))


@pytest.mark.parametrize("workers", [1, 4])
def test_inserts_mid_walk_repeat_runs_but_lose_none_and_store_each_once(walk, workers):
    api = FakeApi(make_runs(120), yield_inside=True)
    original = ids(api.runs)
    counter = iter(range(5000, 6000))
    api.on_every_request(lambda a: a.insert(make_run(next(counter))))  # newest first: shifts down
    w = walk(api, workers=workers)
    assert w.rows_in_pass(1) > len(w.seen(1))  # offset paging did repeat runs
    assert original <= w.seen(1)  # but inserts never make a newest-first walk skip one
    rows, stored = w.warehouse()
    assert original <= stored
    assert rows == len(stored)  # none twice
    # Page 1 carried the count and the newest run as the walk began: every run present then
    # was seen, which proves the walk complete in one pass despite the repeats.
    assert w.report.verified and "runs present when pass 1 began were seen" in w.report.reason


def test_deletes_mid_walk_skip_runs_so_the_walk_is_not_clean_and_rewalks(walk):
    api = FakeApi(make_runs(100))
    newest = [run_id(99), run_id(98), run_id(97)]  # on page 1, already read
    api.before(2, lambda a: a.delete(*newest))
    w = walk(api, workers=4)
    shifted = {run_id(99 - p) for p in (10, 11, 12)}  # moved up onto page 1 after it was read
    assert not (shifted & w.seen(1))  # offset paging skipped them in pass 1
    assert w.report.passes >= 2 and w.report.reason != "clean walk"
    survivors = ids(make_runs(100)) - set(newest)
    rows, stored = w.warehouse()
    assert survivors <= stored and rows == len(stored)
    assert w.report.verified


@pytest.mark.parametrize("workers", [1, 4])
@pytest.mark.parametrize("victim", ["newest", "middle"])
def test_continuous_deletes_still_deliver_every_run_that_existed_throughout(walk, workers,
                                                                            victim):
    api = FakeApi(make_runs(150), yield_inside=True)
    original = ids(api.runs)
    deleted: set[str] = set()

    def delete_one(a: FakeApi) -> None:
        if len(a.runs) > 30:
            order = a.ordered()
            gone = order[0] if victim == "newest" else order[len(order) // 3]
            deleted.add(gone["id"])
            a.delete(gone["id"])

    api.on_every_request(delete_one)
    w = walk(api, workers=workers, max_passes=4)
    assert w.report.passes >= 2
    assert original - deleted <= w.warehouse()[1]


def test_a_run_skipped_by_two_passes_is_not_hidden_behind_a_verified_walk(walk):
    """A delete ahead of it in each pass, undone in between by an insert: pass 2 sees nothing
    new, but its shrinking total shows the source moved, so the walk goes on and finds it."""
    api = FakeApi(make_runs(100))
    hidden = run_id(59)  # position 40: first run of page 5
    api.before(5, lambda a: a.delete(run_id(99)))  # pass 1: hidden moves up onto page 4, read
    newcomer = make_run(1000)
    api.before(11, lambda a: a.insert(newcomer))  # pass 2 page 1: hidden back to position 40
    api.before(15, lambda a: a.delete(newcomer["id"]))  # pass 2 page 5: moves up again
    w = walk(api, workers=1)
    assert w.pass_requests(1) == list(range(1, 11))  # the script above lines up with pass 1
    assert hidden in api.ids()  # it existed throughout
    assert hidden not in w.seen(1) | w.seen(2)  # both passes skipped it
    assert w.report.passes == 3
    assert hidden in w.warehouse()[1]


def test_a_server_that_reorders_on_every_request_is_reported_unverified(walk):
    api = FakeApi(make_runs(100), order="shuffle", seed=7)
    w = walk(api, max_passes=3)
    assert w.report.passes == 3
    assert w.report.verified is False
    assert "not verified after 3 passes" in w.report.reason
    assert w.report.newest_first is False


# --- guards --------------------------------------------------------------------------------------

def test_max_pages_guard_stops_a_server_that_never_ends(walk):
    api = FakeApi(null_totals=True)
    counter = iter(range(10**6))
    api.override = lambda request, page: httpx.Response(200, json={
        "items": [make_run(next(counter)) for _ in range(10)], "total": None, "page": page,
        "size": 10, "pages": None})
    with pytest.raises(WalkError) as info:
        walk(api, max_pages=7, workers=4)
    assert info.value.page == 8
    assert "api.max_pages" in str(info.value)
    assert max(api.pages) == 7 and len(api.pages) == 7


def test_max_pages_guard_also_applies_within_the_advertised_pages(walk):
    api = FakeApi(make_runs(200))
    with pytest.raises(WalkError):
        walk(api, max_pages=5)
    assert max(api.pages) <= 5


def test_an_api_error_on_one_page_fails_the_walk(walk):
    api = FakeApi(make_runs(100))
    api.override = lambda request, page: httpx.Response(503) if page == 6 else None
    with pytest.raises(RetryableApiError) as info:
        walk(api, workers=4)
    assert info.value.page == 6
