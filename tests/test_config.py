"""Settings: precedence, every key, all problems at once, durations, and keeping the key secret."""

from __future__ import annotations

import tomllib
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from runs_etl.config import (
    DEFAULT_API_URL,
    DEFAULT_CONCURRENCY,
    DEFAULT_PAGE_SIZE,
    Settings,
    WorkspaceSettings,
    load_settings,
)
from runs_etl.errors import EXIT_CONFIG, ConfigError

SECRET = "sk-live-DO-NOT-LEAK-4242"

FULL_TOML = """
[api]
url = "https://noxus.example.com"
key = "sk-from-file"
key_file = "/run/secrets/noxus"
page_size = 25
concurrency = 3
timeout = 12.5
max_attempts = 4
backoff_base = 0.25
backoff_max = 9
max_pages = 500
allow_http = true
request_deadline = 45
max_response_bytes = 1048576
ca_bundle = "/etc/ssl/corp-ca.pem"

[warehouse]
duckdb_path = "/data/runs.duckdb"
memory_limit = "512MB"
lock_wait = 5
storage_compatibility = "v1.2.0"

[sync]
batch_pages = 7
parse_workers = 3
max_walk_passes = 4
max_reject_fraction = 0.05
lookback = "15m"
full_refresh_every = "7d"
max_delete_fraction = 0.2
max_single_refreshes = 50
max_duration = "20m"
max_requests_in_flight = 9

[export]
parquet_dir = "/data/parquet"

[analytics]
stuck_after = "2h"

[retention]
raw_pages = "30d"

[schedule]
interval = "15m"
jitter = "30s"
misfire_grace = 120
run_at_start = false
timezone = "Europe/Lisbon"

[logging]
format = "json"
level = "debug"

[lake]
uri = "s3://analytics/noxus"
partition_by_month = false
vacuum_retention = "30d"

[lake.storage_options]
AWS_ENDPOINT_URL = "https://minio.example.com"
AWS_SECRET_ACCESS_KEY = "lake-secret"
"""


