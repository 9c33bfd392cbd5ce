"""Hardening of the operating side (issue 9): a full disk, a signal, a read-only folder, an odd
path or a quiet cron job each end in what the README promises (one ``Error:`` line, the right
exit code, the warehouse at its previous commit), never a traceback or a flood of lines."""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
import signal
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from helpers import (
    Gate,
    assert_mirror,
    dump_tables,
    error_line,
    ledger,
    read_warehouse,
    remount,
    settings_for,
    small_tmpfs,
)

from runs_etl import jobs
from runs_etl.engine import staging as staging_module
from runs_etl.errors import EXIT_FAILURE, EXIT_INTERRUPTED
from runs_etl.warehouse import publish

# --- 22. glob characters in the warehouse path ------------------------------------------------

def test_a_warehouse_path_with_glob_characters_syncs_exports_and_reports(make_sim, run_cli,
                                                                          tmp_path):
    folder = tmp_path / "x[1]"
    folder.mkdir()
    db, parquet = folder / "runs.duckdb", folder / "parquet"
    env = {"RUNS_ETL_DUCKDB_PATH": str(db), "RUNS_ETL_PARQUET_DIR": str(parquet)}
    sim = make_sim(250)
    code, _, err = run_cli(sim, "sync", "-q", **env)
    assert code == 0, err
    sim.add_runs(20)
    code, _, err = run_cli(sim, "sync", "-q", **env)
    assert code == 0, err
    assert [r["mode"] for r in read_warehouse(db).ledger] == ["full", "incremental"]
    assert_mirror(db, sim)
    code, out, err = run_cli(sim, "export", **env)
    assert code == 0, err
    assert "exported 270 runs" in out
    code, _, err = run_cli(sim, "report", "-q", **env)
    assert code == 0, err
    assert "Runs per day by status" in (folder / "report.html").read_text()
    con = duckdb.connect(str(parquet / "analytics.duckdb"), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM runs").fetchall() == [(270,)]
    finally:
        con.close()
    assert Path(parquet / "current").is_symlink()


# --- 23. an export failing after a sync keeps its error type in the log -----------------------

def test_an_export_failure_after_a_sync_logs_its_real_error_type(make_sim, run_cli, tmp_path):
    parquet = tmp_path / "parquet"
    parquet.mkdir()
    (parquet / "current").write_text("not the link runs-etl maintains")
    code, _, err = run_cli(make_sim(50), "sync", "-q", "--log-format", "json",
                           RUNS_ETL_PARQUET_DIR=str(parquet))
    assert code == EXIT_FAILURE
    assert "sync 1 was committed, but the Parquet export failed" in error_line(err)
    failed = [json.loads(line) for line in err.splitlines()
              if line.startswith("{") and json.loads(line).get("event") == "failed"]
    assert len(failed) == 1, err
    assert failed[0]["error_type"] == "WarehouseError"
    assert "not the link runs-etl maintains" in failed[0]["msg"]
    assert [r["outcome"] for r in ledger(tmp_path / "runs.duckdb")] == ["success"]


# --- 28. a quiet sync that succeeds says nothing ------------------------------------------------

def test_a_quiet_sync_that_succeeds_writes_nothing(make_sim, run_cli):
    sim = make_sim(120)
    assert run_cli(sim, "sync")[0] == 0  # the first sync may warn about unknown API fields
    sim.add_runs(7)
    code, out, err = run_cli(sim, "sync", "-q")
    assert (code, out, err) == (0, "", "")  # cron mails nothing
    code, out, err = run_cli(sim, "sync")
    assert code == 0 and "sync 3 success" in err  # without -q the summary line is there


# --- 20. a report that cannot be written ----------------------------------------------------

def test_a_report_into_a_read_only_folder_is_one_error_naming_the_path(make_sim, run_cli,
                                                                      tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    with small_tmpfs(folder, "64m") as mounted:
        db = folder / "runs.duckdb"
        code, _, err = run_cli(make_sim(60), "sync", "-q", RUNS_ETL_DUCKDB_PATH=str(db))
        assert code == 0, err
        if mounted:
            remount(folder, "ro")
        else:  # no mount here: writing or deleting in the folder fails as it would
            def read_only(path, *a, **kw):
                raise OSError(errno.EROFS, "Read-only file system", str(path))

            monkeypatch.setattr(Path, "write_text", read_only)
            monkeypatch.setattr(Path, "unlink", read_only)
        code, out, err = run_cli(None, "report", RUNS_ETL_DUCKDB_PATH=str(db))
        if mounted:
            remount(folder, "rw")
    assert code == EXIT_FAILURE, err
    line = error_line(err)
    assert f"cannot write the report to {folder / 'report.html'}" in line
    assert "Read-only file system" in line and "--out" in line
    assert out == ""


# --- 18. a full disk while staging or at commit -------------------------------------------------

class CommitFailsOnFullDisk:
    """The writer's connection, except that a commit fails as DuckDB's does when its WAL cannot
    grow: the transaction is already rolled back when TransactionException is raised."""

    def __init__(self, con):
        self._con = con

    def __getattr__(self, name):
        return getattr(self._con, name)

    def commit(self):
        self._con.rollback()
        raise duckdb.TransactionException('TransactionContext Error: Failed to commit: Could '
                                          'not write file "x.wal": No space left on device')


def _first_sync(sim, run_cli, db: Path) -> dict:
    code, _, err = run_cli(sim, "sync", "-q", RUNS_ETL_DUCKDB_PATH=str(db))
    assert code == 0, err
    return dump_tables(db)


@pytest.mark.parametrize("where", ["staging", "commit"])
def test_a_full_disk_is_one_error_and_the_warehouse_keeps_its_previous_commit(
        make_sim, run_cli, tmp_path, monkeypatch, where):
    folder = tmp_path / "wh"
    db = folder / "runs.duckdb"
    sim = make_sim(80)
    # staging: a tiny filesystem under the staging folder only; commit: a small one under the
    # database, nearly filled, with room to stage elsewhere.
    outer = small_tmpfs(folder, "32m") if where == "commit" else contextlib.nullcontext(False)
    with outer as outer_mounted:
        before = _first_sync(sim, run_cli, db)
        sim.add_runs(3000)
        staging = folder / ".runs.duckdb.work.staging"
        inner = small_tmpfs(staging, "64k" if where == "staging" else "64m")
        with inner as inner_mounted:
            if where == "staging" and not inner_mounted:
                real_write = pq.write_table

                def disk_full(table, *a, **kw):
                    if table.num_rows:
                        raise OSError(errno.ENOSPC, "No space left on device")
                    return real_write(table, *a, **kw)

                monkeypatch.setattr(staging_module.pq, "write_table", disk_full)
            ballast = folder / "ballast"
            if where == "commit":
                if outer_mounted and inner_mounted:
                    free = shutil.disk_usage(folder).free
                    ballast.write_bytes(b"\0" * (free - 96 * 1024))
                else:
                    monkeypatch.setattr(jobs, "open_working",
                                        lambda *a, **kw: CommitFailsOnFullDisk(
                                            publish.open_working(*a, **kw)))
            code, out, err = run_cli(sim, "sync", "-q", RUNS_ETL_DUCKDB_PATH=str(db))
            ballast.unlink(missing_ok=True)
            monkeypatch.undo()
        assert code == EXIT_FAILURE, err
        line = error_line(err)
        assert "no transaction is active" not in err
        assert "nothing was committed" in line and "disk space" in line
        if where == "staging":
            assert "staged batches" in line
        assert dump_tables(db) == before  # readers see the previous commit
        # With room again, the next sync says what happened and lands everything.
        code, _, err = run_cli(sim, "sync", "-q", RUNS_ETL_DUCKDB_PATH=str(db))
        assert code == 0, err
        assert [r["outcome"] for r in ledger(db)] == ["success", "failed", "success"]
        assert_mirror(db, sim)


# --- 19. SIGTERM: exit 130, one Error: line, nothing else -----------------------------------

def test_sigterm_while_workers_fetch_is_one_error_line_and_exit_130(make_sim, sim_env, procs,
                                                                    tmp_path):
    sim = make_sim(3000)
    db = tmp_path / "runs.duckdb"
    jobs.run_sync(settings_for(sim, db), quiet=True)
    before = dump_tables(db)
    sim.add_runs(50)
    held = Gate(sim, sim.list_request_count + 6)  # a full walk, its workers all in flight
    sync = procs.cli(["sync", "--full-refresh"], sim_env(sim, RUNS_ETL_CONCURRENCY="8"))
    held.wait_entered()
    sync.popen.send_signal(signal.SIGTERM)
    code = sync.finish()
    held.open()
    assert code == EXIT_INTERRUPTED, sync.output
    assert error_line(sync.output) == "Error: interrupted; nothing partial was committed"
    assert "Task exception" not in sync.output and "never retrieved" not in sync.output
    assert dump_tables(db) == before


# A sync whose merge (or export after it) starts with one long DuckDB query, announced on stdout
# once DuckDB runs it: the signal arrives while DuckDB works, the case that printed "Query
# interrupted" and exited 1.
SLOW_PHASE = """
import sys, threading, time
from runs_etl import cli, jobs
from runs_etl.engine import load

def announce(con):
    while con.query_progress() < 0:  # -1: no query running yet
        time.sleep(0.01)
    print("PHASE STARTED", flush=True)

def slow(real):
    def phase(*args, **kw):
        con = kw["con"] if "con" in kw else args[0]  # merge(con, ...), export_parquet(s, con=)
        # One thread: DuckDB checks for signals between tasks, and with worker threads the
        # main thread can wait out a whole pipeline before it looks.
        con.execute("SET threads = 1")
        # query_progress() reports only while DuckDB tracks progress (a cursor does not by
        # default); printing stays off.
        con.execute("SET enable_progress_bar = true; SET enable_progress_bar_print = false")
        threading.Thread(target=announce, args=(con,), daemon=True).start()
        con.execute("SELECT sum(a.range * b.range) FROM range(100000) a, range(1000000) b")
        return real(*args, **kw)
    return phase

if sys.argv[1] == "merge":
    load.merge = slow(load.merge)
else:
    jobs.export_parquet = slow(jobs.export_parquet)
sys.exit(cli.main(["sync", "-q"]))
"""


@pytest.mark.parametrize("phase", ["merge", "export"])
def test_sigterm_during_the_merge_or_the_export_exits_130(make_sim, sim_env, procs, tmp_path,
                                                          phase):
    sim = make_sim(200)
    db, parquet = tmp_path / "runs.duckdb", tmp_path / "parquet"
    env = sim_env(sim, RUNS_ETL_PARQUET_DIR=str(parquet))
    assert procs.cli(["sync", "-q"], env).finish() == 0
    before, exported = dump_tables(db), sorted(p.name for p in (parquet / "versions").iterdir())
    sim.add_runs(30)
    sync = procs.python(SLOW_PHASE.replace("sys.argv[1]", repr(phase)), env)
    sync.wait_for("PHASE STARTED")
    sync.popen.send_signal(signal.SIGTERM)
    assert sync.finish() == EXIT_INTERRUPTED, sync.output
    assert error_line(sync.output) == "Error: interrupted; nothing partial was committed"
    if phase == "merge":  # nothing of the interrupted sync, but its ledger row
        assert dump_tables(db) == before
        assert [r["outcome"] for r in ledger(db)] == ["success", "failed"]
    else:  # the sync stands; the export keeps its previous complete version
        assert [r["outcome"] for r in ledger(db)] == ["success", "success"]
        assert (parquet / "current").resolve().name == exported[-1]
