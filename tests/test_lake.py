"""The Delta lake (outputs/lake.py, jobs.py ``_write_lake``, ``runs-etl lake ...``) against a
real S3 API on loopback: moto's server in its own process, a bucket per test.

Every comparison reads the lake with deltalake + pyarrow (DuckDB's ``delta_scan`` needs an
extension downloaded at run time) and the warehouse from its published snapshot.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import duckdb
import httpx
import pytest
from deltalake import DeltaTable
from helpers import error_line, ledger, settings_for

from runs_etl import jobs
from runs_etl.errors import LakeError, RunsEtlError
from runs_etl.outputs import lake
from runs_etl.outputs.lake import SYNC_ID_KEY, lake_status

SECRET = "lake-secret-do-not-print"
KEYS = {"runs": ("workspace", "id"), "workflows": ("workspace", "id"),
        "run_nodes": ("workspace", "run_id", "position"), "sync_runs": ("sync_id",)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server as a child process (its in-process server makes history() hang)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, "moto_server exited"
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def s3_options(endpoint: str) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true",
            "max_retries": "1", "retry_timeout": "2s"}


@pytest.fixture
def bucket(s3_endpoint) -> tuple[str, dict[str, str]]:
    """A new bucket: (lake uri, storage options)."""
    name = f"lake-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="testing",
                 aws_secret_access_key=SECRET, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}/noxus", s3_options(s3_endpoint)


def lake_settings(sim, db: Path, uri: str, options: dict | None = None, **lake_keys):
    return settings_for(sim, db, lake={"uri": uri, "storage_options": options or {},
                                       **lake_keys})


# --- reading both sides ---------------------------------------------------------------------

def warehouse_rows(db: Path, table: str) -> list[dict]:
    """The published snapshot's rows of ``table``, JSON as text, sorted by key."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        con.execute("SET TimeZone = 'UTC'")
        cols = con.execute("SELECT column_name, data_type FROM information_schema.columns "
                           "WHERE table_name = ? ORDER BY ordinal_position", [table]).fetchall()
        select = ", ".join(f"{c}::VARCHAR AS {c}" if t == "JSON" else c for c, t in cols)
        rows = con.sql(f"SELECT {select} FROM {table}").to_arrow_table().to_pylist()
    finally:
        con.close()
    return sorted(rows, key=lambda r: tuple(r[k] for k in KEYS[table]))


def lake_rows(uri: str, table: str, options: dict | None = None) -> list[dict]:
    rows = DeltaTable(f"{uri}/{table}", storage_options=options).to_pyarrow_table().to_pylist()
    return sorted(rows, key=lambda r: tuple(r[k] for k in KEYS[table]))


def assert_lake_equals_warehouse(uri: str, db: Path, options: dict | None = None) -> None:
    """Every table: each key once, every column equal to the warehouse's."""
    for table in KEYS:
        got, want = lake_rows(uri, table, options), warehouse_rows(db, table)
        keys = [tuple(r[k] for k in KEYS[table]) for r in got]
        assert len(keys) == len(set(keys)), f"{table}: a key appears twice in the lake"
        if table == "runs":
            for r in got:
                assert r.pop("created_month") == r["created_at"].strftime("%Y-%m")
        assert got == want, f"{table}: lake differs from the warehouse"


def metadata_sync_ids(uri: str, table: str, options: dict | None) -> list[int]:
    return [int(c[SYNC_ID_KEY]) for c in
            DeltaTable(f"{uri}/{table}", storage_options=options).history() if SYNC_ID_KEY in c]


# --- tests ------------------------------------------------------------------------------------

