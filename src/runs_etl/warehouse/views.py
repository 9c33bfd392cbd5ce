"""The analytics views of ``sql/``, (re)created in file-name order by every sync.

The SQL files are for analysts to read; the few facts they share with the engine (which statuses
are terminal) are written into them here, from the one Python constant, as they are applied.
"""

from __future__ import annotations

import importlib.resources

from ..config import Settings
from ..engine.models import TERMINAL_STATUSES
from . import ledger

# ``{terminal_statuses}`` in a view's SQL becomes this list: ('completed', 'failed', 'stopped').
TERMINAL_SQL = "(" + ", ".join(f"'{s}'" for s in sorted(TERMINAL_STATUSES)) + ")"
PLACEHOLDERS = {"{terminal_statuses}": TERMINAL_SQL}
# The ``sync_state`` key the ``stuck_runs`` view reads (``analytics.stuck_after``, in seconds).
STATE_STUCK_AFTER = "stuck_after_seconds"


def view_sql(text: str) -> str:
    """A ``sql/`` file's text with the shared constants filled in."""
    for key, value in PLACEHOLDERS.items():
        text = text.replace(key, value)
    return text


def sql_files() -> list[tuple[str, str]]:
    """(file name, text) of every ``sql/`` file, in the file-name order they are applied in."""
    files = sorted((f for f in importlib.resources.files("runs_etl.sql").iterdir()
                    if f.name.endswith(".sql")), key=lambda f: f.name)
    return [(f.name, f.read_text(encoding="utf-8")) for f in files]


def apply_views(con) -> list[str]:
    """(Re)create every view in ``sql/`` in file-name order; returns the file names."""
    files = sql_files()
    for _, text in files:
        con.execute(view_sql(text))
    return [name for name, _ in files]


def store_view_settings(con, settings: Settings) -> None:
    """Keep in ``sync_state`` the settings the views read, so analysts' queries follow the
    configuration (``stuck_runs``: ``analytics.stuck_after``)."""
    ledger.set_state(con, ledger.ALL_WORKSPACES, STATE_STUCK_AFTER,
                     settings.analytics.stuck_after.total_seconds())
