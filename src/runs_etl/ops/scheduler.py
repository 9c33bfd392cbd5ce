"""``runs-etl schedule``: APScheduler runs the sync on a crontab expression or a fixed interval.

One sync at a time (``max_instances=1``; the writer lock keeps cron-started syncs out too) and late
runs coalesce into one. A failed sync is logged and the next one runs on time. SIGTERM / SIGINT stop
the scheduler once the running sync has finished (it commits whole or not at all) and exit 0; a
second signal aborts that sync at once (exit 130), which is safe as well: its transaction rolls
back, and the ledger, the lock and the staging folder are left as after any failed sync.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from ..config import ScheduleSettings, Settings, check_timezone
from ..errors import EXIT_INTERRUPTED, EXIT_OK, ConfigError, LockedError, RunsEtlError
from .logs import log_failure
from .signals import interrupt, was_interrupted

log = logging.getLogger("runs_etl.scheduler")

JOB_ID = "sync"
# 128 + SIGINT: what a shell reports for Ctrl-C; used when a second signal aborts a running sync.
CRON_MACROS = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
               "@weekly": "0 0 * * 0", "@monthly": "0 0 1 * *", "@yearly": "0 0 1 1 *",
               "@annually": "0 0 1 1 *"}
# Crontab numbers weekdays from Sunday (0 or 7); APScheduler 3 from Monday. Names mean the same to
# both, so numeric weekdays are translated to names.
_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun")

SyncFn = Callable[[Settings], object]


def _timezone(name: str) -> tzinfo:
    try:
        return ZoneInfo(check_timezone(name))
    except ValueError as e:
        raise ConfigError([f"schedule.timezone: {e}"]) from None


def _cron_weekdays(field: str) -> str:
    """A crontab day-of-week field with every number replaced by day names."""
    out = []
    for part in field.split(","):
        span, _, step = part.partition("/")
        if not any(c.isdigit() for c in span) and not (span == "*" and step):
            out.append(part)  # "*", names and name ranges: already unambiguous
            continue
        if span == "*":
            first, last = 0, 6
        elif "-" in span:
            first, last = (int(x) for x in span.split("-", 1))
        else:
            first = int(span)
            last = 6 if step else first
        if not (0 <= first <= last <= 7):
            raise ValueError(f"day of week {part!r} is out of range 0-7")
        days = range(first, last + 1, int(step) if step else 1)
        out.extend(dict.fromkeys(_WEEKDAYS[d] for d in days))
    return ",".join(out)


def cron_trigger(expr: str, tz: tzinfo, jitter: float | None = None) -> CronTrigger:
    """A CronTrigger with crontab's meaning (weekday 0 = Sunday, ``@daily`` and friends)."""
    fields = CRON_MACROS.get(expr.strip().lower(), expr).split()
    if len(fields) != 5:
        raise ValueError(f"expected 5 fields (minute hour day month weekday), got {len(fields)}")
    minute, hour, day, month, weekday = fields
    if day != "*" and weekday != "*":
        # cron runs when either matches, APScheduler only when both do: refuse to guess.
        raise ValueError("restrict day-of-month or day-of-week, not both "
                         "(cron and APScheduler disagree on what that means)")
    return CronTrigger(minute=minute, hour=hour, day=day, month=month,
                       day_of_week=_cron_weekdays(weekday), timezone=tz, jitter=jitter)


def build_trigger(schedule: ScheduleSettings, tz: tzinfo):
    """The trigger for ``[schedule]``: exactly one of ``cron`` and ``interval``."""
    if (schedule.cron is None) == (schedule.interval is None):
        which = "both are" if schedule.cron is not None else "neither is"
        raise ConfigError([f"schedule: set exactly one of schedule.cron (e.g. '*/15 * * * *') and "
                           f"schedule.interval (e.g. '15m'); {which} set"])
    jitter = schedule.jitter.total_seconds() or None
    if schedule.interval is not None:
        if schedule.interval <= timedelta(0):
            raise ConfigError([f"schedule.interval must be positive, got {schedule.interval}"])
        return IntervalTrigger(seconds=schedule.interval.total_seconds(), timezone=tz,
                               jitter=jitter)
    try:
        return cron_trigger(schedule.cron or "", tz, jitter)
    except ValueError as e:
        raise ConfigError([f"schedule.cron: {schedule.cron!r} is not a crontab expression: {e}"]
                          ) from None


