"""The fault matrix of issue 9: the real CLI against a hostile or broken server on loopback.

Every scenario starts from a warehouse with one good commit, runs ``runs-etl sync`` against a
``faultserver`` that misbehaves one way, and ends in what the README promises: the exit code,
exactly one ``Error:`` line, no traceback, the API key in no output and no table, and, for a
failure, the warehouse equal to its previous commit. Scenarios whose data is fine but odd (a
deeply nested record, a nonsense total) must land the data instead.
"""

from __future__ import annotations

import json

import pytest
from fakeapi import API_KEY, make_run, make_runs
from faultserver import HOSTILE, FaultServer, Reply, bad_gzip, json_reply, page, redirect
from helpers import DATA_TABLES, dump_tables, error_line, ledger

from runs_etl.errors import EXIT_AUTH, EXIT_FAILURE, EXIT_OK

RUNS = make_runs(5)
CONFIG = """
[api]
max_attempts = 2
backoff_base = 0
request_deadline = 0.5
max_response_bytes = 100000

[sync]
max_reject_fraction = 0.5  # one poison record among six still lands the page
"""


def nested(depth: int) -> dict:
    value: dict = {"leaf": True}
    for _ in range(depth):
        value = {"a": value}
    return value


POISON = make_run(5, input=nested(300))  # beyond what the validator's JSON parser takes

# id, the server's answer to every request, exit code, a phrase of the Error: line (None: none)
SCENARIOS = [
    pytest.param(lambda: redirect("http://127.0.0.1:9/v1/runs"), EXIT_FAILURE,
                 "another origin", id="redirect-to-another-origin"),
    pytest.param(lambda: Reply(200, page(30).body, {"Content-Type": "application/json"},
                               byte_delay=0.05), EXIT_FAILURE, "no complete response",
                 id="trickle-beyond-the-deadline"),
    pytest.param(bad_gzip, EXIT_FAILURE, "undecodable body", id="bad-gzip-forever"),
    pytest.param(lambda: Reply(200, b"[" + b"0," * 100_000 + b"0]"), EXIT_FAILURE,
                 "max_response_bytes", id="huge-body"),
    pytest.param(lambda: json_reply({"detail": HOSTILE}, 400), EXIT_FAILURE,
                 "everything is fine", id="400-hostile-detail"),
    pytest.param(lambda: json_reply({"detail": "invalid key"}, 401), EXIT_AUTH, "401",
                 id="401"),
    pytest.param(lambda: page(runs=[*RUNS, POISON]), EXIT_OK, None, id="deep-nesting-lands"),
    pytest.param(lambda: page(runs=RUNS, total=-5), EXIT_OK, None, id="negative-total"),
]


@pytest.mark.parametrize(("fault", "exit_code", "says"), SCENARIOS)
def test_a_faulty_server_ends_in_the_promised_state(run_cli, tmp_path, fault, exit_code, says):
    db = tmp_path / "runs.duckdb"
    config = tmp_path / "runs-etl.toml"
    config.write_text(CONFIG)
    answer = [page(runs=RUNS)]  # the good commit first
    with FaultServer(lambda r: answer[0]) as api:
        env = {"RUNS_ETL_API_URL": api.url, "RUNS_ETL_API_KEY": API_KEY}
        code, _, err = run_cli(None, "sync", "-q", "--config", str(config), **env)
        assert code == EXIT_OK, err
        before = dump_tables(db)
        answer[0] = fault()
        code, out, err = run_cli(None, "sync", "--config", str(config), **env)
    assert code == exit_code, err
    assert "Traceback" not in out + err
    tables = dump_tables(db, (*DATA_TABLES, "sync_runs"))
    assert API_KEY not in out + err + json.dumps(tables), "the API key leaked"
    assert "\x1b" not in out + err and "\u202e" not in out + err
    outcomes = [r["outcome"] for r in ledger(db)]
    if says is not None:
        assert says in error_line(err)
        assert dump_tables(db) == before  # the previous commit, nothing of this sync
        assert outcomes == ["success", "failed"]
        return
    assert not [line for line in err.splitlines() if line.startswith("Error:")], err
    assert outcomes == ["success", "success"]
    after = dump_tables(db)
    assert after["runs"] == before["runs"]  # nothing lost, nothing deleted
    last = ledger(db)[-1]
    if POISON["id"] in json.dumps(after["rejected_records"]):  # deep nesting
        assert last["verified"]  # 5 runs + 1 rejected record = the total
    else:  # a total of -5 verifies nothing
        assert not last["verified"] and "not verified" in err
