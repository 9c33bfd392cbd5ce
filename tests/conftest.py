"""Shared fixtures: simulators on loopback, a CLI run in process, child processes and held
requests. Fixtures only; the helpers they use are in ``helpers.py``."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest
from helpers import LOGGERS, Gate, Proc

from runs_etl import cli


@pytest.fixture(autouse=True)
def _restore_logging():
    """``main()`` configures logging for a process; give every test a clean slate and put
    things back afterwards, so records reach ``caplog`` / ``capsys`` of the next test."""
    root = logging.getLogger()
    saved = {n: (lg.handlers[:], lg.level, lg.propagate)
             for n in LOGGERS for lg in [logging.getLogger(n)]}
    saved_root = (root.handlers[:], root.level)
    for n in LOGGERS:
        lg = logging.getLogger(n)
        lg.handlers[:], lg.propagate = [], True
        lg.setLevel(logging.NOTSET)
    yield
    for n, (handlers, level, propagate) in saved.items():
        lg = logging.getLogger(n)
        lg.handlers[:], lg.propagate = handlers, propagate
        lg.setLevel(level)
    root.handlers[:] = saved_root[0]
    root.setLevel(saved_root[1])


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


@pytest.fixture
def run_cli(monkeypatch, tmp_path, capsys, sim_env):
    """``run_cli(sim, *args, **env)`` -> (exit code, stdout, stderr) of ``runs-etl`` in process,
    with ``sim_env``'s environment (warehouse: tmp_path / runs.duckdb; ``sim`` may be None)."""
    monkeypatch.chdir(tmp_path)  # no stray ./runs-etl.toml

    def run(sim, *args: str, **env: str):
        for k in [k for k in os.environ if k.startswith("RUNS_ETL_")]:
            monkeypatch.delenv(k)
        base = sim_env(sim) if sim is not None else {
            "RUNS_ETL_DUCKDB_PATH": str(tmp_path / "runs.duckdb")}
        for k, v in {**base, **env}.items():
            if k.startswith("RUNS_ETL_"):
                monkeypatch.setenv(k, v)
        capsys.readouterr()
        code = cli.main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def procs(tmp_path):
    """Start child processes (``procs.cli(args, env)``, ``procs.python(code, env)``); all are
    killed at teardown, whatever the test did."""
    started: list[Proc] = []

    class Starter:
        @staticmethod
        def cli(args: list[str], env: dict) -> Proc:
            started.append(Proc([sys.executable, "-m", "runs_etl", *args], env, tmp_path))
            return started[-1]

        @staticmethod
        def python(code: str, env: dict | None = None) -> Proc:
            started.append(Proc([sys.executable, "-c", code], env, tmp_path))
            return started[-1]

    yield Starter
    for p in started:
        if p.popen.poll() is None:
            p.popen.kill()
        p.finish(10)


@pytest.fixture
def gate(make_sim):
    """``gate(sim)`` holds the sim's next list request until ``.open()``: a sync stays in flight."""
    gates = []

    def factory(sim) -> Gate:
        gates.append(Gate(sim, sim.list_request_count + 1))
        return gates[-1]

    yield factory
    for g in gates:  # before the simulator stops, or its server waits on the held request
        g.open()
