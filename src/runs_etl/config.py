"""Settings: TOML file < ``RUNS_ETL_*`` environment < command-line flags, into one frozen model.

``load_settings`` is the only place that reads the environment or the config file; everything
else receives the resulting ``Settings`` explicitly.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)

from .errors import ConfigError

DEFAULT_CONFIG_FILE = "runs-etl.toml"
DEFAULT_API_URL = "https://backend.noxus.ai"
DEFAULT_DUCKDB_PATH = "./runs.duckdb"
DEFAULT_PAGE_SIZE = 100
DEFAULT_CONCURRENCY = 8
# DuckDB 1.4 and newer (CLI, BI drivers, notebooks) read files written in this format.
DEFAULT_STORAGE_COMPATIBILITY = "v1.4.0"

# env var -> (section, key). Only these are read; see interface.md for the contract.
ENV_VARS: dict[str, tuple[str, str]] = {
    "RUNS_ETL_API_URL": ("api", "url"),
    "RUNS_ETL_API_KEY": ("api", "key"),
    "RUNS_ETL_API_KEY_FILE": ("api", "key_file"),
    "RUNS_ETL_PAGE_SIZE": ("api", "page_size"),
    "RUNS_ETL_CONCURRENCY": ("api", "concurrency"),
    "RUNS_ETL_DUCKDB_PATH": ("warehouse", "duckdb_path"),
    "RUNS_ETL_PARQUET_DIR": ("export", "parquet_dir"),
    "RUNS_ETL_LOG_FORMAT": ("logging", "format"),
    "RUNS_ETL_LOG_LEVEL": ("logging", "level"),
}

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(value: Any) -> timedelta | None:
    """Accept ``"90s"``, ``"15m"``, ``"1h"``, ``"7d"``, ``"2w"`` or a number of seconds."""
    if value is None or isinstance(value, timedelta):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return timedelta(seconds=value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])
    raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 15m, 1h, 7d)")


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ApiSettings(_Section):
    url: str = Field(DEFAULT_API_URL, description="API base URL")
    key: SecretStr | None = Field(None, description="API key, sent as X-API-Key")
    key_file: Path | None = Field(None, description="file holding the API key")
    page_size: int = Field(DEFAULT_PAGE_SIZE, ge=1, le=100, description="`size` per request")
    concurrency: int = Field(DEFAULT_CONCURRENCY, ge=1, le=64, description="max requests in flight")
    timeout: float = Field(30.0, gt=0, description="seconds per request")
    max_attempts: int = Field(6, ge=1, le=50, description="attempts per request before giving up")
    backoff_base: float = Field(0.5, ge=0, description="first retry wait, seconds (doubles)")
    backoff_max: float = Field(30.0, ge=0, description="longest single wait, seconds")
    max_pages: int = Field(100_000, ge=1, description="guard against a server that never ends")

    # A field validator (not a model "after" validator) so a bad URL is reported together with
    # every other problem of the section.
    @field_validator("url")
    @classmethod
    def _url_is_http(cls, url: str) -> str:
        if not re.match(r"^https?://[^/\s]+", url):
            raise ValueError(f"must start with http:// or https://, got {url!r}")
        return url


class WarehouseSettings(_Section):
    duckdb_path: Path = Field(Path(DEFAULT_DUCKDB_PATH), description="DuckDB database file")
    memory_limit: str = Field("256MB", description="DuckDB memory_limit (spills to disk beyond)")
    lock_wait: float = Field(0, ge=0, description="seconds to wait for another writer")
    storage_compatibility: str = Field(
        DEFAULT_STORAGE_COMPATIBILITY, pattern=r"^(v\d+\.\d+\.\d+|latest)$",
        description="DuckDB storage version of the files readers open (v1.4.0: DuckDB 1.4+)")


class SyncSettings(_Section):
    batch_pages: int = Field(20, ge=1, description="pages validated and staged per batch")
    max_walk_passes: int = Field(3, ge=1, le=10, description="walks of a moving source")
    max_reject_fraction: float = Field(0.01, ge=0, le=1, description="fail above this share")
    lookback: Duration = Field(timedelta(hours=1), description="incremental overlap window")
    full_refresh_every: Duration | None = Field(None, description="periodic verified full walk")
    max_delete_fraction: float = Field(0.05, ge=0, le=1, description="mass-delete breaker")
    max_single_refreshes: int = Field(500, ge=0, description="open runs refreshed one by one")


class ExportSettings(_Section):
    parquet_dir: Path | None = Field(None, description="Parquet export root; unset = no export")


class AnalyticsSettings(_Section):
    stuck_after: Duration = Field(timedelta(hours=24), description="open runs older are stuck")


class ScheduleSettings(_Section):
    cron: str | None = Field(None, description="crontab expression, e.g. '*/15 * * * *'")
    interval: Duration | None = Field(None, description="fixed interval, e.g. '15m'")
    jitter: Duration = Field(timedelta(0), description="random delay added to each run")
    misfire_grace: Duration = Field(timedelta(minutes=5), description="late runs still start")
    run_at_start: bool = Field(True, description="sync once when the scheduler starts")
    timezone: str = Field("UTC", description="timezone of the cron expression")


class LoggingSettings(_Section):
    format: Literal["text", "json"] = Field("text", description="log line format")
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")


class Settings(BaseModel):
    """Every setting of runs-etl, grouped like ``config.example.toml``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    api: ApiSettings = ApiSettings()
    warehouse: WarehouseSettings = WarehouseSettings()
    sync: SyncSettings = SyncSettings()
    export: ExportSettings = ExportSettings()
    analytics: AnalyticsSettings = AnalyticsSettings()
    schedule: ScheduleSettings = ScheduleSettings()
    logging: LoggingSettings = LoggingSettings()

    def api_key(self) -> str:
        """The key to send; raises ConfigError naming both ways to set it."""
        if self.api.key is not None and self.api.key.get_secret_value():
            return self.api.key.get_secret_value()
        raise ConfigError(
            ["no API key: set RUNS_ETL_API_KEY, RUNS_ETL_API_KEY_FILE or [api] key in the config"]
        )


