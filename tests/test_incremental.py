"""Incremental syncs and safe delete detection, end to end against the simulator: a plain sync
reads only the head of a newest-first source yet leaves every run the source has exactly as the
source says; runs are marked deleted only when that is proven (a 404 by id, or a verified full
walk), never beyond the mass-delete breaker unless asked."""

from __future__ import annotations

import random
from datetime import timedelta

import duckdb
import pytest
from fakeapi import API_KEY, BASE_URL, EPOCH, FakeApi, make_run, make_runs, run_id
from helpers import (
    TERMINAL,
    assert_mirror,
    dump_tables,
    error_line,
    instant,
    ledger,
    open_db,
    read_warehouse,
    settings_for,
)

from runs_etl import jobs
from runs_etl.config import load_settings
from runs_etl.engine.sync import sync
from runs_etl.warehouse.publish import working_path

PAGE = 50


def _settings(sim, tmp_path, **sync_kw):
    return settings_for(sim, tmp_path / "runs.duckdb", api={"page_size": PAGE},
                        **({"sync": sync_kw} if sync_kw else {}))


def _open_in_warehouse(db) -> set[str]:
    return {i for i, r in read_warehouse(db).runs.items()
            if r["_deleted_at"] is None and r["status"] not in TERMINAL}


# --- rounds of plain syncs ----------------------------------------------------------------------

def test_plain_syncs_read_only_the_head_yet_mirror_every_run_the_source_still_has(make_sim,
                                                                                   tmp_path):
    sim = make_sim(3000, seed=11)
    db = tmp_path / "runs.duckdb"
    settings = _settings(sim, tmp_path)
    first = jobs.run_sync(settings, quiet=True)
    assert first.mode == "full" and first.verified
    full_walk = sim.list_request_count
    assert full_walk >= 60
    rng = random.Random(11)
    kept_deleted: set[str] = set()  # terminal runs the source deleted: kept until a full refresh

    for round_ in range(4):
        wh = read_warehouse(db)
        watermark = max(r["created_at"] for r in wh.runs.values() if r["_deleted_at"] is None)
        snap = sim.snapshot()
        # Late edits of finished runs inside the lookback window (1h) must be picked up.
        recent = [i for i, r in snap.items() if r["status"] in TERMINAL and i in wh.live
                  and instant(r["created_at"]) >= watermark - timedelta(minutes=50)]
        assert recent, "no recent finished run to edit"
        sim.touch_terminal(rng.sample(recent, min(5, len(recent))))
        sim.add_runs(rng.randint(10, 40))
        sim.transition(k=15)
        # Deletes: runs still open in the warehouse (found by id: 404) and finished ones.
        open_victims = rng.sample(sorted(_open_in_warehouse(db) & sim.run_ids()), 2)
        old_terminal = sorted(i for i, r in snap.items() if r["status"] in TERMINAL
                              and instant(r["created_at"]) < watermark - timedelta(hours=2))
        terminal_victims = rng.sample(old_terminal, 3)
        sim.delete(ids=open_victims + terminal_victims)
        kept_deleted |= set(terminal_victims)

        before = sim.list_request_count
        result = jobs.run_sync(settings, quiet=True)

        list_requests = sim.list_request_count - before
        assert result.outcome == "success"
        assert result.mode == "incremental", result.mode_reason
        assert list_requests < 0.25 * full_walk, (round_, list_requests, result.mode_reason)
        wh = assert_mirror(db, sim, stale=kept_deleted, workflows="present")
        assert set(open_victims) <= wh.deleted  # confirmed gone by id
        assert kept_deleted <= wh.live  # an incremental sync cannot prove these gone
        assert result.rows_deleted == 2 and result.single_run_requests >= 2
        assert wh.ledger[-1]["mode"] == "incremental" and wh.ledger[-1]["verified"] is False

    full = jobs.run_sync(settings, quiet=True, full_refresh=True)
    assert full.verified and full.rows_deleted == len(kept_deleted)
    assert kept_deleted <= assert_mirror(db, sim).deleted


@pytest.mark.parametrize("concurrency", [1, 8])
def test_runs_created_while_plain_syncs_walk_do_not_turn_them_into_full_walks(make_sim,
                                                                             tmp_path,
                                                                             concurrency):
    sim = make_sim(3000, seed=19)
    db = tmp_path / "runs.duckdb"
    settings = settings_for(sim, db, api={"page_size": PAGE, "concurrency": concurrency})
    assert jobs.run_sync(settings, quiet=True).verified
    full_walk = sim.list_request_count

    def busy(sim, page, size, n):  # a busy workspace: runs keep being created
        sim.add_runs(2)

    sim.on_list_request(busy)
    for _ in range(2):
        before = sim.list_request_count
        result = jobs.run_sync(settings, quiet=True)
        assert result.mode == "incremental", result.mode_reason
        assert sim.list_request_count - before < 0.25 * full_walk
    sim.on_list_request(None)

    assert jobs.run_sync(settings, quiet=True).mode == "incremental"
    assert_mirror(db, sim, workflows="present")


