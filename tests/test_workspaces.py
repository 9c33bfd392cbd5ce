"""Several workspaces in one warehouse (config.py ``[[workspaces]]``, engine/sync.py
``sync_workspaces``, jobs.py ``run_syncs``): synced together, failing independently."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import duckdb
import pytest
from helpers import assert_mirror, error_line, ledger, read_warehouse, settings_for

from runs_etl import jobs
from runs_etl.config import load_settings
from runs_etl.errors import EXIT_AUTH, AuthError, ConfigError, WorkspacesFailed
from runs_etl.warehouse.publish import working_path

WORKSPACES_TOML = """
[[workspaces]]
name = "prod"
api_url = "{prod}"
key_env = "PROD_KEY"

[[workspaces]]
name = "staging"
api_url = "{staging}"
key_file = "{key_file}"
"""


def two_workspaces(tmp_path: Path, prod, staging, prod_key: str | None = None, **sections):
    """Settings for workspaces ``prod`` and ``staging`` served by two simulators."""
    key_file = tmp_path / "staging.key"
    key_file.write_text(staging.api_key + "\n", encoding="utf-8")
    config = tmp_path / "runs-etl.toml"
    config.write_text(WORKSPACES_TOML.format(prod=prod.base_url, staging=staging.base_url,
                                             key_file=key_file), encoding="utf-8")
    env = {"PROD_KEY": prod_key or prod.api_key,
           "RUNS_ETL_DUCKDB_PATH": str(tmp_path / "runs.duckdb")}
    return load_settings(config, env, sections, cwd=tmp_path)


@pytest.fixture
def pair(make_sim):
    """Two workspaces whose runs share ids (same seed), with different keys and contents."""
    prod = make_sim(400, seed=21, api_key="prod-key")
    staging = make_sim(400, seed=21, api_key="staging-key")
    staging.transition(60)  # the same ids in another state
    staging.add_runs(25)
    return prod, staging


# --- configuration ---------------------------------------------------------------------------

def test_a_single_workspace_configuration_is_workspace_default(tmp_path):
    s = load_settings(None, {"RUNS_ETL_API_KEY": "k"}, cwd=tmp_path)
    assert s.workspace_names() == ["default"]
    assert s.for_workspace("default").api_key() == "k"


def test_workspaces_read_their_keys_from_their_own_variable_or_file(tmp_path, pair):
    s = two_workspaces(tmp_path, *pair)
    assert s.workspace_names() == ["prod", "staging"]
    assert s.for_workspace("prod").api_key() == "prod-key"
    assert s.for_workspace("staging").api_key() == "staging-key"  # stripped of its newline
    assert s.for_workspace("staging").api.url == pair[1].base_url


def test_a_bad_workspace_name_is_located(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[[workspaces]]\nname = "Bad Name"\nkey_env = "X"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"workspaces\.0\.name"):
        load_settings(config, {"X": "k"})


def test_workspace_errors_name_the_workspace_and_come_all_at_once(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[[workspaces]]\nname = "prod"\nkey_env = "NOPE"\n'
                      '[[workspaces]]\nname = "qa"\nkey_env = "X"\napi_url = "ftp://x"\n',
                      encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_settings(config, {"X": "k"})
    problems = e.value.problems
    assert any("workspace 'prod'" in p and "NOPE" in p for p in problems)
    assert any("workspace 'qa'" in p and "api_url" in p for p in problems)


def test_a_workspace_key_file_problem_names_the_workspace_and_the_file(tmp_path):
    """Read as ``[api] key_file`` is: unreadable, empty and non-header keys, never quoted."""
    files = {"gone": tmp_path / "absent.key", "blank": tmp_path / "blank.key",
             "bad": tmp_path / "bad.key"}
    files["blank"].write_text(" \n", encoding="utf-8")
    files["bad"].write_text("sk-secret\x00x", encoding="utf-8")
    config = tmp_path / "c.toml"
    config.write_text("".join(f'[[workspaces]]\nname = "{n}"\nkey_file = "{f}"\n'
                              for n, f in files.items()), encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_settings(config, {})
    gone, blank, bad = e.value.problems
    assert gone.startswith("workspace 'gone': key_file") and "absent.key" in gone
    assert gone.endswith("No such file or directory")
    assert blank.startswith("workspace 'blank': key_file") and "blank.key is empty" in blank
    assert bad.startswith("workspace 'bad': ") and "HTTP header" in bad
    assert "sk-secret" not in str(e.value)


def test_two_workspaces_with_one_name_are_refused(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[[workspaces]]\nname = "a"\nkey_env = "K"\n'
                      '[[workspaces]]\nname = "a"\nkey_env = "K"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="'a' is configured twice"):
        load_settings(config, {"K": "k"})


def test_plain_keys_in_a_file_others_can_read_are_warned_about(tmp_path, caplog):
    config = tmp_path / "c.toml"
    config.write_text('[[workspaces]]\nname = "a"\nkey = "k1"\n'
                      '[[workspaces]]\nname = "b"\nkey = "k2"\n', encoding="utf-8")
    os.chmod(config, 0o644)
    caplog.set_level(logging.WARNING, logger="runs_etl")
    load_settings(config, {})
    assert "other users can read it" in caplog.text and "k1" not in caplog.text
    caplog.clear()
    os.chmod(config, 0o600)
    load_settings(config, {})
    assert "other users can read it" not in caplog.text


def test_an_unknown_workspace_on_the_command_line_is_a_config_error(tmp_path, pair):
    s = two_workspaces(tmp_path, *pair)
    with pytest.raises(ConfigError, match="--workspace dev: no such workspace"):
        jobs.run_syncs(s, ["dev"], quiet=True)


# --- syncing ---------------------------------------------------------------------------------

def test_both_workspaces_land_exactly_though_their_run_ids_overlap(tmp_path, pair):
    prod, staging = pair
    s = two_workspaces(tmp_path, prod, staging)
    outcomes = jobs.run_syncs(s, quiet=True)
    assert [(o.workspace, o.result.outcome) for o in outcomes] == [("prod", "success"),
                                                                  ("staging", "success")]
    db = tmp_path / "runs.duckdb"
    assert_mirror(db, prod, workspace="prod")
    assert_mirror(db, staging, workspace="staging")
    assert set(prod.run_ids()) & set(staging.run_ids())  # the same ids, twice
    # Each workspace has its own ledger row, and its own plan: the next sync is incremental.
    assert {r["workspace"] for r in ledger(db)} == {"prod", "staging"}
    again = jobs.run_syncs(s, quiet=True)
    assert [o.result.mode for o in again] == ["incremental", "incremental"]


def test_one_workspace_can_be_synced_alone(tmp_path, pair):
    s = two_workspaces(tmp_path, *pair)
    [outcome] = jobs.run_syncs(s, ["staging"], quiet=True)
    assert outcome.workspace == "staging"
    assert {r["workspace"] for r in ledger(tmp_path / "runs.duckdb")} == {"staging"}


def test_a_401_in_one_workspace_leaves_the_other_committed_and_exits_3_naming_it(
        tmp_path, pair, run_cli, monkeypatch):
    prod, staging = pair
    s = two_workspaces(tmp_path, prod, staging, prod_key="a-wrong-key")
    with pytest.raises(WorkspacesFailed) as e:
        jobs.run_syncs(s, quiet=True)
    assert e.value.exit_code == EXIT_AUTH and isinstance(e.value.failures["prod"], AuthError)
    assert "prod" in str(e.value) and "staging synced and committed" in str(e.value)
    db = tmp_path / "runs.duckdb"
    assert_mirror(db, staging, workspace="staging")
    assert read_warehouse(db, "prod").runs == {}
    outcomes = {r["workspace"]: r["outcome"] for r in ledger(db)}
    assert outcomes == {"prod": "failed", "staging": "success"}
    # The same through the command line: exit 3, one Error: line naming the workspace.
    monkeypatch.setenv("PROD_KEY", "a-wrong-key")
    code, _, err = run_cli(None, "sync", "-q", "--config", str(tmp_path / "runs-etl.toml"),
                           RUNS_ETL_DUCKDB_PATH=str(db))
    assert code == EXIT_AUTH
    assert "prod" in error_line(err) and "a-wrong-key" not in err


def test_a_verified_full_walk_of_one_workspace_deletes_nothing_in_the_other(tmp_path, pair):
    prod, staging = pair
    s = two_workspaces(tmp_path, prod, staging)
    jobs.run_syncs(s, quiet=True)
    gone = prod.delete(15, where="random")
    [outcome] = jobs.run_syncs(s, ["prod"], quiet=True, full_refresh=True)
    assert outcome.result.verified and outcome.result.rows_deleted == len(gone)
    db = tmp_path / "runs.duckdb"
    assert read_warehouse(db, "prod").deleted == set(gone)
    assert read_warehouse(db, "staging").deleted == set()  # the same ids live on there
    assert_mirror(db, staging, workspace="staging")


def test_a_migrated_single_workspace_warehouse_keeps_every_row_and_ledger_entry(
        tmp_path, make_sim):
    """A warehouse from before workspaces: its rows become workspace ``default``."""
    sim = make_sim(200, seed=4)
    db = tmp_path / "runs.duckdb"
    jobs.run_sync(settings_for(sim, db), quiet=True)
    # Undo migration 3 in the writer's file: what the previous version left behind.
    con = duckdb.connect(str(working_path(db)))
    before = {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
              for t in ("runs", "workflows", "run_nodes", "sync_runs")}
    for t in ("runs", "workflows", "run_nodes", "sync_runs", "rejected_records"):
        con.execute(f"ALTER TABLE {t} DROP COLUMN workspace")
    con.execute("CREATE TABLE old_state AS SELECT key, value, updated_at FROM sync_state")
    con.execute("DROP TABLE sync_state")
    con.execute("CREATE TABLE sync_state (key VARCHAR PRIMARY KEY, value JSON, "
                "updated_at TIMESTAMPTZ)")
    con.execute("INSERT INTO sync_state SELECT * FROM old_state")
    con.execute("DROP TABLE old_state")
    con.execute("DROP TABLE run_history")  # migration 4 came later still
    con.execute("DELETE FROM schema_migrations WHERE version >= 3")
    con.close()

    sim.add_runs(10)
    result = jobs.run_sync(settings_for(sim, db), quiet=True)
    assert result.mode == "incremental"  # the learned order and last full walk were kept
    con = duckdb.connect(str(db), read_only=True)
    try:
        for t, n in before.items():
            assert con.execute(f"SELECT count(*) FROM {t} WHERE workspace = 'default'"
                               ).fetchone()[0] >= n
        assert con.execute("SELECT count(DISTINCT workspace) FROM runs").fetchone()[0] == 1
    finally:
        con.close()
    assert [r["outcome"] for r in ledger(db)] == ["success", "success"]
    assert_mirror(db, sim)


def test_workspaces_can_come_from_code_as_a_list():
    """``load_settings(overrides=...)`` takes [[workspaces]] entries as a list, as TOML does."""
    s = load_settings(None, {}, {"workspaces": [
        {"name": "a", "key": "k1", "api_url": "http://127.0.0.1:1"},
        {"name": "b", "key": "k2", "api_url": "http://127.0.0.1:2"}]})
    assert s.workspace_names() == ["a", "b"]
    assert s.for_workspace("b").api_key() == "k2"
