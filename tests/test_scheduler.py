"""``runs-etl schedule``: when it syncs, what it does with failures, and how it stops."""

from __future__ import annotations

import io
import json
import signal
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import duckdb
import pytest
from apscheduler.events import EVENT_JOB_MAX_INSTANCES
from apscheduler.schedulers.background import BackgroundScheduler
from helpers import ledger, settings_for

from runs_etl import cli, jobs
from runs_etl.config import ScheduleSettings, load_settings
from runs_etl.errors import AuthError, ConfigError, LockedError
from runs_etl.ops import scheduler
from runs_etl.ops.lock import read_holder, running
from runs_etl.ops.logs import setup_logging
from runs_etl.ops.scheduler import build_trigger, cron_trigger, run_scheduler

UTC_TZ = ZoneInfo("UTC")
MONDAY_NOON = datetime(2024, 6, 3, 12, 0, tzinfo=UTC)


@pytest.fixture
def events():
    """Route runs-etl logs into a buffer as JSON lines; returns a callable giving the records."""
    buf = io.StringIO()
    setup_logging("json", "info", stream=buf)
    return lambda: [json.loads(line) for line in buf.getvalue().splitlines()]


def named(records: list[dict], event: str) -> list[dict]:
    return [r for r in records if r.get("event") == event]


@pytest.fixture
def probe(monkeypatch):
    """Watches the APScheduler instance ``run_scheduler`` builds, through APScheduler's events:
    ``refused`` is set when a run is refused because one is still running, ``first_run_at`` is
    the job's first run time as scheduled at start-up, and ``on_start()`` is called then."""
    seen = SimpleNamespace(refused=threading.Event(), first_run_at=None, on_start=lambda: None)

    class Probed(BackgroundScheduler):
        def start(self, *args, **kwargs):
            self.add_listener(lambda ev: seen.refused.set(), EVENT_JOB_MAX_INSTANCES)
            super().start(*args, **kwargs)
            job = self.get_job(scheduler.JOB_ID)
            seen.first_run_at = job.next_run_time if job is not None else None
            seen.on_start()

    monkeypatch.setattr(scheduler, "BackgroundScheduler", Probed)
    return seen


def bare_settings(tmp_path: Path, **schedule):
    return load_settings(None, {}, {"schedule": schedule}, cwd=tmp_path)


def serve(settings, sync_fn, stop: threading.Event, limit: float = 30.0) -> int:
    """run_scheduler with a safety net: it is stopped after ``limit`` seconds whatever happens."""
    guard = threading.Timer(limit, stop.set)
    guard.start()
    try:
        return run_scheduler(settings, sync_fn, stop_event=stop)
    finally:
        guard.cancel()


# --- configuration ---------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", [{}, {"cron": "*/15 * * * *", "interval": "15m"}],
                         ids=["neither", "both"])
def test_exactly_one_of_cron_and_interval_must_be_set(schedule):
    with pytest.raises(ConfigError, match="exactly one of schedule.cron .* schedule.interval"):
        build_trigger(ScheduleSettings(**schedule), UTC_TZ)


@pytest.mark.parametrize("expr", ["0 3 * *", "61 * * * *", "0 3 * * 9", "0 0 1 * 1", "0 3 * * x"])
def test_a_bad_crontab_expression_is_a_config_error(expr):
    with pytest.raises(ConfigError, match="schedule.cron"):
        build_trigger(ScheduleSettings(cron=expr), UTC_TZ)


def test_zero_interval_and_unknown_timezone_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="schedule.interval must be positive"):
        build_trigger(ScheduleSettings(interval="0s"), UTC_TZ)
    with pytest.raises(ConfigError, match="schedule.timezone"):
        run_scheduler(bare_settings(tmp_path, interval="1h", timezone="Mars/Olympus_Mons"),
                      lambda s: None)


@pytest.mark.parametrize("expr, start, expected", [
    ("0 3 * * 0", MONDAY_NOON, datetime(2024, 6, 9, 3, tzinfo=UTC)),  # 0 = Sunday, as in cron
    ("0 3 * * 7", MONDAY_NOON, datetime(2024, 6, 9, 3, tzinfo=UTC)),  # so is 7
    ("0 9 * * 1-5", datetime(2024, 6, 8, 12, tzinfo=UTC), datetime(2024, 6, 10, 9, tzinfo=UTC)),
    ("0 8 * * */2", MONDAY_NOON, datetime(2024, 6, 4, 8, tzinfo=UTC)),  # sun,tue,thu,sat
    ("0 8 * * sat", MONDAY_NOON, datetime(2024, 6, 8, 8, tzinfo=UTC)),
    ("*/15 * * * *", MONDAY_NOON.replace(minute=1), MONDAY_NOON.replace(minute=15)),
    ("@daily", MONDAY_NOON, datetime(2024, 6, 4, 0, 0, tzinfo=UTC)),
])
def test_crontab_expressions_mean_what_they_mean_to_cron(expr, start, expected):
    fire = cron_trigger(expr, UTC_TZ).get_next_fire_time(None, start)
    assert fire == expected


