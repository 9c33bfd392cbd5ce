"""The README keeps up with the code: commands, flags, env vars, views and set-up commands."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from runs_etl.cli import build_parser
from runs_etl.config import ENV_VARS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_is_in_the_readme_commands_table():
    for name in _subcommands():
        assert re.search(rf"^\| `runs-etl {name}\b", README, re.M), name


def test_every_long_flag_of_every_command_is_documented():
    for name, sub in _subcommands().items():
        for action in sub._actions:
            for flag in action.option_strings:
                if flag.startswith("--"):
                    assert f"`{flag}" in README or f"{flag} " in README, f"{name} {flag}"


def test_every_environment_variable_is_documented():
    for var in ENV_VARS:
        assert f"`{var}`" in README, var


def test_every_view_in_sql_is_documented():
    views = set()
    for f in sorted((ROOT / "sql").glob("*.sql")):
        views |= set(re.findall(r"CREATE OR REPLACE VIEW\s+(\w+)", f.read_text(), re.I))
    assert views, "no views found in sql/"
    for view in views:
        assert f"`{view}`" in README, view


def test_the_two_setup_commands_are_on_the_first_screen_and_ci_runs_the_test_one():
    first_screen = "\n".join(README.splitlines()[:15])
    assert ".venv/bin/runs-etl demo" in first_screen
    test_cmd = next(line for line in first_screen.splitlines() if "pytest" in line)
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert test_cmd.strip() in ci
