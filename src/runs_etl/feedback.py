"""What a person sees: a live progress bar on a terminal, one summary line otherwise, and logging.

Logging is text or JSON (``RUNS_ETL_LOG_FORMAT``) on stderr, one line per event; each sync logs one
summary line. The API key never reaches a log line: it is only ever held in the HTTP client's
headers and a ``SecretStr`` (``tests/test_logging.py`` checks it).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_STD_ATTRS = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Third-party loggers that share our handler, and the least severe level each may emit.
# APScheduler warns about missed / skipped runs; its INFO lines repeat what we log ourselves.
_LIBRARY_LEVELS = {"apscheduler": logging.WARNING, "filelock": logging.WARNING,
                   "httpx": logging.WARNING, "httpcore": logging.WARNING}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, plus any ``extra=`` fields (flat)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STD_ATTRS and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, even if it was swapped."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def setup_logging(fmt: str = "text", level: str = "info", stream: TextIO | None = None) -> None:
    """Send runs-etl's logs (and library warnings) to ``stream`` (stderr) as text or JSON lines.

    Calling it again replaces the handler, so a test or a second command never doubles lines.
    """
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger("runs_etl")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    for name, floor in _LIBRARY_LEVELS.items():
        lib = logging.getLogger(name)
        lib.handlers[:] = [handler]
        lib.setLevel(max(floor, root.level))
        lib.propagate = False


# What an operator needs to find a failed request again (see ``errors.ApiError``).
_ERROR_CONTEXT = ("request_id", "status", "url", "page", "attempts")


def log_failure(logger: logging.Logger, what: str, exc: BaseException) -> None:
    """One ERROR line for an expected failure, with its type, exit code and request context."""
    fields = {"event": "failed", "action": what, "error_type": type(exc).__name__,
              "exit_code": getattr(exc, "exit_code", 1)}
    fields.update({k: v for k in _ERROR_CONTEXT if (v := getattr(exc, k, None)) is not None})
    logger.error("%s failed: %s", what, exc, extra=fields)


class BarProgress:
    """Rich progress bar: pages done / total, rows/s, ETA. Use as a context manager."""

    def __init__(self, stream: TextIO | None = None):
        self.console = Console(file=stream or sys.stderr)
        self.bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("pages · {task.fields[rows]:,} runs · {task.fields[rate]:,.0f} runs/s"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=True,
        )
        self.task: TaskID | None = None
        self.rows = 0
        self.t0 = time.perf_counter()

    def __enter__(self) -> BarProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def start_pass(self, number: int, pages: int | None) -> None:
        label = "walking runs" if number == 1 else f"re-walk {number} (source moved)"
        if self.task is not None:
            self.bar.remove_task(self.task)
        self.task = self.bar.add_task(label, total=pages, rows=self.rows, rate=0.0)

    def advance(self, pages: int, rows: int) -> None:
        self.rows += rows
        if self.task is None:
            return
        rate = self.rows / max(time.perf_counter() - self.t0, 1e-6)
        self.bar.update(self.task, advance=pages, rows=self.rows, rate=rate)
        task = next(t for t in self.bar.tasks if t.id == self.task)
        if task.total is not None and task.completed > task.total:  # the source grew
            self.bar.update(self.task, total=task.completed)


class QuietProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def start_pass(self, number: int, pages: int | None) -> None:
        pass

    def advance(self, pages: int, rows: int) -> None:
        pass


def make_progress(*, quiet: bool, stream: TextIO | None = None):
    stream = stream or sys.stderr
    if quiet or not stream.isatty():
        return QuietProgress()
    return BarProgress(stream)


def summary_line(result) -> str:
    """The one line per sync that cron mails and log search find."""
    # Only a full walk can be verified complete; an incremental one is partial by design.
    if result.mode == "incremental" and not result.verified:
        how = ""
    else:
        how = "verified: " if result.verified else "UNVERIFIED: "
    return (
        f"sync {result.sync_id} {result.outcome}: mode={result.mode} ({how}"
        f"{result.mode_reason}) pages={result.pages} requests={result.requests} "
        f"retries={result.retries} runs={result.runs_seen} new={result.rows_new} "
        f"updated={result.rows_updated} unchanged={result.rows_unchanged} "
        f"deleted={result.rows_deleted} rejected={result.rows_rejected} "
        f"extract={result.seconds_extract:.2f}s load={result.seconds_load:.2f}s "
        f"total={result.seconds_total:.2f}s"
    )
