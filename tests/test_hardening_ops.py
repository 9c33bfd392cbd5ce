"""Hardening of the operating side (issue 9): a full disk, a signal, a read-only folder, an odd
path or a quiet cron job each end in what the README promises (one ``Error:`` line, the right
exit code, the warehouse at its previous commit), never a traceback or a flood of lines."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import duckdb
from helpers import (
    assert_mirror,
    error_line,
    ledger,
    read_warehouse,
    remount,
    small_tmpfs,
)

from runs_etl.errors import EXIT_FAILURE

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
