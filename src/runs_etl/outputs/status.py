"""``runs-etl status``: the last syncs from the ledger, row counts and freshness, as tables."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import TextIO

from rich.console import Console
from rich.table import Table

from ..config import Settings
from ..warehouse.connect import open_read_only
from ..warehouse.views import TERMINAL_SQL

DEFAULT_LIMIT = 10
NON_TTY_WIDTH = 160  # cron mail and pipes get the whole table, not 80 squeezed columns
ERROR_WIDTH = 70


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


def _utc(ts: datetime | None) -> str:
    return "" if ts is None else ts.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _num(v) -> str:
    return "" if v is None else f"{v:,}"


def row_counts(con) -> list[tuple[str, int]]:
    """Rows per table, live and soft-deleted runs apart, plus the runs still open."""
    live, deleted, open_ = con.execute(f"""
        SELECT count(*) FILTER (WHERE _deleted_at IS NULL),
               count(*) FILTER (WHERE _deleted_at IS NOT NULL),
               count(*) FILTER (WHERE _deleted_at IS NULL
                                AND coalesce(status NOT IN {TERMINAL_SQL}, true))
        FROM runs""").fetchall()[0]
    counts = [("runs (live)", live), ("runs (deleted at source)", deleted),
              ("runs still open", open_)]
    for table in ("workflows", "run_nodes", "rejected_records", "sync_runs"):
        (n,) = con.execute(f"SELECT count(*) FROM {table}").fetchall()[0]
        counts.append((table, n))
    return counts


def _freshness(con, now: datetime) -> str:
    last_ok = con.execute("SELECT sync_id, finished_at FROM sync_runs WHERE outcome = 'success' "
                          "ORDER BY sync_id DESC LIMIT 1").fetchone()
    (failed_since,) = con.execute(
        "SELECT count(*) FROM sync_runs WHERE outcome IN ('failed', 'abandoned') "
        "AND sync_id > ?", [last_ok[0] if last_ok else 0]).fetchall()[0]
    if last_ok is None:
        line = "[bold red]No successful sync yet.[/]"
    else:
        age = (now - last_ok[1]).total_seconds()
        line = (f"Last successful sync: [bold]#{last_ok[0]}[/], finished {_utc(last_ok[1])} UTC "
                f"([bold]{human_age(age)} ago[/])")
    if failed_since:
        line += f"  [red]{failed_since} failed attempt(s) since.[/]"
    return line


def sync_table(con, limit: int) -> Table:
    table = Table(title=f"Last {limit} syncs (newest first)", title_justify="left")
    for name in ("#", "started (UTC)", "outcome", "mode", "secs", "pages", "runs seen", "new",
                 "updated", "deleted", "rejected", "error"):
        table.add_column(name, justify="left" if name in ("started (UTC)", "outcome", "mode",
                                                          "error") else "right")
    colors = {"success": "green", "failed": "red", "abandoned": "yellow", "running": "cyan"}
    for (sid, started, outcome, mode, secs, pages, seen, new, upd, dele, rej,
         err) in con.execute("""
            SELECT sync_id, started_at, outcome, mode, seconds_total, pages, runs_seen, rows_new,
                   rows_updated, rows_deleted, rows_rejected, error
            FROM sync_runs ORDER BY sync_id DESC LIMIT ?""", [limit]).fetchall():
        err = (err or "").splitlines()[0] if err else ""
        if len(err) > ERROR_WIDTH:
            err = err[: ERROR_WIDTH - 1] + "…"
        table.add_row(str(sid), _utc(started), f"[{colors.get(outcome, 'white')}]{outcome}[/]",
                      mode or "", "" if secs is None else f"{secs:.1f}", _num(pages), _num(seen),
                      _num(new), _num(upd), _num(dele), _num(rej), err)
    return table


def print_status(settings: Settings, limit: int = DEFAULT_LIMIT,
                 stream: TextIO | None = None) -> None:
    """Print freshness, rows per table and the last ``limit`` syncs; opens the DB read-only."""
    out = stream or sys.stdout
    console = Console(file=out, width=None if out.isatty() else NON_TTY_WIDTH, highlight=False)
    con = open_read_only(settings.warehouse)
    try:
        (version,) = con.execute("SELECT max(version) FROM schema_migrations").fetchall()[0]
        console.print(f"Warehouse [bold]{settings.warehouse.duckdb_path}[/] "
                      f"(schema v{version}, now {_utc(datetime.now(UTC))} UTC)")
        console.print(_freshness(con, datetime.now(UTC)))
        counts = Table(title="Rows", title_justify="left")
        counts.add_column("table")
        counts.add_column("rows", justify="right")
        for name, n in row_counts(con):
            counts.add_row(name, f"{n:,}")
        console.print(counts)
        console.print(sync_table(con, max(limit, 0)))
    finally:
        con.close()