def test_two_workspaces_land_in_the_s3_lake_once_each_in_their_latest_state(
        tmp_path, make_sim, bucket):
    """Overlapping run ids in two workspaces; an update and a soft delete arrive by MERGE;
    the lake equals the warehouse snapshot table by table, partitioned by workspace and month,
    and each commit names the sync it reflects."""
    uri, options = bucket
    prod, staging = make_sim(200, seed=7, api_key="k1"), make_sim(200, seed=7, api_key="k2")
    staging.transition(30)
    db = tmp_path / "runs.duckdb"
    config = tmp_path / "runs-etl.toml"
    config.write_text(f"""
[[workspaces]]
name = "prod"
api_url = "{prod.base_url}"
key = "k1"
[[workspaces]]
name = "staging"
api_url = "{staging.base_url}"
key = "k2"
""", encoding="utf-8")
    config.chmod(0o600)
    from runs_etl.config import load_settings

    settings = load_settings(config, {"RUNS_ETL_DUCKDB_PATH": str(db)},
                             {"lake": {"uri": uri, "storage_options": options}})
    jobs.run_syncs(settings, quiet=True)
    assert_lake_equals_warehouse(uri, db, options)
    runs = lake_rows(uri, "runs", options)
    assert {r["workspace"] for r in runs} == {"prod", "staging"}
    assert len([r for r in runs if r["workspace"] == "prod"]) == len(prod.snapshot())

    changed = prod.transition(20)
    gone = prod.delete(3)
    jobs.run_syncs(settings, quiet=True, full_refresh=True)  # a verified walk applies deletes
    assert_lake_equals_warehouse(uri, db, options)
    runs = {(r["workspace"], r["id"]): r for r in lake_rows(uri, "runs", options)}
    assert all(runs[("prod", i)]["_deleted_at"] is not None for i in gone)
    assert all(runs[("staging", i)]["_deleted_at"] is None for i in gone)  # other workspace
    assert {runs[("prod", i)]["status"] for i in changed} == \
        {prod.snapshot()[i]["status"] for i in changed}

    last = ledger(db)[-1]["sync_id"]
    dt = DeltaTable(f"{uri}/runs", storage_options=options)
    assert dt.metadata().partition_columns == ["workspace", "created_month"]
    assert metadata_sync_ids(uri, "runs", options)[0] == last
    assert metadata_sync_ids(uri, "sync_runs", options)[0] == last
    assert lake_status(settings) | {"versions": None} == {
        "uri": uri, "version": dt.version(), "versions": None, "last_applied_sync_id": last,
        "warehouse_last_success": last, "lag_syncs": 0}


def test_a_failed_lake_write_leaves_the_sync_committed_and_the_lake_readable(
        tmp_path, make_sim, bucket, run_cli, monkeypatch):
    """S3 unreachable: exit 1 with one Error line (no secret), the warehouse has the sync, the
    lake keeps its previous version; the next sync catches up everything it missed."""
    uri, options = bucket
    sim = make_sim(200)
    db = tmp_path / "runs.duckdb"
    for k, v in options.items():  # the standard AWS_* environment, as cron would have it
        monkeypatch.setenv(k, v)
    assert run_cli(sim, "sync", "-q", RUNS_ETL_LAKE_URI=uri)[0] == 0
    before = {t: lake_rows(uri, t) for t in KEYS}
    version = DeltaTable(f"{uri}/runs").version()

    sim.transition(40)
    sim.add_runs(10)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nobody there
    code, out, err = run_cli(sim, "sync", "-q", RUNS_ETL_LAKE_URI=uri)
    assert code == 1
    line = error_line(err)
    assert "sync committed, lake write failed" in line and SECRET not in err + out
    assert ledger(db)[-1]["outcome"] == "success"  # the warehouse took the sync
    assert warehouse_rows(db, "runs") != before["runs"]

    monkeypatch.setenv("AWS_ENDPOINT_URL", options["AWS_ENDPOINT_URL"])
    assert DeltaTable(f"{uri}/runs").version() == version
    assert {t: lake_rows(uri, t) for t in KEYS} == before  # previous version, intact
    status = lake_status(lake_settings(sim, db, uri))
    assert status is not None and status["lag_syncs"] == 1
    code, out, _ = run_cli(sim, "status", RUNS_ETL_LAKE_URI=uri)
    assert code == 0 and "1 successful sync(s) behind" in out
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    code, out, _ = run_cli(sim, "status", "--json", RUNS_ETL_LAKE_URI=uri)
    assert code == 0 and "error" in json.loads(out)["lake"]  # status reports, does not fail
    monkeypatch.setenv("AWS_ENDPOINT_URL", options["AWS_ENDPOINT_URL"])

    sim.transition(40)
    assert run_cli(sim, "sync", "-q", RUNS_ETL_LAKE_URI=uri)[0] == 0
    assert_lake_equals_warehouse(uri, db)
    status = lake_status(lake_settings(sim, db, uri))
    assert status is not None and status["lag_syncs"] == 0


