"""Keeping the past: ``run_history`` (``engine/load.py record_history``, migration 4) and the
views over it in ``sql/80_history.sql``, against the simulator."""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime, timedelta

import duckdb
import helpers
import pytest
from helpers import TERMINAL, open_db, rows

from runs_etl import jobs, warehouse
from runs_etl.engine import pages
from runs_etl.errors import DataError
from runs_etl.warehouse.migrations import MIGRATIONS


def sync(sim, db, **kw):
    return jobs.run_sync(helpers.settings_for(sim, db), quiet=True, **kw)


def started(db) -> dict[int, object]:
    """Each sync's start time, by sync id."""
    with open_db(db) as con:
        return dict(con.execute("SELECT sync_id, started_at FROM sync_runs").fetchall())


def history(db, ids=None) -> dict[str, list[dict]]:
    """run_id -> its versions, oldest first."""
    with open_db(db) as con:
        out: dict[str, list[dict]] = {}
        for r in rows(con, "SELECT * FROM run_history ORDER BY run_id, valid_from"):
            if ids is None or r["run_id"] in ids:
                out.setdefault(r["run_id"], []).append(r)
        return out


def count(db, sql: str) -> int:
    with open_db(db) as con:
        return con.execute(sql).fetchall()[0][0]


@pytest.fixture
def three_syncs(make_sim, tmp_path):
    """Three new runs moved queued -> running -> terminal, one sync after each step."""
    # The simulator's clock an hour behind ours: runs are created before the syncs start.
    sim = make_sim(300, now=datetime.now(UTC) - timedelta(hours=1))
    db = tmp_path / "runs.duckdb"
    ids = sim.add_runs(3, status="queued")
    sync(sim, db)
    sim.transition(ids=ids)
    sync(sim, db)
    sim.transition(ids=ids)
    sync(sim, db)
    return sim, db, ids


def test_runs_moved_across_three_syncs_have_three_versions_with_their_windows(three_syncs):
    sim, db, ids = three_syncs
    t = started(db)
    versions = history(db, set(ids))
    assert set(versions) == set(ids)
    for run_id in ids:
        v = versions[run_id]
        assert [x["status"] for x in v[:2]] == ["queued", "running"]
        assert v[2]["status"] in TERMINAL and v[2]["status"] == sim.snapshot()[run_id]["status"]
        assert [(x["valid_from"], x["valid_to"]) for x in v] == \
            [(t[1], t[2]), (t[2], t[3]), (t[3], None)]
        # Each change happened after the last sighting of the state before it.
        assert [x["observed_after"] for x in v] == [None, t[1], t[2]]
        assert [x["_sync_id"] for x in v] == [1, 2, 3]
        assert v[2]["finished_at"] is not None and v[2]["progress"] == \
            sim.snapshot()[run_id]["progress"]


def test_unchanged_runs_add_no_versions_but_are_seen(three_syncs):
    sim, db, ids = three_syncs
    n_runs = len(sim.run_ids())
    # One version per run, plus two more for each of the three runs that moved twice.
    assert count(db, "SELECT count(*) FROM run_history") == n_runs + 2 * len(ids)
    assert count(db, "SELECT count(*) FROM run_history WHERE valid_to IS NULL") == n_runs
    # An open run untouched by the simulator was seen by every sync, in one version.
    still = sorted(sim.open_ids() - set(ids))[0]
    [v] = history(db, {still})[still]
    assert v["_last_seen_at"] == started(db)[3] and v["valid_from"] == started(db)[1]


def test_a_change_outside_the_tracked_fields_updates_the_run_but_adds_no_version(
        make_sim, tmp_path):
    sim = make_sim(200)
    db = tmp_path / "runs.duckdb"
    sync(sim, db)
    done = sorted(i for i, r in sim.snapshot().items() if r["status"] in TERMINAL)[:5]
    sim.touch_terminal(done)
    result = sync(sim, db, full_refresh=True)
    assert result.rows_updated >= 5
    assert count(db, "SELECT count(*) FROM run_history") == len(sim.run_ids())


def test_a_soft_deleted_run_closes_its_last_version(make_sim, tmp_path):
    sim = make_sim(200)
    db = tmp_path / "runs.duckdb"
    sync(sim, db)
    victim = sorted(sim.open_ids())[0]
    sim.delete(ids=[victim])
    result = sync(sim, db)  # the open run is refreshed by id: 404
    assert result.rows_deleted == 1
    [v] = history(db, {victim})[victim]
    assert v["valid_to"] == started(db)[2]
    assert count(db, "SELECT count(*) FROM run_history WHERE valid_to IS NOT NULL") == 1


