"""The ``sync_runs`` ledger and the small ``sync_state`` key/value store.

Each attempt gets a committed ``running`` row first, so a sync that is killed leaves a trace;
the next sync marks such rows ``abandoned``. Success is written in the data transaction,
failure in its own transaction after the rollback.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from typing import Any


@dataclass
class SyncResult:
    """What one sync did: one ``sync_runs`` row, column for column."""

    sync_id: int
    outcome: str = "running"
    mode: str = "full"
    mode_reason: str = ""
    verified: bool = False
    walk_passes: int = 0
    pages: int = 0
    requests: int = 0
    single_run_requests: int = 0
    retries: int = 0
    bytes: int = 0
    total_start: int | None = None
    total_end: int | None = None
    runs_seen: int = 0
    rows_new: int = 0
    rows_updated: int = 0
    rows_unchanged: int = 0
    rows_deleted: int = 0
    rows_undeleted: int = 0
    rows_rejected: int = 0
    workflows_new: int = 0
    workflows_updated: int = 0
    seconds_extract: float = 0.0
    seconds_load: float = 0.0
    seconds_total: float = 0.0
    error: str | None = None
    # Top-level API fields first seen by this sync (kept in ``runs.extra``), comma-separated.
    new_fields: str | None = None

    def ledger_fields(self) -> dict:
        """The counters ``close_attempt`` writes (the key and the outcome are set apart)."""
        return {k: v for k, v in asdict(self).items() if k in LEDGER_FIELDS}


# Columns of ``sync_runs`` a sync fills in as it ends; the rest (started_at, finished_at,
# api_url) are the ledger's own.
LEDGER_FIELDS = tuple(f.name for f in fields(SyncResult) if f.name not in ("sync_id", "outcome"))


# ``sync_state`` rows that hold for every workspace (the settings the views read).
ALL_WORKSPACES = "*"


def mark_abandoned(con) -> int:
    """Rows left ``running`` by a killed process: only called while holding the writer lock."""
    (n,) = con.execute("SELECT count(*) FROM sync_runs WHERE outcome = 'running'").fetchall()[0]
    if n:
        con.execute("UPDATE sync_runs SET outcome = 'abandoned', error = coalesce(error, "
                    "'the process stopped before finishing (killed or crashed)') "
                    "WHERE outcome = 'running'")
    return n


def open_attempt(con, workspace: str, api_url: str,
                 started_at: datetime | None = None) -> int:
    """Insert and commit a ``running`` row for one workspace, started at ``started_at`` (now
    by default); returns its sync_id."""
    (sync_id,) = con.execute("SELECT coalesce(max(sync_id), 0) + 1 FROM sync_runs").fetchall()[0]
    con.execute("INSERT INTO sync_runs (sync_id, workspace, started_at, outcome, api_url) "
                "VALUES (?, ?, ?, 'running', ?)",
                [sync_id, workspace, started_at or datetime.now(UTC), api_url])
    return sync_id


def close_attempt(con, sync_id: int, outcome: str, fields: dict[str, Any]) -> None:
    """Set the outcome, the wall-clock end (not the transaction's start, which DuckDB's
    ``now()`` gives) and every known counter of an attempt."""
    known = {k: v for k, v in fields.items() if k in LEDGER_FIELDS}
    sets = ", ".join(f"{k} = ?" for k in known)
    con.execute(f"UPDATE sync_runs SET outcome = ?, finished_at = ?"
                f"{', ' + sets if sets else ''} WHERE sync_id = ?",
                [outcome, datetime.now(UTC), *known.values(), sync_id])


def get_state(con, workspace: str, key: str, default: Any = None) -> Any:
    """A workspace's ``key`` (``ALL_WORKSPACES`` for settings shared by all)."""
    rows = con.execute("SELECT value FROM sync_state WHERE workspace = ? AND key = ?",
                       [workspace, key]).fetchall()
    return default if not rows or rows[0][0] is None else json.loads(rows[0][0])


def set_state(con, workspace: str, key: str, value: Any) -> None:
    con.execute("INSERT OR REPLACE INTO sync_state (workspace, key, value, updated_at) "
                "VALUES (?, ?, ?, now())", [workspace, key, json.dumps(value, default=str)])
