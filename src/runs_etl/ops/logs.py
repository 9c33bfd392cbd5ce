"""Logging: text or JSON lines (``RUNS_ETL_LOG_FORMAT``) on stderr, one line per event; each
sync logs one summary line (``engine.sync.summary_line``). The API key never reaches a log
line: it is only ever held in the HTTP client's headers and a ``SecretStr``
(``tests/test_logging.py`` checks it).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import TextIO

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