def test_migration_seeds_history_with_each_existing_runs_current_state():
    con = duckdb.connect(":memory:")
    con.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name VARCHAR, "
                "applied_at TIMESTAMPTZ)")
    for version, name, ddl in MIGRATIONS:  # a warehouse from before run history
        if version < 4:
            con.execute(ddl)
            con.execute("INSERT INTO schema_migrations VALUES (?, ?, now())", [version, name])
    helpers.insert_fixture(con)
    assert warehouse.migrate(con) == [4]
    runs = {r["id"]: r for r in rows(con, "SELECT * FROM runs")}
    seeded = rows(con, "SELECT * FROM run_history")
    assert sorted(h["run_id"] for h in seeded) == sorted(runs)
    for h in seeded:
        r = runs[h["run_id"]]
        assert (h["status"], h["workflow_id"], h["finished_at"], h["workspace"]) == \
            (r["status"], r["workflow_id"], r["finished_at"], r["workspace"])
        assert h["observed_after"] is None
        if r["_deleted_at"] is None:  # current since its row was last written
            assert (h["valid_from"], h["valid_to"]) == (r["_synced_at"], None)
        else:  # closed by its delete
            assert (h["valid_from"], h["valid_to"]) == (r["_first_seen_at"], r["_deleted_at"])


def test_views_report_transitions_time_in_status_and_queue_time(three_syncs):
    sim, db, ids = three_syncs
    t = started(db)
    with open_db(db) as con:
        transitions = rows(con, "SELECT * FROM status_transitions ORDER BY run_id, observed_by")
        in_status = {(r["run_id"], r["status"]): r for r in rows(
            con, "SELECT * FROM time_in_status WHERE run_id IN (SELECT unnest(?))", [ids])}
        queue = rows(con, "SELECT * FROM queue_time_daily")
        created = dict(con.execute("SELECT id, created_at FROM runs").fetchall())
    assert {(r["run_id"], r["from_status"], r["to_status"], r["observed_after"],
             r["observed_by"]) for r in transitions} == \
        {(i, "queued", "running", t[1], t[2]) for i in ids} | \
        {(i, "running", sim.snapshot()[i]["status"], t[2], t[3]) for i in ids}
    assert all(r["workspace"] == "default" for r in transitions)
    for i in ids:
        queued = in_status[(i, "queued")]
        # Seen queued at sync 1 only; left after sync 1 and by sync 2, entered at creation.
        assert queued["lower_seconds"] == 0
        assert queued["upper_seconds"] == pytest.approx((t[2] - created[i]).total_seconds())
        running = in_status[(i, "running")]
        assert running["lower_seconds"] == 0
        assert running["upper_seconds"] == pytest.approx((t[3] - t[1]).total_seconds())
        assert not queued["ongoing"] and in_status[(i, sim.snapshot()[i]["status"])]["ongoing"]
    # Every run seen queued left the queue after sync 1 (its last sighting) and by sync 2.
    total = sum(r["runs"] for r in queue)
    seen_queued = count(db, "SELECT count(DISTINCT run_id) FROM run_history "
                            "WHERE status = 'queued'")
    assert total + sum(r["still_queued"] for r in queue) == seen_queued
    assert total >= len(ids)
    for r in queue:
        if r["runs"]:
            assert 0 <= r["max_wait_lower_seconds"] <= r["max_wait_upper_seconds"]


# --- raw page retention and replay ----------------------------------------------------------

REPLAYED = ("runs", "workflows", "run_nodes", "run_history")


def retaining(sim, db, **sync):
    return helpers.settings_for(sim, db, retention={"raw_pages": "30d"}, **sync)


def table_rows(db, table: str) -> list:
    with open_db(db) as con:
        return sorted(map(repr, con.execute(f"SELECT * FROM {table}").fetchall()))


def test_retention_keeps_one_compressed_file_per_sync_and_removes_expired_ones(
        make_sim, tmp_path):
    sim = make_sim(250)
    db = tmp_path / "runs.duckdb"
    jobs.run_sync(retaining(sim, db), quiet=True)
    folder = tmp_path / "runs.duckdb.pages" / "default"
    first = folder / "1.jsonl.zst"
    assert [f.name for f in folder.iterdir()] == ["1.jsonl.zst"]
    assert first.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"  # the zstd frame magic
    kept = list(pages.records(first))
    assert kept[0]["kind"] == "sync" and kept[-1]["kind"] == "commit"
    bodies = [r for r in kept if r["kind"] == "page"]
    assert len(bodies) == helpers.ledger(db)[0]["pages"]
    assert [r["seq"] for r in bodies] == sorted(r["seq"] for r in bodies)  # arrival order
    assert sum(len(json.loads(pages.body_of(r))["items"]) for r in bodies) == 250
    # Older than the retention: removed by the next sync, which keeps its own.
    old = time.time() - 31 * 86400
    os.utime(first, (old, old))
    sim.transition(3)
    jobs.run_sync(retaining(sim, db), quiet=True)
    assert sorted(f.name for f in folder.iterdir()) == ["2.jsonl.zst"]


