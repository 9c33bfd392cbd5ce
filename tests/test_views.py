"""The SQL views in ``sql/`` give the numbers a person would compute by hand from the runs.

The hand-made runs are stored twice, as workspaces ``a`` and ``b`` with the same run and
workflow ids: each workspace's rows of every view must be what that workspace alone gives."""

from __future__ import annotations

import importlib.resources
import math
import random
from collections import Counter, defaultdict
from datetime import UTC, date, datetime, timedelta

import pytest
from helpers import LIVE, SYNCS, TERMINAL, WORKFLOWS, T, handmade_warehouse, insert_fixture, rows

from runs_etl import warehouse
from runs_etl.config import load_settings
from runs_etl.engine.models import TERMINAL_STATUSES
from runs_etl.warehouse.views import store_view_settings

HISTORY_VIEWS = {"status_transitions", "time_in_status", "queue_time_daily"}
VIEWS = {"run_facts", "status_daily", "workflow_duration_stats", "failure_rate_daily",
         "open_runs", "stuck_runs", "node_usage", "sync_history", "sync_health",
         "status_transitions", "time_in_status", "queue_time_daily"}


def utc_day(dt: datetime) -> date:
    return dt.astimezone(UTC).date()


def quantile(xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (what spreadsheets call PERCENTILE.INC)."""
    xs = sorted(xs)
    h = (len(xs) - 1) * q
    lo = math.floor(h)
    return xs[lo] + (h - lo) * (xs[min(lo + 1, len(xs) - 1)] - xs[lo])


WORKSPACES = {"a": 0, "b": len(SYNCS)}  # workspace -> offset of its sync ids


@pytest.fixture
def con(tmp_path):
    """The hand-made fixture in two workspaces with overlapping run ids."""
    con = warehouse.connect(tmp_path / "runs.duckdb")
    warehouse.migrate(con)
    for name, offset in WORKSPACES.items():
        insert_fixture(con, workspace=name, sync_offset=offset)
    warehouse.apply_views(con)
    yield con
    con.close()


@pytest.fixture(params=sorted(WORKSPACES))
def ws(request) -> str:
    """Each workspace in turn: its rows must equal the single-workspace expectations."""
    return request.param


def of(con, view: str, ws: str, columns: str = "*") -> list[dict]:
    """``view``'s rows of workspace ``ws``, without the workspace column."""
    got = rows(con, f"SELECT {columns} FROM {view} WHERE workspace = ?", [ws])
    assert all(r.pop("workspace", ws) == ws for r in got)
    return got


def at_now(con, sql: str, params=None) -> tuple[datetime, list[dict]]:
    """Rows of ``sql`` and the now() they were computed with (one transaction, one now())."""
    con.begin()
    try:
        (now,) = con.execute("SELECT now()").fetchone()
        return now, rows(con, sql, params)
    finally:
        con.commit()


def test_every_sql_file_builds_on_an_empty_warehouse_and_can_be_reapplied(tmp_path):
    """Meta-test: each view file runs on a fresh warehouse, twice, and every view is queryable."""
    files = sorted(f.name for f in importlib.resources.files("runs_etl.sql").iterdir()
                   if f.name.endswith(".sql"))
    assert files, "no sql/*.sql found"
    con = warehouse.connect(tmp_path / "empty.duckdb")
    warehouse.migrate(con)
    assert warehouse.apply_views(con) == files
    assert warehouse.apply_views(con) == files
    names = {n for (n,) in con.execute(
        "SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    assert names == VIEWS
    for name in names:  # sync_health: one row per workspace that has syncs, so none yet
        assert con.execute(f"SELECT * FROM {name}").fetchall() == [], name


def test_every_view_starts_with_the_workspace_column(con):
    for name in VIEWS:
        cur = con.execute(f"SELECT * FROM {name} LIMIT 0")
        assert cur.description[0][0] == "workspace", name
        got = {w for (w,) in con.execute(f"SELECT DISTINCT workspace FROM {name}").fetchall()}
        # The hand-made warehouse has no run_history: the history views are empty here
        # (tests/test_history.py covers them).
        assert got == (set() if name in HISTORY_VIEWS else set(WORKSPACES)), name


def test_a_single_workspace_warehouse_reads_as_workspace_default(tmp_path):
    con = warehouse.connect(handmade_warehouse(tmp_path / "runs.duckdb"))
    try:
        assert {w for (w,) in con.execute("SELECT workspace FROM run_facts").fetchall()} == {
            "default"}
        (h,) = rows(con, "SELECT * FROM sync_health")
        assert (h["workspace"], h["last_success_sync_id"]) == ("default", 3)
    finally:
        con.close()


def test_run_facts_has_one_row_per_live_run_with_workflow_and_duration(con, ws):
    facts = of(con, "run_facts", ws)
    got = {r["run_id"]: r for r in facts}
    assert len(facts) == len(got)  # the workflow join matches within the workspace only
    assert set(got) == {r.id for r in LIVE}
    for r in LIVE:
        f = got[r.id]
        name, typ = WORKFLOWS.get(r.wf, (None, None))
        assert (f["workflow_name"], f["workflow_type"]) == (name, typ)
        assert f["is_terminal"] is (r.status in TERMINAL)
        expected = r.seconds if r.status in TERMINAL else None
        assert f["duration_seconds"] == expected
        assert f["created_date"] == utc_day(r.created)
        assert f["created_hour"] == r.created.astimezone(UTC).replace(
            minute=0, second=0, microsecond=0, tzinfo=None)
        assert f["created_hour_of_day"] == r.created.astimezone(UTC).hour
    assert isinstance(got["a4"]["duration_seconds"], float)


def test_days_and_hours_are_utc_whatever_the_session_time_zone(con):
    con.execute("SET TimeZone = 'America/New_York'")
    got = con.execute("SELECT workspace, created_date, created_hour_of_day FROM run_facts "
                      "WHERE run_id = 'b2' ORDER BY 1").fetchall()
    assert got == [(w, date(2024, 3, 2), 4) for w in sorted(WORKSPACES)]


def test_status_daily_counts_live_runs_per_utc_day_and_status(con, ws):
    got = {(r["created_date"], r["status"]): r["runs"] for r in of(con, "status_daily", ws)}
    assert got == Counter((utc_day(r.created), r.status) for r in LIVE)


def test_workflow_duration_stats_match_hand_computed_counts_and_percentiles(con, ws):
    got = {r["workflow_id"]: r for r in of(con, "workflow_duration_stats", ws)}
    by_wf = defaultdict(list)
    for r in LIVE:
        by_wf[r.wf].append(r)
    assert set(got) == set(by_wf)
    for wf, runs in by_wf.items():
        s = got[wf]
        finished = [r for r in runs if r.status in TERMINAL]
        durations = [r.seconds for r in finished if r.seconds is not None]
        status = Counter(r.status for r in runs)
        assert s["workflow_name"] == WORKFLOWS.get(wf, (None,))[0]
        assert (s["runs"], s["finished"], s["open"]) == (
            len(runs), len(finished), len(runs) - len(finished))
        assert (s["completed"], s["failed"], s["stopped"]) == (
            status["completed"], status["failed"], status["stopped"])
        assert s["failure_rate"] == pytest.approx(status["failed"] / len(finished))
        for q in (50, 90, 95, 99):
            assert s[f"p{q}_seconds"] == pytest.approx(quantile(durations, q / 100)), (wf, q)
        assert s["max_seconds"] == max(durations)
        assert s["last_run_at"] == max(r.created for r in runs)
    # the deleted 1000 s run of wf-a is not counted
    assert got["wf-a"]["max_seconds"] == 100
    assert got["wf-a"]["p90_seconds"] == pytest.approx(76.2)  # 40.5 + 0.6 * (100 - 40.5)


def test_failure_rate_daily_per_day_and_workflow_type(con, ws):
    got = {(r["created_date"], r["workflow_type"]): r for r in of(con, "failure_rate_daily", ws)}
    expected: dict = defaultdict(Counter)
    for r in LIVE:
        if r.status in TERMINAL:
            key = (utc_day(r.created), WORKFLOWS.get(r.wf, (None, None))[1])
            expected[key]["finished"] += 1
            expected[key]["failed"] += r.status == "failed"
    assert set(got) == set(expected)
    for key, c in expected.items():
        assert (got[key]["finished"], got[key]["failed"]) == (c["finished"], c["failed"])
        assert got[key]["failure_rate"] == pytest.approx(c["failed"] / c["finished"])
    # b1 failed and b3 completed on the 1st; b2 (failed) belongs to the 2nd in UTC
    assert got[(date(2024, 3, 1), "handler")]["failure_rate"] == 0.5
    assert got[(date(2024, 3, 2), "handler")]["failure_rate"] == 1.0


def test_open_runs_lists_non_terminal_runs_with_their_age(con, ws):
    now, got = at_now(con, "SELECT * FROM open_runs WHERE workspace = ?", [ws])
    expected = {r.id: r for r in LIVE if r.status not in TERMINAL}
    assert {r["run_id"] for r in got} == set(expected) == {"a6", "b4", "b5"}
    for row in got:
        age = (now - expected[row["run_id"]].created).total_seconds()
        assert row["age_seconds"] == pytest.approx(age, abs=1e-6)


def test_stuck_runs_are_open_runs_older_than_24h_by_default(con, ws):
    got = {r["run_id"]: r for r in of(con, "stuck_runs", ws)}
    assert set(got) == {"a6", "b5"}
    assert {r["stuck_after_seconds"] for r in got.values()} == {86400.0}


def test_stuck_runs_follow_analytics_stuck_after_stored_by_the_sync(con):
    """The setting is global (sync_state workspace '*'): it applies to every workspace."""
    def stuck() -> set[tuple[str, str]]:
        return set(con.execute("SELECT workspace, run_id FROM stuck_runs").fetchall())
    settings = load_settings(None, {}, {"analytics": {"stuck_after": "2d"}})
    store_view_settings(con, settings)
    assert stuck() == {(w, "a6") for w in WORKSPACES}
    settings = load_settings(None, {}, {"analytics": {"stuck_after": "30m"}})
    store_view_settings(con, settings)
    assert stuck() == {(w, r) for w in WORKSPACES for r in ("a6", "b4", "b5")}


def test_node_usage_counts_nodes_of_live_runs_only(con, ws):
    got = {r["node_id"]: r for r in of(con, "node_usage", ws)}
    occurrences = Counter(n for r in LIVE for n in r.nodes)
    runs = Counter(n for r in LIVE for n in set(r.nodes))
    assert "n9" not in got  # only in the deleted run
    assert {n: g["occurrences"] for n, g in got.items()} == occurrences
    assert {n: g["runs"] for n, g in got.items()} == runs
    assert got["n1"]["workflows"] == 2
    assert got["n1"]["run_share"] == pytest.approx(3 / len(LIVE))
    assert got["n3"]["last_seen_at"] == T + timedelta(hours=9)


def test_sync_health_has_one_row_per_workspace_with_syncs_and_failures_stay_local(con):
    """A failure in b counts against b only; a workspace without syncs has no health row."""
    con.execute("INSERT INTO sync_runs (workspace, sync_id, started_at, outcome, error) "
                "VALUES ('b', 100, now(), 'failed', 'HTTP 401')")
    con.execute("INSERT INTO runs (workspace, id, status, created_at, _first_seen_at, "
                "_synced_at) VALUES ('c', 'a1', 'running', now(), now(), now())")
    got = {r["workspace"]: r for r in rows(con, "SELECT * FROM sync_health")}
    assert set(got) == {"a", "b"}
    assert (got["a"]["failures_since_success"], got["a"]["last_attempt_outcome"]) == (
        1, "abandoned")
    assert (got["b"]["failures_since_success"], got["b"]["last_attempt_error"]) == (
        2, "HTTP 401")
    assert (got["a"]["syncs"], got["b"]["syncs"]) == (4, 5)


def test_sync_health_reports_last_success_freshness_and_failures(con, ws):
    now, (h,) = at_now(con, "SELECT * FROM sync_health WHERE workspace = ?", [ws])
    offset = WORKSPACES[ws]
    last_ok = SYNCS[2]
    finished = last_ok[2] + timedelta(seconds=last_ok[3])
    assert h["last_success_sync_id"] == 3 + offset
    assert h["last_success_at"] == finished
    assert h["freshness_seconds"] == pytest.approx((now - finished).total_seconds(), abs=1e-6)
    assert h["last_success_runs_seen"] == 14
    assert h["last_success_rows_changed"] == 2 + 3 + 1
    assert (h["last_attempt_sync_id"], h["last_attempt_outcome"]) == (4 + offset, "abandoned")
    assert h["last_attempt_error"] == "killed"
    assert (h["syncs"], h["successes"], h["failures"], h["abandoned"]) == (4, 2, 1, 1)
    assert h["failures_since_success"] == 1
    assert h["avg_rows_changed"] == pytest.approx((12 + 6) / 2)


def test_sync_history_has_rows_changed_per_attempt(con, ws):
    offset = WORKSPACES[ws]
    got = {r["sync_id"] - offset: r["rows_changed"] for r in of(con, "sync_history", ws)}
    assert got == {1: 12, 2: 0, 3: 6, 4: 0}


# --- one home for the terminal statuses ---------------------------------------------------------

def test_the_terminal_statuses_are_the_ones_the_readme_promises():
    assert TERMINAL_STATUSES == TERMINAL


def test_run_facts_and_open_runs_use_exactly_the_engines_terminal_statuses(tmp_path):
    """sql/10_run_facts.sql gets its list from ``TERMINAL_STATUSES`` when applied: each of those
    is terminal, every other status (unknown ones included) is open."""
    statuses = sorted(TERMINAL_STATUSES) + ["running", "queued", "awaiting_human_feedback",
                                            "paused", "COMPLETED"]
    con = warehouse.connect(tmp_path / "runs.duckdb")
    warehouse.migrate(con)
    for i, status in enumerate(statuses):
        con.execute("INSERT INTO runs (workspace, id, status, created_at, _first_seen_at, "
                    "_synced_at) VALUES ('default', ?, ?, now(), now(), now())",
                    [f"r{i}-{status}", status])
    warehouse.apply_views(con)
    facts = dict(con.execute("SELECT status, is_terminal FROM run_facts").fetchall())
    assert facts == {s: s in TERMINAL_STATUSES for s in statuses}
    open_ = {s for (s,) in con.execute("SELECT status FROM open_runs").fetchall()}
    assert open_ == set(statuses) - TERMINAL_STATUSES
    con.close()


def test_time_in_status_bounds_each_kind_of_version_as_by_hand(tmp_path):
    """Every way a version is entered and left, in two workspaces sharing a run id: first seen
    (bounded by created_at), seen before (bounded by observed_after), back from a delete at the
    source twice in one status (each bounded by created_at, one of them left "before" it was
    created by the API's clock: 0, not negative), a NULL status, still ongoing, and a run
    deleted at the source (not shown)."""
    con = warehouse.connect(tmp_path / "runs.duckdb")
    warehouse.migrate(con)
    t0 = datetime(2026, 3, 1, tzinfo=UTC)

    def at(minutes: float) -> datetime:
        return t0 + timedelta(minutes=minutes)

    runs = {  # (workspace, id): (workflow_id, created_at minute, deleted)
        ("a", "r1"): ("wf1", 0, False), ("b", "r1"): ("wf2", 5, False),
        ("a", "r2"): ("wf1", 20, False), ("a", "r3"): (None, 0, False),
        ("a", "gone"): ("wf1", 0, True),
    }
    for (ws, rid), (wf, created, deleted) in runs.items():
        con.execute("INSERT INTO runs (workspace, id, workflow_id, status, created_at, "
                    "_first_seen_at, _synced_at, _deleted_at) VALUES (?, ?, ?, 'x', ?, ?, ?, ?)",
                    [ws, rid, wf, at(created), at(0), at(0), at(99) if deleted else None])
    # (workspace, run, status, valid_from, valid_to, observed_after, last_seen), minutes
    history = [
        ("a", "r1", "queued", 10, 30, None, 10),      # entered unseen: after created_at (0)
        ("a", "r1", "running", 30, 60, 10, 45),       # entered after 10 (last seen queued)
        ("a", "r1", "completed", 60, None, 45, 90),   # ongoing
        ("b", "r1", "queued", 10, 40, None, 25),      # same id, other workspace: created 5
        ("b", "r1", "completed", 40, 70, 25, 40),
        ("a", "r2", "completed", 15, 18, None, 15),   # left at 18, "created" at 20: 0
        ("a", "r2", "completed", 50, 80, None, 60),   # back from a delete: 80 - 20
        ("a", "r3", None, 10, 20, None, 10),          # no status: still a row
        ("a", "r3", None, 30, 45, None, 30),
        ("a", "gone", "queued", 10, 20, None, 10),    # deleted at the source: not shown
    ]
    for ws, rid, status, start, end, after, seen in history:
        con.execute("INSERT INTO run_history (workspace, run_id, valid_from, valid_to, status, "
                    "observed_after, _last_seen_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [ws, rid, at(start), None if end is None else at(end), status,
                     None if after is None else at(after), at(seen)])
    warehouse.apply_views(con)
    got = {(r["workspace"], r["run_id"], r["status"]): r for r in rows(
        con, "SELECT * FROM time_in_status")}
    con.close()
    m = 60.0
    expected = {  # (workflow_id, versions, lower, upper, ongoing)
        ("a", "r1", "queued"): ("wf1", 1, 0 * m, 30 * m, False),
        ("a", "r1", "running"): ("wf1", 1, 15 * m, 50 * m, False),
        ("a", "r1", "completed"): ("wf1", 1, 30 * m, None, True),
        ("b", "r1", "queued"): ("wf2", 1, 15 * m, 35 * m, False),
        ("b", "r1", "completed"): ("wf2", 1, 0 * m, 45 * m, False),
        ("a", "r2", "completed"): ("wf1", 2, 10 * m, 60 * m, False),
        ("a", "r3", None): (None, 2, 0 * m, 65 * m, False),
    }
    assert set(got) == set(expected)
    for key, (wf, versions, lower, upper, ongoing) in expected.items():
        r = got[key]
        assert (r["workflow_id"], r["versions"], r["ongoing"]) == (wf, versions, ongoing), key
        assert r["lower_seconds"] == pytest.approx(lower), key
        assert r["upper_seconds"] == (None if upper is None else pytest.approx(upper)), key


# time_in_status as first written: a join feeding the aggregate (it ran out of 128MB at 1M runs).
# The view must give the same rows; this is the plain reading of its definition.
_TIME_IN_STATUS_PLAIN = """
    SELECT h.workspace, h.run_id, r.workflow_id, h.status, count(*) AS versions,
           sum(epoch(h._last_seen_at - h.valid_from)) AS lower_seconds,
           CASE WHEN NOT bool_or(h.valid_to IS NULL) THEN sum(greatest(
               epoch(h.valid_to - coalesce(h.observed_after, r.created_at)), 0)) END
               AS upper_seconds,
           bool_or(h.valid_to IS NULL) AS ongoing
    FROM run_history AS h JOIN runs AS r ON r.workspace = h.workspace AND r.id = h.run_id
    WHERE r._deleted_at IS NULL
    GROUP BY h.workspace, h.run_id, r.workflow_id, h.status"""


@pytest.mark.parametrize("seed", range(40))
def test_time_in_status_equals_its_plain_definition_on_random_histories(seed):
    """Two workspaces, up to five versions a run, NULL statuses, observed_after and
    created_at, runs deleted at the source, history of a run the warehouse lacks."""
    rng = random.Random(seed)
    con = warehouse.connect(":memory:")
    warehouse.migrate(con)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)

    def minutes(m: int) -> datetime:
        return t0 + timedelta(minutes=m)

    for ws in ("a", "b"):
        for i in range(rng.randint(1, 8)):
            con.execute("INSERT INTO runs (workspace, id, workflow_id, status, created_at, "
                        "_first_seen_at, _synced_at, _deleted_at) "
                        "VALUES (?, ?, ?, 'x', ?, ?, ?, ?)",
                        [ws, f"r{i}", rng.choice([None, "w1", "w2"]),
                         None if rng.random() < 0.05 else minutes(rng.randint(0, 100)), t0, t0,
                         t0 if rng.random() < 0.2 else None])
            t = rng.randint(0, 120)
            for v in range(rng.randint(1, 5)):
                start, t = t, t + rng.randint(1, 60)
                end = None if v == 4 or rng.random() < 0.2 else t
                con.execute("INSERT INTO run_history (workspace, run_id, valid_from, valid_to, "
                            "status, observed_after, _last_seen_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                            [ws, f"r{i}", minutes(start), None if end is None else minutes(end),
                             rng.choice(["queued", "running", "completed", None]),
                             None if rng.random() < 0.4 else minutes(start - rng.randint(0, 30)),
                             minutes(start + rng.randint(0, 20))])
                if end is None:
                    break
        con.execute("INSERT INTO run_history (workspace, run_id, valid_from, status, "
                    "_last_seen_at) VALUES (?, 'not-in-runs', ?, 'queued', ?)", [ws, t0, t0])
    warehouse.apply_views(con)
    view = con.execute("SELECT * FROM time_in_status ORDER BY ALL").fetchall()
    plain = con.execute(f"SELECT * FROM ({_TIME_IN_STATUS_PLAIN}) ORDER BY ALL").fetchall()
    con.close()
    assert len(view) == len(plain)
    for got, want in zip(view, plain):
        assert got[:5] == want[:5] and got[7] == want[7]
        assert got[5] == pytest.approx(want[5])
        assert got[6] == (None if want[6] is None else pytest.approx(want[6]))
