"""Hardening of the data path (issue 9): a hostile or broken source never loses a run, never
deletes one wrongly, and never turns one bad record into a failed sync."""

from __future__ import annotations

import asyncio
import json
import logging
import sys

import duckdb
import httpx
import pytest
from fakeapi import API_KEY, BASE_URL, FakeApi, make_run, make_runs, run_id

from runs_etl.config import load_settings
from runs_etl.engine.client import ApiClient
from runs_etl.engine.extract import Extracted, _confirm_absent
from runs_etl.engine.models import EnvelopeError, parse_page
from runs_etl.engine.sync import sync
from runs_etl.engine.walk import WalkReport
from runs_etl.errors import FatalApiError


def settings_for(tmp_path, **sections):
    api = {"page_size": 10, "concurrency": 4, "max_attempts": 2, "backoff_base": 0}
    api.update(sections.pop("api", {}))
    sync_kw = {"max_reject_fraction": 0.2, **sections.pop("sync", {})}
    env = {"RUNS_ETL_API_URL": BASE_URL, "RUNS_ETL_API_KEY": API_KEY}
    return load_settings(None, env, {"api": api, "sync": sync_kw, **sections}, cwd=tmp_path)


@pytest.fixture
def con():
    c = duckdb.connect(":memory:")
    yield c
    c.close()


def live_ids(con) -> set[str]:
    return {i for (i,) in con.execute("SELECT id FROM runs WHERE _deleted_at IS NULL").fetchall()}


def rejected(con) -> list[tuple]:
    return con.execute("SELECT run_id, error, raw FROM rejected_records "
                       "ORDER BY item_index").fetchall()


def nested(depth: int) -> object:
    value: object = {"leaf": True}
    for _ in range(depth):
        value = [value]
    return value


# --- 13: a record nested past the parser's limit -------------------------------------------------

def test_a_deeply_nested_record_is_rejected_and_the_rest_of_its_page_lands(tmp_path, con):
    runs = make_runs(20)
    runs[4] = make_run(4, input=nested(250))
    api = FakeApi(runs)
    result = sync(settings_for(tmp_path), con, transport=api.transport())
    assert result.outcome == "success" and result.rows_rejected == 1
    assert live_ids(con) == api.ids() - {run_id(4)}
    ((rid, error, raw),) = rejected(con)
    assert rid == run_id(4) and "recursion" in error
    assert json.loads(raw) == runs[4]  # the raw record, whole
    # The poison run does not block the next sync either.
    assert sync(settings_for(tmp_path), con, transport=api.transport()).outcome == "success"


def test_a_record_deeper_than_pythons_own_parser_is_rejected_as_raw_text():
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)
    try:
        items = [make_run(1), make_run(2, input=nested(5_000)), make_run(3)]
        body = json.dumps({"items": items, "total": 3, "pages": 1}).encode()
    finally:
        sys.setrecursionlimit(limit)
    page = parse_page(body)
    assert [r.id for r in page.runs] == [run_id(1), run_id(3)]
    (bad,) = page.rejected
    assert (bad.index, bad.run_id) == (1, run_id(2))
    assert json.loads(bad.raw).startswith('{"id": "' + run_id(2))  # kept as text, every byte


@pytest.mark.parametrize("body", [
    b'{"items": [{"id": "a", "status": "x", "created_at": "2024-01-01T00:00:00Z"}, ',
    b'{"items": [[[[[[' + b"[" * 300 + b"]" * 300,
    b'{"items": [{"id": "a"}}, "total": 1}',
    b'{"total": 1, "x": ' + b"[" * 300 + b"]" * 300 + b', "items": []}',
])
def test_a_truncated_or_corrupt_body_is_still_a_broken_response_to_retry(body):
    with pytest.raises(EnvelopeError):
        parse_page(body)


def test_strings_holding_brackets_do_not_confuse_the_record_split():
    tricky = make_run(1, group_id='a]b}"c\\', input={"s": "[{,:\"}]", "deep": nested(250)})
    items = [make_run(0, source="x],{"), tricky, make_run(2)]
    page = parse_page(json.dumps({"items": items, "total": 3, "pages": 1}).encode())
    assert [r.id for r in page.runs] == [run_id(0), run_id(2)]
    assert page.runs[0].source == "x],{"
    assert json.loads(page.rejected[0].raw) == tricky
    assert (page.total, page.pages) == (3, 1)


