"""sync() in-process: fake API over MockTransport, DuckDB in memory, the ledger as the witness."""

from __future__ import annotations

import json

import duckdb
import httpx
import pytest
from fakeapi import API_KEY, BASE_URL, FakeApi, Sleeps, make_run, make_runs

from runs_etl import warehouse
from runs_etl.config import load_settings
from runs_etl.engine.client import ApiClient
from runs_etl.engine.sync import sync
from runs_etl.errors import AuthError, ConfigError, DataError, RetryableApiError, WarehouseError
from runs_etl.warehouse import ledger


def settings_for(tmp_path, **sections):
    api = {"page_size": 10, "concurrency": 4, "max_attempts": 3, "backoff_base": 0}
    api.update(sections.pop("api", {}))
    env = {"RUNS_ETL_API_URL": BASE_URL, "RUNS_ETL_API_KEY": API_KEY}
    return load_settings(None, env, {"api": api, **sections}, cwd=tmp_path)


@pytest.fixture
def con():
    c = duckdb.connect(":memory:")
    yield c
    c.close()


@pytest.fixture
def sleeps(monkeypatch):
    """Every client ``sync`` builds records its waits here instead of sleeping."""
    recorded = Sleeps()
    original = ApiClient.from_settings.__func__

    def from_settings(cls, settings, transport=None, **kw):
        client = original(cls, settings, transport=transport, **kw)
        client.sleep, client.jitter = recorded, (lambda: 0.5)
        return client

    monkeypatch.setattr(ApiClient, "from_settings", classmethod(from_settings))
    return recorded


def ledger_rows(con) -> list[dict]:
    cur = con.execute("SELECT * FROM sync_runs ORDER BY sync_id")
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def runs_state(con) -> list[tuple]:
    return con.execute("SELECT id, status, progress, _sync_id FROM runs ORDER BY id").fetchall()


def test_a_sync_commits_every_run_and_a_success_ledger_row(tmp_path, con):
    api = FakeApi(make_runs(25), api_key=API_KEY)
    result = sync(settings_for(tmp_path), con, transport=api.transport())
    assert result.outcome == "success"
    (row,) = ledger_rows(con)
    assert row["outcome"] == "success" and row["error"] is None
    assert row["finished_at"] is not None and row["api_url"] == BASE_URL
    assert row["mode"] == "full" and row["verified"] is True
    assert (row["pages"], row["requests"], row["retries"]) == (3, 3, 0)
    assert (row["total_start"], row["total_end"], row["runs_seen"]) == (25, 25, 25)
    assert (row["rows_new"], row["rows_updated"], row["rows_unchanged"]) == (25, 0, 0)
    assert (row["rows_rejected"], row["rows_deleted"]) == (0, 0)
    assert row["workflows_new"] == 3
    assert row["bytes"] > 0 and row["seconds_total"] >= 0
    assert {r[0] for r in runs_state(con)} == api.ids()
    assert con.execute("SELECT count(*) FROM run_nodes").fetchall()[0][0] == 50


def test_a_second_sync_records_what_changed(tmp_path, con):
    api = FakeApi(make_runs(25))
    sync(settings_for(tmp_path), con, transport=api.transport())
    api.runs[3] = api.runs[3] | {"status": "failed"}
    api.insert(make_run(100))
    result = sync(settings_for(tmp_path), con, transport=api.transport())
    row = ledger_rows(con)[1]
    assert row["outcome"] == "success"
    assert (row["rows_new"], row["rows_updated"]) == (1, 1)
    assert (result.rows_new, result.rows_updated) == (1, 1)
    assert dict((i, s) for i, s, _, _ in runs_state(con))[api.runs[3]["id"]] == "failed"
    assert len(runs_state(con)) == 26


def test_an_empty_workspace_syncs_to_an_empty_warehouse(tmp_path, con):
    result = sync(settings_for(tmp_path), con, transport=FakeApi([]).transport())
    assert result.outcome == "success" and result.verified
    assert runs_state(con) == []
    assert ledger_rows(con)[0]["rows_new"] == 0


