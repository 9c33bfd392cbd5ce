"""Core sync, end to end: after a sync the warehouse is an exact mirror of the source (every run,
once, with its latest state), against the real simulator on loopback, a real DuckDB file and the
real CLI entry point, through faults, a source that moves while it is walked, and a kill -9."""

from __future__ import annotations

import json
import math
import signal
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import pytest
from fakeapi import API_KEY, BASE_URL, EPOCH, FakeApi, make_run
from helpers import (
    RUN_FIELDS,
    Gate,
    assert_mirror,
    cli_process,
    dump_tables,
    error_line,
    instant,
    ledger,
    read_warehouse,
    settings_for,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runs_etl import jobs
from runs_etl.config import load_settings
from runs_etl.engine.sync import sync
from runs_etl.sim import Faults
from runs_etl.warehouse.publish import working_path

PAGE = "50"  # small pages: many requests per walk


def only(rows: list[dict]) -> dict:
    assert len(rows) == 1, rows
    return rows[0]


# --- the happy path through the CLI -----------------------------------------------------------

def test_cli_sync_lands_an_exact_mirror_and_one_ledger_row_that_adds_up(make_sim, run_cli,
                                                                         tmp_path):
    # More unknown fields and node_ids objects than the defaults, so both are surely exercised.
    sim = make_sim(1234, seed=1, node_ids_object_rate=0.05, extra_fields_rate=0.1)
    snap = sim.snapshot()
    assert any(isinstance(r["node_ids"], dict) for r in snap.values())
    assert any(set(r) - set(RUN_FIELDS) for r in snap.values())
    assert any(r["workflow"] is None for r in snap.values())

    code, _, err = run_cli(sim, "sync", "-q", RUNS_ETL_PAGE_SIZE=PAGE)

    assert code == 0, err
    wh = assert_mirror(tmp_path / "runs.duckdb", sim)
    row = only(wh.ledger)
    assert row["outcome"] == "success" and row["error"] is None
    assert row["mode"] == "full" and "first sync" in row["mode_reason"]
    assert row["verified"] is True and row["walk_passes"] == 1
    assert row["pages"] == math.ceil(1234 / 50) == row["requests"]
    assert row["retries"] == 0 and row["single_run_requests"] == 0
    assert row["total_start"] == row["total_end"] == row["runs_seen"] == row["rows_new"] == 1234
    assert (row["rows_updated"], row["rows_unchanged"], row["rows_deleted"],
            row["rows_undeleted"], row["rows_rejected"]) == (0, 0, 0, 0, 0)
    assert row["workflows_new"] == len(wh.workflows) and row["workflows_updated"] == 0
    assert row["api_url"] == sim.base_url and row["finished_at"] >= row["started_at"]


def test_faults_on_one_request_in_ten_are_retried_and_the_mirror_is_still_exact(make_sim,
                                                                                 run_cli,
                                                                                 tmp_path):
    sim = make_sim(1500, seed=2, faults=Faults(rate_429=0.03, rate_500=0.03, rate_truncated=0.02,
                                               rate_bad_envelope=0.02, retry_after="0"))
    config = tmp_path / "runs-etl.toml"
    config.write_text("[api]\nbackoff_base = 0.001\nbackoff_max = 0.01\nmax_attempts = 10\n",
                      encoding="utf-8")

    code, _, err = run_cli(sim, "sync", "-q", "--config", str(config), RUNS_ETL_PAGE_SIZE=PAGE)

    assert code == 0, err
    wh = assert_mirror(tmp_path / "runs.duckdb", sim)
    row = only(wh.ledger)
    assert row["outcome"] == "success" and row["verified"] is True
    assert row["retries"] > 0
    assert row["requests"] == row["pages"] + row["retries"] == sim.list_request_count
    assert row["rows_new"] == row["runs_seen"] == 1500


def test_429_without_retry_after_backs_off_and_still_lands_everything(make_sim, tmp_path):
    sim = make_sim(600, seed=3, faults=Faults(rate_429=0.15, retry_after=None))
    db = tmp_path / "runs.duckdb"
    result = jobs.run_sync(settings_for(sim, db, api={"page_size": 50, "backoff_base": 0.001,
                                                     "backoff_max": 0.01, "max_attempts": 10}),
                          quiet=True)
    assert result.outcome == "success" and result.retries > 0
    assert_mirror(db, sim)


@pytest.mark.parametrize("sim_kw", [{"null_totals": True}, {"order": "random"}],
                         ids=["null-totals", "random-order"])
def test_servers_without_totals_or_order_still_give_an_exact_verified_mirror(make_sim, run_cli,
                                                                            tmp_path, sim_kw):
    sim = make_sim(1111, seed=4, **sim_kw)
    code, _, err = run_cli(sim, "sync", "-q", RUNS_ETL_PAGE_SIZE=PAGE)
    assert code == 0, err
    wh = assert_mirror(tmp_path / "runs.duckdb", sim)
    row = only(wh.ledger)
    assert row["outcome"] == "success" and row["verified"] is True
    if sim_kw.get("null_totals"):  # no total to prove a clean walk: a confirming pass
        assert row["walk_passes"] == 2 and row["total_end"] is None


# --- a source that moves while it is walked ---------------------------------------------------

@pytest.mark.parametrize("concurrency", [1, 8])
def test_inserts_and_deletes_mid_walk_lose_no_run_and_store_none_twice(make_sim, tmp_path,
                                                                       concurrency):
    sim = make_sim(1500, seed=5)
    db = tmp_path / "runs.duckdb"
    settings = settings_for(sim, db, api={"page_size": 50, "concurrency": concurrency})
    start = sim.run_ids()
    added, deleted = [], []

    def churn(sim, page, size, n):  # during most of the first pass (30 pages)
        if 2 <= n <= 25:
            added.extend(sim.add_runs(2))
            deleted.extend(sim.delete(1, where="random"))
            deleted.extend(sim.delete(1, where="oldest"))

    sim.on_list_request(churn)
    result = jobs.run_sync(settings, quiet=True)
    sim.on_list_request(None)

    end = sim.run_ids()
    throughout = start & end
    assert len(deleted) == 48 and len(throughout) == 1500 - 48  # the churn really happened
    wh = read_warehouse(db)
    assert all(n == 1 for n in wh.run_id_counts.values()), "a run is stored twice"
    assert throughout <= wh.live, f"{len(throughout - wh.live)} runs that never left were lost"
    assert wh.live <= start | set(added)
    # What was stored is what the source said (runs' own data does not change under churn).
    snap = sim.snapshot()
    assert_mirror(db, {i: snap[i] for i in wh.live & end}, stale=wh.live - end, workflows=None)
    row = wh.ledger[-1]
    assert row["outcome"] == "success" and result.outcome == "success"
    # The first pass saw the source move; a later pass found it still and verified the walk.
    assert row["walk_passes"] >= 2 and row["verified"] is True

    seen_then_gone = wh.live - end
    assert seen_then_gone, "no run was seen and then deleted: the churn did not test deletes"

    # With the source still, the next syncs converge: a plain one keeps nothing it should not,
    # a full refresh leaves the exact mirror, with exactly the vanished runs marked deleted.
    assert jobs.run_sync(settings, quiet=True).outcome == "success"
    assert_mirror(db, sim, stale=seen_then_gone, workflows="present")
    full = jobs.run_sync(settings, quiet=True, full_refresh=True)
    assert full.outcome == "success" and full.verified
    assert assert_mirror(db, sim).deleted == seen_then_gone


# --- kill -9 in the middle of a sync ----------------------------------------------------------

@pytest.mark.parametrize("held_request", [3, 40], ids=["early", "late"])
def test_sigkill_mid_sync_keeps_the_last_commit_and_the_next_sync_repairs_everything(
        make_sim, sim_env, tmp_path, held_request):
    sim = make_sim(2000, seed=6)
    db = tmp_path / "runs.duckdb"
    settings = settings_for(sim, db, api={"page_size": 50})
    assert jobs.run_sync(settings, quiet=True).outcome == "success"
    good = sim.snapshot()
    before = dump_tables(db)
    # The source changes: the killed sync had new, changed and deleted runs to land.
    sim.add_runs(250)
    sim.transition()
    sim.delete(30, where="random")
    sim.touch_terminal(list(good)[:20])

    gate = Gate(sim, sim.list_request_count + held_request)
    env = sim_env(sim, RUNS_ETL_PAGE_SIZE=PAGE, TMPDIR=str(tmp_path))
    try:
        with cli_process(["sync", "--full-refresh", "-q"], env, tmp_path) as proc:
            assert gate.entered.wait(60), "the sync never reached the held request"
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(30) == -signal.SIGKILL
    finally:
        gate.open()
        sim.on_list_request(None)

    # Readers' file holds exactly the previous good commit; the writer's file holds that commit
    # too, plus the trace of the killed attempt.
    assert dump_tables(db) == before
    assert_mirror(db, good)
    assert [r["outcome"] for r in ledger(db)] == ["success"]
    assert [r["outcome"] for r in ledger(working_path(db))] == ["success", "running"]
    assert dump_tables(working_path(db)) == before

    result = jobs.run_sync(settings, quiet=True, full_refresh=True)
    assert result.outcome == "success" and result.verified
    assert_mirror(db, sim)
    assert [r["outcome"] for r in ledger(db)] == ["success", "abandoned", "success"]


# --- failures that must not touch the data ----------------------------------------------------

@pytest.mark.parametrize("auth_status", [401, 403])
def test_a_wrong_key_exits_3_naming_the_variable_and_changes_no_data(make_sim, run_cli,
                                                                      tmp_path, auth_status):
    sim = make_sim(300, seed=7, auth_status=auth_status)
    assert run_cli(sim, "sync", "-q")[0] == 0
    db = tmp_path / "runs.duckdb"
    before = dump_tables(db)
    wrong = "sk-wrong-3f9c1a7e5d"

    code, out, err = run_cli(sim, "sync", "-q", RUNS_ETL_API_KEY=wrong)

    assert code == 3
    line = error_line(err)
    assert "RUNS_ETL_API_KEY" in line
    assert wrong not in out + err
    assert dump_tables(db) == before
    attempts = ledger(db)
    assert [r["outcome"] for r in attempts] == ["success", "failed"]  # the attempt is on record
    assert wrong not in (attempts[-1]["error"] or "")


def _as_compared(rec: dict) -> dict:
    """A served record without its workflow, timestamps as instants: the wire writes them in
    several styles, the snapshot in one."""
    out = {k: v for k, v in rec.items() if k != "workflow"}
    for k in ("created_at", "finished_at"):
        if out.get(k) not in (None, "not a date"):
            out[k] = instant(out[k])
    return out


def test_malformed_records_are_kept_raw_in_rejected_records_and_the_rest_commits(
        make_sim, run_cli, tmp_path):
    # About one page in three serves one record without its id or with a created_at that is no date.
    sim = make_sim(1000, seed=8, faults=Faults(rate_bad_record=0.3))
    snap = sim.snapshot()

    code, _, err = run_cli(sim, "sync", "-q", RUNS_ETL_PAGE_SIZE=PAGE)

    assert code == 0, err
    bad = set(snap) - read_warehouse(tmp_path / "runs.duckdb").live  # the runs served malformed
    wh = assert_mirror(tmp_path / "runs.duckdb", {i: r for i, r in snap.items() if i not in bad})
    assert 0 < len(wh.rejected) == len(bad) <= 10  # under sync.max_reject_fraction (1%)
    kinds, matched = set(), set()
    for rec in wh.rejected:
        raw = json.loads(rec["raw"])
        if "id" in raw:  # created_at was not a date: the id is known
            assert raw["id"] in bad and rec["run_id"] == raw["id"]
            assert raw["created_at"] == "not a date" and "created_at" in rec["error"]
            original = snap[raw["id"]]
            expected = original | {"created_at": "not a date"}
            kinds.add("created_at")
        else:
            assert rec["run_id"] is None and "id" in rec["error"]
            [original] = [snap[i] for i in bad
                          if instant(snap[i]["created_at"]) == instant(raw["created_at"])]
            expected = {k: v for k, v in original.items() if k != "id"}
            kinds.add("id")
        matched.add(original["id"])
        assert list(raw) == list(expected)  # nothing else was dropped, nor reordered
        assert _as_compared(raw) == _as_compared(expected)
        assert (raw["workflow"] or {}).get("id") == (original["workflow"] or {}).get("id")
    assert kinds == {"id", "created_at"} and matched == bad  # each missing run, once
    row = only(wh.ledger)
    assert row["outcome"] == "success" and row["rows_rejected"] == len(bad)
    assert row["runs_seen"] == row["rows_new"] == 1000 - len(bad)


def test_too_many_malformed_records_fail_the_sync_and_commit_nothing(make_sim, run_cli,
                                                                     tmp_path):
    sim = make_sim(1000, seed=9)
    assert run_cli(sim, "sync", "-q", RUNS_ETL_PAGE_SIZE=PAGE)[0] == 0
    db = tmp_path / "runs.duckdb"
    before = dump_tables(db)
    sim.add_runs(40)
    sim.transition()
    sim.faults.rate_bad_record = 1.0  # one bad record in every page of 50: 2% > 1%

    code, _, err = run_cli(sim, "sync", "-q", "--full-refresh", RUNS_ETL_PAGE_SIZE=PAGE)

    assert code != 0
    assert "max_reject_fraction" in error_line(err)
    assert dump_tables(db) == before  # not the good runs either, not the rejects
    assert [r["outcome"] for r in ledger(db)] == ["success", "failed"]


# --- properties, in process -------------------------------------------------------------------

_JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
_OFFSETS = ("Z", "+00:00", "+02:00", "-05:00", "")


def _render(instant: datetime, offset: str) -> str:
    """An instant the way some server version writes it ("" = naive, meaning UTC)."""
    if offset == "":
        return instant.replace(tzinfo=None).isoformat()
    if offset == "Z":
        return instant.isoformat().replace("+00:00", "Z")
    return instant.astimezone(timezone(timedelta(hours=int(offset[:3])))).isoformat()


@st.composite
def sources(draw) -> list[dict]:
    """Runs as varied as the API sends them: any status, node_ids list/object/null, unknown
    fields, timestamps in any offset style; one workflow snapshot per workflow id."""
    n = draw(st.integers(0, 40))
    runs = []
    for i in draw(st.lists(st.integers(0, 10_000), min_size=n, max_size=n, unique=True)):
        status = draw(st.sampled_from(["completed", "failed", "stopped", "queued", "running",
                                       "awaiting_human_feedback"]))
        created = EPOCH + timedelta(minutes=i, microseconds=draw(st.integers(0, 999_999)))
        wire = _render(created, draw(st.sampled_from(_OFFSETS)))
        run = make_run(i, status=status, created_at=wire, input=draw(_JSON),
                       node_ids=draw(st.none() | st.lists(st.text(min_size=1, max_size=4),
                                                          max_size=4)
                                     | st.dictionaries(st.text(min_size=1, max_size=3),
                                                       st.text(max_size=3), max_size=3)),
                       progress=draw(st.none() | st.integers(0, 100)))
        if draw(st.booleans()):
            run["output"] = draw(_JSON)
        if draw(st.integers(0, 9)) == 0:
            run["workflow"] = None
        runs.append(run)
    return runs


def _settings(page_size: int, concurrency: int = 4):
    env = {"RUNS_ETL_API_URL": BASE_URL, "RUNS_ETL_API_KEY": API_KEY}
    return load_settings(None, env, {"api": {"page_size": page_size, "concurrency": concurrency,
                                             "backoff_base": 0.0}}, cwd=Path.cwd())


_CONTENT = {  # what a reader sees, without the sync's own bookkeeping (times, sync ids)
    "runs": "SELECT * EXCLUDE (_first_seen_at, _synced_at, _sync_id) FROM runs",
    "workflows": "SELECT * EXCLUDE (_first_seen_at, _synced_at, _sync_id) FROM workflows",
    "run_nodes": "SELECT * FROM run_nodes",
}
_EVERYTHING = {t: f"SELECT * FROM {t}" for t in ("runs", "workflows", "run_nodes",
                                                 "rejected_records")}


def _content(con, queries=None) -> dict[str, list]:
    return {t: sorted(map(repr, con.execute(q).fetchall()))
            for t, q in (queries or _CONTENT).items()}


_PROPS = settings(max_examples=15, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@_PROPS
@given(runs=sources(), page_size=st.integers(1, 12))
def test_syncing_the_same_source_twice_equals_syncing_it_once(runs, page_size):
    api, con = FakeApi(runs), duckdb.connect(":memory:")
    try:
        assert sync(_settings(page_size), con, transport=api.transport()).outcome == "success"
        once = _content(con, _EVERYTHING)
        again = sync(_settings(page_size), con, transport=api.transport(), full_refresh=True)
        assert (again.rows_new, again.rows_updated, again.rows_deleted) == (0, 0, 0)
        assert again.rows_unchanged == len(runs) and again.verified
        assert _content(con, _EVERYTHING) == once  # not even _synced_at was rewritten
        plain = sync(_settings(page_size), con, transport=api.transport())
        assert (plain.rows_new, plain.rows_updated, plain.rows_deleted) == (0, 0, 0)
        assert _content(con, _EVERYTHING) == once
        assert_mirror(con, {r["id"]: r for r in runs})
    finally:
        con.close()


@_PROPS
@given(runs=sources(), order=st.randoms(use_true_random=False), size_a=st.integers(1, 12),
       size_b=st.integers(1, 12), concurrency=st.integers(1, 6))
def test_any_page_order_or_split_gives_the_same_warehouse(runs, order, size_a, size_b,
                                                          concurrency):
    shuffled = list(runs)
    order.shuffle(shuffled)
    a, b = duckdb.connect(":memory:"), duckdb.connect(":memory:")
    try:
        assert sync(_settings(size_a), a, transport=FakeApi(runs).transport()).verified
        api = FakeApi(shuffled, order="as_is", yield_inside=True)
        assert sync(_settings(size_b, concurrency), b, transport=api.transport()).verified
        assert _content(a) == _content(b)
        assert_mirror(b, {r["id"]: r for r in runs})
    finally:
        a.close()
        b.close()
