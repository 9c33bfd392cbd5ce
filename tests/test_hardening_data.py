"""Hardening of the data path (issue 9): a hostile or broken source never loses a run, never
deletes one wrongly, and never turns one bad record into a failed sync."""

from __future__ import annotations

import json
import sys

import duckdb
import pytest
from fakeapi import API_KEY, BASE_URL, FakeApi, make_run, make_runs, run_id

from runs_etl.config import load_settings
from runs_etl.engine.models import EnvelopeError, parse_page
from runs_etl.engine.sync import sync


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