def test_a_write_that_dies_between_tables_is_repaired_by_the_next_sync(
        tmp_path, make_sim, bucket, monkeypatch):
    """runs merged, run_nodes failed: sync_runs still names the old sync, and the next sync
    brings every table (each from its own last applied sync) up to date."""
    uri, options = bucket
    sim = make_sim(200)
    db = tmp_path / "runs.duckdb"
    settings = lake_settings(sim, db, uri, options)
    jobs.run_sync(settings, quiet=True)
    first = ledger(db)[-1]["sync_id"]

    def broken(*args, **kw):
        raise OSError("injected: connection reset")

    real = lake._merge_nodes
    monkeypatch.setattr(lake, "_merge_nodes", broken)
    sim.transition(50)
    with pytest.raises(RunsEtlError, match="sync committed, lake write failed.*injected"):
        jobs.run_sync(settings, quiet=True)
    assert metadata_sync_ids(uri, "runs", options)[0] == first + 1  # runs got there
    assert metadata_sync_ids(uri, "sync_runs", options)[0] == first  # the lake did not
    assert lake_status(settings)["last_applied_sync_id"] == first

    monkeypatch.setattr(lake, "_merge_nodes", real)
    sim.transition(50)
    sim.add_runs(5)
    jobs.run_sync(settings, quiet=True)
    assert_lake_equals_warehouse(uri, db, options)
    assert lake_status(settings)["lag_syncs"] == 0


def test_lake_commands_optimize_vacuum_rebuild(tmp_path, make_sim, bucket, run_cli,
                                               monkeypatch):
    """optimize compacts (z-order too), vacuum deletes what no retained version needs, rebuild
    writes every table afresh; the lake stays equal to the warehouse and keeps its sync id."""
    uri, options = bucket
    for k, v in options.items():
        monkeypatch.setenv(k, v)
    sim = make_sim(200)
    db = tmp_path / "runs.duckdb"
    for _ in range(3):  # several small commits to compact
        assert run_cli(sim, "sync", "-q", RUNS_ETL_LAKE_URI=uri)[0] == 0
        sim.transition(30)
    applied = metadata_sync_ids(uri, "runs", None)[0]

    code, out, _ = run_cli(sim, "lake", "optimize", "--zorder", RUNS_ETL_LAKE_URI=uri)
    assert code == 0 and "optimized runs" in out
    newest = DeltaTable(f"{uri}/runs").history(1)[0]
    assert newest["operation"] == "OPTIMIZE" and int(newest[SYNC_ID_KEY]) == applied

    code, out, _ = run_cli(sim, "lake", "vacuum", "--dry-run", RUNS_ETL_LAKE_URI=uri)
    assert code == 0 and "would remove runs 0 files" in out  # younger than 7 days
    config = tmp_path / "zero.toml"
    config.write_text('[lake]\nvacuum_retention = "0s"\n', encoding="utf-8")
    code, out, _ = run_cli(sim, "lake", "vacuum", "--config", str(config),
                           RUNS_ETL_LAKE_URI=uri)
    assert code == 0
    removed = int(out.split("runs ")[1].split(" files")[0])
    assert removed > 0
    assert_lake_equals_warehouse(uri, db)  # the current version is whole

    code, out, _ = run_cli(sim, "lake", "rebuild", RUNS_ETL_LAKE_URI=uri)
    assert code == 0 and "rebuilt" in out
    assert DeltaTable(f"{uri}/runs").history(1)[0]["runs_etl.operation"] == "rebuild"
    assert_lake_equals_warehouse(uri, db)
    assert lake_status(lake_settings(sim, db, uri))["lag_syncs"] == 0


def test_a_local_folder_lake_and_its_errors(tmp_path, make_sim, run_cli):
    """No S3 at all: a folder holds the Delta tables; without month partitions when so set;
    maintenance on an empty lake is one Error line."""
    sim = make_sim(200)
    db = tmp_path / "runs.duckdb"
    folder = tmp_path / "lake"
    code, _, err = run_cli(sim, "lake", "optimize", RUNS_ETL_LAKE_URI=str(folder))
    assert code == 1 and "no lake tables under" in error_line(err)

    settings = lake_settings(sim, db, str(folder), partition_by_month=False)
    jobs.run_sync(settings, quiet=True)
    sim.transition(25)
    jobs.run_sync(settings, quiet=True)
    runs = DeltaTable(str(folder / "runs"))
    assert runs.metadata().partition_columns == ["workspace"]
    for table in KEYS:
        got, want = lake_rows(str(folder), table), warehouse_rows(db, table)
        assert got == want, table
    assert (folder / "runs" / "workspace=default").is_dir()