def test_runs_an_unverified_walk_missed_are_landed_by_the_next_plain_sync(make_sim, tmp_path):
    sim = make_sim(1000, seed=22)
    db = tmp_path / "runs.duckdb"
    settings = settings_for(sim, db, api={"page_size": PAGE, "concurrency": 1},
                            sync={"max_walk_passes": 1})
    start = sim.run_ids()

    def delete_ahead(sim, page, size, n):  # deep in the walk: pages 15 and 25 skip a run
        if n in (15, 25):
            sim.delete(1, where="newest")  # seen on page 1

    sim.on_list_request(delete_ahead)
    first = jobs.run_sync(settings, quiet=True)
    sim.on_list_request(None)
    missed = (start & sim.run_ids()) - read_warehouse(db).live
    assert first.verified is False or not missed  # a verified walk misses nothing

    second = jobs.run_sync(settings, quiet=True)

    # Incremental walks only re-read the head: history a walk may have missed needs a full one.
    assert second.mode == "full" if not first.verified else second.mode == "incremental"
    assert_mirror(db, sim)
    assert jobs.run_sync(settings, quiet=True).mode == "incremental"


# --- full refresh: deletes and undeletes ------------------------------------------------------

def test_full_refresh_marks_runs_gone_from_the_source_and_clears_a_wrong_mark(make_sim, run_cli,
                                                                            tmp_path):
    sim = make_sim(1000, seed=12)
    db = tmp_path / "runs.duckdb"
    assert run_cli(sim, "sync", "-q", RUNS_ETL_PAGE_SIZE=str(PAGE))[0] == 0
    snap = sim.snapshot()
    gone = sim.delete(ids=random.Random(12).sample(
        sorted(i for i, r in snap.items() if r["status"] in TERMINAL), 20))
    assert run_cli(sim, "sync", "-q", RUNS_ETL_PAGE_SIZE=str(PAGE))[0] == 0
    assert set(gone) <= read_warehouse(db).live  # a plain sync does not prove them gone
    marked = sorted(sim.run_ids())[0]  # still in the source: the mark is wrong
    with open_db(working_path(db)) as con:  # the writer's file: the next sync starts from it
        con.execute("UPDATE runs SET _deleted_at = now() WHERE id = ?", [marked])

    code, _, err = run_cli(sim, "sync", "-q", "--full-refresh", RUNS_ETL_PAGE_SIZE=str(PAGE))

    assert code == 0, err
    wh = assert_mirror(db, sim)
    assert wh.deleted == set(gone)
    row = wh.ledger[-1]
    assert row["mode"] == "full" and "--full-refresh" in row["mode_reason"]
    assert row["verified"] is True and row["outcome"] == "success"
    assert row["rows_deleted"] == 20 and row["rows_undeleted"] == 1


def test_mass_delete_breaker_refuses_then_applies_with_allow_mass_delete(make_sim, run_cli,
                                                                        tmp_path):
    sim = make_sim(1000, seed=13)
    db = tmp_path / "runs.duckdb"
    assert run_cli(sim, "sync", "-q", RUNS_ETL_PAGE_SIZE=str(PAGE))[0] == 0
    gone = sim.delete(80, where="random")  # 8% > sync.max_delete_fraction (5%)
    before = dump_tables(db)

    code, _, err = run_cli(sim, "sync", "-q", "--full-refresh", RUNS_ETL_PAGE_SIZE=str(PAGE))

    assert code != 0
    assert "--allow-mass-delete" in error_line(err)
    assert dump_tables(db) == before  # nothing committed, not even the runs that did change
    assert [r["outcome"] for r in ledger(db)] == ["success", "failed"]

    code, _, err = run_cli(sim, "sync", "-q", "--full-refresh", "--allow-mass-delete",
                           RUNS_ETL_PAGE_SIZE=str(PAGE))

    assert code == 0, err
    wh = assert_mirror(db, sim)
    assert wh.deleted == set(gone)
    assert wh.ledger[-1]["rows_deleted"] == 80 and wh.ledger[-1]["outcome"] == "success"


