"""``runs-etl demo``: the whole job against the built-in simulator, no account, no network."""

from __future__ import annotations

from pathlib import Path

from .config import load_settings
from .engine.sync import summary_line
from .jobs import run_sync
from .outputs.report import write_report
from .sim import Simulator
from .warehouse.publish import remove_warehouse

DEMO_SEED = 42

QUERIES = [
    ("Runs per day and status, last week",
     "SELECT * FROM status_daily WHERE created_date >= current_date - 7 "
     "ORDER BY created_date DESC, runs DESC;"),
    ("Slowest workflows (p95 seconds) and how often they fail",
     "SELECT workflow_name, runs, failure_rate, p50_seconds, p95_seconds "
     "FROM workflow_duration_stats ORDER BY p95_seconds DESC NULLS LAST;"),
    ("Runs that look stuck",
     "SELECT run_id, workflow_name, status, age_seconds / 3600 AS hours "
     "FROM stuck_runs ORDER BY age_seconds DESC;"),
]


def run_demo(*, runs: int, out_dir: Path, quiet: bool = False) -> int:
    """Serve ``runs`` simulated runs on loopback, sync them, let the source move, sync again
    (incrementally), then export Parquet, write the report and say what to try."""
    out_dir = Path(out_dir)
    db = out_dir / "runs.duckdb"
    remove_warehouse(db)  # each demo starts from scratch
    with Simulator(runs, seed=DEMO_SEED) as sim:
        settings = load_settings(None, {}, {
            "api": {"url": sim.base_url, "key": sim.api_key},
            "warehouse": {"duckdb_path": db},
            "export": {"parquet_dir": out_dir / "parquet"},
        })
        print(f"Simulator serving {runs:,} runs at {sim.base_url} (no account, no network)\n")
        first = run_sync(settings, quiet=quiet)
        print(summary_line(first))
        # The source moves on: new runs arrive, open ones finish, a few vanish.
        sim.delete(ids=sorted(sim.open_ids())[:3])
        sim.add_runs(max(1, runs // 200))
        sim.transition(max(1, runs // 400))
        second = run_sync(settings, quiet=quiet)
        print(summary_line(second))
    report = write_report(settings)
    db = db.resolve()
    print(f"\nSynced {first.runs_seen:,} runs in {first.seconds_total:.1f}s "
          f"({first.runs_seen / max(first.seconds_total, 1e-9):,.0f} runs/s); the incremental "
          f"re-sync after changes took {second.seconds_total:.2f}s and "
          f"{second.requests} requests instead of {first.requests}.")
    print(f"  warehouse: {db}")
    print(f"  parquet:   {(out_dir / 'parquet' / 'current').absolute()}")
    print(f"  report:    {report.resolve()}")
    print(f"\nTry these in `duckdb -readonly {db}` (or python -c \"import duckdb; "
          f"print(duckdb.connect('{db}', read_only=True).sql('...'))\"):")
    for title, sql in QUERIES:
        print(f"\n  -- {title}\n  {sql}")
    return 0
