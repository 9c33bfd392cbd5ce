"""Parquet exports read back equal to the warehouse and are published atomically."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from helpers import settings_for

from runs_etl import warehouse
from runs_etl.cli import main
from runs_etl.config import load_settings
from runs_etl.engine.sync import sync
from runs_etl.errors import ConfigError, WarehouseError
from runs_etl.outputs import export as export_mod
from runs_etl.outputs.export import current_version, export_parquet

N_RUNS = 400


def live_runs_sql(con) -> str:
    """The warehouse side of the comparison: live runs, JSON as text, exported columns only."""
    cols = [c for (c,) in con.execute(
        "SELECT column_name FROM duckdb_columns() WHERE table_name = 'runs' "
        "AND column_name NOT IN ('_deleted_at', '_sync_id') ORDER BY column_index").fetchall()]
    sel = ", ".join(f"CAST({c} AS VARCHAR) AS {c}" if c in ("input", "definitions", "extra")
                    else c for c in cols)
    return f"SELECT {sel} FROM runs WHERE _deleted_at IS NULL"


@pytest.fixture
def synced(make_sim, tmp_path):
    """A simulator, Settings with an export root, and a warehouse holding one successful sync."""
    sim = make_sim(N_RUNS)
    settings = settings_for(sim, tmp_path / "runs.duckdb",
                            export={"parquet_dir": str(tmp_path / "parquet")})
    con = warehouse.connect(settings.warehouse.duckdb_path)
    sync(settings, con)
    con.close()
    return sim, settings


def root_of(settings) -> Path:
    return Path(settings.export.parquet_dir)


def read_runs_ids(path: Path) -> list[str]:
    return ds.dataset(path / "runs", format="parquet", partitioning="hive").to_table(
        columns=["id"]).column("id").to_pylist()


def test_duckdb_pyarrow_and_pandas_read_back_exactly_the_live_warehouse(synced):
    _, settings = synced
    result = export_parquet(settings)
    cur = root_of(settings) / "current"
    assert result.rows["runs"] == N_RUNS and str(result).startswith(f"exported {N_RUNS} runs")
    con = warehouse.connect(settings.warehouse.duckdb_path, read_only=True)
    expected = con.sql(live_runs_sql(con) + " ORDER BY id").to_arrow_table()
    cols = ", ".join(expected.column_names)
    glob = f"'{cur}/runs/**/*.parquet'"
    # DuckDB, Hive partitions on
    for a, b in ((f"SELECT {cols} FROM read_parquet({glob}, hive_partitioning=true)",
                  live_runs_sql(con)),
                 (live_runs_sql(con), f"SELECT {cols} FROM read_parquet({glob})")):
        assert con.execute(f"SELECT count(*) FROM ({a} EXCEPT ALL {b})").fetchone() == (0,)
    bad = con.execute(f"""SELECT count(*) FROM read_parquet({glob}, hive_partitioning=true,
                          hive_types={{'year': INTEGER, 'month': INTEGER}})
                          WHERE year <> year(timezone('UTC', created_at))
                             OR month <> month(timezone('UTC', created_at))""").fetchone()
    assert bad == (0,)
    wf_cols = [c for c in con.sql("SELECT * FROM workflows").columns if c != "_sync_id"]
    wf_sel = ", ".join(f"CAST({c} AS VARCHAR) AS {c}" if c in ("definition", "extra") else c
                       for c in wf_cols)
    for table, sql in (("workflows", f"SELECT {wf_sel} FROM workflows"),
                       ("run_nodes", "SELECT * FROM run_nodes")):
        parquet = f"SELECT * FROM read_parquet('{cur}/{table}/*.parquet')"
        assert con.execute(f"SELECT count(*) FROM ({parquet})").fetchone() == (
            result.rows[table],)
        for a, b in ((parquet, sql), (sql, parquet)):
            assert con.execute(f"SELECT count(*) FROM ({a} EXCEPT ALL {b})").fetchone() == (0,)
    # pyarrow dataset
    table = ds.dataset(cur / "runs", format="parquet", partitioning="hive").to_table()
    assert {"year", "month"} <= set(table.column_names)
    table = table.select(expected.column_names).sort_by("id")
    assert table.to_pylist() == expected.to_pylist()
    # pandas
    frame = pd.read_parquet(cur / "runs").drop(columns=["year", "month"])
    frame = frame.sort_values("id").reset_index(drop=True)[expected.column_names]
    pd.testing.assert_frame_equal(frame, expected.to_pandas(), check_dtype=False)
    con.close()


def test_files_are_zstd_and_runs_are_partitioned_by_utc_year_and_month(synced):
    _, settings = synced
    result = export_parquet(settings)
    files = sorted(result.path.rglob("*.parquet"))
    assert len(files) == result.files
    for f in files:
        meta = pq.read_metadata(f)
        assert meta.row_group(0).column(0).compression == "ZSTD"
        assert result.version in f.name  # a listing that straddles a switch fails, never mixes
    for f in (result.path / "runs").rglob("*.parquet"):
        year, month = f.parent.parent.name, f.parent.name
        assert year.startswith("year=") and len(year) == 9
        assert month.startswith("month=") and len(month) == 8  # zero-padded MM
        stamps = pq.read_table(f, columns=["created_at"]).column("created_at").to_pylist()
        assert {(t.year, t.month) for t in stamps} == {(int(year[5:]), int(month[6:]))}


def test_reexport_after_upserts_has_each_run_once_in_its_latest_state(synced):
    sim, settings = synced
    export_parquet(settings)
    changed = set(sim.transition(30))
    added = set(sim.add_runs(25))
    con = warehouse.connect(settings.warehouse.duckdb_path)
    sync(settings, con)
    gone = [r for (r,) in con.execute("SELECT id FROM runs LIMIT 3").fetchall()]
    con.execute("UPDATE runs SET _deleted_at = now() WHERE id IN (SELECT unnest(?))", [gone])
    status = dict(con.execute("SELECT id, status FROM runs").fetchall())
    con.close()
    result = export_parquet(settings)
    cur = root_of(settings) / "current"
    table = ds.dataset(cur / "runs", format="parquet", partitioning="hive").to_table()
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == N_RUNS + len(added) - len(gone) == result.rows["runs"]
    assert added <= set(ids) and not set(gone) & set(ids)
    got = dict(zip(ids, table.column("status").to_pylist()))
    assert all(got[i] == status[i] for i in changed - set(gone))
    nodes = ds.dataset(cur / "run_nodes", format="parquet").to_table()
    pairs = list(zip(nodes.column("run_id").to_pylist(), nodes.column("position").to_pylist()))
    assert len(pairs) == len(set(pairs)) and not set(gone) & {r for r, _ in pairs}


def soft_delete_first(settings, n: int) -> None:
    """Mark the first ``n`` runs (by id) deleted in the warehouse, as a sync would."""
    con = warehouse.connect(settings.warehouse.duckdb_path)
    con.execute("UPDATE runs SET _deleted_at = now() WHERE id IN "
                "(SELECT id FROM runs ORDER BY id LIMIT ?)", [n])
    con.close()


def test_a_reader_sees_the_previous_complete_version_until_the_switch(synced, monkeypatch):
    _, settings = synced
    root = root_of(settings)
    export_parquet(settings)
    soft_delete_first(settings, 100)
    seen_before_switch = []
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == root / "current":  # the new version is fully written at this point
            seen_before_switch.append(len(read_runs_ids(root / "current")))
            staged = sorted((root / "versions").iterdir())
            seen_before_switch.append(len(staged))
        return real_replace(src, dst)

    monkeypatch.setattr(export_mod.os, "replace", replace)
    result = export_parquet(settings)
    assert seen_before_switch == [N_RUNS, 2]
    assert len(read_runs_ids(root / "current")) == N_RUNS - 100 == result.rows["runs"]


def test_concurrent_readers_only_ever_see_a_complete_version(synced):
    _, settings = synced
    root = root_of(settings)
    export_parquet(settings)
    soft_delete_first(settings, 50)
    counts, errors, stop = [], [], threading.Event()

    def reader():
        try:
            while not stop.is_set():
                counts.append(len(read_runs_ids(current_version(root))))
        except Exception as e:  # reported below: a reader must never fail
            errors.append(e)

    t = threading.Thread(target=reader)
    t.start()
    try:
        export_parquet(settings)
        n = len(counts)
        while len(counts) == n and t.is_alive():  # at least one read after the switch
            time.sleep(0.001)
    finally:
        stop.set()
        t.join()
    assert not errors
    assert set(counts) <= {N_RUNS, N_RUNS - 50} and counts[-1] == N_RUNS - 50


def test_only_the_current_and_previous_versions_are_kept(synced):
    _, settings = synced
    root = root_of(settings)
    results = [export_parquet(settings) for _ in range(4)]
    (root / ".staging-killed").mkdir()  # what a killed export leaves behind
    results.append(export_parquet(settings))
    assert sorted(p.name for p in (root / "versions").iterdir()) == [
        results[-2].version, results[-1].version]
    assert current_version(root) == results[-1].path.resolve()
    assert os.readlink(root / "current") == f"versions/{results[-1].version}"  # relocatable
    assert not list(root.glob(".staging-*")) and not list(root.glob(".current-*"))
    assert results[-1].removed_versions == [results[-3].version]


def test_a_failed_export_leaves_the_current_version_alone(synced, tmp_path):
    _, settings = synced
    root = root_of(settings)
    good = export_parquet(settings)
    con = warehouse.connect(tmp_path / "broken.duckdb")
    warehouse.migrate(con)
    con.execute("DROP TABLE run_nodes")
    with pytest.raises(WarehouseError, match="Parquet export failed"):
        export_parquet(settings, con=con)
    con.close()
    assert current_version(root) == good.path.resolve()
    assert [p.name for p in (root / "versions").iterdir()] == [good.version]
    assert not list(root.glob(".staging-*"))


def test_export_with_a_connection_exports_committed_data_only(synced):
    _, settings = synced
    con = warehouse.connect(settings.warehouse.duckdb_path)
    con.begin()
    con.execute("UPDATE runs SET _deleted_at = now()")
    result = export_parquet(settings, con=con)
    con.rollback()
    con.close()
    assert result.rows["runs"] == N_RUNS


def test_no_export_folder_configured_is_a_config_error(tmp_path):
    settings = load_settings(None, {"RUNS_ETL_DUCKDB_PATH": str(tmp_path / "x.duckdb")})
    with pytest.raises(ConfigError, match="RUNS_ETL_PARQUET_DIR"):
        export_parquet(settings)


def test_a_missing_database_is_a_warehouse_error_and_creates_no_file(tmp_path):
    settings = load_settings(None, {"RUNS_ETL_DUCKDB_PATH": str(tmp_path / "none.duckdb"),
                                    "RUNS_ETL_PARQUET_DIR": str(tmp_path / "pq")})
    with pytest.raises(WarehouseError, match="runs-etl sync"):
        export_parquet(settings)
    assert not (tmp_path / "none.duckdb").exists() and not (tmp_path / "pq").exists()


def test_cli_export_prints_one_line_and_errors_cleanly(synced, tmp_path, monkeypatch, capsys):
    _, settings = synced
    for name in [k for k in os.environ if k.startswith("RUNS_ETL_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    db = str(settings.warehouse.duckdb_path)
    assert main(["export", "--duckdb-path", db, "--parquet-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"exported {N_RUNS} runs") and out.count("\n") == 1
    assert (tmp_path / "out" / "current" / "runs").is_dir()
    assert main(["export", "--duckdb-path", db]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and "parquet_dir" in err and "Traceback" not in err


def test_two_exports_at_once_take_turns_and_leave_one_consistent_current(synced):
    _, settings = synced
    root = root_of(settings)
    results, errors = [], []

    def run():
        try:
            results.append(export_parquet(settings))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 2
    assert current_version(root).name in {r.version for r in results}
    assert len(read_runs_ids(current_version(root))) == N_RUNS
    assert len(list((root / "versions").iterdir())) == 2


def test_a_current_folder_not_made_by_runs_etl_is_refused(synced):
    _, settings = synced
    (root_of(settings) / "current").mkdir(parents=True)
    with pytest.raises(WarehouseError, match="not the link runs-etl maintains"):
        export_parquet(settings)
