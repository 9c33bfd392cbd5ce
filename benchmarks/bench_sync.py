"""Benchmark: whole `runs-etl sync` processes vs the fetch floor, start-up, publish cost, and
adaptive concurrency against a rate-limited and a latency-bound simulator.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/bench_sync.py --runs 100000

The simulator runs in its own process (so it does not share our GIL), commanded over a pipe.
Each sync runs as a child process (``python -m runs_etl sync``): its wall time includes
interpreter start-up and imports; its CPU time includes its validation workers', and its peak
memory is the most it and its workers held at once (RSS and PSS, sampled). The
*fetch floor* is
the fastest honest client: bare httpx, every body parsed with orjson, against the same simulator
in the same run, at 4, 8 and the sync's concurrency ceiling; the fastest counts. A lower floor
on httpcore (httpx's transport, without its client layer) shows what the HTTP client costs. The
full sync runs ``--repeat`` times on fresh warehouses and the median counts. Prints a JSON
report and Markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import duckdb
import httpx
import orjson

from runs_etl.config import DEFAULT_CONCURRENCY
from runs_etl.engine.client import ApiClient
from runs_etl.engine.parallel import usable_cpus
from runs_etl.errors import RetryableApiError


def _serve(n_runs: int, faults: dict, conn) -> None:
    from runs_etl.sim import Simulator
    from runs_etl.sim.server import Faults

    sim = Simulator(n_runs, seed=7, faults=Faults(**faults))
    conn.send(sim.start())
    while True:
        cmd, args = conn.recv()
        if cmd == "stop":
            sim.stop()
            conn.send(None)
            return
        if cmd == "stats":
            conn.send({"requests": sim.request_count, "bytes": sim.bytes_sent,
                       "throttled": sim.throttled_count})
            continue
        conn.send(getattr(sim, cmd)(*args))


class SimProcess:
    def __init__(self, n_runs: int, **faults):
        self.conn, child = mp.Pipe()
        self.proc = mp.Process(target=_serve, args=(n_runs, faults, child), daemon=True)
        self.proc.start()
        self.url = self.conn.recv()

    def call(self, cmd: str, *args):
        self.conn.send((cmd, args))
        return self.conn.recv()

    def stop(self) -> None:
        self.call("stop")
        self.proc.join(10)


async def _walk_floor(get, concurrency: int) -> dict:
    """Every page through ``get(page) -> body``, ``concurrency`` at a time, each body parsed
    with orjson: the floor's walk, whatever the HTTP client."""
    first = orjson.loads(await get(1))
    sem = asyncio.Semaphore(concurrency)
    nbytes = [0]

    async def one(p: int) -> int:
        async with sem:
            body = await get(p)
        nbytes[0] += len(body)
        return len(orjson.loads(body)["items"])

    counts = await asyncio.gather(*(one(p) for p in range(2, first["pages"] + 1)))
    return {"runs": len(first["items"]) + sum(counts), "pages": first["pages"],
            "bytes": nbytes[0], "concurrency": concurrency}


async def _fetch_floor(url: str, key: str, concurrency: int, size: int) -> dict:
    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": key}, limits=limits,
                                 timeout=60) as http:
        async def get(p: int) -> bytes:
            return (await http.get("/v1/runs", params={"page": p, "size": size})).content

        out = await _walk_floor(get, concurrency)
    return {"seconds": time.perf_counter() - t0, **out}


async def _fetch_floor_core(url: str, key: str, concurrency: int, size: int) -> dict:
    """The same walk on httpcore, the transport under httpx, without httpx's client layer
    (URL merging, cookies, auth and event hooks, response models): a lower floor than the
    issue's, to show what the HTTP client itself costs."""
    import httpcore

    t0 = time.perf_counter()
    headers = {"X-API-Key": key}
    async with httpcore.AsyncConnectionPool(max_connections=concurrency) as pool:
        async def get(p: int) -> bytes:
            return (await pool.request("GET", f"{url}/v1/runs?page={p}&size={size}",
                                       headers=headers)).content

        out = await _walk_floor(get, concurrency)
    return {"seconds": time.perf_counter() - t0, **out}


