"""Settings: TOML file < ``RUNS_ETL_*`` environment < command-line flags, into one frozen model.

``load_settings`` is the only place that reads the environment or the config file; everything
else receives the resulting ``Settings`` explicitly.
"""

from __future__ import annotations

import difflib
import ipaddress
import logging
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from .errors import ConfigError, one_line

log = logging.getLogger("runs_etl.config")

DEFAULT_CONFIG_FILE = "runs-etl.toml"
DEFAULT_WORKSPACE = "default"
WORKSPACE_NAME = r"^[a-z0-9][a-z0-9_-]{0,39}$"
DEFAULT_API_URL = "https://backend.noxus.ai"
DEFAULT_DUCKDB_PATH = "./runs.duckdb"
DEFAULT_PAGE_SIZE = 100
DEFAULT_CONCURRENCY = 16  # a ceiling: the client starts at 4 and adapts (engine/concurrency.py)
DEFAULT_MAX_IN_FLIGHT = 32  # across workspaces syncing at once
# DuckDB 1.4 and newer (CLI, BI drivers, notebooks) read files written in this format.
DEFAULT_STORAGE_COMPATIBILITY = "v1.4.0"
# DuckDB's memory, beyond which it spills to disk. 128MB keeps a sync's whole process near 330 MB
# at 1M runs (256MB: ~455 MB, for a merge as fast within this machine's noise); a warehouse of
# many millions of runs, or a big machine, merges faster with more.
DEFAULT_MEMORY_LIMIT = "128MB"
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_DURATION = timedelta(hours=1)
DEFAULT_VACUUM_RETENTION = timedelta(days=7)
# Where delta-rs can keep a table: a local folder (a plain path or file://) or object storage.
LAKE_SCHEMES = ("file", "s3", "s3a", "gs", "az", "abfs", "abfss")

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
    "RUNS_ETL_LAKE_URI": ("lake", "uri"),
}

# What DuckDB's memory_limit accepts, strictly: the value is formatted into a SET statement.
MEMORY_LIMIT = re.compile(r"^(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$", re.IGNORECASE)
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")


def redact_url(url: str) -> str:
    """``url`` without the credentials it may carry (``https://user:pass@host`` -> ``***@``)."""
    return _USERINFO.sub(r"\1***@", url)