def test_cron_runs_in_the_configured_timezone():
    trigger = build_trigger(ScheduleSettings(cron="0 3 * * *", timezone="Europe/Lisbon"),
                            ZoneInfo("Europe/Lisbon"))
    fire = trigger.get_next_fire_time(None, MONDAY_NOON)
    assert fire.astimezone(UTC) == datetime(2024, 6, 4, 2, tzinfo=UTC)  # 03:00 WEST = 02:00 UTC


def test_jitter_is_passed_to_the_trigger():
    trigger = build_trigger(ScheduleSettings(interval="1h", jitter="30s"), UTC_TZ)
    assert trigger.jitter == 30


# --- running in process ----------------------------------------------------------------------

def test_scheduler_runs_real_syncs_on_its_interval_until_stopped(make_sim, tmp_path, events):
    sim = make_sim(300)
    db = tmp_path / "runs.duckdb"
    settings = settings_for(sim, db, schedule={"interval": 0.01, "run_at_start": True})
    stop, results = threading.Event(), []

    def sync_fn(s):
        results.append(jobs.run_sync(s, quiet=True))
        if len(results) == 1:
            sim.add_runs(20)  # the next tick must pick these up
        else:
            stop.set()

    assert serve(settings, sync_fn, stop) == 0
    assert [r.outcome for r in results] == ["success", "success"]
    con = duckdb.connect(str(db), read_only=True)
    try:
        (runs,) = con.execute("SELECT count(*) FROM runs").fetchone()
    finally:
        con.close()
    assert runs == len(sim.run_ids()) == 320
    assert [r["outcome"] for r in ledger(db)] == ["success", "success"]
    records = events()
    [started] = named(records, "scheduler_started")
    assert "first sync now" in started["msg"]
    assert len(named(records, "sync_finished")) == 2  # one summary line per sync
    assert len(named(records, "next_run")) >= 1
    assert records[-1]["event"] == "scheduler_stopped"


def test_a_failed_sync_is_logged_in_one_line_and_the_next_one_still_runs(tmp_path, events):
    settings = bare_settings(tmp_path, interval=0.01)
    stop, calls = threading.Event(), []
    failures = [AuthError("the API rejected the API key", status=401, request_id="req-42"),
                LockedError("another writer is using runs.duckdb"),
                RuntimeError("boom")]

    def sync_fn(s):
        calls.append(1)
        if failures:
            raise failures.pop(0)
        stop.set()

    assert serve(settings, sync_fn, stop) == 0
    assert len(calls) == 4
    records = events()
    [auth] = named(records, "failed")
    assert auth["error_type"] == "AuthError" and auth["level"] == "error"
    assert auth["request_id"] == "req-42" and auth["status"] == 401
    assert auth["exit_code"] == 3 and "request id req-42" in auth["msg"]
    [locked] = named(records, "sync_skipped")
    assert locked["level"] == "warning"
    [crash] = named(records, "sync_crashed")
    assert "RuntimeError: boom" in crash["exc"]  # a bug keeps its traceback
    assert records[-1]["event"] == "scheduler_stopped"


def test_syncs_never_overlap_when_one_outlasts_the_interval(tmp_path, events, probe):
    settings = bare_settings(tmp_path, interval=0.01)
    stop, lock = threading.Event(), threading.Lock()
    active, most, calls = [0], [0], [0]

    def slow_sync(s):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        if calls[0] == 0:
            # the first sync outlasts the interval: it runs until a tick has come and been refused
            assert probe.refused.wait(30), "no tick came while the first sync ran"
        with lock:
            active[0] -= 1
            calls[0] += 1
            if calls[0] == 3:
                stop.set()

    assert serve(settings, slow_sync, stop) == 0
    assert probe.refused.is_set() and calls[0] == 3
    assert most[0] == 1
    # APScheduler's own warning about the refused run comes out through runs-etl's log handler
    assert [r for r in events()
            if r["logger"].startswith("apscheduler") and r["level"] == "warning"]


