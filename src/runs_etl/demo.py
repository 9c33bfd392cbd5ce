"""``runs-etl demo``: the whole job against the built-in simulator, no account, no network."""

from __future__ import annotations

import tempfile
from contextlib import ExitStack
from pathlib import Path

import duckdb

from .config import Settings, load_settings
from .engine.sync import summary_line
from .jobs import run_sync, run_syncs
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


def run_demo(*, runs: int, out_dir: Path, quiet: bool = False, workspaces: int = 1) -> int:
    """Serve ``runs`` simulated runs on loopback, sync them, let the source move, sync again
    (incrementally), then export Parquet, write the report and say what to try. With several
    ``workspaces``, each is its own simulator (own key and data), synced into one warehouse."""
    if workspaces > 1:
        return run_demo_workspaces(runs=runs, out_dir=Path(out_dir), quiet=quiet, n=workspaces)
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


def _workspace_settings(sims: dict, db: Path, parquet: Path, tmp: Path) -> Settings:
    """``[[workspaces]]`` settings for the simulators, through a config file as a user would
    write one (keys from environment variables, never in the file)."""
    config = tmp / "runs-etl.toml"
    config.write_text("".join(
        f'[[workspaces]]\nname = "{name}"\napi_url = "{sim.base_url}"\n'
        f'key_env = "RUNS_ETL_DEMO_KEY_{i}"\n\n' for i, (name, sim) in enumerate(sims.items())),
        encoding="utf-8")
    env = {f"RUNS_ETL_DEMO_KEY_{i}": sim.api_key for i, sim in enumerate(sims.values())}
    return load_settings(config, env, {"warehouse": {"duckdb_path": db},
                                       "export": {"parquet_dir": parquet}})


def run_demo_workspaces(*, runs: int, out_dir: Path, quiet: bool, n: int) -> int:
    """``n`` simulated workspaces (own key, own seed, overlapping run ids are possible) synced
    by one ``run_syncs`` into one warehouse, then compared side by side."""
    db = out_dir / "runs.duckdb"
    remove_warehouse(db)
    with ExitStack() as stack:
        sims = {f"ws{i + 1}": stack.enter_context(
            Simulator(runs, seed=DEMO_SEED + i, api_key=f"demo-key-ws{i + 1}")) for i in range(n)}
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        settings = _workspace_settings(sims, db, out_dir / "parquet", tmp)
        print(f"{n} simulators serving {runs:,} runs each, one key each (no account, no "
              "network):")
        for name, sim in sims.items():
            print(f"  {name}: {sim.base_url}")
        print()
        for outcome in run_syncs(settings, quiet=quiet):
            print(f"{outcome.workspace}: {summary_line(outcome.result)}")
        for sim in sims.values():  # each source moves on its own
            sim.add_runs(max(1, runs // 200))
            sim.transition(max(1, runs // 400))
        for outcome in run_syncs(settings, quiet=quiet):
            print(f"{outcome.workspace}: {summary_line(outcome.result)}")
    report = write_report(settings)
    db = db.resolve()
    print("\nSide by side:")
    with duckdb.connect(str(db), read_only=True) as con:
        print(con.sql(SIDE_BY_SIDE))
    print(f"  warehouse: {db}")
    print(f"  parquet:   {(out_dir / 'parquet' / 'current').absolute()} (runs/workspace=<name>/)")
    print(f"  report:    {report.resolve()} (all workspaces, then one section each)")
    print(f"\nTry in `duckdb -readonly {db}`:\n  {SIDE_BY_SIDE}")
    return 0


SIDE_BY_SIDE = ("SELECT workspace, count(*) AS runs, "
                "count(*) FILTER (status = 'failed') AS failed, "
                "round(avg(duration_seconds), 1) AS avg_seconds, max(created_at) AS newest "
                "FROM run_facts GROUP BY workspace ORDER BY workspace;")
