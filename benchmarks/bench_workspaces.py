"""Benchmark (issue 11): two workspaces of N runs each in one `runs-etl sync`, against one.

    .venv/bin/python benchmarks/bench_workspaces.py --runs 100000 --repeat 2

Each workspace has its own simulator, started as its own process with the command line
(``python -m runs_etl.sim --runs N --seed S --api-key K``), and its own ``[[workspaces]]``
entry (name, api_url, key_env). The single-workspace sync uses the same kind of config with one
entry and the first simulator. Each sync is a whole ``runs-etl sync`` process into a new
warehouse: wall time (start-up included) and its own peak RSS (``wait4``). Prints a JSON report
and a Markdown table; the target is two workspaces in well under twice the time of one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def start_sim(runs: int, seed: int, key: str, latency: float = 0.0
              ) -> tuple[subprocess.Popen, str]:
    """A simulator process on a free loopback port; returns it and its base URL."""
    proc = subprocess.Popen([sys.executable, "-m", "runs_etl.sim", "--runs", str(runs),
                             "--seed", str(seed), "--api-key", key, "--port", "0",
                             "--latency", str(latency)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # "SIM_URL=..." once it listens (after generating the runs)
    if not line.startswith("SIM_URL="):
        proc.kill()
        raise SystemExit(f"simulator did not start: {line!r}")
    return proc, line.strip().removeprefix("SIM_URL=")


def write_config(path: Path, workspaces: list[tuple[str, str, str]]) -> Path:
    """A config with one ``[[workspaces]]`` entry per (name, api_url, key_env)."""
    path.write_text("".join(f'[[workspaces]]\nname = "{name}"\napi_url = "{url}"\n'
                            f'key_env = "{key_env}"\n' for name, url, key_env in workspaces))
    return path


def timed_sync(config: Path, db: Path, env: dict) -> dict:
    """One ``runs-etl sync`` process: wall and CPU seconds, its own peak RSS, the load averages
    before and after (the machine is shared)."""
    before = _load()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "runs_etl", "sync", "--quiet", "--config",
                             str(config), "--duckdb-path", str(db)], env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"sync failed with exit code {os.waitstatus_to_exitcode(status)}")
    # CPU seconds near the wall seconds: the sync process is bound by its one interpreter (GIL)
    return {"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": usage.ru_maxrss / 1024,
            "load": f"{before} / {_load()}"}


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100_000, help="runs per workspace")
    ap.add_argument("--repeat", type=int, default=1, help="one, then two workspaces, this often")
    ap.add_argument("--latency", type=float, default=0.0,
                    help="seconds each simulator adds per request: a real API is slower than "
                         "loopback, and then the workspaces' walks overlap")
    args = ap.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNS_ETL_")}
    env.update(BENCH_KEY_A="key-a", BENCH_KEY_B="key-b")
    sims = [start_sim(args.runs, 1, "key-a", args.latency),
            start_sim(args.runs, 2, "key-b", args.latency)]
    (_, url_a), (_, url_b) = sims
    report: dict = {"runs_per_workspace": args.runs, "latency": args.latency, "one": [],
                    "two": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            one = write_config(Path(tmp) / "one.toml", [("a", url_a, "BENCH_KEY_A")])
            two = write_config(Path(tmp) / "two.toml", [("a", url_a, "BENCH_KEY_A"),
                                                        ("b", url_b, "BENCH_KEY_B")])
            for i in range(args.repeat):
                report["one"].append(timed_sync(one, Path(tmp) / f"one{i}.duckdb", env))
                report["two"].append(timed_sync(two, Path(tmp) / f"two{i}.duckdb", env))
    finally:
        for proc, _ in sims:
            proc.terminate()
            proc.wait(10)
    print(json.dumps(report, indent=2))
    print(f"\n| {args.runs:,} runs per workspace | wall s | two / one | sync CPU s "
          "| peak RSS MB | load before / after |\n|---|---|---|---|---|---|")
    for i, (a, b) in enumerate(zip(report["one"], report["two"]), 1):
        print(f"| one workspace (round {i}) | {a['seconds']:.2f} | | {a['cpu_seconds']:.1f} "
              f"| {a['peak_rss_mb']:.0f} | {a['load']} |")
        print(f"| two workspaces (round {i}) | {b['seconds']:.2f} | "
              f"{b['seconds'] / a['seconds']:.2f}x | {b['cpu_seconds']:.1f} "
              f"| {b['peak_rss_mb']:.0f} | {b['load']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