def test_without_retention_nothing_is_kept(make_sim, tmp_path):
    sim = make_sim(100)
    sync(sim, tmp_path / "runs.duckdb")
    assert not (tmp_path / "runs.duckdb.pages").exists()


def test_a_failed_sync_keeps_no_pages(make_sim, tmp_path):
    sim = make_sim(100)
    db = tmp_path / "runs.duckdb"
    jobs.run_sync(retaining(sim, db), quiet=True)
    sim.delete(20, where="oldest")  # past the mass-delete breaker: the sync fails
    with pytest.raises(DataError):
        jobs.run_sync(retaining(sim, db, sync={"full_refresh_every": "1s"}), quiet=True)
    assert [f.name for f in (tmp_path / "runs.duckdb.pages" / "default").iterdir()] == \
        ["1.jsonl.zst"]


def test_replay_rebuilds_the_same_tables_as_the_syncs_did(make_sim, tmp_path, run_cli):
    sim = make_sim(400)
    db = tmp_path / "runs.duckdb"
    settings = retaining(sim, db)
    jobs.run_sync(settings, quiet=True)
    for step in range(3):
        new = sim.add_runs(5)
        sim.transition(10)
        sim.delete(ids=sorted(sim.open_ids() - set(new))[:1])  # open: 404 by id at once
        sim.delete(2, where="oldest")  # terminal: gone at the full refresh of the last step
        done = sorted(i for i, r in sim.snapshot().items() if r["status"] in TERMINAL)
        sim.touch_terminal(done[step * 3:step * 3 + 3])
        jobs.run_sync(settings, quiet=True, full_refresh=step == 2)
    assert sum(r["rows_deleted"] for r in helpers.ledger(db)) >= 6
    code, out, err = run_cli(sim, "replay", RUNS_ETL_DUCKDB_PATH=str(db))
    assert code == 0, err
    replayed = tmp_path / "runs.replayed.duckdb"
    assert "replayed 4 syncs" in out and str(replayed) in out
    for table in REPLAYED:
        assert table_rows(replayed, table) == table_rows(db, table), table
    # The new file is a warehouse: views and a ledger saying what was replayed.
    with open_db(replayed) as con:
        assert con.execute("SELECT count(*) FROM status_transitions").fetchone()[0] > 0
        assert {m for (m,) in con.execute("SELECT mode FROM sync_runs").fetchall()} == \
            {"replay"}
    # A second replay to the same file is refused, with one Error line.
    code, _, err = run_cli(sim, "replay", RUNS_ETL_DUCKDB_PATH=str(db))
    assert code == 2 and "--out: " in helpers.error_line(err) and "exists" in err


def test_replay_in_place_replaces_the_tables_and_since_limits_the_syncs(
        make_sim, tmp_path, run_cli):
    sim = make_sim(200)
    db = tmp_path / "runs.duckdb"
    jobs.run_sync(retaining(sim, db), quiet=True)
    sim.transition(5)
    jobs.run_sync(retaining(sim, db), quiet=True)
    before = {t: table_rows(db, t) for t in REPLAYED}
    with open_db(helpers_working(db)) as con:  # damage the writer's copy: replay repairs it
        con.execute("DELETE FROM run_history")
        con.execute("UPDATE runs SET status = 'garbled'")
    code, _, err = run_cli(sim, "replay", "--in-place", "-q", RUNS_ETL_DUCKDB_PATH=str(db))
    assert code == 0, err
    assert {t: table_rows(db, t) for t in REPLAYED} == before
    assert not list(tmp_path.glob("*.replay*"))  # the rebuilt file was swapped in and removed
    code, _, err = run_cli(sim, "replay", "--since", "2999-01-01",
                           RUNS_ETL_DUCKDB_PATH=str(db))
    assert code != 0 and "no retained raw pages" in helpers.error_line(err)


def helpers_working(db):
    from runs_etl.warehouse.publish import working_path
    return working_path(db)
