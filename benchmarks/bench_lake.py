"""Benchmark: what the Delta lake costs, locally and against moto's S3 server on loopback.

    .venv/bin/python benchmarks/bench_lake.py --runs 100000

A warehouse of N synthetic runs (3 nodes each, 50 workflows, 2 workspaces) is built in memory;
then ``write_lake`` is timed for: the initial write, a MERGE after a sync that changed every
run (N rows), a MERGE after a sync that changed 1% of them spread over every partition (the worst
case: every file holds a changed run), and one after a sync that changed the newest 1% (what an
incremental sync brings). Prints one Markdown table, with the seconds per lake table.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import sys
import tempfile
import time

import duckdb

from runs_etl import warehouse
from runs_etl.config import load_settings
from runs_etl.outputs import lake
from runs_etl.outputs.lake import write_lake


def build(n: int):
    con = duckdb.connect(":memory:")
    con.execute("SET TimeZone = 'UTC'")
    warehouse.migrate(con)
    con.execute("""INSERT INTO runs (workspace, id, workflow_id, input, node_ids, status, progress,
                   created_at, finished_at, _first_seen_at, _synced_at, _sync_id)
        SELECT CASE WHEN i % 2 = 0 THEN 'prod' ELSE 'staging' END, 'run-' || i, 'wf-' || (i % 50),
               '{"prompt": "hello", "n": 1}', ['a', 'b', 'c'], 'completed', 100,
               TIMESTAMPTZ '2023-01-01' + to_seconds(i * 600), TIMESTAMPTZ '2023-01-01'
               + to_seconds(i * 600 + 30), now(), now(), 1 FROM range($n) t(i)""", {"n": n})
    con.execute("""INSERT INTO run_nodes SELECT id, p, node_ids[p + 1], workspace
                   FROM runs, range(3) r(p)""")
    con.execute("""INSERT INTO workflows (workspace, id, name, _first_seen_at, _synced_at, _sync_id)
        SELECT ws, 'wf-' || i, 'flow ' || i, now(), now(), 1
        FROM range(50) t(i), (VALUES ('prod'), ('staging')) w(ws)""")
    sync(con, 1)
    return con


def sync(con, sync_id: int) -> None:
    con.execute("INSERT INTO sync_runs (workspace, sync_id, started_at, outcome) "
                "VALUES ('prod', ?, now(), 'success')", [sync_id])


def change(con, sync_id: int, every: int, newest: bool = False) -> None:
    """Change every ``every``-th run, spread over all partitions by a hash of the id, or
    (``newest``) the newest 1/``every`` of the runs, as an incremental sync sees them: runs
    created or finished since the last sync, all in the latest month or two."""
    where = ("created_at >= (SELECT quantile_disc(created_at, 1 - 1 / $every) FROM runs)"
             if newest else "hash(id) % $every = 0")
    con.execute(f"UPDATE runs SET status = 'failed', _sync_id = $s WHERE {where}",
                {"s": sync_id, "every": every})
    sync(con, sync_id)


@contextlib.contextmanager
def per_table_seconds():
    """Seconds per lake table of the ``write_lake`` calls inside, by wrapping the private
    ``_write_table`` (where a MERGE's time goes; write_lake itself only reports the total)."""
    seconds: dict[str, float] = {}
    original = lake._write_table

    def timed(settings, con, table, sync_id):
        t0 = time.perf_counter()
        try:
            return original(settings, con, table, sync_id)
        finally:
            seconds[table] = time.perf_counter() - t0

    lake._write_table = timed
    try:
        yield seconds
    finally:
        lake._write_table = original


def _split(seconds: dict[str, float]) -> str:
    return ", ".join(f"{t} {s:.2f}" for t, s in seconds.items())


def measure(label: str, settings, n: int) -> list[str]:
    con = build(n)
    out = []
    with per_table_seconds() as tables:
        t0 = time.perf_counter()
        write_lake(settings, con)
    out.append(f"| {label} | initial write of {n:,} runs | {time.perf_counter() - t0:.2f} s "
               f"| {_split(tables)} |")
    for sync_id, every, newest, what in (
            (2, 1, False, f"MERGE of {n:,} changed runs"),
            (3, 100, False, f"MERGE of 1% ({n // 100:,}) changed runs, spread over every month"),
            (4, 100, True, f"MERGE of 1% ({n // 100:,}) changed runs, the newest")):
        change(con, sync_id, every, newest)
        with per_table_seconds() as tables:
            t0 = time.perf_counter()
            result = write_lake(settings, con)
        out.append(f"| {label} | {what} (runs rows merged: {result.rows['runs']:,}) | "
                   f"{time.perf_counter() - t0:.2f} s | {_split(tables)} |")
    return out


@contextlib.contextmanager
def moto_s3(bucket: str = "bench"):
    """moto's S3 server in its own process on a free loopback port, with ``bucket`` created;
    yields the delta-rs storage options (the same names as the AWS_* environment variables)."""
    import boto3
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        boto3.client("s3", endpoint_url=url, aws_access_key_id="a", aws_secret_access_key="b",
                     region_name="us-east-1").create_bucket(Bucket=bucket)
        yield {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b",
               "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}
    finally:
        moto.terminate()
        moto.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=100_000)
    ap.add_argument("--skip-s3", action="store_true", help="only the local folder")
    args = ap.parse_args()
    lines = ["| lake | what | seconds (whole write_lake: 4 tables) | per table |",
             "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        local = load_settings(None, {"RUNS_ETL_LAKE_URI": f"{tmp}/lake"})
        lines += measure("local folder", local, args.runs)
        if not args.skip_s3:
            with moto_s3() as options:
                s3 = load_settings(None, {"RUNS_ETL_LAKE_URI": "s3://bench/lake"},
                                   {"lake": {"storage_options": options}})
                lines += measure("moto S3 on loopback", s3, args.runs)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
