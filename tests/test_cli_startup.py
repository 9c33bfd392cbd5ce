"""Start-up of the command line: `--help` and argument errors answer without loading the heavy
libraries (cron and shells pay start-up on every call; see README "Performance")."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("duckdb", "pyarrow", "pydantic", "pydantic_core", "httpx", "rich", "apscheduler")

_PROBE = f"""
import sys

import pytest
import runs_etl.cli
try:
    runs_etl.cli.main(sys.argv[1:])
except SystemExit:
    pass
print(sorted(m for m in sys.modules if m.split('.')[0] in {set(HEAVY)!r}))
"""


def _heavy_modules_after(*argv: str) -> str:
    out = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True,
                         check=True, timeout=60)
    return out.stdout.strip().splitlines()[-1]


def test_help_imports_no_heavy_library():
    assert _heavy_modules_after("--help") == "[]"


def test_subcommand_help_imports_no_heavy_library():
    for command in ("sync", "status", "export", "report", "schedule", "demo"):
        assert _heavy_modules_after(command, "--help") == "[]", command


def test_python_m_help_works_and_lists_commands():
    out = subprocess.run([sys.executable, "-m", "runs_etl", "--help"], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    assert "sync" in out and "status" in out


_SYNC_PROBE = """
import sys

import pytest
from runs_etl.cli import run
sys.argv = ["runs-etl", "sync", "-q"]
code = run()
unused = {"pandas", "numpy", "rich", "deltalake"}
print(code, sorted({m.split(".")[0] for m in sys.modules} & unused), "httpx._main" in sys.modules)
"""


def test_a_sync_under_cron_loads_no_library_it_does_not_use(make_sim, sim_env):
    """pandas and numpy (pulled in by pyarrow when installed, as here), httpx's own command line,
    rich without a terminal and deltalake without a lake cost every cron run time and memory."""
    sim = make_sim(300)
    out = subprocess.run([sys.executable, "-c", _SYNC_PROBE], capture_output=True, text=True,
                         env=sim_env(sim), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "[]", "False"]