@pytest.mark.parametrize("passes", [1, 3])
def test_deletes_are_applied_only_after_a_verified_complete_walk(make_sim, tmp_path, passes):
    # Served in a fixed random order: no shortcut can tell which runs a walk skipped.
    sim = make_sim(1000, seed=14, order="random")
    db = tmp_path / "runs.duckdb"
    settings = settings_for(sim, db, api={"page_size": PAGE, "concurrency": 1},
                            sync={"max_walk_passes": passes})
    jobs.run_sync(settings, quiet=True)
    start = sim.run_ids()
    base = sim.list_request_count
    deleted: list[str] = []

    def delete_ahead(sim, page, size, n):
        # Deleting the run served first shifts every later page: one run per page is skipped.
        if base + 2 <= n <= base + 11:
            deleted.extend(sim.delete(ids=[next(iter(sim.snapshot()))]))

    sim.on_list_request(delete_ahead)
    result = jobs.run_sync(settings, quiet=True, full_refresh=True)
    sim.on_list_request(None)

    assert len(deleted) == 10 and result.outcome == "success"
    if passes == 1:
        # The deleted runs were all on page 1, seen before they went: the 10 runs the walk did
        # not see still exist. Deleting what was absent would have lost them: nothing is.
        assert len(start) - result.runs_seen == 10
        assert result.verified is False and result.rows_deleted == 0
        wh = assert_mirror(db, sim, stale=deleted)
        assert not wh.deleted
        assert ledger(db)[-1]["verified"] is False
    else:
        # A later pass found the skipped runs: verified, nothing lost. (Runs deleted after
        # this refresh had seen them may wait for the next one.)
        assert result.verified is True
        wh = assert_mirror(db, sim, stale=deleted)
        assert wh.deleted <= set(deleted)
    again = jobs.run_sync(settings, quiet=True, full_refresh=True)
    assert again.verified is True
    assert assert_mirror(db, sim).deleted == set(deleted)


# --- modes ------------------------------------------------------------------------------------

def test_an_unsorted_source_gets_a_full_fallback_walk_every_time_and_stays_exact(make_sim,
                                                                                 tmp_path):
    sim = make_sim(1000, seed=15, order="random")
    db = tmp_path / "runs.duckdb"
    settings = _settings(sim, tmp_path)
    assert jobs.run_sync(settings, quiet=True).mode == "full"
    for _ in range(2):
        sim.add_runs(20)
        sim.transition()
        sim.delete(5, where="random")
        sim.touch_terminal(random.Random(15).sample(sorted(sim.run_ids()), 10))  # any age
        before = sim.list_request_count
        result = jobs.run_sync(settings, quiet=True)
        assert result.mode == "fallback" and "not verified newest-first" in result.mode_reason
        assert result.verified and sim.list_request_count - before >= 1000 // PAGE
        wh = assert_mirror(db, sim)
        row = wh.ledger[-1]
        assert row["mode"] == "fallback" and "newest-first" in row["mode_reason"]


def test_too_many_open_runs_to_refresh_one_by_one_make_a_plain_sync_read_to_the_end(make_sim,
                                                                                   tmp_path):
    sim = make_sim(2000, seed=21)
    db = tmp_path / "runs.duckdb"
    settings = _settings(sim, tmp_path, max_single_refreshes=0)
    jobs.run_sync(settings, quiet=True)
    assert _open_in_warehouse(db)
    sim.add_runs(10)
    sim.transition()
    gone = sim.delete(3, where="oldest")
    before = sim.list_request_count

    result = jobs.run_sync(settings, quiet=True)

    assert result.mode == "incremental" and "read everything" in result.mode_reason
    assert sim.list_request_count - before >= 2000 // PAGE  # the whole source was read ...
    assert result.verified and result.rows_deleted == 3  # ... so deletes are proven
    assert assert_mirror(db, sim).deleted == set(gone)


@pytest.mark.parametrize("every, mode", [("0s", "full"), ("1h", "incremental")])
def test_full_refresh_every_turns_a_plain_sync_into_a_periodic_reconciliation(make_sim,
                                                                              tmp_path, every,
                                                                              mode):
    sim = make_sim(1000, seed=16)
    db = tmp_path / "runs.duckdb"
    settings = _settings(sim, tmp_path, full_refresh_every=every)
    jobs.run_sync(settings, quiet=True)
    snap = sim.snapshot()
    gone = sim.delete(ids=[i for i, r in snap.items() if r["status"] in TERMINAL][-5:])

    result = jobs.run_sync(settings, quiet=True)

    assert result.mode == mode
    if mode == "full":
        assert "periodic reconciliation" in result.mode_reason and result.verified
        assert result.rows_deleted == 5
        assert assert_mirror(db, sim).deleted == set(gone)
    else:  # the last verified full walk is recent enough
        assert result.rows_deleted == 0
        assert_mirror(db, sim, stale=gone, workflows="present")


