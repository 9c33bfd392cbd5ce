"""One error tree for runs-etl; the CLI turns any ``RunsEtlError`` into ``Error: ...`` + exit code.

    RunsEtlError                      exit 1 unless a branch says otherwise
    ├── ConfigError                   exit 2   bad settings file / env / flags
    ├── ApiError                               anything the API did wrong
    │   ├── AuthError                 exit 3   401 / 403: the API key is missing or wrong
    │   ├── RetryableApiError                  429, 5xx, timeouts, bad bodies (retried, then raised)
    │   ├── FatalApiError                      other 4xx (422, 404 ...), redirect off the API's
    │   │                                      origin, oversized body: retrying will not help
    │   └── WalkError                          the server never ends, or the walk cannot be trusted
    ├── DeadlineError                          the sync ran past sync.max_duration
    ├── DataError                              too many records failed validation
    ├── WorkspacesFailed              worst of   some workspaces of a sync failed, others committed
    ├── LakeError                              the Delta lake could not be read or written
    └── WarehouseError                         DuckDB could not be opened / migrated / written
        └── LockedError               exit 75  another writer holds the warehouse
"""

from __future__ import annotations

import re

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_AUTH = 3
# 75 is EX_TEMPFAIL in sysexits.h: cron wrappers and systemd treat it as "try again later".
EXIT_LOCKED = 75
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


# Characters that must never reach a terminal or a log line raw: C0/C1 controls (ESC starts ANSI
# sequences), line and paragraph separators, and bidi overrides that reorder what is displayed.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_BREAKS = "\t\n\r\x0b\x0c\x85\u2028\u2029"


def one_line(text: str, limit: int | None = None) -> str:
    """``text`` as one printable line: line breaks become spaces, other control characters
    visible escapes (``\\x1b``), and at most ``limit`` characters. For anything a server sent."""

    def escape(m: re.Match) -> str:
        c = m.group()
        return " " if c in _BREAKS else c.encode("unicode_escape").decode("ascii")

    out = _UNSAFE.sub(escape, text)
    if limit is not None and len(out) > limit:
        out = out[: max(0, limit - 3)] + "..."
    return out


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
        # Messages and request ids can carry server text: one printable line at the source.
        message = one_line(message)
        request_id = one_line(request_id, 100) if request_id is not None else None
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


class DeadlineError(RunsEtlError):
    """The sync ran longer than ``sync.max_duration``; it was stopped and committed nothing."""


class DataError(RunsEtlError):
    pass


class WarehouseError(RunsEtlError):
    pass


class WorkerError(RunsEtlError):
    """A validation worker process (``engine.parallel``) died mid-sync: nothing was committed."""


class LakeError(RunsEtlError):
    """The Delta lake (``[lake] uri``) could not be read or written; the warehouse stands."""


class LockedError(WarehouseError):
    exit_code = EXIT_LOCKED


# Which exit code wins when several workspaces fail differently: what a person must fix first.
_SEVERITY = {EXIT_INTERRUPTED: 5, EXIT_CONFIG: 4, EXIT_AUTH: 3, EXIT_LOCKED: 2, EXIT_FAILURE: 1}


class WorkspacesFailed(RunsEtlError):
    """Some workspaces of a sync failed (the others committed); ``failures`` maps each failed
    workspace to its error, and the exit code is the most serious of theirs."""

    def __init__(self, failures: dict[str, RunsEtlError], synced: list[str]):
        self.failures = failures
        self.exit_code = max((e.exit_code for e in failures.values()),
                             key=lambda c: _SEVERITY.get(c, 0))
        kept = f" ({', '.join(synced)} synced and committed)" if synced else ""
        super().__init__(f"{len(failures)} workspace(s) failed{kept}: " + "; ".join(
            f"{name}: {err}" for name, err in failures.items()))


def first_line(e: BaseException) -> str:
    """An exception's first line (libraries such as DuckDB add context lines), or its type."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
