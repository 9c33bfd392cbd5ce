"""``runs-etl demo`` runs the whole job on the built-in simulator, one workspace or several."""

from __future__ import annotations

import duckdb
from helpers import error_line

from runs_etl.cli import main


def test_demo_with_two_workspaces_syncs_both_into_one_warehouse(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--workspaces", "2", "--runs", "300", "--dir", "tmp", "-q"]) == 0
    out = capsys.readouterr().out
    con = duckdb.connect(str(tmp_path / "tmp" / "runs.duckdb"), read_only=True)
    try:
        counts = dict(con.execute("SELECT workspace, count(*) FROM runs GROUP BY 1").fetchall())
        ledger = con.execute("SELECT workspace, outcome FROM sync_runs ORDER BY sync_id"
                             ).fetchall()
    finally:
        con.close()
    assert set(counts) == {"ws1", "ws2"} and min(counts.values()) >= 300
    assert ledger == [("ws1", "success"), ("ws2", "success")] * 2  # a full then an incremental
    # shown side by side, exported per workspace, one report section each
    assert "ws1" in out and "ws2" in out and "Side by side" in out
    runs = tmp_path / "tmp" / "parquet" / "current" / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["workspace=ws1", "workspace=ws2"]
    html = (tmp_path / "tmp" / "report.html").read_text(encoding="utf-8")
    assert 'id="ws-ws1"' in html and 'id="ws-ws2"' in html


def test_demo_refuses_zero_workspaces(tmp_path, capsys):
    assert main(["demo", "--workspaces", "0", "--dir", str(tmp_path / "d")]) == 2
    assert "--workspaces" in error_line(capsys.readouterr().err)