# --- 14: timestamps the warehouse cannot hold ----------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("created_at", "0001-01-01T00:00:00+14:00"),  # 1 BC once in UTC
    ("created_at", "1969-12-31T23:59:59Z"),
    ("created_at", "1970-01-01T01:00:00+02:00"),  # before the epoch once the offset applies
    ("finished_at", "9999-12-31T23:00:00-05:00"),  # year 10000 in UTC
])
def test_a_timestamp_outside_the_accepted_range_rejects_the_record(tmp_path, con, field, value):
    runs = make_runs(10)
    runs[3] = runs[3] | {field: value}
    result = sync(settings_for(tmp_path), con, transport=FakeApi(runs).transport())
    assert result.outcome == "success" and result.rows_rejected == 1
    assert run_id(3) not in live_ids(con) and len(live_ids(con)) == 9
    ((rid, error, _),) = rejected(con)
    assert rid == run_id(3) and field in error
    # What was stored reads back into Python (the report crashed on a 1 BC instant).
    for created, finished in con.execute("SELECT created_at, finished_at FROM runs").fetchall():
        assert created.year >= 1970 and (finished is None or finished.year <= 9999)


def test_the_edges_of_the_accepted_range_are_stored(tmp_path, con):
    runs = make_runs(3)
    runs[0] |= {"created_at": "1970-01-01T00:00:00Z"}
    runs[1] |= {"created_at": "1970-01-01T00:00:00", "finished_at": "9999-12-31T23:59:59Z"}
    result = sync(settings_for(tmp_path), con, transport=FakeApi(runs).transport())
    assert result.rows_rejected == 0 and len(live_ids(con)) == 3


# --- 12: ids that do not survive a URL path --------------------------------------------------

def _aged_source(odd_id: str) -> FakeApi:
    """200 runs a minute apart (far past the 1 h lookback) whose oldest is open: an
    incremental sync stops long before it and refreshes it by id."""
    runs = make_runs(200, start=1)
    runs.append(make_run(0, status="running", id=odd_id))
    return FakeApi(runs)


def test_an_open_run_whose_id_holds_a_slash_is_never_deleted_on_its_404(tmp_path, con, caplog):
    api = _aged_source("weird/id")
    assert sync(settings_for(tmp_path), con, transport=api.transport()).verified
    result = sync(settings_for(tmp_path), con, transport=api.transport())
    assert result.mode == "incremental" and result.single_run_requests == 1
    raw_path = api.requests[-1].url.raw_path
    assert raw_path == b"/v1/runs/weird%2Fid"  # one path segment, not /v1/runs/weird/id
    assert result.rows_deleted == 0 and "weird/id" in live_ids(con)
    assert "404" in caplog.text and "'weird/id'" in caplog.text


def test_an_open_run_with_a_plain_id_that_answers_404_is_still_marked_deleted(tmp_path, con):
    api = _aged_source("plain-id_1.x~")
    sync(settings_for(tmp_path), con, transport=api.transport())
    api.delete("plain-id_1.x~")
    result = sync(settings_for(tmp_path), con, transport=api.transport())
    assert result.mode == "incremental" and result.rows_deleted == 1
    assert "plain-id_1.x~" not in live_ids(con)


# --- 15, 17: a total that cannot be believed verifies nothing ----------------------------------

class BadTotals(FakeApi):
    def __init__(self, runs, **envelope):
        super().__init__(runs)
        self.envelope = envelope

    def page_body(self, page: int, size: int) -> dict:
        return super().page_body(page, size) | self.envelope


@pytest.mark.parametrize("envelope, stored_total", [
    ({"total": -5, "pages": 1}, -5),
    ({"total": 0, "pages": 0}, 0),
    ({"total": 2**70, "pages": 3}, None),  # beyond BIGINT: not storable, not a traceback
    ({"total": 25, "pages": 1}, 25),  # pages disagrees with total
])
def test_a_nonsense_total_leaves_the_walk_unverified_and_deletes_nothing(
        tmp_path, con, envelope, stored_total):
    sync(settings_for(tmp_path), con, transport=FakeApi(make_runs(25)).transport())
    api = BadTotals(make_runs(24), **envelope)  # run 24 vanished: only a verified walk may say
    result = sync(settings_for(tmp_path), con, transport=api.transport(), full_refresh=True)
    assert result.outcome == "success" and not result.verified
    assert "not verified" in result.mode_reason and "verified: all" not in result.mode_reason
    assert result.rows_deleted == 0 and run_id(24) in live_ids(con)
    row = con.execute("SELECT outcome, verified, total_start FROM sync_runs "
                      "WHERE sync_id = 2").fetchall()[0]
    assert row == ("success", False, stored_total)


