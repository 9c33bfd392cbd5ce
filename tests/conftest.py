"""Shared fixtures: a simulator on loopback and settings pointing a real DuckDB file at it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runs_etl.config import Settings, load_settings


@pytest.fixture
def make_sim():
    """Start simulators (``make_sim(n_runs, **kw)``) and stop them after the test."""
    from runs_etl.sim import Simulator

    started = []

    def factory(n_runs: int = 500, **kw):
        sim = Simulator(n_runs, **kw)
        sim.start()
        started.append(sim)
        return sim

    yield factory
    for sim in started:
        sim.stop()


@pytest.fixture
def sim_env(tmp_path: Path):
    """Environment for a CLI run against ``sim``: key, URL and a DuckDB file in tmp_path."""

    def env_for(sim, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUNS_ETL_")}
        env.update({
            "RUNS_ETL_API_URL": sim.base_url,
            "RUNS_ETL_API_KEY": sim.api_key,
            "RUNS_ETL_DUCKDB_PATH": str(tmp_path / "runs.duckdb"),
        })
        env.update(extra)
        return env

    return env_for


def settings_for(sim, db: Path, **sections) -> Settings:
    """Settings for an in-process sync against ``sim`` (sections: {"sync": {...}} overrides)."""
    env = {"RUNS_ETL_API_URL": sim.base_url, "RUNS_ETL_API_KEY": sim.api_key,
           "RUNS_ETL_DUCKDB_PATH": str(db)}
    return load_settings(None, env, sections, cwd=db.parent)
