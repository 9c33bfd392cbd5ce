"""One error tree for runs-etl; the CLI turns any ``RunsEtlError`` into ``Error: ...`` + exit code.

    RunsEtlError                      exit 1 unless a branch says otherwise
    ├── ConfigError                   exit 2   bad settings file / env / flags
    ├── ApiError                               anything the API did wrong
    │   ├── AuthError                 exit 3   401 / 403: the API key is missing or wrong
    │   ├── RetryableApiError                  429, 5xx, timeouts, bad bodies (retried, then raised)
    │   ├── FatalApiError                      other 4xx (422, 404 ...): retrying will not help
    │   └── WalkError                          the server never ends, or the walk cannot be trusted
    ├── DataError                              too many records failed validation
    └── WarehouseError                         DuckDB could not be opened / migrated / written
        └── LockedError               exit 75  another writer holds the warehouse
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_AUTH = 3
# 75 is EX_TEMPFAIL in sysexits.h: cron wrappers and systemd treat it as "try again later".
EXIT_LOCKED = 75
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


class RunsEtlError(Exception):
    """Root of every expected failure; ``str(err)`` is the one line shown to the user."""

    exit_code = EXIT_FAILURE


class ConfigError(RunsEtlError):
    """Settings are invalid; ``problems`` lists every one of them."""

    exit_code = EXIT_CONFIG

    def __init__(self, problems: list[str]):
        self.problems = problems
        if len(problems) == 1:
            msg = f"invalid configuration: {problems[0]}"
        else:
            msg = f"invalid configuration ({len(problems)} problems): " + "; ".join(problems)
        super().__init__(msg)


class ApiError(RunsEtlError):
    """The API answered badly; carries what an operator needs to find the request again."""

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        status: int | None = None,
        page: int | None = None,
        request_id: str | None = None,
        attempts: int | None = None,
    ):
        self.url = url
        self.status = status
        self.page = page
        self.request_id = request_id
        self.attempts = attempts
        self.message = message
        details = []
        if page is not None:
            details.append(f"page {page}")
        if status is not None:
            details.append(f"HTTP {status}")
        if request_id:
            details.append(f"request id {request_id}")
        if attempts:
            details.append(f"after {attempts} attempts")
        super().__init__(message + (f" ({', '.join(details)})" if details else ""))


class AuthError(ApiError):
    exit_code = EXIT_AUTH


class RetryableApiError(ApiError):
    """A failure worth retrying; ``retry_after`` is the server's requested wait in seconds."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw):
        self.retry_after = retry_after
        super().__init__(message, **kw)


class FatalApiError(ApiError):
    pass


class WalkError(ApiError):
    pass


class DataError(RunsEtlError):
    pass


class WarehouseError(RunsEtlError):
    pass


class LockedError(WarehouseError):
    exit_code = EXIT_LOCKED