def is_loopback(url: str) -> bool:
    """Does ``url`` point at this machine (``localhost``, 127.0.0.0/8, ``::1``)?"""
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_timezone(name: str) -> str:
    """``name`` if it is an IANA timezone, else ValueError saying what to use."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timezone {name!r} (use an IANA name such as UTC or "
                         "Europe/Lisbon)") from None
    return name


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


def _positive(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise ValueError(f"must be positive, got {value}")
    return value


# A limit or a retention period: zero or less would mean "fail at once" or "keep nothing".
PositiveDuration = Annotated[Duration, AfterValidator(_positive)]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ApiSettings(_Section):
    # Declared before ``url`` so the url check below can see it.
    allow_http: bool = Field(False, description="allow plain http:// to a non-loopback host")
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
    request_deadline: float | None = Field(
        None, gt=0, description="seconds for a whole response (default: 2 x timeout)")
    max_response_bytes: int = Field(DEFAULT_MAX_RESPONSE_BYTES, ge=1024,
                                    description="largest response body accepted")
    ca_bundle: Path | None = Field(None, description="PEM file of CAs to trust (verify stays on)")

    # Field validators (not a model "after" validator) so a bad URL is reported together with
    # every other problem of the section.
    @field_validator("url")
    @classmethod
    def _url_is_http(cls, url: str, info: ValidationInfo) -> str:
        url = url.strip()
        shown = redact_url(url)
        if not re.match(r"^https?://[^/\s]+", url):
            raise ValueError(f"must start with http:// or https://, got {shown!r}")
        if (url.lower().startswith("http://") and not is_loopback(url)
                and not info.data.get("allow_http", False)):
            raise ValueError(f"{shown} is plain http to another host: the API key would travel "
                             "in clear. Use https://, or set api.allow_http = true")
        return url

    @field_validator("key", mode="before")
    @classmethod
    def _key_is_a_header_value(cls, key: Any) -> Any:
        raw = key.get_secret_value() if isinstance(key, SecretStr) else key
        if not isinstance(raw, str):
            return key
        raw = raw.strip()  # a CRLF env file or a TOML value with a newline
        # An HTTP header value holds visible ASCII and inner spaces; anything else is a
        # copy-paste accident that would otherwise surface as an error quoting the key.
        bad = next((i for i, c in enumerate(raw) if not " " <= c <= "~"), None)
        if bad is not None:  # never quote the key itself
            raise ValueError(f"the key has a character that cannot be sent in an HTTP header "
                             f"(non-ASCII or control character at position {bad + 1}); "
                             "check where it was copied from")
        return raw


class WarehouseSettings(_Section):
    duckdb_path: Path = Field(Path(DEFAULT_DUCKDB_PATH), description="DuckDB database file")
    memory_limit: str = Field(DEFAULT_MEMORY_LIMIT,
                              description="DuckDB memory_limit (spills to disk beyond)")
    lock_wait: float = Field(0, ge=0, description="seconds to wait for another writer")
    storage_compatibility: str = Field(
        DEFAULT_STORAGE_COMPATIBILITY, pattern=r"^(v\d+\.\d+\.\d+|latest)$",
        description="DuckDB storage version of the files readers open (v1.4.0: DuckDB 1.4+)")

    @field_validator("memory_limit")
    @classmethod
    def _memory_limit_is_a_size(cls, value: str) -> str:
        value = value.strip()
        if not MEMORY_LIMIT.match(value):
            raise ValueError(f"{value!r} is not a memory size (use e.g. 256MB, 2GB, 1.5GiB)")
        return value


class SyncSettings(_Section):
    batch_pages: int = Field(20, ge=1, description="pages validated and staged per batch")
    parse_workers: int | None = Field(
        None, ge=0, le=64, description="processes validating pages in long walks; unset = one "
        "per CPU beyond the first (none on one CPU), 0 = in the sync's own process")
    max_walk_passes: int = Field(3, ge=1, le=10, description="walks of a moving source")
    max_reject_fraction: float = Field(0.01, ge=0, le=1, description="fail above this share")
    lookback: Duration = Field(timedelta(hours=1), description="incremental overlap window")
    full_refresh_every: Duration | None = Field(None, description="periodic verified full walk")
    max_delete_fraction: float = Field(0.05, ge=0, le=1, description="mass-delete breaker")
    max_single_refreshes: int = Field(500, ge=0, description="open runs refreshed one by one")
    max_requests_in_flight: int = Field(
        DEFAULT_MAX_IN_FLIGHT, ge=1, le=256,
        description="requests in flight across all workspaces (each keeps api.concurrency)")
    max_duration: PositiveDuration = Field(
        DEFAULT_MAX_DURATION, description="a sync still walking after this fails cleanly")


class ExportSettings(_Section):
    parquet_dir: Path | None = Field(None, description="Parquet export root; unset = no export")


class AnalyticsSettings(_Section):
    stuck_after: Duration = Field(timedelta(hours=24), description="open runs older are stuck")


class RetentionSettings(_Section):
    raw_pages: PositiveDuration | None = Field(
        None, description="keep every fetched body this long, for `runs-etl replay`; unset = off")


class ScheduleSettings(_Section):
    cron: str | None = Field(None, description="crontab expression, e.g. '*/15 * * * *'")
    interval: Duration | None = Field(None, description="fixed interval, e.g. '15m'")
    jitter: Duration = Field(timedelta(0), description="random delay added to each run")
    misfire_grace: Duration = Field(timedelta(minutes=5), description="late runs still start")
    run_at_start: bool = Field(True, description="sync once when the scheduler starts")
    timezone: str = Field("UTC", description="timezone of the cron expression")

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, name: str) -> str:
        return check_timezone(name)


class LoggingSettings(_Section):
    format: Literal["text", "json"] = Field("text", description="log line format")
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")


class LakeSettings(_Section):
    """``[lake]``: Delta Lake tables written after every sync (unset ``uri`` = no lake)."""

    uri: str | None = Field(None, description="local folder or s3://bucket/prefix of the tables")
    # Secrets (keys, tokens): SecretStr keeps them out of reprs, logs and error messages.
    storage_options: dict[str, SecretStr] = Field(
        default_factory=dict, description="delta-rs storage options (AWS_ENDPOINT_URL ...); "
        "unset ones come from the standard AWS_* environment variables")
    partition_by_month: bool = Field(True, description="partition runs by workspace and the "
                                     "UTC month of created_at (else by workspace only)")
    vacuum_retention: Duration = Field(DEFAULT_VACUUM_RETENTION,
                                       description="`lake vacuum` keeps files younger than this")

    @field_validator("uri")
    @classmethod
    def _uri_is_a_place(cls, uri: str | None) -> str | None:
        if uri is None or not uri.strip():
            return None
        uri = uri.strip().rstrip("/")
        scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", uri)
        if scheme and scheme.group(1).lower() not in LAKE_SCHEMES:
            raise ValueError(f"{redact_url(uri)!r}: use a local folder or one of "
                             + ", ".join(f"{s}://" for s in LAKE_SCHEMES))
        if scheme and scheme.group(1).lower() != "file" and not urlsplit(uri).netloc:
            raise ValueError(f"{redact_url(uri)!r} names no bucket (e.g. s3://bucket/prefix)")
        return uri

    def storage(self) -> dict[str, str]:
        """The storage options as delta-rs takes them (plain strings)."""
        return {k: v.get_secret_value() for k, v in self.storage_options.items()}


class WorkspaceSettings(_Section):
    """One ``[[workspaces]]`` entry: a Noxus workspace (one API key) synced into the warehouse."""

    name: str = Field(pattern=WORKSPACE_NAME, description="short slug, e.g. prod, staging")
    api_url: str | None = Field(None, description="API base URL (default: api.url)")
    key_env: str | None = Field(None, description="environment variable holding the key")
    key_file: Path | None = Field(None, description="file holding the key")
    key: SecretStr | None = Field(None, description="the key itself (prefer key_env / key_file)")


class Settings(BaseModel):
    """Every setting of runs-etl, grouped like ``config.example.toml``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    api: ApiSettings = ApiSettings()
    # Empty: one workspace, ``default``, from ``[api]`` (and RUNS_ETL_API_KEY).
    workspaces: tuple[WorkspaceSettings, ...] = ()
    warehouse: WarehouseSettings = WarehouseSettings()
    sync: SyncSettings = SyncSettings()
    export: ExportSettings = ExportSettings()
    analytics: AnalyticsSettings = AnalyticsSettings()
    retention: RetentionSettings = RetentionSettings()
    schedule: ScheduleSettings = ScheduleSettings()
    logging: LoggingSettings = LoggingSettings()
    lake: LakeSettings = LakeSettings()

    def api_key(self) -> str:
        """The key to send; raises ConfigError naming both ways to set it."""
        if self.api.key is not None and self.api.key.get_secret_value():
            return self.api.key.get_secret_value()
        raise ConfigError(
            ["no API key: set RUNS_ETL_API_KEY, RUNS_ETL_API_KEY_FILE or [api] key in the config"]
        )

    def workspace_names(self) -> list[str]:
        return [w.name for w in self.workspaces] or [DEFAULT_WORKSPACE]

    def select_workspaces(self, names: Sequence[str] | None) -> list[str]:
        """The workspaces a command works on (all by default); unknown names are ConfigError."""
        known = self.workspace_names()
        if not names:
            return known
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError([f"--workspace {n}: no such workspace (configured: "
                               f"{', '.join(known)})" for n in unknown])
        return list(dict.fromkeys(names))

    def for_workspace(self, name: str) -> Settings:
        """These settings with ``api`` pointing at workspace ``name`` (its URL and key), so the
        engine syncs one workspace with the settings it always had."""
        if not self.workspaces:
            return self
        ws = next(w for w in self.workspaces if w.name == name)
        api = self.api.model_copy(update={"url": ws.api_url or self.api.url, "key": ws.key})
        return self.model_copy(update={"api": api})

    def check_keys(self, names: Sequence[str]) -> None:
        """Every workspace to sync has a key, before anything is locked or created."""
        if not self.workspaces:
            self.api_key()
            return
        missing = [n for n in names if self.for_workspace(n).api.key is None]
        if missing:
            raise ConfigError([f"workspace {n!r}: no API key: set key_env (an environment "
                               "variable holding it) or key_file" for n in missing])


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