class _Daemon:
    """The job, the stop flag and the signal handling of one ``run_scheduler`` call.

    APScheduler decides *when* (on its worker thread); the sync itself runs on the thread that
    called ``run_scheduler`` (the main thread), so a second SIGTERM / Ctrl-C interrupts it the
    way it interrupts ``runs-etl sync``: the transaction rolls back, the ledger says ``failed``,
    staging files and the writer lock are released, and the process exits 130.
    """

    def __init__(self, settings: Settings, sync_fn: SyncFn, stop: threading.Event):
        self.settings, self.sync_fn, self.stop = settings, sync_fn, stop
        self.running = threading.Event()
        self.scheduler: BackgroundScheduler | None = None
        self.due: queue.Queue[threading.Event] = queue.Queue()

    def job(self) -> None:
        """APScheduler's job: hand the sync to the serving thread and wait for it to finish, so
        ``max_instances=1`` and coalescing keep their meaning."""
        done = threading.Event()
        self.due.put(done)
        while not done.wait(0.5):
            if self.stop.is_set() and not self.running.is_set():
                return  # stopping: the serving thread will not take it any more

    def serve(self) -> None:
        """Run due syncs until stopped."""
        while not self.stop.is_set():
            try:
                done = self.due.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.run_one()
            finally:
                done.set()

    def run_one(self) -> None:
        self.running.set()
        t0 = time.monotonic()
        try:
            try:
                self.sync_fn(self.settings)
            except Exception:
                if was_interrupted():  # e.g. DuckDB's "Query interrupted": the second signal
                    raise KeyboardInterrupt from None
                raise
        except LockedError as e:
            log.warning("scheduled sync skipped: %s", e, extra={"event": "sync_skipped"})
        except RunsEtlError as e:
            log_failure(log, "scheduled sync", e)
        except Exception:  # a bug: keep the traceback, and keep the daemon serving
            log.exception("scheduled sync crashed after %.1fs (a bug in runs-etl: please report "
                          "it); the scheduler keeps going", time.monotonic() - t0,
                          extra={"event": "sync_crashed"})
        finally:
            self.running.clear()
        self.log_next_run()

    def log_next_run(self) -> None:
        if self.stop.is_set() or self.scheduler is None:
            return
        job = self.scheduler.get_job(JOB_ID)
        when = job.next_run_time if job is not None else None
        log.info("next sync at %s", when.isoformat() if when else "(none scheduled)",
                 extra={"event": "next_run", "next_run_at": when})

    def on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if not self.stop.is_set():
            # Set before logging: a second signal may arrive while this handler is still logging.
            self.stop.set()
            busy = self.running.is_set()
            log.info("%s received: stopping%s", name,
                     " after the running sync (send it again to abort that sync)" if busy else "",
                     extra={"event": "stopping"})
        elif self.running.is_set():
            log.warning("%s received again: aborting the running sync; it commits nothing, the "
                        "warehouse keeps its previous state", name, extra={"event": "aborting"})
            interrupt()  # unwinds the sync on this (the main) thread

    def install_signals(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}  # only the main thread may handle signals; the caller stops us via the event
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, self.on_signal)
        return previous


def run_scheduler(settings: Settings, sync_fn: SyncFn, *,
                  stop_event: threading.Event | None = None) -> int:
    """Call ``sync_fn(settings)`` on ``settings.schedule`` until SIGTERM / SIGINT (or
    ``stop_event``); returns 0, or 130 when a second signal aborted a running sync.
    ``runs-etl schedule`` passes ``jobs.run_sync``."""
    schedule = settings.schedule
    tz = _timezone(schedule.timezone)
    trigger = build_trigger(schedule, tz)
    daemon = _Daemon(settings, sync_fn, stop_event or threading.Event())
    scheduler = BackgroundScheduler(timezone=tz, executors={"default": ThreadPoolExecutor(1)})
    daemon.scheduler = scheduler
    first_run = {"next_run_time": datetime.now(tz)} if schedule.run_at_start else {}
    scheduler.add_job(daemon.job, trigger, id=JOB_ID, name="runs-etl sync", max_instances=1,
                      coalesce=True, replace_existing=True,
                      misfire_grace_time=max(1, int(schedule.misfire_grace.total_seconds())),
                      **first_run)
    previous = daemon.install_signals()
    code = EXIT_OK
    try:
        scheduler.start()
        job = scheduler.get_job(JOB_ID)
        first = ("now" if schedule.run_at_start else
                 f"at {job.next_run_time.isoformat()}" if job and job.next_run_time else "never")
        log.info("scheduler started (%s, timezone %s, pid %s); first sync %s", trigger, tz,
                 os.getpid(), first, extra={"event": "scheduler_started"})
        daemon.serve()
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
        log.warning("the running sync was aborted; nothing of it was committed",
                    extra={"event": "aborted"})
    finally:
        daemon.stop.set()
        if scheduler.running:
            scheduler.shutdown(wait=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    log.info("scheduler stopped", extra={"event": "scheduler_stopped"})
    return code