def test_without_run_at_start_the_first_sync_waits_for_the_schedule(tmp_path, events, probe):
    settings = bare_settings(tmp_path, interval="1h", run_at_start=False)
    stop, calls = threading.Event(), []
    probe.on_start = stop.set  # nothing is due for an hour: stop as soon as it has started
    before = datetime.now(UTC)

    assert serve(settings, lambda s: calls.append(1), stop) == 0
    assert calls == []
    assert probe.first_run_at is not None and probe.first_run_at >= before + timedelta(hours=1)
    [started] = named(events(), "scheduler_started")
    assert "first sync at " in started["msg"]


def test_schedule_command_without_a_schedule_exits_2(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RUNS_ETL_API_KEY", "k")
    assert cli.main(["schedule"]) == 2
    assert "Error: invalid configuration: schedule: set exactly one of" in capsys.readouterr().err


def test_schedule_command_without_an_api_key_exits_2_at_start(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    for k in ("RUNS_ETL_API_KEY", "RUNS_ETL_API_KEY_FILE"):
        monkeypatch.delenv(k, raising=False)
    (tmp_path / "runs-etl.toml").write_text('[schedule]\ninterval = "15m"\n', encoding="utf-8")
    assert cli.main(["schedule"]) == 2
    assert "no API key" in capsys.readouterr().err


# --- signals (a real daemon process) ---------------------------------------------------------

def json_event(name: str) -> str:
    """How a JSON log line of the daemon names its event."""
    return json.dumps({"event": name})[1:-1]


STOPPING = json_event("stopping")


def _daemon_with_a_sync_in_flight(make_sim, sim_env, gate, procs, tmp_path):
    """A warehouse with one commit, a daemon whose first sync is held mid-walk."""
    sim = make_sim(300)
    db = tmp_path / "runs.duckdb"
    jobs.run_sync(settings_for(sim, db), quiet=True)
    before = sim.run_ids()
    sim.add_runs(40)
    config = tmp_path / "schedule.toml"
    config.write_text('[schedule]\ninterval = "1h"\nrun_at_start = true\n', encoding="utf-8")
    held = gate(sim)
    daemon = procs.cli(["schedule", "--config", str(config)],
                       sim_env(sim, RUNS_ETL_LOG_FORMAT="json"))
    held.wait_entered()
    return sim, db, before, held, daemon


def _run_ids(db: Path) -> set[str]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return {i for (i,) in con.execute("SELECT id FROM runs").fetchall()}
    finally:
        con.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_lets_the_running_sync_commit_then_exits_0(
        make_sim, sim_env, gate, procs, tmp_path, sig):
    sim, db, _, held, daemon = _daemon_with_a_sync_in_flight(make_sim, sim_env, gate, procs,
                                                             tmp_path)
    daemon.popen.send_signal(sig)
    daemon.wait_for(STOPPING)
    held.open()
    assert daemon.finish() == 0, daemon.output
    assert [r["outcome"] for r in ledger(db)] == ["success", "success"], daemon.output
    assert _run_ids(db) == sim.run_ids(), daemon.output  # the whole new commit
    assert json_event("scheduler_stopped") in daemon.output
    assert "Traceback" not in daemon.output


def test_a_second_signal_aborts_the_running_sync_without_committing(
        make_sim, sim_env, gate, procs, tmp_path):
    sim, db, before, held, daemon = _daemon_with_a_sync_in_flight(make_sim, sim_env, gate, procs,
                                                                  tmp_path)
    daemon.popen.send_signal(signal.SIGTERM)
    daemon.wait_for(STOPPING)
    daemon.popen.send_signal(signal.SIGTERM)
    assert daemon.finish() == cli.EXIT_INTERRUPTED, daemon.output
    assert json_event("aborting") in daemon.output
    held.open()
    assert _run_ids(db) == before  # the previous commit, nothing partial
    # the aborted attempt is recorded as failed (not left running), nothing is left behind
    assert [r["outcome"] for r in ledger(db)] == ["success", "failed"]
    assert "interrupted" in ledger(db)[-1]["error"]
    assert read_holder(db) is None and running(db) is None
    assert not [p for p in tmp_path.rglob("*") if ".staging" in p.name and any(p.iterdir())]
    jobs.run_sync(settings_for(sim, db), quiet=True)
    assert [r["outcome"] for r in ledger(db)] == ["success", "failed", "success"]
    assert _run_ids(db) == sim.run_ids()