def test_a_changed_partition_by_month_is_told_to_rebuild(tmp_path, make_sim, run_cli):
    """The runs MERGE names the partitions it touches (so that delta-rs reads only those): a
    lake partitioned otherwise than the settings say gets one Error line naming `lake rebuild`,
    and the rebuild fixes it."""
    sim = make_sim(200)
    db = tmp_path / "runs.duckdb"
    folder = str(tmp_path / "lake")
    assert run_cli(sim, "sync", "-q", RUNS_ETL_LAKE_URI=folder)[0] == 0
    config = tmp_path / "flat.toml"
    config.write_text("[lake]\npartition_by_month = false\n", encoding="utf-8")

    sim.transition(30)
    code, _, err = run_cli(sim, "sync", "-q", "--config", str(config), RUNS_ETL_LAKE_URI=folder)
    line = error_line(err)
    assert code == 1 and "sync committed, lake write failed" in line
    assert "partitioned by ['workspace', 'created_month']" in line
    assert "runs-etl lake rebuild" in line

    code, out, _ = run_cli(sim, "lake", "rebuild", "--config", str(config),
                           RUNS_ETL_LAKE_URI=folder)
    assert code == 0 and "rebuilt" in out
    assert DeltaTable(f"{folder}/runs").metadata().partition_columns == ["workspace"]
    sim.transition(30)
    assert run_cli(sim, "sync", "-q", "--config", str(config), RUNS_ETL_LAKE_URI=folder)[0] == 0
    for table in KEYS:
        assert lake_rows(folder, table) == warehouse_rows(db, table), table


def test_lake_settings_are_checked_and_secrets_stay_out_of_messages(tmp_path, make_sim):
    from runs_etl.config import load_settings
    from runs_etl.errors import ConfigError

    with pytest.raises(ConfigError, match="lake.uri"):
        load_settings(None, {"RUNS_ETL_LAKE_URI": "ftp://host/x"})
    with pytest.raises(ConfigError, match="names no bucket"):
        load_settings(None, {"RUNS_ETL_LAKE_URI": "s3:///x"})
    sim = make_sim(50)
    settings = lake_settings(sim, tmp_path / "runs.duckdb", "s3://nobucket/x",
                             {**s3_options(f"http://127.0.0.1:{free_port()}")})
    assert SECRET not in repr(settings)
    with pytest.raises(LakeError) as info:
        lake.optimize_lake(settings)
    assert SECRET not in str(info.value) and "\x1b" not in str(info.value)
    assert lake_status(settings_for(sim, tmp_path / "runs.duckdb")) is None  # no lake set


def test_a_run_whose_node_list_shrank_loses_its_extra_positions_in_the_lake(tmp_path):
    """run_nodes are rewritten with their run: positions beyond the new list are deleted,
    other runs' nodes are left alone (warehouse in memory, lake in a folder)."""
    from runs_etl import warehouse
    from runs_etl.config import load_settings

    con = duckdb.connect(":memory:")
    con.execute("SET TimeZone = 'UTC'")
    warehouse.migrate(con)

    def sync(sync_id: int, runs: dict[str, list[str]]) -> None:
        con.execute("INSERT INTO sync_runs (workspace, sync_id, started_at, outcome) "
                    "VALUES ('w', ?, now(), 'success')", [sync_id])
        for run_id, nodes in runs.items():
            con.execute("DELETE FROM runs WHERE id = ?", [run_id])
            con.execute("DELETE FROM run_nodes WHERE run_id = ?", [run_id])
            con.execute("INSERT INTO runs (workspace, id, status, created_at, node_ids, "
                        "_first_seen_at, _synced_at, _sync_id) VALUES ('w', ?, 'running', "
                        "TIMESTAMPTZ '2024-05-01', ?, now(), now(), ?)", [run_id, nodes, sync_id])
            for pos, node in enumerate(nodes):
                con.execute("INSERT INTO run_nodes VALUES (?, ?, ?, 'w')", [run_id, pos, node])

    settings = load_settings(None, {"RUNS_ETL_LAKE_URI": str(tmp_path / "lake")})
    sync(1, {"a": ["n1", "n2", "n3"], "b": ["n1", "n2"]})
    lake.write_lake(settings, con)
    sync(2, {"a": ["n9"]})
    result = lake.write_lake(settings, con)
    assert result.rows["run_nodes"] == 3  # one upsert, two deletes
    nodes = [(r["run_id"], r["position"], r["node_id"])
             for r in lake_rows(str(tmp_path / "lake"), "run_nodes")]
    assert nodes == [("a", 0, "n9"), ("b", 0, "n1"), ("b", 1, "n2")]


