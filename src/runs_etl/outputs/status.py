"""``runs-etl status``: freshness, a sync running now, row counts and the last syncs.

``collect_status`` gathers everything once (read-only, through ``open_read_only``); people get
rich tables that fit 80 columns, monitoring gets the same facts as one JSON object
(``--json``). Freshness is per workspace (``workspaces``); the top-level ``freshness`` and
``failures_since_success`` are the stalest workspace's, so a check written for one workspace
alerts when any of several falls behind. Text that comes from the ledger (error messages are
written by servers) is shown escaped and stripped of control characters, so it can neither break
the markup nor the terminal.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..config import Settings
from ..errors import LockedError, RunsEtlError, one_line
from ..ops.lock import read_holder, running, skipped_attempts
from ..warehouse.connect import open_read_only
from ..warehouse.views import TERMINAL_SQL

DEFAULT_LIMIT = 10
NON_TTY_WIDTH = 160  # cron mail and pipes get the whole table, not 80 squeezed columns
WIDE = 120  # below this width the syncs table keeps its key columns and lists errors below it
ERROR_WIDTH = 70
ROWS = (("runs_live", "runs (live)"), ("runs_deleted", "runs (deleted at source)"),
        ("runs_open", "runs still open"), ("workflows", "workflows"), ("run_nodes", "run_nodes"),
        ("rejected_records", "rejected_records"), ("sync_runs", "sync_runs"))
SYNC_COLUMNS = ("sync_id", "workspace", "started_at", "finished_at", "outcome", "mode",
                "seconds_total", "pages", "runs_seen", "rows_new", "rows_updated", "rows_deleted",
                "rows_rejected", "error", "new_fields")


def human_age(seconds: float | None) -> str:
    """``42 s``, ``12 min``, ``3.5 h``, ``2.1 d``: how long ago, for people."""
    if seconds is None:
        return "never"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _utc(ts: datetime | None, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    return "" if ts is None else ts.astimezone(UTC).strftime(fmt)


def _num(v) -> str:
    return "" if v is None else f"{v:,}"


def safe(text: object, width: int | None = None) -> str:
    """Text from outside (ledger, lock record) made printable: one line, no control characters
    (an ``ESC [2J`` would clear the reader's screen), cut to ``width``, rich markup escaped."""
    line = str(text).splitlines()[0] if str(text).strip() else ""
    line = "".join(ch if ch.isprintable() else "?" for ch in line)
    if width is not None and len(line) > width:
        line = line[: max(width - 1, 0)] + "…"
    return escape(line)


def row_counts(con) -> dict[str, int]:
    """Rows per table, live and soft-deleted runs apart, plus the runs still open."""
    live, deleted, open_ = con.execute(f"""
        SELECT count(*) FILTER (WHERE _deleted_at IS NULL),
               count(*) FILTER (WHERE _deleted_at IS NOT NULL),
               count(*) FILTER (WHERE _deleted_at IS NULL
                                AND coalesce(status NOT IN {TERMINAL_SQL}, true))
        FROM runs""").fetchall()[0]
    counts = {"runs_live": live, "runs_deleted": deleted, "runs_open": open_}
    for table in ("workflows", "run_nodes", "rejected_records", "sync_runs"):
        (counts[table],) = con.execute(f"SELECT count(*) FROM {table}").fetchall()[0]
    return counts


def collect_status(settings: Settings, limit: int = DEFAULT_LIMIT,
                   now: datetime | None = None) -> dict[str, Any]:
    """Everything ``status`` shows, as one JSON-ready dict (timestamps as datetimes).

    A sync running before the first publish (no file yet, or the file held) is reported, not an
    error; a missing warehouse with no sync running is ``WarehouseError`` as before."""
    now = now or datetime.now(UTC)
    path = Path(settings.warehouse.duckdb_path)
    holder = running(path)
    status: dict[str, Any] = {
        "warehouse": str(path), "now": now, "readable": False, "schema_version": None,
        "freshness": {"last_success_sync_id": None, "last_success_finished_at": None,
                      "age_seconds": None},
        "failures_since_success": None, "workspaces": {},
        "running": asdict(holder) if holder is not None else None,
        "unfinished": _unfinished(path) if holder is None else None,
        "rows": None, "last_syncs": [], "skipped_since_success": [], "lake": None}
    if holder is not None and not path.is_file():
        return status
    try:
        con = open_read_only(settings.warehouse)
    except LockedError:
        if holder is None:
            raise
        return status  # the running sync holds the file; it is the news
    try:
        status["readable"] = True
        (status["schema_version"],) = con.execute(
            "SELECT max(version) FROM schema_migrations").fetchall()[0]
        configured = [w.name for w in settings.workspaces]
        status["workspaces"] = workspaces = workspace_freshness(con, configured, now)
        stalest = min(workspaces.values(), key=_staleness, default=None)
        if stalest is not None:
            status["freshness"] = stalest["freshness"]
        status["failures_since_success"] = max(
            (w["failures_since_success"] for w in workspaces.values()), default=0)
        status["rows"] = row_counts(con)
        status["skipped_since_success"] = _skipped_since(
            path, status["freshness"]["last_success_finished_at"])
        rows = con.execute(f"SELECT {', '.join(SYNC_COLUMNS)} FROM sync_runs "
                           "ORDER BY sync_id DESC LIMIT ?", [max(limit, 0)]).fetchall()
        status["last_syncs"] = [dict(zip(SYNC_COLUMNS, r)) for r in rows]
        status["lake"] = _lake(settings, con)  # its lag counted in the same snapshot
    finally:
        con.close()
    return status


def workspace_freshness(con, configured: list[str], now: datetime) -> dict[str, dict]:
    """Per workspace (those in the ledger and those configured): its last success, how long
    ago, and the failed or abandoned attempts since."""
    found = con.execute("""
        WITH ok AS (SELECT workspace, max(sync_id) AS sync_id FROM sync_runs
                    WHERE outcome = 'success' GROUP BY workspace)
        SELECT s.workspace, ok.sync_id,
               any_value(s.finished_at) FILTER (WHERE s.sync_id = ok.sync_id),
               count(*) FILTER (WHERE s.outcome IN ('failed', 'abandoned')
                                AND s.sync_id > coalesce(ok.sync_id, 0))
        FROM sync_runs AS s LEFT JOIN ok ON ok.workspace = s.workspace
        GROUP BY s.workspace, ok.sync_id ORDER BY s.workspace""").fetchall()
    out = {name: {"freshness": {"last_success_sync_id": sid, "last_success_finished_at": fin,
                                "age_seconds": None if fin is None
                                else (now - fin).total_seconds()},
                  "failures_since_success": failures}
           for name, sid, fin, failures in found}
    for name in configured:
        out.setdefault(name, {"freshness": {"last_success_sync_id": None,
                                            "last_success_finished_at": None,
                                            "age_seconds": None},
                              "failures_since_success": 0})
    return out


def _staleness(ws: dict) -> tuple:
    """Sort key: never succeeded first, then the oldest success."""
    finished = ws["freshness"]["last_success_finished_at"]
    return (finished is not None, finished or datetime.min.replace(tzinfo=UTC))


def _skipped_since(path: Path, since: datetime | None) -> list[dict]:
    """Syncs that gave up on a busy warehouse after ``since``: they never reach the ledger."""
    def after(entry: dict) -> bool:
        try:
            return since is None or datetime.fromisoformat(entry["at"]) > since
        except (KeyError, TypeError, ValueError):
            return False
    return [e for e in skipped_attempts(path) if after(e)]


def status_json(status: dict[str, Any]) -> str:
    """One line of JSON; timestamps as ISO 8601 in UTC."""
    def default(v):
        if isinstance(v, datetime):
            return v.astimezone(UTC).isoformat()
        raise TypeError(f"{type(v).__name__} is not JSON serializable")
    return json.dumps(status, default=default, ensure_ascii=False)


def _lake(settings: Settings, con) -> dict[str, Any] | None:
    """The lake's version and lag, when one is configured; an unreadable lake is news, not a
    reason for status to fail."""
    if settings.lake.uri is None:
        return None
    from .lake import lake_status  # deltalake loads only when a lake is configured

    try:
        return lake_status(settings, con)
    except RunsEtlError as e:
        return {"error": one_line(str(e), 300)}


def _lake_line(lake: dict[str, Any]) -> str:
    if "error" in lake:
        return f"[red]Lake unreadable: {safe(lake['error'])}[/]"
    behind = lake["lag_syncs"]
    lag = "up to date" if not behind else f"[yellow]{behind} successful sync(s) behind[/]"
    applied = lake["last_applied_sync_id"]
    return (f"Lake {safe(lake['uri'])}: version {lake['version']}, last applied sync "
            f"{'none' if applied is None else f'#{applied}'}, {lag}")


def _unfinished(path: Path) -> dict[str, Any] | None:
    """A holder record nobody holds: that writer was killed or crashed before it could clear
    it (the next sync records its attempt as abandoned)."""
    stale = read_holder(path)
    return asdict(stale) if stale is not None else None


def _running_line(holder: dict[str, Any]) -> str:
    pages = "" if holder["pages"] is None else f", {holder['pages']:,} pages so far"
    who = f"pid {holder['pid']}" + ("" if holder["host"] in ("?", "") else
                                    f" on {holder['host']}")
    return (f"[bold cyan]Sync running now:[/] {safe(who)} ({safe(holder['command'])}), "
            f"since {safe(holder['started_at'])}{safe(pages)}")


def _success_line(fresh: dict[str, Any], failures: int | None, label: str) -> str:
    if fresh["last_success_sync_id"] is None:
        line = f"[bold red]{label}: no successful sync yet.[/]" if label else \
            "[bold red]No successful sync yet.[/]"
    else:
        line = (f"{label or 'Last successful sync'}: [bold]#{fresh['last_success_sync_id']}[/], "
                f"finished {_utc(fresh['last_success_finished_at'])} UTC "
                f"([bold]{human_age(fresh['age_seconds'])} ago[/])")
    if failures:
        line += f"  [red]{failures} failed attempt(s) since.[/]"
    return line


def _freshness_line(status: dict[str, Any]) -> str:
    workspaces = status["workspaces"]
    if len(workspaces) > 1:  # a line per workspace; one workspace reads as it always did
        line = "Last successful sync per workspace:" + "".join(
            "\n  " + _success_line(w["freshness"], w["failures_since_success"], safe(name))
            for name, w in workspaces.items())
    else:
        line = _success_line(status["freshness"], status["failures_since_success"], "")
    drift = [s for s in status["last_syncs"] if s.get("new_fields")]
    if drift:
        line += (f"\n[yellow]New API fields seen by sync #{drift[0]['sync_id']}: "
                 f"{safe(drift[0]['new_fields'], 160)} (kept in runs.extra)[/]")
    if status["skipped_since_success"]:
        last = status["skipped_since_success"][-1]
        line += (f"\n[yellow]{len(status['skipped_since_success'])} sync attempt(s) skipped "
                 f"since (warehouse busy); last at {safe(last.get('at'))}: "
                 f"{safe(last.get('reason'), 160)}[/]")
    return line


def sync_table(syncs: list[dict[str, Any]], limit: int, wide: bool = True) -> Table:
    """The last syncs; narrow keeps the columns people scan and drops the row details."""
    table = Table(title=f"Last {limit} syncs (newest first)", title_justify="left")
    names = (("#", "started (UTC)", "outcome", "mode", "secs", "pages", "runs seen", "new",
              "updated", "deleted", "rejected", "error") if wide else
             ("#", "started (UTC)", "outcome", "mode", "secs", "runs seen", "changed"))
    for name in names:
        table.add_column(name, no_wrap=name != "error",
                         justify="left" if name in ("started (UTC)", "outcome", "mode", "error")
                         else "right")
    colors = {"success": "green", "failed": "red", "abandoned": "yellow", "running": "cyan"}
    for s in syncs:
        outcome = f"[{colors.get(s['outcome'], 'white')}]{safe(s['outcome'])}[/]"
        secs = "" if s["seconds_total"] is None else f"{s['seconds_total']:.1f}"
        if wide:
            err = safe(s["error"] or "", ERROR_WIDTH)
            table.add_row(str(s["sync_id"]), _utc(s["started_at"]), outcome,
                          safe(s["mode"] or ""), secs, _num(s["pages"]), _num(s["runs_seen"]),
                          _num(s["rows_new"]), _num(s["rows_updated"]), _num(s["rows_deleted"]),
                          _num(s["rows_rejected"]), err)
        else:
            parts = [s[k] for k in ("rows_new", "rows_updated", "rows_deleted")]
            changed = None if all(v is None for v in parts) else sum(v or 0 for v in parts)
            table.add_row(str(s["sync_id"]), _utc(s["started_at"], "%m-%d %H:%M"), outcome,
                          safe(s["mode"] or ""), secs, _num(s["runs_seen"]), _num(changed))
    return table


def render_status(console: Console, status: dict[str, Any], limit: int) -> None:
    """The human ``status``: a few lines and two tables, within ``console.width``."""
    schema = f"schema v{status['schema_version']}, " if status["readable"] else ""
    console.print(f"Warehouse [bold]{safe(status['warehouse'])}[/] "
                  f"({schema}now {_utc(status['now'])} UTC)")
    if status["running"] is not None:
        console.print(_running_line(status["running"]))
    elif status["unfinished"] is not None:
        u = status["unfinished"]
        console.print(f"[yellow]The last {safe(u['command'])} (pid {u['pid']}, since "
                      f"{safe(u['started_at'])}) stopped without finishing (killed or crashed); "
                      "nothing of it was published, and the next sync records it as "
                      "abandoned.[/]")
    if not status["readable"]:
        console.print("No published warehouse to read yet: tables and the ledger appear when "
                      "the running sync has committed.")
        return
    console.print(_freshness_line(status))
    if status["lake"] is not None:
        console.print(_lake_line(status["lake"]))
    counts = Table(title="Rows", title_justify="left")
    counts.add_column("table")
    counts.add_column("rows", justify="right")
    for key, label in ROWS:
        counts.add_row(label, f"{status['rows'][key]:,}")
    console.print(counts)
    wide = console.width >= WIDE
    console.print(sync_table(status["last_syncs"], max(limit, 0), wide=wide))
    if not wide:
        for s in status["last_syncs"]:
            if s["error"]:
                prefix = f"  #{s['sync_id']}: "
                console.print(prefix + safe(s["error"], console.width - len(prefix)),
                              overflow="ellipsis", no_wrap=True)


def print_status(settings: Settings, limit: int = DEFAULT_LIMIT, stream: TextIO | None = None,
                 as_json: bool = False) -> None:
    """Print the status as tables (or one JSON object); opens the DB read-only."""
    out = stream or sys.stdout
    status = collect_status(settings, limit)
    if as_json:
        print(status_json(status), file=out)
        return
    console = Console(file=out, width=None if out.isatty() else NON_TTY_WIDTH, highlight=False)
    render_status(console, status, limit)
