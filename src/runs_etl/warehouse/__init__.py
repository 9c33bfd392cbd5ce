"""The DuckDB warehouse: opening it (connect), its versioned schema (migrations), the analytics
views of ``sql/`` (views) and the sync ledger (ledger)."""

from .connect import connect, open_read_only
from .migrations import MIGRATIONS, migrate
from .views import apply_views

__all__ = ["MIGRATIONS", "apply_views", "connect", "migrate", "open_read_only"]