# --- two processes, one lake (issue 12) -------------------------------------------------------

OPTIMIZER = """
import sys
from pathlib import Path
from runs_etl.cli import main
stop, rounds = Path({stop!r}), 0
while not stop.exists():
    code = main(["lake", "optimize"])
    if code:
        sys.exit(code)
    rounds += 1
    print(f"round {{rounds}}", flush=True)
"""


def commits(uri: str, table: str, options: dict) -> list[dict]:
    """The table's commits, oldest first."""
    return DeltaTable(f"{uri}/{table}", storage_options=options).history()[::-1]


def test_syncs_racing_lake_optimize_in_another_process_lose_no_commit(
        tmp_path, make_sim, bucket, procs):
    """While `runs-etl lake optimize` runs in a loop in its own process, five syncs MERGE into
    the same S3 tables: every sync's commit and every compaction the optimizer reported is in
    each table's history, the lake equals the warehouse and names the last sync."""
    uri, options = bucket
    sim = make_sim(300)
    db = tmp_path / "runs.duckdb"
    settings = lake_settings(sim, db, uri, options)
    jobs.run_sync(settings, quiet=True)  # the tables exist before the optimizer starts
    first = ledger(db)[-1]["sync_id"]
    stop = tmp_path / "stop-optimizing"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNS_ETL_", "AWS_"))}
    env |= {**options, "RUNS_ETL_LAKE_URI": uri, "RUNS_ETL_DUCKDB_PATH": str(db)}
    optimizer = procs.python(OPTIMIZER.format(stop=str(stop)), env)
    optimizer.wait_for("round 1", timeout=120)
    for _ in range(5):
        sim.transition(20)
        sim.add_runs(5)
        jobs.run_sync(settings, quiet=True)  # a LakeError here fails the test
    last = ledger(db)[-1]["sync_id"]
    stop.touch()
    assert optimizer.finish(120) == 0, optimizer.output

    # What the optimizer committed, per table: each round's line lists every table.
    compactions = dict.fromkeys(KEYS, 0)
    for line in optimizer.lines:
        for table, added in re.findall(r"(\w+) \(\+(\d+) -\d+ files\)", line):
            compactions[table] += int(added) > 0
    raced = False
    for table in ("runs", "sync_runs"):  # both change in every sync
        history = commits(uri, table, options)
        merged = [int(c[SYNC_ID_KEY]) for c in history if c["operation"] != "OPTIMIZE"]
        assert merged == list(range(first, last + 1)), table
        optimized = [v for v, c in enumerate(history) if c["operation"] == "OPTIMIZE"]
        assert len(optimized) == compactions[table], table
        syncs = [v for v, c in enumerate(history) if c["operation"] != "OPTIMIZE"]
        raced |= any(syncs[1] < v < syncs[-1] for v in optimized)
    assert raced, "the optimizer never committed between two syncs: nothing was tested"
    assert_lake_equals_warehouse(uri, db, options)
    status = lake_status(settings)
    assert status["last_applied_sync_id"] == last and status["lag_syncs"] == 0


def test_run_nodes_merge_after_the_lake_holds_merged_files(tmp_path, make_sim):
    """delta-rs writes strings as string_view; the run_nodes MERGE used to filter the lake's
    files with a string list and failed (ArrowNotImplementedError) from the third sync on."""
    sim = make_sim(300)
    db, folder = tmp_path / "runs.duckdb", tmp_path / "lake"
    settings = lake_settings(sim, db, str(folder))
    for _ in range(3):
        jobs.run_sync(settings, quiet=True)
        sim.transition(20)
        sim.add_runs(5)
    assert_lake_equals_warehouse(str(folder), db)
