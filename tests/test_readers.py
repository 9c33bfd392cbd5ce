"""Readers never wait: analysts, BI tools and ``status`` read while syncs keep the warehouse
fresh (warehouse/publish.py). Real processes hold real DuckDB connections on the file users know.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import duckdb
import pytest
from helpers import assert_mirror, dump_tables, error_line, ledger, settings_for

from runs_etl import jobs
from runs_etl.config import DEFAULT_STORAGE_COMPATIBILITY
from runs_etl.errors import LockedError
from runs_etl.ops.lock import skipped_attempts
from runs_etl.outputs.status import collect_status, print_status
from runs_etl.sim import Faults
from runs_etl.warehouse.publish import working_path


def _reader(db: Path, *, read_only: bool, write: bool = False):
    """A notebook: connects, counts runs, optionally writes, then answers 'count' on demand."""
    code = (
        "import duckdb, sys\n"
        f"con = duckdb.connect({str(db)!r}, read_only={read_only})\n"
        + ("con.execute('CREATE TABLE scratch AS SELECT 1 AS x')\n" if write else "")
        + "print('open', con.execute('SELECT count(*) FROM runs').fetchone()[0], flush=True)\n"
        "for line in sys.stdin:\n"
        "    print('count', con.execute('SELECT count(*) FROM runs').fetchone()[0], flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline().split()
    assert first[:1] == ["open"], proc.stderr.read()
    return proc, int(first[1])


def _ask(proc) -> int:
    proc.stdin.write("count\n")
    proc.stdin.flush()
    line = proc.stdout.readline().split()
    assert line[:1] == ["count"], proc.stderr.read()
    return int(line[1])


def _count_in_new_process(db: Path) -> int:
    out = subprocess.run(
        [sys.executable, "-c", "import duckdb, sys; print(duckdb.connect(sys.argv[1], "
         "read_only=True).execute('SELECT count(*) FROM runs').fetchone()[0])", str(db)],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


@pytest.mark.parametrize("read_only,write", [(True, False), (False, False), (False, True)],
                         ids=["read-only", "read-write", "read-write-that-writes"])
def test_a_reader_holding_the_file_open_across_three_syncs_never_makes_one_fail_or_wait(
        make_sim, tmp_path, read_only, write):
    sim = make_sim(300, seed=3)
    db = tmp_path / "runs.duckdb"
    settings = settings_for(sim, db)  # lock_wait 0: a sync that had to wait would fail
    jobs.run_sync(settings, quiet=True)
    proc, opened_with = _reader(db, read_only=read_only, write=write)
    try:
        assert opened_with == 300
        for round_ in range(3):
            sim.add_runs(10)
            result = jobs.run_sync(settings, quiet=True)
            assert result.outcome == "success"
            # The open connection keeps the snapshot it opened; a new one sees the newest.
            assert _ask(proc) == 300
            assert _count_in_new_process(db) == 300 + 10 * (round_ + 1)
    finally:
        proc.kill()
        proc.wait(10)
    assert_mirror(db, sim)
    assert not db.with_name(db.name + ".wal").exists()  # a reader's WAL never outlives a publish


def test_a_reader_connecting_during_a_sync_connects_at_once_and_sees_the_last_published_sync(
        make_sim, sim_env, gate, procs, run_cli, tmp_path):
    sim = make_sim(400, seed=4)
    db = tmp_path / "runs.duckdb"
    jobs.run_sync(settings_for(sim, db), quiet=True)
    before = dump_tables(db)
    sim.add_runs(50)
    held = gate(sim)
    sync = procs.cli(["sync", "--full-refresh", "-q"], sim_env(sim))
    held.wait_entered()  # the sync is mid-walk, holding its lock and its working file
    try:
        assert _count_in_new_process(db) == 400
        assert dump_tables(db) == before  # nothing of the running sync is visible
        for command in (["status"], ["report", "--out", str(tmp_path / "r.html")],
                        ["export", "--parquet-dir", str(tmp_path / "parquet")]):
            code, _, err = run_cli(None, *command)
            assert code == 0, (command, err)
    finally:
        held.open()
    assert sync.finish() == 0, sync.output
    assert _count_in_new_process(db) == 450


def test_a_killed_sync_leaves_no_partial_snapshot_and_no_temporary_file(make_sim, sim_env, gate,
                                                                        procs, tmp_path):
    sim = make_sim(200, seed=5)
    db = tmp_path / "runs.duckdb"
    jobs.run_sync(settings_for(sim, db), quiet=True)
    before = dump_tables(db)
    sim.add_runs(30)
    held = gate(sim)
    sync = procs.cli(["sync", "-q"], sim_env(sim))
    held.wait_entered()
    sync.popen.kill()
    held.open()
    sync.finish()
    assert dump_tables(db) == before
    assert [p.name for p in tmp_path.iterdir() if ".publish-" in p.name] == []
    status = collect_status(settings_for(sim, db))
    assert status["running"] is None and status["unfinished"]["pid"] == sync.pid
    assert jobs.run_sync(settings_for(sim, db), quiet=True).outcome == "success"
    assert collect_status(settings_for(sim, db))["unfinished"] is None
    assert [r["outcome"] for r in ledger(db)] == ["success", "abandoned", "success"]


def test_the_published_file_is_read_only_and_in_the_configured_storage_version(make_sim,
                                                                              tmp_path):
    sim = make_sim(20)
    db = tmp_path / "runs.duckdb"
    jobs.run_sync(settings_for(sim, db), quiet=True)
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o444
    con = duckdb.connect(str(db), read_only=True)
    try:
        (tags,) = con.execute("SELECT tags FROM duckdb_databases() "
                              "WHERE database_name = current_database()").fetchone()
    finally:
        con.close()
    assert tags["storage_version"].startswith(DEFAULT_STORAGE_COMPATIBILITY)


def test_a_warehouse_written_by_the_previous_version_migrates_with_history_and_ledger(
        make_sim, tmp_path):
    sim = make_sim(120, seed=8)
    db = tmp_path / "runs.duckdb"
    settings = settings_for(sim, db)
    jobs.run_sync(settings, quiet=True)
    # What the previous version left: one read-write file in DuckDB's newest storage format at
    # the path users know, and no working file.
    old = tmp_path / "old.duckdb"
    con = duckdb.connect(str(old))
    con.execute(f"ATTACH '{db}' AS src (READ_ONLY)")
    con.execute("COPY FROM DATABASE src TO old")
    con.close()
    for p in (db, working_path(db)):
        p.unlink()
    shutil.move(old, db)
    history = ledger(db)

    sim.add_runs(5)
    assert jobs.run_sync(settings, quiet=True).outcome == "success"
    assert ledger(db)[: len(history)] == history
    assert [r["outcome"] for r in ledger(db)] == ["success", "success"]
    assert_mirror(db, sim)
    assert working_path(db).exists() and stat.S_IMODE(os.stat(db).st_mode) == 0o444


def test_a_sync_that_gives_up_on_a_busy_warehouse_leaves_a_note_for_status(make_sim, tmp_path):
    sim = make_sim(20)
    db = tmp_path / "runs.duckdb"
    jobs.run_sync(settings_for(sim, db), quiet=True)
    holder, _ = _reader(working_path(db), read_only=True)  # someone opened the writer's file
    try:
        with pytest.raises(LockedError, match="writes this file alone"):
            jobs.run_sync(settings_for(sim, db, warehouse={"lock_wait": 0.5}), quiet=True)
    finally:
        holder.kill()
        holder.wait(10)
    [skipped] = skipped_attempts(db)
    assert "writes this file alone" in skipped["reason"] and skipped["pid"] == os.getpid()
    status = collect_status(settings_for(sim, db))
    assert [s["reason"] for s in status["skipped_since_success"]] == [skipped["reason"]]
    out = io.StringIO()
    print_status(settings_for(sim, db), stream=out)
    assert "1 sync attempt(s) skipped since (warehouse busy)" in out.getvalue()


def test_wait_also_waits_for_a_process_holding_the_writers_file(make_sim, tmp_path):
    sim = make_sim(20)
    db = tmp_path / "runs.duckdb"
    jobs.run_sync(settings_for(sim, db), quiet=True)
    holder, _ = _reader(working_path(db), read_only=True)
    result: list = []
    sync = threading.Thread(target=lambda: result.append(
        jobs.run_sync(settings_for(sim, db, warehouse={"lock_wait": 60}), quiet=True)))
    sync.start()
    try:
        assert _ask(holder) == 20  # still holding while the sync waits
        assert not result
    finally:
        holder.stdin.close()  # the holder lets go
        holder.wait(10)
    sync.join(60)
    assert result and result[0].outcome == "success"


def test_the_ledger_holds_wall_clock_times_of_the_whole_sync(make_sim, tmp_path):
    sim = make_sim(300, faults=Faults(latency=0.02))  # long enough for the difference to show
    db = tmp_path / "runs.duckdb"
    result = jobs.run_sync(settings_for(sim, db, api={"page_size": 20, "concurrency": 2}),
                           quiet=True)
    [row] = ledger(db)
    took = (row["finished_at"] - row["started_at"]).total_seconds()
    assert result.seconds_total > 0.2
    assert took == pytest.approx(result.seconds_total, abs=0.1)


def _duckdb_1x_cli() -> Path:
    """The DuckDB 1.x command line the test extra installs (package ``duckdb-cli``)."""
    cli = Path(sys.executable).with_name("duckdb")
    assert cli.is_file(), "the test extra installs duckdb-cli (a DuckDB 1.x binary)"
    return cli


def test_the_duckdb_1x_cli_opens_the_published_file_and_runs_the_readme_queries(make_sim,
                                                                                tmp_path):
    from runs_etl.demo import QUERIES

    sim = make_sim(200, seed=9)
    db = tmp_path / "runs.duckdb"
    jobs.run_sync(settings_for(sim, db), quiet=True)
    cli = _duckdb_1x_cli()
    version = subprocess.run([str(cli), "-version"], capture_output=True, text=True, timeout=30)
    assert version.stdout.startswith("v1."), version.stdout
    health = "SELECT last_success_sync_id, freshness_seconds < 3600 AS fresh FROM sync_health;"
    for sql in [sql for _, sql in QUERIES] + [health]:
        out = subprocess.run([str(cli), "-readonly", "-json", str(db), "-c", sql],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "Error" not in out.stderr, (sql, out.stderr)
        json.loads(out.stdout or "[]")
    out = subprocess.run([str(cli), "-readonly", "-json", str(db), "-c", health],
                         capture_output=True, text=True, timeout=60)
    assert json.loads(out.stdout) == [{"last_success_sync_id": 1, "fresh": True}]


def test_readers_of_a_snapshot_from_an_older_runs_etl_are_told_to_sync_once(make_sim, tmp_path,
                                                                           run_cli):
    """Upgrade runs-etl, run status before the next sync: a clear error, not a traceback."""
    sim = make_sim(20)
    db = tmp_path / "runs.duckdb"
    jobs.run_sync(settings_for(sim, db), quiet=True)
    os.chmod(db, 0o644)
    con = duckdb.connect(str(db))
    con.execute("DELETE FROM schema_migrations WHERE version > 1")  # as if published by v1
    con.close()
    for command in (["status"], ["status", "--json"], ["report"]):
        code, _, err = run_cli(sim, *command)
        assert code == 1 and "run `runs-etl sync` once to migrate it" in error_line(err)
    assert jobs.run_sync(settings_for(sim, db), quiet=True).outcome == "success"
    assert run_cli(sim, "status")[0] == 0
