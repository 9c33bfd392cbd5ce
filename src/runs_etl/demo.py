"""``runs-etl demo``: the whole job against the built-in simulator, no account, no network."""

from __future__ import annotations

from pathlib import Path

from .config import load_settings
from .feedback import summary_line
from .sim import Simulator

DEMO_SEED = 42

QUERIES = [
    ("Runs per day and status, last week",
     "SELECT * FROM status_daily WHERE day >= current_date - 7 ORDER BY day DESC, runs DESC;"),
    ("Slowest workflows (p95 seconds)",
     "SELECT workflow_name, runs, failure_rate, p50_seconds, p95_seconds "
     "FROM workflow_duration_stats ORDER BY p95_seconds DESC NULLS LAST;"),
    ("Runs that look stuck",
     "SELECT id, workflow_name, status, age_seconds FROM stuck_runs ORDER BY age_seconds DESC;"),
]


def run_demo(*, runs: int, out_dir: Path, quiet: bool = False) -> int:
    """Serve ``runs`` simulated runs on loopback, sync them, export, report, and say what to try."""
    from .cli import run_sync  # the same path cron and the scheduler take

    out_dir = Path(out_dir)
    with Simulator(runs, seed=DEMO_SEED) as sim:
        settings = load_settings(None, {}, {
            "api": {"url": sim.base_url, "key": sim.api_key},
            "warehouse": {"duckdb_path": out_dir / "runs.duckdb"},
            "export": {"parquet_dir": out_dir / "parquet"},
        })
        print(f"Simulator serving {runs:,} runs at {sim.base_url} (no account, no network)")
        result = run_sync(settings, quiet=quiet)
    db = settings.warehouse.duckdb_path.resolve()
    print(summary_line(result))
    print(f"\nSynced {result.runs_seen:,} runs in {result.seconds_total:.1f}s "
          f"({result.runs_seen / max(result.seconds_total, 1e-9):,.0f} runs/s) into {db}")
    print("\nTry these (e.g. `duckdb " + str(db) + "` or python -c 'import duckdb; ...'):")
    for title, sql in QUERIES:
        print(f"\n  -- {title}\n  {sql}")
    return 0