# --- lookback boundaries ----------------------------------------------------------------------

@pytest.mark.parametrize("lookback", ["1h", "0s"])
def test_runs_that_finish_right_after_a_sync_saw_them_open_land_finished_next_time(
        make_sim, tmp_path, lookback):
    sim = make_sim(2000, seed=17)
    db = tmp_path / "runs.duckdb"
    settings = _settings(sim, tmp_path, lookback=lookback)
    jobs.run_sync(settings, quiet=True)
    fresh = sim.add_runs(8)
    sim.transition(ids=fresh)  # running
    jobs.run_sync(settings, quiet=True)
    assert set(fresh) <= _open_in_warehouse(db)
    # Finish them (and the oldest open run, far beyond the lookback) right after that sync ...
    runs = read_warehouse(db).runs
    finished = [*fresh, min(_open_in_warehouse(db), key=lambda i: runs[i]["created_at"])]
    sim.transition(ids=finished)
    sim.transition(ids=finished)  # queued -> running -> finished
    # ... and some more while the next sync is reading its first pages.
    more = sim.add_runs(6)
    sim.transition(ids=more)
    base = sim.list_request_count

    def finish_mid_walk(sim, page, size, n):
        if n == base + 2:
            sim.transition(ids=more)

    sim.on_list_request(finish_mid_walk)
    mid = jobs.run_sync(settings, quiet=True)
    sim.on_list_request(None)
    assert mid.mode == "incremental"
    assert not set(sim.open_ids()) & set(finished)

    result = jobs.run_sync(settings, quiet=True)

    assert result.mode == "incremental", result.mode_reason
    wh = assert_mirror(db, sim, workflows="present")
    assert all(wh.runs[i]["status"] in TERMINAL and wh.runs[i]["finished_at"] is not None
               for i in [*finished, *more])


def test_without_lookback_bursts_of_runs_in_one_second_and_runs_created_mid_walk_all_land(
        make_sim, tmp_path):
    sim = make_sim(1000, seed=18)
    db = tmp_path / "runs.duckdb"
    settings = _settings(sim, tmp_path, lookback="0s")  # the watermark itself is the cutoff
    jobs.run_sync(settings, quiet=True)
    burst = sim.add_runs(30, status="completed")
    seconds = {sim.snapshot()[i]["created_at"][:19] for i in burst}
    assert len(seconds) < len(burst)  # several runs share a second
    base = sim.list_request_count
    late: list[str] = []

    def add_during_walk(sim, page, size, n):
        if n in (base + 2, base + 3):  # created in the same second, after page 1 was served
            late.extend(sim.add_runs(3, status="completed"))

    sim.on_list_request(add_during_walk)
    jobs.run_sync(settings, quiet=True)
    sim.on_list_request(None)
    assert len(late) == 6

    result = jobs.run_sync(settings, quiet=True)

    assert result.mode == "incremental"
    assert_mirror(db, sim, workflows="present")


def test_a_change_to_a_run_created_exactly_at_the_cutoff_is_picked_up_across_a_page_boundary(
        tmp_path):
    """Ties at the cutoff (watermark - lookback) that span pages: none of them is settled."""
    cutoff = EPOCH + timedelta(minutes=89)
    ties = [make_run(i, created_at=cutoff.isoformat().replace("+00:00", "Z"))
            for i in range(1000, 1007)]
    api = FakeApi(make_runs(100) + ties)  # served newest first, 5 per page: ties on pages 3-4
    env = {"RUNS_ETL_API_URL": BASE_URL, "RUNS_ETL_API_KEY": API_KEY}
    settings = load_settings(None, env, {"api": {"page_size": 5},
                                         "sync": {"lookback": "10m"}}, cwd=tmp_path)
    con = duckdb.connect(str(tmp_path / "runs.duckdb"))
    try:
        assert sync(settings, con, transport=api.transport()).mode == "full"
        for run in api.runs:  # edit the last tie in serving order and a run on the same page
            if run["id"] in (run_id(1000), run_id(89), run_id(88)):
                run["source"] = "edited"
        api.pages.clear()

        result = sync(settings, con, transport=api.transport())

        assert result.mode == "incremental" and max(api.pages) < 10  # of 22 pages
        assert_mirror(con, {r["id"]: r for r in api.runs})
    finally:
        con.close()