async def _client_walk(url: str, pages: int, concurrency: int, adaptive: bool) -> dict:
    """Every page through runs-etl's own ``ApiClient`` (retries, limiter), ``concurrency``
    workers: how the limiter copes with a rate limit or a slow server."""
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": "sim-key"}, timeout=60,
                                 limits=httpx.Limits(max_connections=concurrency)) as http:
        client = ApiClient(http, page_size=100, concurrency=concurrency, adaptive=adaptive,
                           max_attempts=50)
        todo = iter(range(1, pages + 1))
        t0 = time.perf_counter()

        async def worker() -> None:
            for p in todo:
                await client.fetch_page(p)

        gave_up = None
        try:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        except RetryableApiError as e:  # a page lost the race for tokens 50 times in a row
            gave_up = e.page
        return {"seconds": time.perf_counter() - t0, "requests": client.stats.requests,
                "retries": client.stats.retries, "peak_limit": client.limiter.peak,
                "gave_up_on_page": gave_up}


def _wall(*argv: str, env: dict | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "runs_etl", *argv], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _sync(url: str, db: Path, *extra: str, lake_env: dict | None = None) -> dict:
    """One ``runs-etl sync`` in a child process: wall seconds, its own peak RSS, its ledger row,
    what ``publish()`` took and, with ``lake_env`` (RUNS_ETL_LAKE_URI and any AWS_*), what the
    lake write took (the ``published`` and ``lake_written`` events)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNS_ETL_")}
    env.update(RUNS_ETL_API_URL=url, RUNS_ETL_API_KEY="sim-key", RUNS_ETL_DUCKDB_PATH=str(db))
    env.update(lake_env or {})
    config = os.environ.get("RUNS_ETL_BENCH_CONFIG")
    args = ["--config", config] if config else []
    with tempfile.TemporaryFile() as log:
        t0 = time.perf_counter()
        # -v --log-format json: the debug line "published ... in Xs" carries the publish cost
        proc = subprocess.Popen([sys.executable, "-m", "runs_etl", "sync", "-v", "--log-format",
                                 "json", *args, *extra], env=env, stderr=log)
        tree = _TreeRss(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        tree.stop()
        log.seek(0)
        lines = log.read().decode().splitlines()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.stderr.write("\n".join(lines[-5:]) + "\n")
        raise SystemExit(f"sync failed with exit code {proc.returncode}")
    events = [json.loads(line) for line in lines if line.startswith("{")]
    publish = [e["seconds"] for e in events if e.get("event") == "published"]
    lake = [e["seconds"] for e in events if e.get("event") == "lake_written"]
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
    # With validation workers the sync is several processes: the most they held at once.
    out["peak_tree_rss_mb"] = max(tree.peak / 1024, out["peak_rss_mb"])
    out["peak_tree_pss_mb"] = tree.peak_pss / 1024 or None  # None: no worker ran
    out["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    out["publish_seconds"] = publish[0] if publish else None
    out["lake_seconds"] = lake[0] if lake else None
    return out


class _TreeRss:
    """Samples the memory of a process and its children (the sync's validation workers),
    keeping the largest sums (KiB): of their RSS (every 10 ms), and of their PSS (every 100 ms:
    shared pages, such as the libraries every process maps, counted once, so the memory the
    tree really held). ``wait4`` only knows one process at a time."""

    def __init__(self, pid: int):
        self.pid, self.peak, self.peak_pss = pid, 0, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = 0
        while not self._done.wait(0.01):
            tree = [self.pid, *_children(self.pid)]
            self.peak = max(self.peak, sum(_status_kib(p, "VmRSS:") for p in tree))
            # PSS every 100 ms only: reading smaps_rollup walks a process's memory map under
            # its lock, which stalls the process (every 10 ms it slowed the sync measurably).
            n += 1
            if len(tree) > 1 and n % 10 == 0:  # alone, ru_maxrss says it all
                self.peak_pss = max(self.peak_pss, sum(_pss_kib(p) for p in tree))

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
                for c in (task / "children").read_text().split()]
    except OSError:
        return []


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _with_cpu(walk) -> dict:
    """Run a floor's walk; add the CPU seconds this process spent on it. On a shared machine
    wall times wander with the neighbours; CPU time much less, so both are reported."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    out = asyncio.run(walk)
    after = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu_seconds"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return out


def _compile_package() -> None:
    """runs_etl's bytecode, as installing a wheel writes it. An editable install run with
    PYTHONDONTWRITEBYTECODE set (as on this machine) would compile every module again in every
    sync: ~0.1 s of start-up that no deployed cron job pays."""
    import compileall

    import runs_etl

    compileall.compile_dir(Path(runs_etl.__file__).parent, quiet=1)


def _load() -> str:
    """The 1, 5 and 15 minute load averages (the machine is shared: a figure needs its load)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


@contextlib.contextmanager
def _lake(kind: str | None, tmp: Path):
    """The environment that makes each sync write a Delta lake: none, a local folder under
    ``tmp``, or a bucket on moto's S3 server (started here, in its own process)."""
    if kind is None:
        yield {}
    elif kind == "local":
        yield {"RUNS_ETL_LAKE_URI": str(tmp / "lake")}
    else:
        from bench_lake import moto_s3  # benchmarks/ is on sys.path when run as a script

        with moto_s3() as options:
            yield {"RUNS_ETL_LAKE_URI": "s3://bench/lake", **options}


def _import_floor(repeat: int = 5) -> list[float]:
    """Wall seconds of a process that only imports what every sync needs (DuckDB, Arrow with
    Parquet, httpx, pydantic; the imports runs-etl never uses skipped as the command skips
    them): the least any `runs-etl sync` process can take, whatever it syncs."""
    code = ("from runs_etl.unused import skip_unused_imports; skip_unused_imports(); "
            "import duckdb, httpx, pydantic, pyarrow.parquet")
    walls = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        walls.append(time.perf_counter() - t0)
    return walls


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far (the simulator's)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _startup(db: Path) -> dict:
    """Wall seconds of `runs-etl --help` and `runs-etl status` (on the synced warehouse), 3 each."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNS_ETL_")}
    helps = [_wall("--help", env=env) for _ in range(3)]
    status = [_wall("status", "--duckdb-path", str(db), env=env) for _ in range(3)]
    return {"help": helps, "status": status}


def _adaptive(rate_limit: float, latency: float, pages: int) -> dict:
    """The limiter against a token-bucket rate limit and against a slow server."""
    out: dict = {}
    sim = SimProcess(pages * 100, rate_limit=rate_limit)
    try:
        for name, adaptive in (("fixed", False), ("adaptive", True)):
            before = sim.call("stats")["throttled"]
            r = asyncio.run(_client_walk(sim.url, pages, DEFAULT_CONCURRENCY, adaptive))
            r["throttled_429"] = sim.call("stats")["throttled"] - before
            out[f"rate_limited_{name}"] = r
            time.sleep(1.5)  # let the bucket refill, so both start alike
    finally:
        sim.stop()
    sim = SimProcess(pages * 100, latency=latency)
    try:
        out["latency_concurrency_1"] = asyncio.run(_client_walk(sim.url, pages, 1, False))
        out["latency_fixed"] = asyncio.run(
            _client_walk(sim.url, pages, DEFAULT_CONCURRENCY, False))
        out["latency_adaptive"] = asyncio.run(
            _client_walk(sim.url, pages, DEFAULT_CONCURRENCY, True))
    finally:
        sim.stop()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3, help="full syncs (the median counts)")
    ap.add_argument("--change-fraction", type=float, default=0.01)
    ap.add_argument("--only-full", action="store_true", help="skip the incremental syncs")
    ap.add_argument("--skip-adaptive", action="store_true",
                    help="skip the rate-limited and latency-bound client runs")
    ap.add_argument("--rate-limit", type=float, default=40.0, help="requests/s (adaptive runs)")
    ap.add_argument("--latency", type=float, default=0.1, help="seconds (adaptive runs)")
    ap.add_argument("--adaptive-pages", type=int, default=200)
    ap.add_argument("--memory-limit", help="warehouse.memory_limit for the syncs (e.g. 128MB)")
    ap.add_argument("--parse-workers", type=int,
                    help="sync.parse_workers for the syncs (default: runs-etl's, one per CPU)")
    ap.add_argument("--lake", choices=("local", "s3"),
                    help="every sync also writes a Delta lake: a local folder or moto's S3")
    ap.add_argument("--skip-floor", action="store_true", help="no fetch floor (1M: minutes)")
    ap.add_argument("--skip-refresh", action="store_true", help="no full-refresh sync")
    ap.add_argument("--skip-startup", action="store_true", help="no --help / status timings")
    args = ap.parse_args(argv)
    report: dict = {"runs": args.runs, "concurrency_ceiling": DEFAULT_CONCURRENCY}
    _compile_package()
    sim = SimProcess(args.runs)
    try:
        if not args.skip_floor:
            floors = [_with_cpu(_fetch_floor(sim.url, "sim-key", c, 100))
                      for c in sorted({4, 8, DEFAULT_CONCURRENCY})]
            report["fetch_floors"] = floors
            report["fetch_floor"] = min(floors, key=lambda f: f["seconds"])
            report["httpcore_floor"] = _with_cpu(
                _fetch_floor_core(sim.url, "sim-key", report["fetch_floor"]["concurrency"], 100))
        with tempfile.TemporaryDirectory() as tmp, _lake(args.lake, Path(tmp)) as lake_env:
            sync = functools.partial(_sync, sim.url, lake_env=lake_env)
            lines = []
            if args.memory_limit:
                lines.append(f'[warehouse]\nmemory_limit = "{args.memory_limit}"')
            if args.parse_workers is not None:
                lines.append(f"[sync]\nparse_workers = {args.parse_workers}")
            if lines:
                config = Path(tmp) / "bench.toml"
                config.write_text("\n".join(lines) + "\n")
                os.environ["RUNS_ETL_BENCH_CONFIG"] = str(config)
            report["uptime_before"] = _load()
            # Each full sync on a fresh warehouse; the median counts (this machine is shared).
            fulls, paired = [], []
            for i in range(args.repeat):
                db = Path(tmp) / f"bench-{i}.duckdb"
                sim_cpu = _proc_cpu(sim.proc.pid)
                fulls.append(sync(db))
                fulls[-1]["simulator_cpu_seconds"] = _proc_cpu(sim.proc.pid) - sim_cpu
                if "fetch_floor" in report:
                    # The floor again right after: a ratio of two figures taken a few seconds
                    # apart, which the machine's drift over minutes does not skew.
                    floor = _with_cpu(_fetch_floor(sim.url, "sim-key",
                                                   report["fetch_floor"]["concurrency"], 100))
                    fulls[-1]["paired_floor_seconds"] = floor["seconds"]
                    paired.append(round(fulls[-1]["seconds"] / floor["seconds"], 2))
            if paired:
                report["paired_ratios"] = paired
                # What the CPU bound (below) allows against the same floors: the least ratio
                # any spreading of this work over the CPUs could reach.
                report["paired_cpu_bound_ratios"] = [
                    round((f["cpu_seconds"] + f["simulator_cpu_seconds"]) / usable_cpus()
                          / f["paired_floor_seconds"], 2) for f in fulls]
            report["full_syncs"] = [round(f["seconds"], 2) for f in fulls]
            report["full_syncs_peak_rss_mb"] = [round(f["peak_tree_rss_mb"]) for f in fulls]
            report["full_syncs_peak_pss_mb"] = [round(f["peak_tree_pss_mb"] or 0) for f in fulls]
            report["full_sync"] = sorted(fulls, key=lambda f: f["seconds"])[len(fulls) // 2]
            if not args.only_full:
                n = max(1, int(args.runs * args.change_fraction))
                sim.call("add_runs", n // 2)
                sim.call("transition", n - n // 2)
                report["incremental_sync"] = sync(db)
                if not args.skip_refresh:
                    report["full_refresh"] = sync(db, "--full-refresh")
            report["db_mb"] = db.stat().st_size / 2**20
            if not args.skip_startup:
                report["startup"] = _startup(db)
                report["import_floor"] = _import_floor()
            report["uptime_after"] = _load()
    finally:
        sim.stop()
    if not args.skip_adaptive:
        report["adaptive"] = _adaptive(args.rate_limit, args.latency, args.adaptive_pages)
    full = report["full_sync"]
    # The CPUs (simulator and sync share them) do the sync's and the simulator's work in at least
    # this long, however well it is spread over them.
    report["cpus"] = usable_cpus()
    report["full_cpu_bound_seconds"] = (
        (full["cpu_seconds"] + full["simulator_cpu_seconds"]) / report["cpus"])
    if "fetch_floor" in report:
        report["full_vs_floor_wall"] = full["seconds"] / report["fetch_floor"]["seconds"]
        report["full_vs_floor_cpu"] = full["cpu_seconds"] / report["fetch_floor"]["cpu_seconds"]
        report["full_vs_httpcore_floor_wall"] = \
            full["seconds"] / report["httpcore_floor"]["seconds"]
    if full["lake_seconds"] is not None:
        report["lake_share_of_full_without_lake"] = (
            full["lake_seconds"] / (full["seconds"] - full["lake_seconds"]))
    report["publish_share_of_full"] = full["publish_seconds"] / full["seconds"]
    if "incremental_sync" in report:
        inc = report["incremental_sync"]
        report["incremental_bytes_share"] = inc["bytes"] / full["bytes"]
        report["incremental_time_share_wall"] = inc["seconds"] / full["seconds"]
    print(json.dumps(report, indent=2, default=str))
    print(f"\nload before: {report['uptime_before']}; after: {report['uptime_after']}")
    print(f"\n| {args.runs:,} runs | wall s (process) | CPU s | sync s (ledger) | publish s "
          "| lake s | requests | MB transferred | peak RSS MB: all, the sync's own, PSS of all |"
          "\n|---|---|---|---|---|---|---|---|---|")
    for f in report.get("fetch_floors", []):
        print(f"| fetch floor, httpx + orjson, concurrency {f['concurrency']} | "
              f"{f['seconds']:.2f} | {f['cpu_seconds']:.2f} | | | | {f['pages']} | "
              f"{f['bytes'] / 2**20:.1f} | |")
    if "httpcore_floor" in report:
        f = report["httpcore_floor"]
        print(f"| fetch floor, httpcore + orjson, concurrency {f['concurrency']} | "
              f"{f['seconds']:.2f} | {f['cpu_seconds']:.2f} | | | | {f['pages']} | "
              f"{f['bytes'] / 2**20:.1f} | |")
    for name in ("full_sync", "incremental_sync", "full_refresh"):
        if name in report:
            r = report[name]
            lake = "" if r["lake_seconds"] is None else f"{r['lake_seconds']:.2f}"
            print(f"| {name.replace('_', ' ')} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | "
                  f"{r['seconds_total']:.2f} | "
                  f"{r['publish_seconds']:.3f} | {lake} | {r['requests']} | "
                  f"{r['bytes'] / 2**20:.1f} | {r['peak_tree_rss_mb']:.0f}, "
                  f"{r['peak_rss_mb']:.0f}, {r['peak_tree_pss_mb'] or 0:.0f} |")
    print(f"\npublish / full sync (wall): {report['publish_share_of_full']:.2%}")
    if "lake_share_of_full_without_lake" in report:
        print("lake write / rest of the full sync (wall): "
              f"{report['lake_share_of_full_without_lake']:.1%}")
    if "full_vs_floor_wall" in report:
        print(f"full sync / floor (wall): {report['full_vs_floor_wall']:.2f}x "
              f"(median of {report['full_syncs']} s; peak RSS "
              f"{report['full_syncs_peak_rss_mb']} MB, PSS "
              f"{report['full_syncs_peak_pss_mb']} MB); / httpcore floor: "
              f"{report['full_vs_httpcore_floor_wall']:.2f}x; CPU: "
              f"{report['full_vs_floor_cpu']:.2f}x the floor's")
    if "paired_ratios" in report:
        pairs = report["paired_ratios"]
        print(f"each full sync / the floor run right after it: {pairs} (median "
              f"{sorted(pairs)[len(pairs) // 2]:.2f}x)")
    print(f"full sync's CPU bound: ({full['cpu_seconds']:.2f} s of the sync + "
          f"{full['simulator_cpu_seconds']:.2f} s of the simulator) / {report['cpus']} CPUs = "
          f"{report['full_cpu_bound_seconds']:.2f} s (the median sync's; each sync's bound / "
          f"the floor run right after it: {report.get('paired_cpu_bound_ratios', 'no floor')})")
    if "incremental_time_share_wall" in report:
        print(f"incremental / full (wall): {report['incremental_time_share_wall']:.1%}")
    if "import_floor" in report:
        imports = sorted(report["import_floor"])[len(report["import_floor"]) // 2]
        print(f"import floor (a process importing duckdb, pyarrow.parquet, httpx, pydantic): "
              f"{min(report['import_floor']):.2f}-{max(report['import_floor']):.2f} s, median "
              f"{imports:.2f} s = {imports / full['seconds']:.1%} of the full sync")
    if "startup" in report:
        st = report["startup"]
        print(f"--help: {min(st['help']):.2f}-{max(st['help']):.2f} s; "
              f"status: {min(st['status']):.2f}-{max(st['status']):.2f} s")
    if "adaptive" in report:
        print(f"\n| client, {args.adaptive_pages} pages | seconds | 429s | retries | peak limit |"
              "\n|---|---|---|---|---|")
        for name, r in report["adaptive"].items():
            failed = "" if r["gave_up_on_page"] is None else \
                f" (gave up: page {r['gave_up_on_page']} answered 429 50 times)"
            print(f"| {name.replace('_', ' ')}{failed} | {r['seconds']:.2f} | "
                  f"{r.get('throttled_429', '')} | {r['retries']} | {r['peak_limit']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