def _suggest(loc: tuple) -> str:
    """'; did you mean api.page_size?' for an unknown key close to a real one, else ''."""
    fields: Mapping[str, Any] = Settings.model_fields
    prefix = ""
    if len(loc) == 2 and loc[0] in fields:
        section = fields[loc[0]].annotation
        if not (isinstance(section, type) and issubclass(section, BaseModel)):
            return ""
        fields, prefix = section.model_fields, f"{loc[0]}."
    match = difflib.get_close_matches(str(loc[-1]), list(fields), n=1, cutoff=0.6)
    return f"; did you mean {prefix}{match[0]}?" if match else ""


def _format_errors(err: ValidationError, origins: Mapping[tuple, str] | None = None) -> list[str]:
    origins = origins or {}
    problems = []
    for e in err.errors():
        loc = tuple(e["loc"])
        name = ".".join(str(p) for p in loc)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown setting" + _suggest(loc)
        origin = origins.get(loc[:2]) or origins.get(loc[:1])
        if origin:
            msg += f" (from {origin})"
        problems.append(f"{name}: {msg}" if name else msg)
    return problems


def _cross_problems(data: Mapping, origins: Mapping[tuple, str]) -> list[str]:
    """Problems between settings, found on the raw values so they are listed with the rest."""
    schedule = data.get("schedule")
    if not isinstance(schedule, Mapping):
        return []
    if schedule.get("cron") is not None and schedule.get("interval") is not None:
        where = sorted({o for k in ("cron", "interval")
                        if (o := origins.get(("schedule", k))) is not None})
        return ["schedule: set exactly one of schedule.cron (e.g. '*/15 * * * *') and "
                "schedule.interval (e.g. '15m'); both are set"
                + (f" (from {', '.join(where)})" if where else "")]
    return []


