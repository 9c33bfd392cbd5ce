"""The writer lock: one writer per warehouse, a clear exit 75 for the next, waits on request,
and nothing left behind by a killed process blocks the next run."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from helpers import ledger, settings_for

from runs_etl import jobs
from runs_etl.errors import EXIT_LOCKED, LockedError, WarehouseError
from runs_etl.ops.lock import holder_path, lock_path, read_holder, writer_lock

# --- in process -----------------------------------------------------------------------------

def test_second_writer_fails_at_once_naming_the_holder(tmp_path):
    db = tmp_path / "runs.duckdb"
    with writer_lock(db, command="runs-etl sync") as me:
        assert me.pid == os.getpid() and read_holder(db) == me
        with pytest.raises(LockedError) as err:
            with writer_lock(db):
                pass
    assert err.value.exit_code == EXIT_LOCKED == 75
    msg = str(err.value)
    assert f"pid {os.getpid()}" in msg and "runs-etl sync" in msg and "--wait" in msg
    assert str(db) in msg


def test_released_lock_leaves_no_holder_record_and_can_be_taken_again(tmp_path):
    db = tmp_path / "runs.duckdb"
    with writer_lock(db):
        assert holder_path(db).exists()
    assert not holder_path(db).exists()
    with writer_lock(db):
        pass


def test_a_waiting_writer_gets_the_lock_when_the_holder_releases_it(tmp_path):
    db = tmp_path / "runs.duckdb"
    taken, release = threading.Event(), threading.Event()

    def hold():
        with writer_lock(db, command="first"):
            taken.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert taken.wait(10)
        threading.Timer(0.3, release.set).start()
        with writer_lock(db, wait=30, command="second") as me:
            assert release.is_set()  # it got the lock only once the first writer let go
            assert read_holder(db) == me
    finally:
        release.set()
        t.join(10)


def test_a_writer_that_waits_too_long_gets_locked_error(tmp_path):
    db = tmp_path / "runs.duckdb"
    with writer_lock(db):
        with pytest.raises(LockedError, match=r"still held after waiting 0\.2s"):
            with writer_lock(db, wait=0.2):
                pass


def test_a_lock_that_cannot_be_created_is_a_warehouse_error_not_a_traceback(tmp_path):
    (tmp_path / "not-a-folder").write_text("", encoding="utf-8")
    with pytest.raises(WarehouseError, match="cannot take the writer lock"):
        with writer_lock(tmp_path / "not-a-folder" / "runs.duckdb"):
            pass


def test_in_memory_warehouse_needs_no_lock(tmp_path):
    with writer_lock(Path(":memory:")) as holder:
        assert holder is None
    assert not lock_path(Path(":memory:")).exists()


def test_sync_refuses_to_start_while_another_writer_holds_the_warehouse(make_sim, tmp_path):
    sim = make_sim(50)
    db = tmp_path / "runs.duckdb"
    with writer_lock(db, command="runs-etl export"):
        with pytest.raises(LockedError, match="runs-etl export"):
            jobs.run_sync(settings_for(sim, db), quiet=True)
    assert not db.exists()  # refused before opening (or creating) the warehouse
    assert jobs.run_sync(settings_for(sim, db), quiet=True).outcome == "success"


# --- across processes -----------------------------------------------------------------------

def test_racing_syncs_one_runs_one_exits_75_and_one_waits_its_turn(make_sim, sim_env, gate,
                                                                    procs, tmp_path):
    sim = make_sim(300)
    env = sim_env(sim)
    held = gate(sim)
    first = procs.cli(["sync"], env)
    held.wait_entered()  # the first sync holds the lock and is mid-walk

    second = procs.cli(["sync"], env)
    assert second.finish() == EXIT_LOCKED
    errors = [line for line in second.lines if line.startswith("Error:")]
    assert len(errors) == 1 and f"pid {first.pid}" in errors[0] and "--wait" in errors[0]
    assert "Traceback" not in second.output

    third = procs.cli(["sync", "--wait", "60"], env)
    third.wait_for("waiting up to 60s")
    held.open()
    assert first.finish() == 0, first.output
    assert third.finish() == 0, third.output
    # the refused sync never touched the ledger; the other two both committed
    assert [r["outcome"] for r in ledger(tmp_path / "runs.duckdb")] == ["success"] * 2


def test_lock_left_by_a_sigkilled_process_is_recovered_at_once(procs, tmp_path):
    db = tmp_path / "runs.duckdb"
    holder = procs.python(
        "import time\nfrom runs_etl.ops.lock import writer_lock\n"
        f"with writer_lock({str(db)!r}, command='doomed'):\n"
        "    print('locked', flush=True)\n    time.sleep(60)\n")
    holder.wait_for("locked")
    with pytest.raises(LockedError, match=f"pid {holder.pid}"):
        with writer_lock(db):
            pass
    holder.popen.kill()
    holder.finish()
    assert read_holder(db).pid == holder.pid  # its record is stale ...
    with writer_lock(db) as me:  # ... but the kernel released the lock with the process
        assert read_holder(db) == me


def test_sync_after_a_sigkilled_sync_runs_and_marks_it_abandoned(make_sim, sim_env, gate, procs,
                                                                  tmp_path):
    sim = make_sim(200)
    db = tmp_path / "runs.duckdb"
    held = gate(sim)
    victim = procs.cli(["sync"], sim_env(sim))
    held.wait_entered()
    victim.popen.kill()
    victim.finish()
    held.open()
    result = jobs.run_sync(settings_for(sim, db), quiet=True)  # no --wait: the lock is free
    assert result.outcome == "success" and result.runs_seen == 200
    assert [r["outcome"] for r in ledger(db)] == ["abandoned", "success"]
