"""Helpers the tests share (fixtures live in ``conftest.py``, the fake API in ``fakeapi.py``).

``assert_mirror(db, sim)`` compares the DuckDB file with ``sim.snapshot()`` (or any id -> run dict
in API shape) field by field; the rest reads the warehouse, builds settings, runs the CLI, holds
simulator requests and writes the hand-made warehouse the view, report and status tests check.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import duckdb

from runs_etl import warehouse
from runs_etl.config import Settings, load_settings

# What the README promises is terminal, written out by hand: the tests' oracle, not the code's.
TERMINAL = frozenset({"completed", "failed", "stopped"})
# Loggers that ``runs_etl.ops.logs.setup_logging`` configures for a process.
LOGGERS = ("runs_etl", "apscheduler", "filelock", "httpx", "httpcore", "asyncio")
# Fields the runs table stores in columns of the same name; anything else belongs in ``extra``.
RUN_FIELDS = ("id", "group_id", "workflow_id", "input", "node_ids", "status", "progress",
              "definitions", "created_at", "finished_at", "workflow", "source")
WORKFLOW_FIELDS = ("id", "group_id", "name", "type", "definition", "last_updated_at",
                   "last_run_at", "created_at", "deleted_at", "runs_count", "author_name",
                   "description", "saved", "error_handler")
_RUN_TS = ("created_at", "finished_at")
_RUN_JSON = ("input", "definitions", "extra")
_WF_TS = ("last_updated_at", "last_run_at", "created_at", "deleted_at")
DATA_TABLES = ("runs", "workflows", "run_nodes", "rejected_records", "sync_state")


# --- reading the warehouse ------------------------------------------------------------------

def instant(value: Any) -> datetime | None:
    """A wire timestamp (offset, 'Z' or naive = UTC) or a datetime, as an aware UTC instant."""
    if value is None:
        return None
    dt = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).astimezone(UTC)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


@contextmanager
def open_db(db):
    """A plain connection to the warehouse file (same config as the product's, so it can be
    opened while an in-process sync connection exists), closed afterwards; an open DuckDB
    connection (e.g. ``:memory:``) is used as it is."""
    if not isinstance(db, (str, Path)):
        yield db
        return
    con = duckdb.connect(str(db))
    try:
        yield con
    finally:
        con.close()


def rows(con, sql: str, params=None) -> list[dict]:
    """Rows of ``sql`` as dicts keyed by column name."""
    cur = con.execute(sql, params or [])
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]


@dataclass
class Warehouse:
    """What a reader of the warehouse sees, in Python values (JSON parsed, instants in UTC)."""

    runs: dict[str, dict] = field(default_factory=dict)  # id -> row (the last one, if repeated)
    run_id_counts: Counter = field(default_factory=Counter)
    workflows: list[dict] = field(default_factory=list)
    run_nodes: list[tuple] = field(default_factory=list)
    ledger: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)

    @property
    def live(self) -> set[str]:
        return {i for i, r in self.runs.items() if r["_deleted_at"] is None}

    @property
    def deleted(self) -> set[str]:
        return {i for i, r in self.runs.items() if r["_deleted_at"] is not None}


def read_warehouse(db: Path, workspace: str | None = None) -> Warehouse:
    """The warehouse (or one workspace of it) as Python values."""
    wh = Warehouse()
    where, params = ("WHERE workspace = ?", [workspace]) if workspace else ("", [])
    with open_db(db) as con:
        for row in rows(con, f"SELECT * FROM runs {where}", params):
            for k in _RUN_JSON:
                row[k] = _loads(row[k])
            for k in (*_RUN_TS, "_deleted_at"):
                row[k] = instant(row[k])
            wh.runs[row["id"]] = row
            wh.run_id_counts[row["id"]] += 1
        for row in rows(con, f"SELECT * FROM workflows {where}", params):
            row["definition"], row["extra"] = _loads(row["definition"]), _loads(row["extra"])
            for k in _WF_TS:
                row[k] = instant(row[k])
            wh.workflows.append(row)
        wh.run_nodes = con.execute(f"SELECT run_id, position, node_id FROM run_nodes {where}",
                                   params).fetchall()
        wh.ledger = rows(con, f"SELECT * FROM sync_runs {where} ORDER BY sync_id", params)
        wh.rejected = rows(con, f"SELECT * FROM rejected_records {where} "
                                "ORDER BY page, item_index", params)
    return wh


def ledger(db: Path) -> list[dict]:
    with open_db(db) as con:
        return rows(con, "SELECT * FROM sync_runs ORDER BY sync_id")


def dump_tables(db: Path, tables: Iterable[str] = DATA_TABLES) -> dict[str, list]:
    """Every row of ``tables``, sorted: equal dumps mean nothing was written to them."""
    with open_db(db) as con:
        return {t: sorted(map(repr, con.execute(f"SELECT * FROM {t}").fetchall()))
                for t in tables}


# --- what the warehouse should hold ---------------------------------------------------------

def expected_run(run: Mapping) -> dict:
    """The columns an API run must land as: node_ids objects become their keys (the object
    stays in extra.node_ids), unknown fields go to extra, timestamps are instants."""
    nodes = run.get("node_ids")
    extra = {k: v for k, v in run.items() if k not in RUN_FIELDS}
    if isinstance(nodes, dict):
        extra["node_ids"] = nodes
        nodes = [str(k) for k in nodes]
    return {"group_id": run.get("group_id"), "workflow_id": run.get("workflow_id"),
            "input": run.get("input"), "node_ids": nodes, "status": run["status"],
            "progress": run.get("progress"), "definitions": run.get("definitions"),
            "created_at": instant(run["created_at"]),
            "finished_at": instant(run.get("finished_at")),
            "source": run.get("source"), "extra": extra or None}


def expected_workflow(wf: Mapping) -> dict:
    out = {k: wf.get(k) for k in WORKFLOW_FIELDS}
    for k in _WF_TS:
        out[k] = instant(out[k])
    extra = {k: v for k, v in wf.items() if k not in WORKFLOW_FIELDS}
    out["extra"] = extra or None
    return out


def run_differences(wh: Warehouse, expected: Mapping[str, Mapping]) -> list[tuple]:
    """(id, column, expected, stored) for every run of ``expected`` stored differently."""
    out = []
    for run_id, run in expected.items():
        row = wh.runs.get(run_id)
        if row is None:
            out.append((run_id, "<row>", "present", "missing"))
            continue
        for col, want in expected_run(run).items():
            if row[col] != want:
                out.append((run_id, col, want, row[col]))
    return out


def _snapshot_of(source) -> dict[str, dict]:
    return source.snapshot() if hasattr(source, "snapshot") else dict(source)


def assert_mirror(db: Path, source, *, stale: Iterable[str] = (),
                  workflows: str | None = "exact", workspace: str | None = None) -> Warehouse:
    """Assert the warehouse is an exact mirror of ``source`` (a Simulator or id -> run dict).

    Live runs are exactly the source's runs (plus ``stale``: runs the source lost that the
    warehouse may keep, e.g. deleted terminal runs after an incremental sync), each stored once,
    with every column equal; ``run_nodes`` explodes their node_ids. ``workflows``: "exact" (one
    row per embedded workflow, equal to the latest snapshot), "present" (every embedded workflow
    has one row) or None. ``workspace``: compare that workspace's rows only.
    """
    expected = _snapshot_of(source)
    wh = read_warehouse(db, workspace)
    repeated = {i: n for i, n in wh.run_id_counts.items() if n > 1}
    assert not repeated, f"run ids stored more than once: {list(repeated.items())[:5]}"
    missing = set(expected) - wh.live
    unexpected = wh.live - set(expected) - set(stale)
    assert not missing, f"{len(missing)} source runs are not live in the warehouse, e.g. " \
                        f"{sorted(missing)[:3]}"
    assert not unexpected, f"{len(unexpected)} live warehouse runs are not in the source, e.g. " \
                           f"{sorted(unexpected)[:3]}"
    diffs = run_differences(wh, expected)
    assert not diffs, f"{len(diffs)} stored values differ from the source, first: {diffs[:5]}"
    _assert_run_nodes(wh, expected)
    if workflows is not None:
        _assert_workflows(wh, expected, exact=workflows == "exact")
    return wh


def _assert_run_nodes(wh: Warehouse, expected: Mapping[str, Mapping]) -> None:
    keys = Counter((r, p) for r, p, _ in wh.run_nodes)
    assert not [k for k, n in keys.items() if n > 1], "run_nodes repeats a (run_id, position)"
    stored: dict[str, dict[int, str]] = {}
    for run_id, position, node in wh.run_nodes:
        stored.setdefault(run_id, {})[position] = node
    bad = []
    for run_id, run in expected.items():
        nodes = expected_run(run)["node_ids"] or []
        if stored.get(run_id, {}) != dict(enumerate(nodes)):
            bad.append((run_id, nodes, stored.get(run_id)))
    assert not bad, f"{len(bad)} runs' run_nodes do not match node_ids, first: {bad[:3]}"


def _assert_workflows(wh: Warehouse, expected: Mapping[str, Mapping], *, exact: bool) -> None:
    ids = Counter(w["id"] for w in wh.workflows)
    assert all(n == 1 for n in ids.values()), f"workflows repeats an id: {ids}"
    want = {run["workflow"]["id"]: run["workflow"] for run in expected.values()
            if run.get("workflow")}
    got = {w["id"]: w for w in wh.workflows}
    assert set(want) <= set(got), f"workflows missing: {set(want) - set(got)}"
    if not exact:
        return
    assert set(got) == set(want), f"workflows no source run embeds: {set(got) - set(want)}"
    diffs = [(i, k, v, got[i][k]) for i, wf in want.items()
             for k, v in expected_workflow(wf).items() if got[i][k] != v]
    assert not diffs, f"workflow snapshots differ from the source, first: {diffs[:5]}"


# --- picking runs to change -------------------------------------------------------------------

def newest(snapshot: Mapping[str, Mapping], k: int, *, terminal: bool | None = None) -> list[str]:
    """Ids of the k newest runs (optionally only terminal / only open ones)."""
    runs = sorted(snapshot.values(), key=lambda r: (instant(r["created_at"]), r["id"]),
                  reverse=True)
    if terminal is not None:
        runs = [r for r in runs if (r["status"] in TERMINAL) == terminal]
    return [r["id"] for r in runs[:k]]


def oldest_open(snapshot: Mapping[str, Mapping], k: int) -> list[str]:
    runs = sorted((r for r in snapshot.values() if r["status"] not in TERMINAL),
                  key=lambda r: (instant(r["created_at"]), r["id"]))
    return [r["id"] for r in runs[:k]]


# --- settings ---------------------------------------------------------------------------------

def settings_for(sim, db: Path, **sections) -> Settings:
    """Settings for an in-process sync against ``sim`` (sections: {"sync": {...}} overrides)."""
    env = {"RUNS_ETL_API_URL": sim.base_url, "RUNS_ETL_API_KEY": sim.api_key,
           "RUNS_ETL_DUCKDB_PATH": str(db)}
    return load_settings(None, env, sections, cwd=db.parent)


def settings_for_db(db: Path, **analytics) -> Settings:
    """Settings that only name a warehouse file (for the commands that read it)."""
    return load_settings(None, {"RUNS_ETL_DUCKDB_PATH": str(db)},
                         {"analytics": analytics} if analytics else None)


# --- running the product --------------------------------------------------------------------

def error_line(err: str) -> str:
    """The one ``Error:`` line a failed command prints (and no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, err
    return lines[0]


class Gate:
    """Holds the sim's list request number ``nth`` (counted by the sim) until ``open()``."""

    def __init__(self, sim, nth: int):
        self.nth = nth
        self.entered, self.released = threading.Event(), threading.Event()
        sim.on_list_request(self._hook)

    def _hook(self, sim, page, size, n) -> None:
        if n == self.nth:
            self.entered.set()
            self.released.wait(60)

    def wait_entered(self) -> None:
        assert self.entered.wait(30), "the sync never reached the simulator"

    def open(self) -> None:
        self.released.set()


@contextmanager
def cli_process(args: list[str], env: Mapping[str, str], cwd: Path):
    """``python -m runs_etl *args`` as a child process, killed at exit whatever happened.
    Output goes to files (a full pipe would stall the child)."""
    out, err = cwd / "child.stdout", cwd / "child.stderr"
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen([sys.executable, "-m", "runs_etl", *args], env=dict(env),
                                cwd=cwd, stdout=fo, stderr=fe, text=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)


class Proc:
    """A child process whose output lines are collected as they come."""

    def __init__(self, args: list[str], env: dict | None, cwd: Path):
        self.popen = subprocess.Popen(args, env=env, cwd=cwd, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
        self.pid = self.popen.pid
        self.lines: list[str] = []
        self._seen = threading.Condition()
        self._readers = [threading.Thread(target=self._read, args=(s,), daemon=True)
                         for s in (self.popen.stdout, self.popen.stderr)]
        for t in self._readers:
            t.start()

    def _read(self, stream) -> None:
        for line in stream:
            with self._seen:
                self.lines.append(line.rstrip("\n"))
                self._seen.notify_all()

    @property
    def output(self) -> str:
        with self._seen:
            return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float = 30) -> None:
        with self._seen:
            ok = self._seen.wait_for(
                lambda: any(text in line for line in self.lines) or self.popen.poll() is not None,
                timeout)
            if not any(text in line for line in self.lines):
                raise AssertionError(f"{text!r} never appeared (ok={ok}); output:\n{self.output}")

    def finish(self, timeout: float = 60) -> int:
        rc = self.popen.wait(timeout)
        for t in self._readers:
            t.join(5)
        return rc


# --- a hand-made warehouse: runs whose view numbers can be computed by hand -----------------

T = datetime(2024, 3, 1, tzinfo=UTC)
NOW = datetime.now(UTC)


@dataclass
class R:
    """A run of the hand-made warehouse."""

    id: str
    wf: str | None
    status: str
    created: datetime
    seconds: float | None = None  # finished_at - created_at; None = not finished
    nodes: tuple[str, ...] = ()
    deleted: bool = False

    @property
    def finished(self) -> datetime | None:
        return None if self.seconds is None else self.created + timedelta(seconds=self.seconds)


WORKFLOWS = {"wf-a": ("Invoice extraction", "flow"), "wf-b": ("Support <triage>", "handler"),
             "wf-c": ("数据 ingestion", "ingestion")}
RUNS = [
    R("a1", "wf-a", "completed", T + timedelta(hours=1), 10, ("n1", "n2")),
    R("a2", "wf-a", "completed", T + timedelta(hours=2), 20, ("n1",)),
    R("a3", "wf-a", "failed", T + timedelta(hours=3), 30, ("n2", "n2")),
    R("a4", "wf-a", "completed", T + timedelta(days=1, hours=1), 40.5),
    R("a5", "wf-a", "stopped", T + timedelta(days=1, hours=2), 100),
    R("a6", "wf-a", "running", T + timedelta(days=1, hours=3)),
    R("a7", "wf-a", "completed", T + timedelta(hours=4), 1000, ("n9",), deleted=True),
    R("b1", "wf-b", "failed", T + timedelta(minutes=5), 5, ("n3", "n1")),
    # 23:30 in New York on March 1st is March 2nd in UTC: it must count on the 2nd.
    R("b2", "wf-b", "failed", datetime(2024, 3, 1, 23, 30, tzinfo=timezone(timedelta(hours=-5))),
      7),
    R("b3", "wf-b", "completed", T + timedelta(hours=6), 3),
    R("b4", "wf-b", "queued", NOW - timedelta(hours=1)),
    R("b5", "wf-b", "awaiting_human_feedback", NOW - timedelta(hours=30)),
    R("c1", "wf-c", "completed", T + timedelta(hours=7), 3600),
    R("c2", "wf-c", "completed", T + timedelta(hours=8)),  # terminal, finished_at unknown
    R("o1", "wf-gone", "failed", T + timedelta(hours=9), 50, ("n3",)),
]
LIVE = [r for r in RUNS if not r.deleted]
# sync_id, outcome, started, seconds, runs_seen, new, updated, deleted, error
SYNCS = [
    (1, "success", T, 10.0, 12, 12, 0, 0, None),
    (2, "failed", T + timedelta(hours=1), 2.0, None, None, None, None, "HTTP 500"),
    (3, "success", NOW - timedelta(minutes=30), 4.0, 14, 2, 3, 1, None),
    (4, "abandoned", NOW - timedelta(minutes=10), None, None, None, None, None, "killed"),
]


def insert_fixture(con, workspace: str = "default", sync_offset: int = 0) -> None:
    """The hand-made runs, workflows, nodes and syncs, as rows of ``workspace`` (sync ids
    shifted by ``sync_offset``, so two workspaces can hold the same fixture)."""
    for wid, (name, typ) in WORKFLOWS.items():
        con.execute("INSERT INTO workflows (workspace, id, name, type, _first_seen_at, "
                    "_synced_at) VALUES (?, ?, ?, ?, now(), now())", [workspace, wid, name, typ])
    for r in RUNS:
        con.execute(
            "INSERT INTO runs (workspace, id, workflow_id, status, created_at, finished_at, "
            "node_ids, _first_seen_at, _synced_at, _deleted_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, now(), now(), ?)",
            [workspace, r.id, r.wf, r.status, r.created, r.finished, list(r.nodes),
             NOW if r.deleted else None])
        for pos, node in enumerate(r.nodes):
            con.execute("INSERT INTO run_nodes (workspace, run_id, position, node_id) "
                        "VALUES (?, ?, ?, ?)", [workspace, r.id, pos, node])
    for sid, outcome, started, secs, seen, new, upd, dele, err in SYNCS:
        finished = None if secs is None else started + timedelta(seconds=secs)
        con.execute(
            "INSERT INTO sync_runs (workspace, sync_id, started_at, finished_at, outcome, "
            "runs_seen, rows_new, rows_updated, rows_deleted, seconds_total, error) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [workspace, sid + sync_offset, started, finished, outcome, seen, new, upd, dele,
             secs, err])


def handmade_warehouse(path: Path, *, views: bool = True) -> Path:
    """A migrated warehouse file holding RUNS, WORKFLOWS and SYNCS (views applied unless
    ``views=False``), closed; returns ``path``."""
    con = warehouse.connect(path)
    try:
        warehouse.migrate(con)
        insert_fixture(con)
        if views:
            warehouse.apply_views(con)
    finally:
        con.close()
    return path


# --- real filesystem faults -------------------------------------------------------------------

@contextmanager
def small_tmpfs(folder: Path, size: str = "3m"):
    """Mount a tmpfs of ``size`` on ``folder`` (root only) and yield True; yield False where
    mounting is not permitted, so the caller injects the fault instead. Unmounted afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                              str(folder)], capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def remount(folder: Path, mode: str) -> None:
    """``mode`` "ro" or "rw" for a folder ``small_tmpfs`` mounted."""
    subprocess.run(["mount", "-o", f"remount,{mode}", str(folder)], check=True)