def _deep_merge(base: dict, over: Mapping) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"config file not found: {path}"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"cannot read config file {path}: {e}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path} is not valid TOML: {e}"]) from None


def _format_errors(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown setting"
        problems.append(f"{loc}: {msg}" if loc else msg)
    return problems


def load_settings(
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    cwd: Path | None = None,
) -> Settings:
    """Build Settings from file, environment and flag overrides (``{"api": {"url": ...}}``)."""
    env = {} if env is None else env
    data: dict = {}
    if config_file is None:
        default = (cwd or Path.cwd()) / DEFAULT_CONFIG_FILE
        config_file = default if default.is_file() else None
    if config_file is not None:
        data = _read_toml(Path(config_file))
    from_env: dict[str, dict[str, str]] = {}
    for name, (section, key) in ENV_VARS.items():
        if env.get(name, "") != "":
            from_env.setdefault(section, {})[key] = env[name]
    data = _deep_merge(data, from_env)
    if overrides:
        data = _deep_merge(data, {s: {k: v for k, v in d.items() if v is not None}
                                  for s, d in overrides.items()})
    try:
        settings = Settings.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e)) from None
    return _resolve_key_file(settings)


def _resolve_key_file(settings: Settings) -> Settings:
    """A key given directly wins; otherwise read it from ``key_file`` (a mounted secret)."""
    api = settings.api
    if (api.key is not None and api.key.get_secret_value()) or api.key_file is None:
        return settings
    try:
        key = api.key_file.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ConfigError([f"api.key_file: cannot read {api.key_file}: {e.strerror}"]) from None
    if not key:
        raise ConfigError([f"api.key_file: {api.key_file} is empty"])
    return settings.model_copy(update={"api": api.model_copy(update={"key": SecretStr(key)})})
