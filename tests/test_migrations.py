"""The warehouse schema: ``warehouse/migrations.py`` (versioned DDL, applied once) and
``warehouse/connect.py`` (opening the file); and one home per column list: the migrated tables
carry exactly the columns the Arrow schemas and the ledger's ``SyncResult`` define."""

from __future__ import annotations

from dataclasses import fields

import duckdb
import pytest

from runs_etl import warehouse
from runs_etl.engine.normalize import RUNS_SCHEMA, WORKFLOWS_SCHEMA
from runs_etl.errors import ConfigError, WarehouseError
from runs_etl.warehouse.ledger import SyncResult

# Columns the warehouse keeps for itself, not sent by the API (README: "system columns").
SYSTEM_COLUMNS = {
    "runs": ["_first_seen_at", "_synced_at", "_deleted_at", "_sync_id", "workspace"],
    "workflows": ["_first_seen_at", "_synced_at", "_sync_id", "workspace"],
    "run_nodes": ["workspace"],
}


@pytest.fixture
def con():
    c = duckdb.connect(":memory:")
    warehouse.migrate(c)
    yield c
    c.close()


def columns(con, table: str) -> list[str]:
    return [name for (name,) in con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = ? "
        "ORDER BY ordinal_position", [table]).fetchall()]


def test_migrate_is_idempotent_and_recorded(con):
    assert warehouse.migrate(con) == []  # already applied by the fixture
    versions = con.execute("SELECT version, name, applied_at FROM schema_migrations").fetchall()
    assert [v for v, _, _ in versions] == [v for v, _, _ in warehouse.MIGRATIONS]
    assert all(name and applied for _, name, applied in versions)


def test_first_migrate_applies_every_version_and_creates_the_tables():
    c = duckdb.connect(":memory:")
    assert warehouse.migrate(c) == [v for v, _, _ in warehouse.MIGRATIONS]
    tables = {t for (t,) in c.execute("SELECT table_name FROM information_schema.tables")
              .fetchall()}
    assert {"runs", "workflows", "run_nodes", "sync_runs", "rejected_records",
            "sync_state", "schema_migrations"} <= tables


def test_a_warehouse_from_a_newer_runs_etl_is_refused(con):
    con.execute("INSERT INTO schema_migrations VALUES (999, 'future', now())")
    with pytest.raises(WarehouseError, match="upgrade runs-etl"):
        warehouse.migrate(con)


def test_connect_creates_the_folder_and_uses_utc(tmp_path):
    path = tmp_path / "deep" / "er" / "runs.duckdb"
    c = warehouse.connect(path)
    try:
        assert path.parent.is_dir()
        assert c.execute("SELECT current_setting('TimeZone')").fetchall()[0][0] == "UTC"
    finally:
        c.close()


def test_bad_memory_limit_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="memory_limit"):
        warehouse.connect(tmp_path / "w.duckdb", memory_limit="lots")


# --- one home per concept --------------------------------------------------------------------

@pytest.mark.parametrize(("table", "schema"), [("runs", RUNS_SCHEMA),
                                               ("workflows", WORKFLOWS_SCHEMA)])
def test_data_tables_have_the_arrow_schema_columns_plus_the_system_columns(con, table, schema):
    """A column added to the Arrow schema (or the DDL) alone would be dropped or left NULL."""
    arrow = [name for name in schema.names if name != "_seq"]
    assert columns(con, table) == arrow + SYSTEM_COLUMNS[table]


def test_sync_runs_has_a_column_per_sync_result_field_plus_the_ledgers_own(con):
    """A counter added to ``SyncResult`` alone would never reach the ledger."""
    expected = [f.name for f in fields(SyncResult)] + ["started_at", "finished_at", "api_url",
                                                        "workspace"]
    assert sorted(columns(con, "sync_runs")) == sorted(expected)
