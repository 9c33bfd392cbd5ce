"""Benchmark: full and incremental sync of N simulated runs vs the fetch floor.

    .venv/bin/python benchmarks/bench_sync.py --runs 100000

The simulator runs in its own process (so it does not share our GIL), commanded over a pipe.
Each sync runs as a child process (``python -m runs_etl sync``) so its peak RSS is its own.
The *fetch floor* is a bare httpx client fetching and ``json.loads``-ing every page with the same
concurrency: what any tool must at least spend. Prints a JSON report and a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import httpx


def _serve(n_runs: int, conn) -> None:
    from runs_etl.sim import Simulator

    sim = Simulator(n_runs, seed=7)
    conn.send(sim.start())
    while True:
        cmd, args = conn.recv()
        if cmd == "stop":
            sim.stop()
            conn.send(None)
            return
        if cmd == "stats":
            conn.send({"requests": sim.request_count, "bytes": sim.bytes_sent})
            continue
        conn.send(getattr(sim, cmd)(*args))


class SimProcess:
    def __init__(self, n_runs: int):
        self.conn, child = mp.Pipe()
        self.proc = mp.Process(target=_serve, args=(n_runs, child), daemon=True)
        self.proc.start()
        self.url = self.conn.recv()

    def call(self, cmd: str, *args):
        self.conn.send((cmd, args))
        return self.conn.recv()

    def stop(self) -> None:
        self.call("stop")
        self.proc.join(10)


async def _fetch_floor(url: str, key: str, concurrency: int, size: int) -> dict:
    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": key}, limits=limits,
                                 timeout=60) as http:
        first = (await http.get("/v1/runs", params={"page": 1, "size": size})).json()
        pages = first["pages"]
        sem = asyncio.Semaphore(concurrency)
        nbytes = [0]

        async def one(p: int) -> int:
            async with sem:
                r = await http.get("/v1/runs", params={"page": p, "size": size})
            nbytes[0] += len(r.content)
            return len(json.loads(r.content)["items"])

        counts = await asyncio.gather(*(one(p) for p in range(2, pages + 1)))
    runs = len(first["items"]) + sum(counts)
    return {"seconds": time.perf_counter() - t0, "runs": runs, "pages": pages,
            "bytes": nbytes[0]}


def _sync(url: str, db: Path, *extra: str) -> dict:
    """One ``runs-etl sync`` in a child process: wall seconds, its own peak RSS, its ledger row."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNS_ETL_")}
    env.update(RUNS_ETL_API_URL=url, RUNS_ETL_API_KEY="sim-key", RUNS_ETL_DUCKDB_PATH=str(db),
               RUNS_ETL_LOG_LEVEL="warning")
    t0 = time.perf_counter()
    config = os.environ.get("RUNS_ETL_BENCH_CONFIG")
    args = ["--config", config] if config else []
    proc = subprocess.Popen([sys.executable, "-m", "runs_etl", "sync", "--quiet", *args, *extra],
                            env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"sync failed with exit code {proc.returncode}")
    con = duckdb.connect(str(db), read_only=True)
    keys = ["mode", "pages", "requests", "single_run_requests", "bytes", "runs_seen",
            "rows_new", "rows_updated", "rows_unchanged", "rows_deleted", "seconds_extract",
            "seconds_load", "seconds_total"]
    row = con.execute(f"SELECT {', '.join(keys)} FROM sync_runs "
                      "ORDER BY sync_id DESC LIMIT 1").fetchall()[0]
    con.close()
    out = dict(zip(keys, row))
    out["seconds"] = seconds  # process wall time, Python start-up and imports included
    out["peak_rss_mb"] = usage.ru_maxrss / 1024
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100_000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--change-fraction", type=float, default=0.01)
    ap.add_argument("--only-full", action="store_true", help="skip the incremental syncs")
    ap.add_argument("--memory-limit", help="warehouse.memory_limit for the syncs (e.g. 128MB)")
    args = ap.parse_args(argv)
    sim = SimProcess(args.runs)
    report: dict = {"runs": args.runs, "concurrency": args.concurrency}
    try:
        floors = [asyncio.run(_fetch_floor(sim.url, "sim-key", args.concurrency, 100))
                  for _ in range(2)]
        report["fetch_floor"] = min(floors, key=lambda f: f["seconds"])
        with tempfile.TemporaryDirectory() as tmp:
            db = Path(tmp) / "bench.duckdb"
            if args.memory_limit:
                config = Path(tmp) / "bench.toml"
                config.write_text(f'[warehouse]\nmemory_limit = "{args.memory_limit}"\n')
                os.environ["RUNS_ETL_BENCH_CONFIG"] = str(config)
            report["full_sync"] = _sync(sim.url, db)
            if not args.only_full:
                n = max(1, int(args.runs * args.change_fraction))
                sim.call("add_runs", n // 2)
                sim.call("transition", n - n // 2)
                report["incremental_sync"] = _sync(sim.url, db)
                report["full_refresh"] = _sync(sim.url, db, "--full-refresh")
            report["db_mb"] = db.stat().st_size / 2**20
    finally:
        sim.stop()
    floor, full = report["fetch_floor"], report["full_sync"]
    report["full_vs_floor_wall"] = full["seconds"] / floor["seconds"]
    report["full_vs_floor_sync"] = full["seconds_total"] / floor["seconds"]
    if "incremental_sync" in report:
        inc = report["incremental_sync"]
        report["incremental_bytes_share"] = inc["bytes"] / full["bytes"]
        report["incremental_time_share_sync"] = inc["seconds_total"] / full["seconds_total"]
        report["incremental_time_share_wall"] = inc["seconds"] / full["seconds"]
    print(json.dumps(report, indent=2, default=str))
    print(f"\n| {args.runs:,} runs | wall s (process) | sync s (ledger) | runs/s | requests "
          "| MB transferred | peak RSS MB |\n|---|---|---|---|---|---|---|")
    print(f"| fetch floor (bare httpx + json.loads) | {floor['seconds']:.2f} | | "
          f"{floor['runs'] / floor['seconds']:,.0f} | {floor['pages']} | "
          f"{floor['bytes'] / 2**20:.1f} | |")
    for name in ("full_sync", "incremental_sync", "full_refresh"):
        if name not in report:
            continue
        r = report[name]
        print(f"| {name.replace('_', ' ')} | {r['seconds']:.2f} | {r['seconds_total']:.2f} | "
              f"{r['runs_seen'] / r['seconds_total']:,.0f} | {r['requests']} | "
              f"{r['bytes'] / 2**20:.1f} | {r['peak_rss_mb']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