def _origins(data: Mapping, label: str) -> dict[tuple, str]:
    out: dict[tuple, str] = {}
    for section, values in data.items():
        out[(section,)] = label
        if isinstance(values, Mapping):
            out.update({(section, key): label for key in values})
    return out


def load_settings(
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    cwd: Path | None = None,
) -> Settings:
    """Build Settings from file, environment and flag overrides (``{"api": {"url": ...}}``).
    Every problem is reported at once, each naming where its value came from."""
    env = {} if env is None else env
    data: dict = {}
    origins: dict[tuple, str] = {}
    if config_file is None:
        default = (cwd or Path.cwd()) / DEFAULT_CONFIG_FILE
        config_file = default if default.is_file() else None
    if config_file is not None:
        data = _read_toml(Path(config_file))
        origins.update(_origins(data, str(config_file)))
    from_env: dict[str, dict[str, str]] = {}
    for name, (section, key) in ENV_VARS.items():
        if env.get(name, "") != "":
            from_env.setdefault(section, {})[key] = env[name]
            # Never echo the key; other values are shown as given, on one line.
            shown = name if key == "key" else f"{name}={one_line(redact_url(env[name]), 80)}"
            origins[(section, key)] = shown
    data = _deep_merge(data, from_env)
    if overrides:
        # Sections are mappings of flag values (None: not given); ``workspaces`` is a list.
        flags = {s: {k: v for k, v in d.items() if v is not None} if isinstance(d, Mapping)
                 else d for s, d in overrides.items()}
        data = _deep_merge(data, flags)
        origins.update({(s, k): "the command line" for s, d in flags.items()
                        if isinstance(d, Mapping) for k in d})
    problems = _cross_problems(data, origins)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as e:
        problems = _format_errors(e, origins) + problems
    if problems:
        raise ConfigError(problems)
    return _resolve_workspaces(_resolve_key_file(settings), env, config_file)