def write(tmp_path: Path, text: str, name: str = "conf.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_error(*args, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_settings(*args, **kw)
    return info.value


# --- precedence ---------------------------------------------------------------------------------

def test_flag_beats_env_beats_file_beats_default(tmp_path):
    conf = write(tmp_path, '[api]\nurl = "https://file.test"\npage_size = 10\nconcurrency = 2\n')
    env = {"RUNS_ETL_API_URL": "https://env.test", "RUNS_ETL_PAGE_SIZE": "20"}
    s = load_settings(conf, env, {"api": {"url": "https://flag.test"}})
    assert s.api.url == "https://flag.test"  # flag over env and file
    assert s.api.page_size == 20  # env over file
    assert s.api.concurrency == 2  # file over default
    assert s.api.timeout == 30.0  # default

    assert load_settings(conf, env).api.url == "https://env.test"
    assert load_settings(conf, {}).api.url == "https://file.test"
    assert load_settings(None, {}, cwd=tmp_path).api.url == DEFAULT_API_URL


def test_flag_left_unset_does_not_override_env(tmp_path):
    """A command-line option the user did not pass (None) keeps the env / file value."""
    s = load_settings(None, {"RUNS_ETL_API_URL": "https://env.test"},
                      {"api": {"url": None, "page_size": None}}, cwd=tmp_path)
    assert s.api.url == "https://env.test"
    assert s.api.page_size == DEFAULT_PAGE_SIZE


def test_empty_env_var_counts_as_unset(tmp_path):
    s = load_settings(None, {"RUNS_ETL_API_URL": "", "RUNS_ETL_CONCURRENCY": ""}, cwd=tmp_path)
    assert s.api.url == DEFAULT_API_URL
    assert s.api.concurrency == DEFAULT_CONCURRENCY


def test_runs_etl_toml_in_cwd_is_read_when_no_config_given(tmp_path):
    write(tmp_path, "[api]\npage_size = 33\n", name="runs-etl.toml")
    assert load_settings(None, {}, cwd=tmp_path).api.page_size == 33


def test_every_env_var_of_the_interface_is_read(tmp_path):
    env = {
        "RUNS_ETL_API_URL": "http://localhost:8080",
        "RUNS_ETL_API_KEY": "k",
        "RUNS_ETL_DUCKDB_PATH": str(tmp_path / "w.duckdb"),
        "RUNS_ETL_PARQUET_DIR": str(tmp_path / "pq"),
        "RUNS_ETL_PAGE_SIZE": "42",
        "RUNS_ETL_CONCURRENCY": "5",
        "RUNS_ETL_LOG_FORMAT": "json",
    }
    s = load_settings(None, env, cwd=tmp_path)
    assert s.api.url == "http://localhost:8080"
    assert s.api_key() == "k"
    assert s.warehouse.duckdb_path == tmp_path / "w.duckdb"
    assert s.export.parquet_dir == tmp_path / "pq"
    assert (s.api.page_size, s.api.concurrency) == (42, 5)
    assert s.logging.format == "json"


def test_missing_config_file_is_a_config_error(tmp_path):
    err = load_error(tmp_path / "nope.toml", {})
    assert "not found" in str(err) and "nope.toml" in str(err)
    assert err.exit_code == EXIT_CONFIG


def test_invalid_toml_is_a_config_error_naming_the_file(tmp_path):
    err = load_error(write(tmp_path, "[api\nurl = "), {})
    assert "conf.toml" in str(err) and "TOML" in str(err)


# --- every key -----------------------------------------------------------------------------------

def test_every_key_of_a_full_toml_parses(tmp_path):
    s = load_settings(write(tmp_path, FULL_TOML), {})
    assert s.api.url == "https://noxus.example.com"
    assert s.api_key() == "sk-from-file"  # a key given directly wins over key_file
    assert s.api.key_file == Path("/run/secrets/noxus")
    assert (s.api.page_size, s.api.concurrency, s.api.timeout) == (25, 3, 12.5)
    assert (s.api.max_attempts, s.api.backoff_base, s.api.backoff_max) == (4, 0.25, 9.0)
    assert s.api.max_pages == 500
    assert (s.api.allow_http, s.api.request_deadline) == (True, 45)
    assert s.api.max_response_bytes == 1048576
    assert s.api.ca_bundle == Path("/etc/ssl/corp-ca.pem")
    assert s.warehouse.duckdb_path == Path("/data/runs.duckdb")
    assert (s.warehouse.memory_limit, s.warehouse.lock_wait) == ("512MB", 5)
    assert s.warehouse.storage_compatibility == "v1.2.0"
    assert (s.sync.batch_pages, s.sync.max_walk_passes, s.sync.parse_workers) == (7, 4, 3)
    assert s.sync.max_reject_fraction == 0.05
    assert s.sync.lookback == timedelta(minutes=15)
    assert s.sync.full_refresh_every == timedelta(days=7)
    assert (s.sync.max_delete_fraction, s.sync.max_single_refreshes) == (0.2, 50)
    assert s.sync.max_duration == timedelta(minutes=20)
    assert s.export.parquet_dir == Path("/data/parquet")
    assert s.analytics.stuck_after == timedelta(hours=2)
    assert s.retention.raw_pages == timedelta(days=30)
    assert s.schedule.cron is None  # cron and interval exclusive: cron is tested on its own
    assert s.schedule.interval == timedelta(minutes=15)
    assert s.schedule.jitter == timedelta(seconds=30)
    assert s.schedule.misfire_grace == timedelta(seconds=120)
    assert s.schedule.run_at_start is False
    assert s.schedule.timezone == "Europe/Lisbon"
    assert (s.logging.format, s.logging.level) == ("json", "debug")
    assert (s.lake.uri, s.lake.partition_by_month) == ("s3://analytics/noxus", False)
    assert s.lake.vacuum_retention == timedelta(days=30)
    assert s.lake.storage() == {"AWS_ENDPOINT_URL": "https://minio.example.com",
                                "AWS_SECRET_ACCESS_KEY": "lake-secret"}
    assert "lake-secret" not in repr(s) and "lake-secret" not in str(s.lake)


def test_full_toml_above_covers_every_setting():
    """Keeps FULL_TOML honest: a new setting must be added to it (and so be tested)."""
    doc = tomllib.loads(FULL_TOML)
    doc["schedule"]["cron"] = "exclusive with interval: see test_cron_in_a_file_parses"
    # [[workspaces]] is a list of entries: tests/test_workspaces.py covers its keys.
    assert set(doc) | {"workspaces"} == set(Settings.model_fields)
    for section, field in Settings.model_fields.items():
        if section == "workspaces":
            continue
        model = field.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        assert set(doc[section]) == set(model.model_fields), section


def test_cron_in_a_file_parses(tmp_path):
    s = load_settings(write(tmp_path, '[schedule]\ncron = "*/15 * * * *"\n'), {})
    assert s.schedule.cron == "*/15 * * * *"


def test_every_setting_has_a_description():
    sections = {name: field.annotation for name, field in Settings.model_fields.items()}
    sections["workspaces"] = WorkspaceSettings
    for section, model in sections.items():
        for name, f in model.model_fields.items():
            assert f.description, f"{section}.{name} has no description"


def test_settings_are_frozen():
    s = Settings()
    with pytest.raises(ValidationError):
        s.api.page_size = 5  # type: ignore[misc]


# --- validation ----------------------------------------------------------------------------------

def test_all_problems_are_reported_in_one_error(tmp_path):
    conf = write(tmp_path, '[api]\nurl = "ftp://x"\npage_size = 0\nconcurrency = 0\n'
                           '[logging]\nformat = "xml"\n')
    err = load_error(conf, {})
    joined = "\n".join(err.problems)
    assert len(err.problems) == 4, err.problems
    for name in ("api.url", "api.page_size", "api.concurrency", "logging.format"):
        assert name in joined
    assert "4 problems" in str(err)


def test_env_and_flag_values_are_validated_too(tmp_path):
    err = load_error(None, {"RUNS_ETL_PAGE_SIZE": "500", "RUNS_ETL_CONCURRENCY": "lots"},
                     {"api": {"url": "backend.noxus.ai"}}, cwd=tmp_path)
    assert {p.split(":")[0] for p in err.problems} == {"api.page_size", "api.concurrency",
                                                       "api.url"}


@pytest.mark.parametrize("url", ["http://localhost:8000", "https://backend.noxus.ai/"])
def test_http_and_https_urls_are_accepted(tmp_path, url):
    assert load_settings(None, {}, {"api": {"url": url}}, cwd=tmp_path).api.url == url


def test_unknown_keys_and_sections_are_rejected(tmp_path):
    err = load_error(write(tmp_path, '[api]\npagesize = 10\n[warehous]\npath = "x"\n'), {})
    assert sorted(p.split(" (from")[0] for p in err.problems) == [
        "api.pagesize: unknown setting; did you mean api.page_size?",
        "warehous: unknown setting; did you mean warehouse?"]


@pytest.mark.parametrize(("text", "expected"), [
    ('"15m"', timedelta(minutes=15)),
    ('"7d"', timedelta(days=7)),
    ('"90s"', timedelta(seconds=90)),
    ('"1h"', timedelta(hours=1)),
    ('"2w"', timedelta(weeks=2)),
    ('"1.5h"', timedelta(minutes=90)),
    ('"45"', timedelta(seconds=45)),
    ("600", timedelta(minutes=10)),
    ("0.5", timedelta(milliseconds=500)),
])
def test_durations_accept_units_and_plain_seconds(tmp_path, text, expected):
    s = load_settings(write(tmp_path, f"[sync]\nlookback = {text}\n"), {})
    assert s.sync.lookback == expected


@pytest.mark.parametrize("text", ['"soon"', '"15 minutes"', '"-5m"', "true"])
def test_bad_durations_name_the_setting(tmp_path, text):
    err = load_error(write(tmp_path, f"[sync]\nlookback = {text}\n"), {})
    assert len(err.problems) == 1 and err.problems[0].startswith("sync.lookback")


def test_optional_duration_can_be_left_unset():
    assert Settings().sync.full_refresh_every is None


# --- the API key ---------------------------------------------------------------------------------

def test_api_key_read_from_key_file_and_stripped(tmp_path):
    key_file = write(tmp_path, f"  {SECRET}\n\n", name="key")
    s = load_settings(None, {"RUNS_ETL_API_KEY_FILE": str(key_file)}, cwd=tmp_path)
    assert s.api_key() == SECRET


def test_api_key_given_directly_wins_over_key_file(tmp_path):
    key_file = write(tmp_path, "from-file", name="key")
    s = load_settings(None, {"RUNS_ETL_API_KEY_FILE": str(key_file),
                             "RUNS_ETL_API_KEY": "from-env"}, cwd=tmp_path)
    assert s.api_key() == "from-env"


def test_empty_key_file_is_an_error(tmp_path):
    key_file = write(tmp_path, " \n", name="key")
    err = load_error(None, {"RUNS_ETL_API_KEY_FILE": str(key_file)}, cwd=tmp_path)
    assert "empty" in str(err) and str(key_file) in str(err)


def test_binary_key_file_is_a_config_error_that_does_not_echo_it(tmp_path):
    key_file = tmp_path / "keystore.p12"
    key_file.write_bytes(b"\x30\x82\xff\xfe secret-bytes")
    err = load_error(None, {"RUNS_ETL_API_KEY_FILE": str(key_file)}, cwd=tmp_path)
    assert "not UTF-8" in str(err) and str(key_file) in str(err)
    assert "secret-bytes" not in str(err)


def test_missing_key_file_is_an_error(tmp_path):
    err = load_error(None, {"RUNS_ETL_API_KEY_FILE": str(tmp_path / "absent")}, cwd=tmp_path)
    assert "api.key_file" in str(err) and "absent" in str(err)


def test_missing_key_error_names_runs_etl_api_key(tmp_path):
    s = load_settings(None, {}, cwd=tmp_path)  # loading works: only `sync` needs a key
    with pytest.raises(ConfigError) as info:
        s.api_key()
    assert "RUNS_ETL_API_KEY" in str(info.value)


def test_empty_key_counts_as_missing(tmp_path):
    s = load_settings(None, {}, {"api": {"key": ""}}, cwd=tmp_path)
    with pytest.raises(ConfigError):
        s.api_key()


def test_key_never_shown_in_settings_repr_or_dump(tmp_path):
    s = load_settings(None, {"RUNS_ETL_API_KEY": SECRET}, cwd=tmp_path)
    assert s.api_key() == SECRET
    for text in (repr(s), str(s), repr(s.api), s.model_dump_json(), str(s.model_dump())):
        assert SECRET not in text


def test_key_never_shown_in_config_errors(tmp_path):
    conf = write(tmp_path, f'[api]\nkey = "{SECRET}"\npage_size = 0\nbogus = 1\n')
    err = load_error(conf, {"RUNS_ETL_CONCURRENCY": "-1"})
    assert len(err.problems) == 3
    assert SECRET not in str(err) and SECRET not in repr(err)
    assert all(SECRET not in p for p in err.problems)


def test_key_from_file_never_shown_in_repr(tmp_path):
    key_file = write(tmp_path, SECRET, name="key")
    s = load_settings(None, {"RUNS_ETL_API_KEY_FILE": str(key_file)}, cwd=tmp_path)
    assert SECRET not in repr(s)


# --- hardening (issue 9) -------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [f"{SECRET}\n", f"{SECRET}\r\n", f"  {SECRET}\t"])
def test_whitespace_around_the_key_is_stripped_wherever_it_comes_from(tmp_path, raw):
    from_env = load_settings(None, {"RUNS_ETL_API_KEY": raw}, cwd=tmp_path)
    from_toml = load_settings(write(tmp_path, f"[api]\nkey = {raw!r}\n".replace("'", '"')), {})
    assert from_env.api_key() == from_toml.api_key() == SECRET


@pytest.mark.parametrize("bad", [f"{SECRET}é", f"sk\n{SECRET}", f"{SECRET}\x00x"])
def test_a_key_that_cannot_be_a_header_is_refused_without_printing_it(tmp_path, bad):
    err = load_error(None, {"RUNS_ETL_API_KEY": bad}, cwd=tmp_path)
    assert err.problems[0].startswith("api.key:") and "RUNS_ETL_API_KEY" in err.problems[0]
    assert SECRET not in str(err) and SECRET not in repr(err)
    key_file = write(tmp_path, bad, name="key")
    err = load_error(None, {"RUNS_ETL_API_KEY_FILE": str(key_file)}, cwd=tmp_path)
    assert "api.key_file" in str(err) and SECRET not in str(err)


@pytest.mark.parametrize("url", ["http://api.example.com", "http://10.0.0.5:8000",
                                 "http://backend.noxus.ai/"])
def test_plain_http_to_another_host_needs_allow_http(tmp_path, url):
    err = load_error(None, {"RUNS_ETL_API_URL": url}, cwd=tmp_path)
    assert "api.allow_http" in str(err) and "api.url" in str(err)
    allowed = load_settings(None, {"RUNS_ETL_API_URL": url}, {"api": {"allow_http": True}},
                            cwd=tmp_path)
    assert allowed.api.url == url


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost", "http://[::1]:9"])
def test_plain_http_to_loopback_is_fine(tmp_path, url):
    assert load_settings(None, {"RUNS_ETL_API_URL": url}, cwd=tmp_path).api.url == url


def test_credentials_in_a_bad_url_are_not_echoed(tmp_path):
    err = load_error(None, {"RUNS_ETL_API_URL": "http://ana:pw-42@api.example.com"},
                     cwd=tmp_path)
    assert "pw-42" not in str(err) and "***@api.example.com" in str(err)


@pytest.mark.parametrize("value", ["256MB'; CREATE TABLE pwned (x INT); --", "lots", "1 PB",
                                   "-5GB"])
def test_memory_limit_must_be_a_plain_size(tmp_path, value):
    err = load_error(write(tmp_path, f'[warehouse]\nmemory_limit = "{value}"\n'.replace(
        "'", "\\u0027")), {})
    assert err.problems[0].startswith("warehouse.memory_limit")


@pytest.mark.parametrize("value", ["512MB", "2gb", "1.5 GiB", "100000KB", "64mib"])
def test_memory_limit_sizes_duckdb_knows_are_accepted(tmp_path, value):
    s = load_settings(write(tmp_path, f'[warehouse]\nmemory_limit = "{value}"\n'), {})
    assert s.warehouse.memory_limit == value


def test_every_problem_is_listed_at_once_with_a_suggestion(tmp_path):
    conf = write(tmp_path, '[api]\npage_size = 0\n[warehouse]\nduckdb_pth = "x.duckdb"\n'
                           '[schedule]\ncron = "*/15 * * * *"\ninterval = "15m"\n'
                           'timezone = "Mars/Olympus_Mons"\n')
    err = load_error(conf, {})
    joined = "\n".join(err.problems)
    assert len(err.problems) == 4, err.problems
    assert "api.page_size" in joined and "schedule.timezone" in joined
    assert "did you mean warehouse.duckdb_path?" in joined
    assert "both are set" in joined
    assert all(f"(from {conf})" in p for p in err.problems)


def test_each_problem_names_where_its_value_came_from(tmp_path):
    conf = write(tmp_path, "[api]\nconcurrency = 0\n")
    err = load_error(conf, {"RUNS_ETL_PAGE_SIZE": "abc"}, {"api": {"timeout": -1}})
    by_key = {p.split(":")[0]: p for p in err.problems}
    assert by_key["api.page_size"].endswith("(from RUNS_ETL_PAGE_SIZE=abc)")
    assert by_key["api.concurrency"].endswith(f"(from {conf})")
    assert by_key["api.timeout"].endswith("(from the command line)")


def test_max_duration_must_be_positive(tmp_path):
    err = load_error(write(tmp_path, '[sync]\nmax_duration = "0s"\n'), {})
    assert err.problems[0].startswith("sync.max_duration")


def test_raw_page_retention_must_be_positive_when_set(tmp_path):
    err = load_error(write(tmp_path, '[retention]\nraw_pages = "0s"\n'), {})
    assert err.problems[0].startswith("retention.raw_pages: must be positive")
