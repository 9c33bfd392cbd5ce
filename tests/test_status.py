"""``runs-etl status`` shows freshness, rows per table and the last syncs, read-only."""

from __future__ import annotations

import io
import json
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from helpers import LIVE, RUNS, SYNCS, handmade_warehouse, settings_for_db
from rich.console import Console

from runs_etl import warehouse
from runs_etl.cli import main
from runs_etl.errors import WarehouseError
from runs_etl.ops.lock import note_progress, writer_lock
from runs_etl.outputs.status import (
    DEFAULT_LIMIT,
    collect_status,
    human_age,
    print_status,
    render_status,
)
from runs_etl.warehouse.migrations import MIGRATIONS


@pytest.fixture
def db(tmp_path) -> Path:
    """The hand-made warehouse of ``helpers``: 4 syncs (success, failed, success, abandoned)."""
    return handmade_warehouse(tmp_path / "runs.duckdb", views=False)


def status_text(db: Path, **kw) -> str:
    out = io.StringIO()
    print_status(settings_for_db(db), stream=out, **kw)
    return out.getvalue()


def table_rows(text: str) -> dict[str, list[str]]:
    """Rows of the rich tables, keyed by their first cell."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if line.startswith("│") and cells[0]:
            rows[cells[0]] = cells
    return rows


def test_status_shows_rows_per_table(db):
    rows = table_rows(status_text(db))
    open_runs = sum(r.status not in ("completed", "failed", "stopped") for r in LIVE)
    assert rows["runs (live)"][1] == str(len(LIVE))
    assert rows["runs (deleted at source)"][1] == str(len(RUNS) - len(LIVE))
    assert rows["runs still open"][1] == str(open_runs)
    assert rows["workflows"][1] == "3" and rows["sync_runs"][1] == "4"
    assert rows["run_nodes"][1] == str(sum(len(r.nodes) for r in RUNS))


def test_status_shows_the_last_syncs_newest_first_with_their_outcome(db):
    text = status_text(db)
    rows = table_rows(text)
    assert [rows[str(i)][2] for i in (4, 3, 2, 1)] == ["abandoned", "success", "failed",
                                                      "success"]
    assert "HTTP 500" in rows["2"][-1] and "killed" in rows["4"][-1]
    order = [line.split("│")[1].strip() for line in text.splitlines()
             if line.startswith("│") and line.split("│")[1].strip().isdigit()]
    assert order == ["4", "3", "2", "1"]
    assert set(table_rows(status_text(db, limit=2))) & {"1", "2", "3", "4"} == {"3", "4"}


def test_status_says_how_fresh_the_last_successful_sync_is(db):
    text = status_text(db)
    assert "Last successful sync: #3" in text
    started, secs = SYNCS[2][2], SYNCS[2][3]
    minutes = (datetime.now(UTC) - started - timedelta(seconds=secs)).total_seconds() / 60
    shown = int(re.search(r"\((\d+) min ago\)", text).group(1))
    assert abs(shown - minutes) <= 1
    assert "1 failed attempt(s) since." in text


def test_status_of_a_warehouse_never_synced(tmp_path):
    path = tmp_path / "new.duckdb"
    con = warehouse.connect(path)
    warehouse.migrate(con)
    con.close()
    text = status_text(path)
    assert "No successful sync yet." in text and table_rows(text)["runs (live)"][1] == "0"


def test_a_missing_database_is_an_error_and_no_file_is_created(tmp_path):
    with pytest.raises(WarehouseError, match="no warehouse at .*runs-etl sync"):
        status_text(tmp_path / "missing.duckdb")
    assert not (tmp_path / "missing.duckdb").exists()


def test_a_file_that_is_not_a_warehouse_is_an_error(tmp_path):
    path = tmp_path / "other.duckdb"
    con = warehouse.connect(path)
    con.execute("CREATE TABLE unrelated (x INTEGER)")
    con.close()
    with pytest.raises(WarehouseError, match="not a runs-etl warehouse"):
        status_text(path)


def test_status_leaves_the_database_file_unchanged(db):
    before = db.read_bytes()
    status_text(db)
    assert db.read_bytes() == before and not Path(f"{db}.wal").exists()


def test_human_age_reads_naturally():
    assert [human_age(s) for s in (None, 5, 600, 5400, 3 * 86400)] == [
        "never", "5 s", "10 min", "1.5 h", "3.0 d"]


def test_cli_status_prints_tables_and_missing_db_is_one_error_line(db, tmp_path, monkeypatch,
                                                                   capsys):
    for name in [k for k in os.environ if k.startswith("RUNS_ETL_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    assert main(["status", "--duckdb-path", str(db), "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "Last 3 syncs" in out and "Last successful sync: #3" in out
    assert main(["status", "--duckdb-path", str(tmp_path / "none.duckdb")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: no warehouse at") and err.count("\n") == 1


def status_json_of(db: Path) -> dict:
    out = io.StringIO()
    print_status(settings_for_db(db), stream=out, as_json=True)
    assert out.getvalue().count("\n") == 1  # one object, one line: easy to log and to jq
    return json.loads(out.getvalue())


def render_at(db: Path, width: int) -> str:
    out = io.StringIO()
    render_status(Console(file=out, width=width, highlight=False),
                  collect_status(settings_for_db(db)), DEFAULT_LIMIT)
    return out.getvalue()


def test_status_json_has_freshness_failures_rows_and_the_last_syncs(db):
    status = status_json_of(db)
    assert status["readable"] is True and status["schema_version"] == MIGRATIONS[-1][0]
    assert status["running"] is None
    fresh = status["freshness"]
    assert fresh["last_success_sync_id"] == 3
    started, secs = SYNCS[2][2], SYNCS[2][3]
    assert datetime.fromisoformat(fresh["last_success_finished_at"]) == \
        started + timedelta(seconds=secs)
    expected_age = (datetime.now(UTC) - started - timedelta(seconds=secs)).total_seconds()
    assert abs(fresh["age_seconds"] - expected_age) < 60
    assert status["failures_since_success"] == 1
    assert status["rows"]["runs_live"] == len(LIVE)
    assert status["rows"]["runs_deleted"] == len(RUNS) - len(LIVE)
    assert status["rows"]["sync_runs"] == 4
    assert [(s["sync_id"], s["outcome"]) for s in status["last_syncs"]] == [
        (4, "abandoned"), (3, "success"), (2, "failed"), (1, "success")]
    assert "HTTP 500" in status["last_syncs"][2]["error"]


def test_cli_status_json_prints_one_object(db, tmp_path, monkeypatch, capsys):
    for name in [k for k in os.environ if k.startswith("RUNS_ETL_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    assert main(["status", "--duckdb-path", str(db), "--json", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert [s["sync_id"] for s in json.loads(out)["last_syncs"]] == [4, 3]


def test_status_shows_the_sync_running_now_with_its_pages(db):
    with writer_lock(db, command="runs-etl sync") as holder:
        note_progress(db, holder, 17)
        text = status_text(db)
        running_now = status_json_of(db)["running"]
    assert f"Sync running now: pid {os.getpid()}" in text and "17 pages so far" in text
    assert "Last successful sync: #3" in text  # the published state is still shown
    assert running_now["pid"] == os.getpid() and running_now["pages"] == 17
    assert running_now["command"] == "runs-etl sync"
    assert "running now" not in status_text(db) and status_json_of(db)["running"] is None


def test_status_while_the_first_sync_runs_says_so_instead_of_failing(tmp_path, monkeypatch,
                                                                       capsys):
    db = tmp_path / "new.duckdb"
    for name in [k for k in os.environ if k.startswith("RUNS_ETL_")]:
        monkeypatch.delenv(name)
    with writer_lock(db, command="runs-etl sync"):
        assert main(["status", "--duckdb-path", str(db)]) == 0
        text = capsys.readouterr().out
        status = status_json_of(db)
    assert f"Sync running now: pid {os.getpid()}" in text
    assert "No published warehouse to read yet" in text
    assert status["readable"] is False and status["running"]["pid"] == os.getpid()
    assert status["rows"] is None and status["freshness"]["last_success_sync_id"] is None
    assert not db.exists()
    with pytest.raises(WarehouseError, match="no warehouse at"):
        status_text(db)  # no sync running: a missing warehouse is still an error


def test_the_status_tables_fit_80_columns_with_their_key_columns(db):
    text = render_at(db, 80)
    assert max(len(line) for line in text.splitlines()) <= 80
    header = next(line for line in text.splitlines() if "outcome" in line)
    cells = [c.strip() for c in header.strip("┃ ").split("┃")]
    assert cells == ["#", "started (UTC)", "outcome", "mode", "secs", "runs seen", "changed"]
    rows = table_rows(text)
    assert [rows[str(i)][2] for i in (4, 3, 2, 1)] == ["abandoned", "success", "failed",
                                                      "success"]
    errors = {line.split(":")[0].strip(): line for line in text.splitlines()
              if line.startswith("  #")}
    assert set(errors) == {"#2", "#4"} and "HTTP 500" in errors["#2"]
    assert rows["runs (deleted at source)"][1] == str(len(RUNS) - len(LIVE))
    assert "error" in next(line for line in render_at(db, 160).splitlines() if "outcome" in line)


def test_markup_and_terminal_escapes_in_a_ledger_error_print_harmlessly(db):
    con = warehouse.connect(db)
    con.execute("INSERT INTO sync_runs (sync_id, started_at, finished_at, outcome, mode, error) "
                "VALUES (5, now(), now(), 'failed', 'full', ?)", ["x [/] y \x1b[2J"])
    con.close()
    for text in (status_text(db), render_at(db, 80)):
        assert "\x1b" not in text
        assert "x [/] y ?[2J" in text
    assert status_json_of(db)["last_syncs"][0]["error"] == "x [/] y \x1b[2J"


def test_new_api_fields_a_sync_saw_are_shown(db):
    con = warehouse.connect(db)
    con.execute("UPDATE sync_runs SET new_fields = 'meta, cost' WHERE sync_id = 3")
    con.close()
    assert "New API fields seen by sync #3: meta, cost" in status_text(db)
    assert [s["new_fields"] for s in status_json_of(db)["last_syncs"]].count("meta, cost") == 1