def _resolve_workspaces(settings: Settings, env: Mapping[str, str],
                        config_file: Path | None) -> Settings:
    """Read each workspace's key (from its environment variable or file) and check its URL the
    way ``[api] url`` is checked; problems name the workspace."""
    if not settings.workspaces:
        return settings
    problems: list[str] = []
    names = [w.name for w in settings.workspaces]
    problems += [f"workspaces: {n!r} is configured twice" for n in sorted(set(names))
                 if names.count(n) > 1]
    resolved = []
    for ws in settings.workspaces:
        where = f"workspace {ws.name!r}"
        key = ws.key.get_secret_value() if ws.key is not None else None
        if sum(x is not None for x in (ws.key, ws.key_env, ws.key_file)) > 1:
            problems.append(f"{where}: set one of key_env, key_file and key")
        elif ws.key_env is not None:
            key = env.get(ws.key_env) or None
            if key is None:
                problems.append(f"{where}: key_env {ws.key_env} is not set in the environment")
        elif ws.key_file is not None:
            try:
                key = _read_key_file(ws.key_file, f"{where}: key_file")
            except ConfigError as e:
                problems += e.problems
        try:
            api = ApiSettings.model_validate({**settings.api.model_dump(),
                                              "url": ws.api_url or settings.api.url,
                                              "key": key})
        except ValidationError as e:
            problems += [f"{where}: {p.replace('url:', 'api_url:', 1)}"
                         for p in _format_errors(e)]
            continue
        resolved.append(ws.model_copy(update={"api_url": api.url, "key": api.key}))
    if problems:
        raise ConfigError(problems)
    plain = [w.name for w in settings.workspaces if w.key is not None]
    if len(settings.workspaces) > 1 and plain and config_file is not None \
            and os.stat(config_file).st_mode & 0o044:
        log.warning("%s holds plain API keys (workspaces %s) and other users can read it: use "
                    "key_env or key_file, or chmod 600 it", config_file, ", ".join(plain))
    return settings.model_copy(update={"workspaces": tuple(resolved)})


def _resolve_key_file(settings: Settings) -> Settings:
    """A key given directly wins; otherwise read it from ``key_file`` (a mounted secret)."""
    api = settings.api
    if (api.key is not None and api.key.get_secret_value()) or api.key_file is None:
        return settings
    key = _read_key_file(api.key_file, "api.key_file")
    return settings.model_copy(update={"api": api.model_copy(update={"key": SecretStr(key)})})


def _read_key_file(path: Path, setting: str) -> str:
    """The key in ``path``, stripped; one unreadable, empty or not a header value is ConfigError
    naming ``setting``, so ``[api]`` and each ``[[workspaces]]`` entry report it alike."""
    try:
        key = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ConfigError([f"{setting}: cannot read {path}: {e.strerror}"]) from None
    except UnicodeDecodeError:  # a binary file (a keystore, a wrong path): never echo it
        raise ConfigError([f"{setting}: {path} is not UTF-8 text"]) from None
    if not key:
        raise ConfigError([f"{setting}: {path} is empty"])
    try:
        ApiSettings._key_is_a_header_value(key)
    except ValueError as e:
        raise ConfigError([f"{setting}: {path}: {e}"]) from None
    return key
