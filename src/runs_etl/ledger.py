"""The ``sync_runs`` ledger and the small ``sync_state`` key/value store.

Each attempt gets a committed ``running`` row first, so a sync that is killed leaves a trace;
the next sync marks such rows ``abandoned``. Success is written in the data transaction,
failure in its own transaction after the rollback.
"""

from __future__ import annotations

import json
from typing import Any

LEDGER_FIELDS = (
    "mode", "mode_reason", "verified", "walk_passes", "pages", "requests", "single_run_requests",
    "retries", "bytes", "total_start", "total_end", "runs_seen", "rows_new", "rows_updated",
    "rows_unchanged", "rows_deleted", "rows_undeleted", "rows_rejected", "workflows_new",
    "workflows_updated", "seconds_extract", "seconds_load", "seconds_total", "error",
)


def mark_abandoned(con) -> int:
    """Rows left ``running`` by a killed process: only called while holding the writer lock."""
    (n,) = con.execute("SELECT count(*) FROM sync_runs WHERE outcome = 'running'").fetchall()[0]
    if n:
        con.execute("UPDATE sync_runs SET outcome = 'abandoned', error = coalesce(error, "
                    "'the process stopped before finishing (killed or crashed)') "
                    "WHERE outcome = 'running'")
    return n


def open_attempt(con, api_url: str) -> int:
    """Insert and commit a ``running`` row; returns its sync_id."""
    (sync_id,) = con.execute("SELECT coalesce(max(sync_id), 0) + 1 FROM sync_runs").fetchall()[0]
    con.execute("INSERT INTO sync_runs (sync_id, started_at, outcome, api_url) "
                "VALUES (?, now(), 'running', ?)", [sync_id, api_url])
    return sync_id


def close_attempt(con, sync_id: int, outcome: str, fields: dict[str, Any]) -> None:
    """Set the outcome and every known counter of an attempt."""
    known = {k: v for k, v in fields.items() if k in LEDGER_FIELDS}
    sets = ", ".join(f"{k} = ?" for k in known)
    con.execute(f"UPDATE sync_runs SET outcome = ?, finished_at = now()"
                f"{', ' + sets if sets else ''} WHERE sync_id = ?",
                [outcome, *known.values(), sync_id])


def get_state(con, key: str, default: Any = None) -> Any:
    rows = con.execute("SELECT value FROM sync_state WHERE key = ?", [key]).fetchall()
    return default if not rows or rows[0][0] is None else json.loads(rows[0][0])


def set_state(con, key: str, value: Any) -> None:
    con.execute("INSERT OR REPLACE INTO sync_state VALUES (?, ?, now())",
                [key, json.dumps(value, default=str)])
