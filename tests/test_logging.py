"""Logs a team can run on: text or JSON lines, one summary line per sync, request ids on errors,
and never the API key, anywhere."""

from __future__ import annotations

import io
import json
import logging
import os
import traceback

import duckdb
import pytest
from helpers import LOGGERS, settings_for

from runs_etl import cli, jobs
from runs_etl.config import load_settings
from runs_etl.errors import AuthError
from runs_etl.ops.logs import JsonFormatter, setup_logging
from runs_etl.sim import Faults

# Distinctive enough that any occurrence is a leak, not a coincidence.
KEY = "sk-live-LEAKCHECK-7f3a9c1e5b2d"


@pytest.fixture
def env(monkeypatch, tmp_path):
    """Point ``runs-etl`` (in process) at a simulator: ``env(sim, **extra)``."""
    monkeypatch.chdir(tmp_path)

    def use(sim, **extra: str) -> None:
        for k in [k for k in os.environ if k.startswith("RUNS_ETL_")]:
            monkeypatch.delenv(k)
        values = {"RUNS_ETL_API_URL": sim.base_url, "RUNS_ETL_API_KEY": sim.api_key,
                  "RUNS_ETL_DUCKDB_PATH": str(tmp_path / "runs.duckdb"), **extra}
        for k, v in values.items():
            monkeypatch.setenv(k, v)

    return use


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_json_lines_are_one_object_each_with_extra_fields():
    buf = io.StringIO()
    setup_logging("json", "info", stream=buf)
    log = logging.getLogger("runs_etl.test")
    log.info("synced %d runs", 3, extra={"sync_id": 7, "request_id": "req-1"})
    log.debug("not shown at info")
    [record] = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert record["msg"] == "synced 3 runs" and record["level"] == "info"
    assert record["logger"] == "runs_etl.test" and record["ts"].endswith("+00:00")
    assert record["sync_id"] == 7 and record["request_id"] == "req-1"


def test_text_lines_have_time_level_logger_and_message():
    buf = io.StringIO()
    setup_logging("text", "debug", stream=buf)
    logging.getLogger("runs_etl.test").debug("hello")
    assert buf.getvalue().rstrip().endswith("DEBUG runs_etl.test: hello")


def test_setting_up_twice_does_not_double_lines():
    buf = io.StringIO()
    setup_logging("text", "info", stream=buf)
    setup_logging("text", "info", stream=buf)
    logging.getLogger("runs_etl.test").info("once")
    assert buf.getvalue().count("once") == 1


def test_json_formatter_keeps_tracebacks_in_one_line():
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("runs_etl.x", logging.ERROR, __file__, 1, "failed", None,
                                   __import__("sys").exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line and "ValueError: boom" in json.loads(line)["exc"]


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_every_sync_logs_one_summary_line(make_sim, env, capsys, fmt):
    sim = make_sim(250)
    env(sim, RUNS_ETL_LOG_FORMAT=fmt)
    assert cli.main(["sync"]) == 0
    sim.add_runs(5)
    assert cli.main(["sync"]) == 0
    err = capsys.readouterr().err
    if fmt == "text":
        summaries = [line for line in err.splitlines() if "runs_etl.sync: sync " in line]
        assert len(summaries) == 2
        for word in ("mode=", "pages=", "new=", "updated=", "unchanged=", "deleted=",
                     "extract=", "load=", "total="):
            assert word in summaries[1]
        return
    summaries = [r for r in json_lines(err) if r.get("event") == "sync_finished"]
    assert [r["sync_id"] for r in summaries] == [1, 2]
    second = summaries[1]
    assert second["outcome"] == "success" and second["sync"]["rows_new"] == 5
    for field in ("mode", "pages", "rows_new", "rows_updated", "rows_unchanged", "rows_deleted",
                  "seconds_extract", "seconds_load", "seconds_total"):
        assert field in second["sync"]


def test_a_failed_sync_logs_the_request_id_and_exit_code(make_sim, env, capsys):
    sim = make_sim(20)
    env(sim, RUNS_ETL_LOG_FORMAT="json", RUNS_ETL_API_KEY="wrong")
    assert cli.main(["sync"]) == 3
    err = capsys.readouterr().err
    [failure] = [r for r in json_lines(err) if r["level"] == "error"]
    assert failure["error_type"] == "AuthError" and failure["exit_code"] == 3
    assert failure["status"] == 401 and failure["request_id"].startswith("sim-")
    assert failure["request_id"] in failure["msg"]
    assert [line for line in err.splitlines() if line.startswith("Error:")]


def _everything_at_debug(buf: io.StringIO) -> None:
    """Every logger, ours and the libraries', at DEBUG into ``buf``: the worst case."""
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG)
    for name in LOGGERS:
        lg = logging.getLogger(name)
        lg.handlers[:], lg.propagate = [], True
        lg.setLevel(logging.DEBUG)