def test_a_failing_api_leaves_the_data_unchanged_and_the_failure_in_the_ledger(
        tmp_path, con, sleeps):
    api = FakeApi(make_runs(15))
    sync(settings_for(tmp_path), con, transport=api.transport())
    before = runs_state(con)
    api.runs = [r | {"status": "stopped", "progress": 1} for r in api.runs]  # would be updates
    api.override = lambda request, page: httpx.Response(
        500, json={"detail": "boom"}, headers={"x-request-id": "req-500"})
    settings = settings_for(tmp_path, api={"max_attempts": 2, "backoff_base": 1.0})
    with pytest.raises(RetryableApiError) as info:
        sync(settings, con, transport=api.transport())
    assert sleeps == [0.75]  # one retry, waited (patched) 75% of backoff_base with jitter 0.5
    assert runs_state(con) == before
    first, failed = ledger_rows(con)
    assert first["outcome"] == "success"
    assert failed["outcome"] == "failed" and failed["finished_at"] is not None
    assert failed["error"] == str(info.value)
    assert "HTTP 500" in failed["error"] and "req-500" in failed["error"]
    assert failed["retries"] == 1 and failed["requests"] == 2


def test_a_first_sync_that_fails_leaves_an_empty_warehouse(tmp_path, con, sleeps):
    api = FakeApi(make_runs(15))
    api.override = lambda request, page: httpx.Response(503) if page == 2 else None
    with pytest.raises(RetryableApiError):
        sync(settings_for(tmp_path, api={"max_attempts": 3}), con, transport=api.transport())
    assert sleeps == [0.0, 0.0]  # backoff_base=0
    assert runs_state(con) == []
    assert con.execute("SELECT count(*) FROM workflows").fetchall()[0][0] == 0
    assert [r["outcome"] for r in ledger_rows(con)] == ["failed"]


def test_a_rejected_key_fails_with_auth_error_and_no_key_in_the_ledger(tmp_path, con):
    api = FakeApi(make_runs(5), api_key="the-right-key")
    with pytest.raises(AuthError):
        sync(settings_for(tmp_path), con, transport=api.transport())
    (row,) = ledger_rows(con)
    assert row["outcome"] == "failed" and "RUNS_ETL_API_KEY" in row["error"]
    assert API_KEY not in row["error"]
    assert len(api.requests) == 1  # auth errors are not retried


def test_a_missing_key_fails_before_touching_the_warehouse(tmp_path, con):
    settings = load_settings(None, {"RUNS_ETL_API_URL": BASE_URL}, cwd=tmp_path)
    api = FakeApi(make_runs(5))
    with pytest.raises(ConfigError, match="RUNS_ETL_API_KEY"):
        sync(settings, con, transport=api.transport())
    assert api.requests == []
    assert con.execute("SELECT count(*) FROM information_schema.tables").fetchall()[0][0] == 0


def without(run: dict, key: str) -> dict:
    return {k: v for k, v in run.items() if k != key}


def test_too_many_rejected_records_fail_the_sync_and_commit_nothing(tmp_path, con):
    runs = make_runs(20)
    runs[4], runs[11] = without(runs[4], "created_at"), without(runs[11], "id")
    api = FakeApi(runs, order="as_is")
    with pytest.raises(DataError) as info:
        sync(settings_for(tmp_path), con, transport=api.transport())  # default limit: 1%
    assert "2 of 20" in str(info.value) and "max_reject_fraction" in str(info.value)
    assert runs_state(con) == []
    assert con.execute("SELECT count(*) FROM rejected_records").fetchall()[0][0] == 0
    (row,) = ledger_rows(con)
    assert row["outcome"] == "failed" and "failed validation" in row["error"]


def test_rejected_records_under_the_limit_are_kept_and_counted(tmp_path, con):
    runs = make_runs(20)
    runs[4] = without(runs[4], "created_at")
    runs[13] = without(runs[13], "id") | {"input": {"text": "ünï"}}
    api = FakeApi(runs, order="as_is")
    sync(settings_for(tmp_path, sync={"max_reject_fraction": 0.2}), con,
         transport=api.transport())
    (row,) = ledger_rows(con)
    assert row["outcome"] == "success"
    assert (row["rows_rejected"], row["runs_seen"], row["rows_new"]) == (2, 18, 18)
    rejected = con.execute("SELECT sync_id, page, item_index, run_id, error, raw "
                           "FROM rejected_records ORDER BY page, item_index").fetchall()
    assert [(s, p, i) for s, p, i, *_ in rejected] == [(1, 1, 4), (1, 2, 3)]
    assert rejected[0][3] == runs[4]["id"] and "created_at" in rejected[0][4]
    assert rejected[1][3] is None and "id" in rejected[1][4]
    assert json.loads(rejected[1][5]) == runs[13]
    assert len(runs_state(con)) == 18


