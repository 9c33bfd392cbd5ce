"""Start-up of the command line: `--help` and argument errors answer without loading the heavy
libraries (cron and shells pay start-up on every call; see README "Performance")."""

from __future__ import annotations

import json
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


def _buffered(env: dict[str, str]) -> dict[str, str]:
    """Output buffered as under cron (this machine's PYTHONUNBUFFERED would hide a lost
    buffer)."""
    return {k: v for k, v in env.items() if k != "PYTHONUNBUFFERED"}


def test_the_command_leaves_fast_with_its_output_flushed_and_its_exit_code(make_sim, sim_env,
                                                                          tmp_path):
    """`runs-etl` ends with os._exit (no interpreter teardown): the summary line, the JSON on
    stdout, the committed warehouse and a failure's exit code must all survive it."""
    sim = make_sim(300)
    env = _buffered(sim_env(sim))
    sync = subprocess.run([sys.executable, "-m", "runs_etl", "sync", "--log-format", "json"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert sync.returncode == 0, sync.stderr
    events = [json.loads(line) for line in sync.stderr.splitlines() if line.startswith("{")]
    assert [e["event"] for e in events if e.get("event") == "sync_finished"] == ["sync_finished"]
    status = subprocess.run([sys.executable, "-m", "runs_etl", "status", "--json"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["rows"]["runs_live"] == 300  # every byte of it, parseable
    broken = subprocess.run([sys.executable, "-m", "runs_etl", "status", "--duckdb-path",
                             str(tmp_path / "absent.duckdb")],
                            capture_output=True, text=True, env=env, timeout=60)
    assert broken.returncode != 0
    assert broken.stderr.startswith("Error: ") and len(broken.stderr.splitlines()) == 1


def test_a_reader_that_stops_early_gets_no_traceback(make_sim, sim_env):
    """`runs-etl status | head -1`: the rest of the output has nowhere to go; that is not an
    error worth a traceback, and the fast exit must not turn it into one."""
    sim = make_sim(300)
    env = _buffered(sim_env(sim))
    subprocess.run([sys.executable, "-m", "runs_etl", "sync", "-q"], env=env, check=True,
                   timeout=120)
    proc = subprocess.Popen([sys.executable, "-m", "runs_etl", "status"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith("Warehouse ")
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(60)
    assert "Traceback" not in err and "Exception ignored" not in err, err


def test_output_to_a_full_disk_is_one_error_line_and_a_failure(make_sim, sim_env):
    """`runs-etl status > file` on a full disk (/dev/full): the output is lost, which must not
    look like success, and says so once, buffered (cron) or not."""
    sim = make_sim(300)
    env = sim_env(sim)
    subprocess.run([sys.executable, "-m", "runs_etl", "sync", "-q"], env=env, check=True,
                   timeout=120)
    for run_env in (env, _buffered(env)):
        for args in (["status", "--json"], ["status"]):
            # r+, not w: where /dev/full is missing, "w" would create a file that every
            # later run then writes to without error
            with open("/dev/full", "r+") as full:
                out = subprocess.run([sys.executable, "-m", "runs_etl", *args], env=run_env,
                                     stdout=full, stderr=subprocess.PIPE, text=True, timeout=60)
            assert out.returncode == 1, (args, out.stderr)
            assert out.stderr == "Error: cannot write the output: No space left on device\n"