def _assert_no_key(text: str, where: str) -> None:
    assert KEY not in text, f"the API key leaked into {where}"


def test_the_api_key_never_reaches_logs_output_ledger_or_errors(make_sim, env, capfd, tmp_path):
    faulty = make_sim(400, api_key=KEY, faults=Faults(rate_429=0.15, rate_500=0.15,
                                                      rate_truncated=0.1, rate_bad_envelope=0.05))
    other = make_sim(20, api_key="the-server-wants-another-key")
    config = tmp_path / "runs-etl.toml"
    config.write_text("[api]\nmax_attempts = 15\nbackoff_base = 0\nbackoff_max = 0\n",
                      encoding="utf-8")
    db = tmp_path / "runs.duckdb"

    # 1. the command line, at debug level, text and JSON, with faults and with a rejected key
    env(faulty, RUNS_ETL_LOG_LEVEL="debug")
    assert cli.main(["sync", "-v", "--config", str(config)]) == 0
    assert cli.main(["sync", "-v", "--log-format", "json", "--config", str(config)]) == 0
    env(other, RUNS_ETL_API_KEY=KEY)
    assert cli.main(["sync", "-v", "--config", str(config)]) == 3
    assert cli.main(["sync", "-v", "--log-format", "json", "--config", str(config)]) == 3
    out, err = capfd.readouterr()
    assert "sync 1 success" in err and "API key" in err  # the runs did happen
    _assert_no_key(out, "stdout")
    _assert_no_key(err, "stderr (logs and Error: lines)")

    # 2. in process, with every library logging at debug, and the exceptions themselves
    buf = io.StringIO()
    _everything_at_debug(buf)
    result = jobs.run_sync(settings_for(faulty, db), quiet=True)
    assert result.retries > 0  # the faults were exercised
    wrong = load_settings(None, {"RUNS_ETL_API_URL": other.base_url, "RUNS_ETL_API_KEY": KEY,
                                 "RUNS_ETL_DUCKDB_PATH": str(db)}, cwd=tmp_path)
    with pytest.raises(AuthError) as failure:
        jobs.run_sync(wrong, quiet=True)
    exc = failure.value
    _assert_no_key(buf.getvalue(), "debug logs of runs-etl and its libraries")
    _assert_no_key("".join(traceback.format_exception(exc)) + repr(exc) + str(exc),
                   "the exception")
    _assert_no_key(repr(wrong) + str(wrong) + wrong.model_dump_json(), "the settings")

    # 3. the warehouse: every column of every ledger row, and every other table
    con = duckdb.connect(str(db), read_only=True)
    try:
        rows = con.execute("SELECT * FROM sync_runs").fetchall()
        assert len(rows) == 6 and {r[3] for r in rows} == {"success", "failed"}
        _assert_no_key(repr(rows), "sync_runs")
        for (table,) in con.execute("SELECT table_name FROM duckdb_tables()").fetchall():
            _assert_no_key(repr(con.execute(f'SELECT * FROM "{table}"').fetchall()), table)
    finally:
        con.close()
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), f"the API key leaked into {path}"
