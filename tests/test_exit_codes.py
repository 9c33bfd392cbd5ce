"""Exit codes that cron wrappers and monitoring rely on: 0 ok, 1 failure, 2 config, 3 auth,
75 warehouse busy, 130 interrupted; each with one ``Error:`` line and no traceback."""

from __future__ import annotations

import os
import signal

import duckdb
import pytest
from helpers import error_line, ledger, settings_for

from runs_etl import cli, errors, jobs
from runs_etl.ops.lock import writer_lock
from runs_etl.sim import Faults


def test_the_documented_codes_are_the_ones_errors_carry():
    assert (errors.EXIT_OK, errors.EXIT_FAILURE, errors.EXIT_CONFIG, errors.EXIT_AUTH,
            errors.EXIT_LOCKED, cli.EXIT_INTERRUPTED) == (0, 1, 2, 3, 75, 130)
    assert errors.ConfigError(["x"]).exit_code == 2
    assert errors.AuthError("x").exit_code == 3
    assert errors.LockedError("x").exit_code == 75
    for cls in (errors.RetryableApiError, errors.FatalApiError, errors.WalkError,
                errors.DataError, errors.WarehouseError):
        assert cls("x").exit_code == 1


def test_success_exits_0(make_sim, run_cli):
    code, out, err = run_cli(make_sim(100), "sync")
    assert code == 0, err
    # The summary is a log line (stderr); stdout stays empty so cron mails only failures.
    assert "sync 1 success" in err and "Error:" not in err and out == ""


def test_an_api_that_keeps_failing_exits_1_with_the_request_id(make_sim, run_cli, tmp_path):
    sim = make_sim(100, faults=Faults(rate_500=1.0))
    config = tmp_path / "runs-etl.toml"
    config.write_text("[api]\nmax_attempts = 1\n", encoding="utf-8")
    code, _, err = run_cli(sim, "sync", "--config", str(config))
    assert code == 1
    line = error_line(err)
    assert "giving up" in line and "request id sim-" in line
    assert [r["outcome"] for r in ledger(tmp_path / "runs.duckdb")] == ["failed"]


@pytest.mark.parametrize("env, problem", [
    ({"RUNS_ETL_PAGE_SIZE": "0"}, "api.page_size"),
    ({"RUNS_ETL_API_KEY": ""}, "no API key"),
], ids=["bad-page-size", "no-key"])
def test_bad_configuration_exits_2_before_touching_the_warehouse(make_sim, run_cli, tmp_path,
                                                                 env, problem):
    code, _, err = run_cli(make_sim(10), "sync", **env)
    assert code == 2
    assert problem in error_line(err)
    assert not (tmp_path / "runs.duckdb").exists()


def test_a_wrong_api_key_exits_3(make_sim, run_cli):
    code, _, err = run_cli(make_sim(10), "sync", RUNS_ETL_API_KEY="not-the-key")
    assert code == 3
    assert "API key" in error_line(err)


@pytest.mark.parametrize("command", [["export"], ["report", "--out", "r.html"]])
def test_export_and_report_before_any_committed_sync_say_so(make_sim, run_cli, tmp_path,
                                                            command):
    """A first sync that failed still publishes its ledger row (for `status`), but no views:
    export and report say there is nothing committed yet, not a catalog error."""
    sim = make_sim(10)
    assert run_cli(sim, "sync", RUNS_ETL_API_KEY="not-the-key")[0] == 3
    code, _, err = run_cli(sim, *command, RUNS_ETL_PARQUET_DIR=str(tmp_path / "pq"))
    assert code == 1
    assert "no committed sync yet" in error_line(err) and "runs-etl sync" in error_line(err)
    assert run_cli(sim, "status")[0] == 0  # the failed attempt stays visible


@pytest.mark.parametrize("flags, says", [([], "not waiting"),
                                         (["--wait", "0.2"], "after waiting 0.2s")],
                         ids=["no-wait", "wait-expires"])
def test_a_busy_warehouse_exits_75(make_sim, run_cli, tmp_path, flags, says):
    with writer_lock(tmp_path / "runs.duckdb", command="runs-etl sync"):
        code, _, err = run_cli(make_sim(10), "sync", *flags)
    assert code == 75
    line = error_line(err)
    assert says in line and f"pid {os.getpid()}" in line


def test_export_runs_beside_a_sync_from_the_published_snapshot(make_sim, run_cli, tmp_path):
    sim = make_sim(40)
    assert run_cli(sim, "sync", "-q")[0] == 0
    with writer_lock(tmp_path / "runs.duckdb", command="runs-etl sync"):  # a sync is running
        code, out, err = run_cli(None, "export", "--parquet-dir", str(tmp_path / "parquet"))
    assert code == 0, err
    assert "exported 40 runs" in out


def test_sigterm_during_a_sync_exits_130_and_keeps_the_previous_commit(
        make_sim, sim_env, gate, procs, tmp_path):
    sim = make_sim(300)
    db = tmp_path / "runs.duckdb"
    jobs.run_sync(settings_for(sim, db), quiet=True)
    before = sim.run_ids()
    sim.add_runs(40)
    held = gate(sim)
    sync = procs.cli(["sync"], sim_env(sim))
    held.wait_entered()
    sync.popen.send_signal(signal.SIGTERM)
    assert sync.finish() == 130, sync.output
    held.open()
    assert "Error: interrupted; nothing partial was committed" in sync.output
    assert "Traceback" not in sync.output
    con = duckdb.connect(str(db), read_only=True)
    try:
        ids = {i for (i,) in con.execute("SELECT id FROM runs").fetchall()}
    finally:
        con.close()
    assert ids == before  # the previous commit, nothing of the interrupted one
    assert [r["outcome"] for r in ledger(db)] == ["success", "failed"]
