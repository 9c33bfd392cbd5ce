"""The writer lock: one process at a time writes a warehouse (cron syncs, the scheduler, export).

An OS lock (``flock`` through ``filelock``) on ``<db>.lock``: the kernel drops it when its holder
exits, however it exits, so a lock left by a SIGKILLed process never blocks the next run. Who holds
it (pid, host, start time, command) is written to the sidecar ``<db>.lock.json`` for the error
message; the lock file itself is opened by every contender, so it carries no data.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from filelock import FileLock, Timeout

from ..errors import LockedError, WarehouseError

log = logging.getLogger("runs_etl.lock")

LOCK_SUFFIX = ".lock"
HOLDER_SUFFIX = ".lock.json"
SKIPPED_SUFFIX = ".skipped.json"
SKIPPED_KEPT = 20  # the most recent skipped attempts kept for status
# How often a waiting writer retries; short enough that a queued cron run starts promptly.
POLL_SECONDS = 0.1


@dataclass(frozen=True)
class Holder:
    """Who holds (or last held) the writer lock."""

    pid: int
    host: str
    started_at: str
    command: str
    pages: int | None = None  # pages a running sync has fetched so far, when it says

    def describe(self) -> str:
        here = self.host == socket.gethostname()
        where = "" if here else f" on host {self.host}"
        pages = "" if self.pages is None else f", {self.pages:,} pages so far"
        return f"pid {self.pid}{where} ({self.command}, since {self.started_at}{pages})"


def lock_path(db_path: Path) -> Path:
    return Path(f"{db_path}{LOCK_SUFFIX}")


def holder_path(db_path: Path) -> Path:
    return Path(f"{db_path}{HOLDER_SUFFIX}")


def read_holder(db_path: Path) -> Holder | None:
    """The holder recorded in the sidecar; None when absent or unreadable (it is only a hint)."""
    try:
        data = json.loads(holder_path(db_path).read_text(encoding="utf-8"))
        pages = data.get("pages")
        return Holder(int(data["pid"]), str(data["host"]), str(data["started_at"]),
                      str(data["command"]), None if pages is None else int(pages))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_holder(db_path: Path, holder: Holder) -> None:
    # Write then rename, so a contender never reads half a record. The record is only a hint for
    # the error message: failing to write it must not fail the sync.
    target = holder_path(db_path)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(asdict(holder)), encoding="utf-8")
        os.replace(tmp, target)
    except OSError as e:
        log.warning("cannot record the lock holder in %s: %s", target, e.strerror or e)


def note_progress(db_path: Path | str, holder: Holder | None, pages: int) -> Holder | None:
    """Record how far the holder has got, for ``status`` (a hint: never fails the sync)."""
    if holder is None:
        return None
    updated = replace(holder, pages=pages)
    _write_holder(Path(db_path), updated)
    return updated


def running(db_path: Path | str) -> Holder | None:
    """Who holds the writer lock right now (a sync or export in progress), or None.

    Probes the lock itself, so a holder record left by a killed process is not reported."""
    db_path = Path(db_path)
    path = lock_path(db_path)
    if _is_in_memory(db_path) or not path.exists():
        return None
    probe = FileLock(str(path))
    try:
        probe.acquire(timeout=0)
    except Timeout:
        return read_holder(db_path) or Holder(0, "?", "?", "another runs-etl process")
    except OSError:
        return None
    probe.release()
    return None


def _clear_holder(db_path: Path, holder: Holder) -> None:
    if (current := read_holder(db_path)) is not None and replace(current, pages=None) == \
            replace(holder, pages=None):
        try:
            holder_path(db_path).unlink(missing_ok=True)
        except OSError:
            pass  # a stale record is overwritten by the next holder


def record_skipped(db_path: Path | str, reason: str) -> None:
    """Note a sync that gave up because the warehouse was busy: it never reaches the ledger
    (it held no lock to write it), so ``status`` reads these instead. Only a hint."""
    db_path = Path(db_path)
    if _is_in_memory(db_path):
        return
    entry = {"at": datetime.now(UTC).isoformat(), "pid": os.getpid(),
             "reason": reason}
    target = Path(f"{db_path}{SKIPPED_SUFFIX}")
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps((skipped_attempts(db_path) + [entry])[-SKIPPED_KEPT:]),
                       encoding="utf-8")
        os.replace(tmp, target)
    except OSError as e:
        log.warning("cannot record the skipped sync in %s: %s", target, e.strerror or e)


def skipped_attempts(db_path: Path | str) -> list[dict]:
    """Syncs that gave up on a busy warehouse, oldest first (``at``, ``pid``, ``reason``)."""
    try:
        data = json.loads(Path(f"{db_path}{SKIPPED_SUFFIX}").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []


def _is_in_memory(db_path: Path) -> bool:
    return str(db_path).startswith(":memory:")


def locked_message(db_path: Path, waited: float) -> str:
    holder = read_holder(db_path)
    who = holder.describe() if holder else "another runs-etl process"
    waited_text = f"still held after waiting {waited:g}s" if waited > 0 else "not waiting"
    return (f"another writer is using {db_path}: {who} holds {lock_path(db_path)} "
            f"({waited_text}). It is released when that sync/export ends; retry later, or pass "
            "--wait SECONDS (warehouse.lock_wait) to queue behind it")


def _acquire(lock: FileLock, db_path: Path, wait: float) -> None:
    try:
        lock.acquire(timeout=0)
        return
    except Timeout:
        if wait <= 0:
            raise LockedError(locked_message(db_path, 0)) from None
    holder = read_holder(db_path)
    log.info("%s is busy: %s holds it; waiting up to %gs", db_path,
             holder.describe() if holder else "another runs-etl process", wait,
             extra={"event": "lock_wait", "holder_pid": holder.pid if holder else None})
    try:
        lock.acquire(timeout=wait, poll_interval=POLL_SECONDS)
    except Timeout:
        raise LockedError(locked_message(db_path, wait)) from None


@contextmanager
def writer_lock(db_path: Path | str, wait: float = 0.0, *,
                command: str = "runs-etl") -> Iterator[Holder | None]:
    """Hold the warehouse's writer lock, waiting up to ``wait`` seconds; else ``LockedError``."""
    db_path = Path(db_path)
    if _is_in_memory(db_path):  # nothing on disk to share, nothing to lock
        yield None
        return
    path = lock_path(db_path)
    lock = FileLock(str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _acquire(lock, db_path, wait)
    except OSError as e:  # Timeout is an OSError too, but _acquire turns it into LockedError
        raise WarehouseError(f"cannot take the writer lock {path}: {e.strerror or e}") from None
    try:
        holder = Holder(os.getpid(), socket.gethostname(),
                        datetime.now(UTC).isoformat(timespec="seconds"), command)
        _write_holder(db_path, holder)
        try:
            yield holder
        finally:
            _clear_holder(db_path, holder)
    finally:
        lock.release()