def test_a_believable_total_still_verifies_and_an_empty_workspace_is_clean(tmp_path, con):
    assert sync(settings_for(tmp_path), con, transport=FakeApi([]).transport()).verified
    assert sync(settings_for(tmp_path), con, transport=FakeApi(make_runs(25)).transport()).verified


# --- 23: one failed by-id fetch stops its siblings --------------------------------------------

def test_a_failing_fetch_by_id_cancels_the_others_still_in_flight(tmp_path):
    others = ["a", "b", "c"]
    started: list[str] = []
    cancelled: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        rid = request.url.path.rsplit("/", 1)[1]
        if rid == "bad":
            while len(started) < len(others):
                await asyncio.sleep(0)
            return httpx.Response(400, json={"detail": "no"})
        started.append(rid)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(rid)
            raise
        raise AssertionError("unreachable")

    class Sink:
        async def unstaged_live_ids(self):
            return ["bad", *others]

    async def main() -> None:
        http = httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url=BASE_URL)
        client = ApiClient(http=http, page_size=10, concurrency=8)
        extracted = Extracted("full", "", WalkReport(verified=True), True)
        with pytest.raises(FatalApiError):
            await _confirm_absent(extracted, client, Sink(), settings_for(tmp_path), True)
        assert sorted(cancelled) == others  # none left running behind the error
        await client.aclose()

    asyncio.run(main())


# --- 24: timestamps of mixed precision on a newest-first source ------------------------------

def _mixed_precision_runs(n: int) -> list[dict]:
    """Newest first by their true instants (every 300 ms), each sent at the precision of its
    turn: whole seconds (truncated), milliseconds or microseconds."""
    runs = []
    for i in reversed(range(n)):
        ms = 5_000 + 300 * i
        sec, frac = divmod(ms, 1000)
        stamp = ("2024-01-01T00:{:02d}:{:02d}".format(*divmod(sec, 60)) + [
            "Z", f".{frac:03d}Z", f".{frac:03d}123+00:00"][i % 3])
        runs.append(make_run(i, created_at=stamp, finished_at=stamp))
    return runs


def test_mixed_precision_timestamps_do_not_make_a_newest_first_source_unordered(tmp_path, con):
    api = FakeApi(_mixed_precision_runs(45), order="as_is")
    first = sync(settings_for(tmp_path), con, transport=api.transport())
    assert first.verified
    second = sync(settings_for(tmp_path), con, transport=api.transport())
    assert second.mode == "incremental", second.mode_reason


def test_a_real_order_violation_is_still_seen_across_precisions(tmp_path, con):
    runs = _mixed_precision_runs(45)
    runs[20]["created_at"] = "2024-01-01T00:00:59.400Z"  # newer than the second before it
    api = FakeApi(runs, order="as_is")
    sync(settings_for(tmp_path), con, transport=api.transport())
    assert sync(settings_for(tmp_path), con, transport=api.transport()).mode == "fallback"


# --- 25: new API fields are noticed once -------------------------------------------------------

def test_a_new_top_level_field_is_logged_once_and_recorded_in_the_ledger(tmp_path, con, caplog):
    runs = [r | {"meta": {"k": 1}, "progress_details": []} for r in make_runs(12)]
    runs[0]["node_ids"] = {"n1": {}}  # an object node_ids lands in extra but is a known field
    api = FakeApi(runs)
    caplog.set_level(logging.INFO, logger="runs_etl")
    sync(settings_for(tmp_path), con, transport=api.transport())
    assert "meta, progress_details" in caplog.text and "node_ids" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # a baseline
    caplog.clear()
    sync(settings_for(tmp_path), con, transport=api.transport(), full_refresh=True)
    assert "does not know" not in caplog.text  # once, not on every sync
    api.runs[5] = api.runs[5] | {"cost": 0.2}
    sync(settings_for(tmp_path), con, transport=api.transport(), full_refresh=True)
    assert [r.levelno for r in caplog.records if "cost" in r.getMessage()] == [logging.WARNING]
    rows = con.execute("SELECT new_fields FROM sync_runs ORDER BY sync_id").fetchall()
    assert rows == [("meta, progress_details",), (None,), ("cost",)]
