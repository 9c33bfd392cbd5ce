"""The docs keep up with the code, one test per item so a failure names it: every command, flag,
env var and view is in the README, every key of config.example.toml parses, and the set-up
commands are on the first screen. (Every ``sql/*.sql`` view building on an empty warehouse is
checked in ``test_views.py``.)"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

import pytest

from runs_etl.cli import build_parser
from runs_etl.config import ENV_VARS, Settings, WorkspaceSettings, load_settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
EXAMPLE = ROOT / "config.example.toml"
# config.example.toml with its commented-out keys (``# key = ...``) uncommented.
EXAMPLE_ALL = re.sub(r"(?m)^# (\w+ = )", r"\1", EXAMPLE.read_text(encoding="utf-8"))


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


COMMANDS = _subcommands()
FLAGS = [(name, flag) for name, sub in COMMANDS.items() for action in sub._actions
         for flag in action.option_strings if flag.startswith("--")]
VIEWS = sorted({v for f in (ROOT / "sql").glob("*.sql")
                for v in re.findall(r"CREATE OR REPLACE VIEW\s+(\w+)", f.read_text(), re.I)})
EXAMPLE_KEYS = [(section, key) for section, keys in tomllib.loads(EXAMPLE_ALL).items()
                for key in keys]


def test_the_lists_below_are_not_empty():
    """Guard: a parser or a glob that found nothing would make every test below vacuous."""
    assert len(COMMANDS) >= 6 and FLAGS and VIEWS and len(EXAMPLE_KEYS) >= 20


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_is_in_the_readme_commands_table(command):
    assert re.search(rf"^\| `runs-etl {command}\b", README, re.M)


@pytest.mark.parametrize(("command", "flag"), FLAGS, ids=[f"{c} {f}" for c, f in FLAGS])
def test_every_long_flag_of_every_command_is_documented(command, flag):
    assert f"`{flag}" in README or f"{flag} " in README


@pytest.mark.parametrize("var", ENV_VARS)
def test_every_environment_variable_is_documented(var):
    assert f"`{var}`" in README


@pytest.mark.parametrize("view", VIEWS)
def test_every_view_in_sql_is_documented(view):
    assert f"`{view}`" in README


def test_config_example_parses_and_its_values_are_the_defaults():
    assert load_settings(EXAMPLE, {}) == Settings()


def test_config_example_documents_every_setting():
    """Commented-out keys count as documented."""
    documented = set(EXAMPLE_KEYS)
    missing = [(section, key) for section, field in Settings.model_fields.items()
               if section != "workspaces"
               for key in field.annotation.model_fields if (section, key) not in documented]
    assert not missing, f"config.example.toml lacks {missing}"


@pytest.mark.parametrize("key", list(WorkspaceSettings.model_fields))
def test_config_example_documents_every_workspace_key(key):
    """The commented [[workspaces]] example shows each key of an entry."""
    block = EXAMPLE_ALL[EXAMPLE_ALL.index("# [[workspaces]]"):EXAMPLE_ALL.index("[warehouse]")]
    assert re.search(rf"(?m)^#\s+(# )?{key} = ", block), key


@pytest.mark.parametrize(("section", "key"), EXAMPLE_KEYS,
                         ids=[f"{s}.{k}" for s, k in EXAMPLE_KEYS])
def test_every_key_of_the_config_example_parses(tmp_path, section, key):
    """Each key as the example writes it (uncommented), alone in a config file, is accepted.
    (A key in the environment keeps ``api.key_file`` from reading the example's secret path.)"""
    value = tomllib.loads(EXAMPLE_ALL)[section][key]
    path = tmp_path / "one-key.toml"
    path.write_text(f"[{section}]\n{key} = {toml_value(value)}\n", encoding="utf-8")
    settings = load_settings(path, {"RUNS_ETL_API_KEY": "k"}, cwd=tmp_path)
    assert key in getattr(settings, section).model_fields_set


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):  # an inline table, e.g. lake.storage_options
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)


def test_the_two_setup_commands_are_on_the_first_screen_and_ci_runs_the_test_one():
    first_screen = "\n".join(README.splitlines()[:15])
    assert ".venv/bin/runs-etl demo" in first_screen
    test_cmd = next(line for line in first_screen.splitlines() if "pytest" in line)
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert test_cmd.strip() in ci