def test_a_sync_left_running_is_marked_abandoned_by_the_next(tmp_path, con):
    warehouse.migrate(con)
    killed = ledger.open_attempt(con, "default", BASE_URL)  # a process that died mid-sync
    result = sync(settings_for(tmp_path), con, transport=FakeApi(make_runs(3)).transport())
    rows = {r["sync_id"]: r for r in ledger_rows(con)}
    assert rows[killed]["outcome"] == "abandoned"
    assert "stopped before finishing" in rows[killed]["error"]
    assert result.sync_id != killed and rows[result.sync_id]["outcome"] == "success"


def test_retries_are_counted_in_the_ledger(tmp_path, con, sleeps):
    api = FakeApi(make_runs(25))
    flaky = iter([True, False])
    api.override = lambda request, page: (
        httpx.Response(429, headers={"Retry-After": "3"}) if page == 2 and next(flaky, False)
        else None)
    sync(settings_for(tmp_path), con, transport=api.transport())
    (row,) = ledger_rows(con)
    assert sleeps == [3.0]
    assert (row["outcome"], row["retries"], row["requests"]) == ("success", 1, 4)
    assert len(runs_state(con)) == 25


def test_a_run_that_exists_throughout_is_never_marked_deleted(tmp_path, con):
    """Even when both walk passes skip it (see test_walk), a live run is not soft-deleted."""
    api = FakeApi(make_runs(100))
    settings = settings_for(tmp_path, api={"concurrency": 1})
    sync(settings, con, transport=api.transport())
    hidden = make_run(59)["id"]
    api.requests.clear()  # number the requests of the next sync from 1
    newcomer = make_run(1000)
    api.before(5, lambda a: a.delete(make_run(99)["id"]))
    api.before(11, lambda a: a.insert(newcomer))
    api.before(15, lambda a: a.delete(newcomer["id"]))
    sync(settings, con, transport=api.transport(), full_refresh=True)
    assert hidden in api.ids()
    (deleted_at,) = con.execute("SELECT _deleted_at FROM runs WHERE id = ?", [hidden]).fetchall()[0]
    assert deleted_at is None


def test_a_run_deleted_at_the_source_is_soft_deleted_by_a_full_sync(tmp_path, con):
    api = FakeApi(make_runs(40))
    settings = settings_for(tmp_path, sync={"max_delete_fraction": 0.1})
    sync(settings, con, transport=api.transport())
    gone = make_run(17)["id"]
    api.delete(gone)
    result = sync(settings, con, transport=api.transport(), full_refresh=True)
    assert result.verified and result.rows_deleted == 1
    deleted = con.execute("SELECT id FROM runs WHERE _deleted_at IS NOT NULL").fetchall()
    assert deleted == [(gone,)]
    assert len(runs_state(con)) == 40  # soft delete: the row stays, flagged


def test_duckdb_out_of_memory_is_a_clear_error_naming_the_setting_and_commits_nothing(tmp_path,
                                                                                  con):
    api = FakeApi(make_runs(30), api_key=API_KEY)
    sync(settings_for(tmp_path), con, transport=api.transport())
    before = runs_state(con)
    api.runs.extend(make_runs(3000, start=100))
    con.execute("SET memory_limit = '4MB'")  # far too little for the merge
    with pytest.raises(WarehouseError, match=r"out of memory.*warehouse\.memory_limit"):
        sync(settings_for(tmp_path), con, transport=api.transport())
    con.execute("SET memory_limit = '256MB'")  # room again to look at what is there
    assert runs_state(con) == before
    assert [r["outcome"] for r in ledger_rows(con)].count("success") == 1
