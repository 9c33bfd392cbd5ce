"""Validation in worker processes: a long walk validates and stages pages on every core.

pydantic, msgspec and the Python that builds Arrow columns hold the GIL, so in one process a
walk is bound to one core: ~2.3 ms of validating, normalizing and staging per page of 100 runs
against ~1.1 ms of HTTP. When a full walk begins on a source of ``START_AT_PAGE`` pages or more
(short walks, and incremental ones, never start them: ``staging.StagingSink.expect``), the sync
starts ``sync.parse_workers`` worker processes. Until one is ready (a fresh interpreter: ~0.15 s
of imports) pages are validated in the sync's own process as before. From then the sync's
process fetches, and hands each body to the least busy worker (or, when every worker is
``SHARE_AT`` pages behind, validates it itself), which validates it with the same
``models.parse_page``, stages it with the same ``normalize.staged_tables`` into the sync's
staging folder (``batches.BatchFiles``, a file prefix of its own), and answers with the page's
``models.PageDigest``: what the walk needs to go on and to verify itself. A body that is not a
page envelope is answered as such, and the client retries the request as before. Everything
about HTTP (retries, the limiter, the ledger's counters, raw page retention) stays in the sync's
process.

A worker reads requests on stdin and answers each on stdout, in order (4-byte length, pickle:
a private socket between two processes of the same program). It exits when its stdin closes,
and only then: a sync killed with SIGKILL leaves none behind, and a signal meant for the sync
(Ctrl-C in a terminal, systemd's SIGTERM to the whole service) is ignored by the workers, so
the sync unwinds, or finishes, as it would alone. A worker that dies fails the sync
(``WorkerError``, nothing committed: it may have held pages not yet written); one that cannot
start leaves the walk validating in process, with a warning. Each worker costs ~80-120 MB of
RSS, most of it the libraries the sync's own process maps too.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import pickle
import signal
import socket
import sys
import traceback
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ..errors import WorkerError

# The worker process imports these only once it ignores signals and skips unused imports.
if TYPE_CHECKING:
    from .models import PageDigest

log = logging.getLogger("runs_etl.parallel")

# A full walk this long starts the workers: below it, their start-up costs more than they save.
START_AT_PAGE = 20
# When every worker has this many pages waiting, the sync's own process validates the next one
# itself: on two CPUs, one worker validates more slowly than the sync fetches (measured at
# 100k: median 3.76 s with this, 4.10 s without, over five alternating pairs; at 2 or 4
# pages the sync's process took too much of it and fetched late).
SHARE_AT = 8
# Seconds a worker gets to exit once its stdin is closed, before it is killed.
EXIT_WAIT = 5.0
# Most workers a sync starts by default: each is a second interpreter with its libraries.
MAX_DEFAULT_WORKERS = 4


def default_workers() -> int:
    """One worker per CPU this process may use beyond the one its own fetching needs, at most
    ``MAX_DEFAULT_WORKERS``: none on a single CPU, one on two. (Measured at 100k runs on two
    CPUs shared with the simulator: one worker cut the full sync's wall time by a quarter; two
    took more CPU and memory for no more speed, the sync's own process losing its core to
    them.)"""
    return max(0, min(usable_cpus() - 1, MAX_DEFAULT_WORKERS))


def usable_cpus() -> int:
    """The CPUs this process may use: those it may run on, within its container's CPU quota."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(cpus or 1, _cpu_quota() or 1 << 16)


def _cpu_quota(path: str = "/sys/fs/cgroup/cpu.max") -> int | None:
    """The CPUs a cgroup v2 quota allows (``cpu.max``: "quota period", or "max"), rounded up."""
    try:
        quota, period = Path(path).read_text().split()[:2]
        return None if quota == "max" else max(1, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        return None


PageParser = Callable[[int, int, bytes], Awaitable["PageDigest | None"]]


@dataclass(eq=False)
class _Worker:
    proc: asyncio.subprocess.Process
    stdout: asyncio.StreamReader
    stdin: asyncio.StreamWriter
    ready: bool = False
    gone: bool = False  # its answers have ended: nothing sent to it will be answered
    pending: deque[asyncio.Future] = field(default_factory=deque)
    reader: asyncio.Task | None = None


class ValidationPool:
    """The sync's validation workers, started on demand; shared by its workspaces' walks."""

    def __init__(self, workers: int, batch_pages: int):
        self.size = workers
        self.batch_pages = batch_pages
        self._workers: list[_Worker] = []
        self._starting: asyncio.Task | None = None
        self._failure: BaseException | None = None
        self._closing = False
        self.pages = 0  # validated by the workers
        self.share_at = SHARE_AT

    def parser_for(self, folder: Path) -> PageParser:
        """The client's page parser for a walk staging into ``folder``."""
        async def parse(seq: int, number: int, body: bytes) -> PageDigest | None:
            return await self.parse(folder, seq, number, body)
        return parse

    async def parse(self, folder: Path, seq: int, number: int, body: bytes
                    ) -> PageDigest | None:
        """Page ``number``'s ``body`` (arrival ``seq``) validated and staged by a worker: its
        digest; None while no worker is ready, or none was started (the caller validates it
        in process). Raises ``EnvelopeError`` for a body that is not a page envelope."""
        if self._failure is not None:
            raise self._failure
        ready = [w for w in self._workers if w.ready]
        if not ready:
            return None
        worker = min(ready, key=lambda w: len(w.pending))
        if len(worker.pending) >= self.share_at:  # every worker is behind: lend a hand
            return None
        reply = await self._call(worker, ("page", str(folder), seq, number, body))
        if reply[0] == "page":
            self.pages += 1
            return reply[1]
        if reply[0] == "invalid":
            from .models import EnvelopeError

            raise EnvelopeError(reply[1])
        raise self._failed(reply)

    def expect(self, pages: int | None) -> None:
        """A full walk of about ``pages`` pages begins: start the workers if it is long enough
        (``START_AT_PAGE``) to pay for them."""
        if pages is not None and pages >= START_AT_PAGE:
            self.start()

    def start(self) -> None:
        """Start the workers (once), in the background: pages are validated in process until
        one is ready."""
        if self._starting is None and self.size > 0:
            self._starting = asyncio.ensure_future(self._start())

    async def flush(self, folder: Path) -> None:
        """Wait until every page validated for ``folder`` is written (and raise what writing
        it raised)."""
        if self._failure is not None:
            raise self._failure
        replies = await asyncio.gather(*(self._call(w, ("flush", str(folder)))
                                         for w in self._workers if w.ready))
        for reply in replies:
            if reply[0] != "flushed":
                raise self._failed(reply)

    async def aclose(self) -> None:
        """Stop the workers: each exits once its stdin is closed (killed if it does not)."""
        self._closing = True
        log.debug("validation workers: %d started, %d pages validated", len(self._workers),
                  self.pages, extra={"event": "workers_stopped", "pages": self.pages})
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
            await asyncio.gather(self._starting, return_exceptions=True)
        for w in self._workers:
            w.stdin.close()
        for w in self._workers:
            try:
                await asyncio.wait_for(w.proc.wait(), EXIT_WAIT)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
                await w.proc.wait()
            if w.reader is not None:
                w.reader.cancel()
                await asyncio.gather(w.reader, return_exceptions=True)

    async def _start(self) -> None:
        for _ in range(self.size):
            ours, theirs = socket.socketpair()
            proc = None
            try:
                for sock in (ours, theirs):  # a page body in one write, not 64 KB at a time
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
                # -P: the working directory is not on the worker's sys.path (as it is not on
                # the runs-etl command's), so no file there shadows a module.
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-P", "-m", __name__, str(self.batch_pages),
                    stdin=theirs.fileno(), stdout=theirs.fileno(),
                    stderr=asyncio.subprocess.DEVNULL)
                reader, writer = await asyncio.open_connection(sock=ours, limit=1 << 20)
            except BaseException as e:
                ours.close()
                if proc is not None and proc.returncode is None:
                    proc.kill()
                if not isinstance(e, OSError):
                    raise
                # No process to be had (a limit): validate in process.
                log.warning("cannot start a validation worker (%s): the sync validates pages "
                            "in its own process", e.strerror or e,
                            extra={"event": "workers_unavailable"})
                return
            finally:
                theirs.close()
            worker = _Worker(proc, reader, writer)
            worker.reader = asyncio.ensure_future(self._read(worker))
            self._workers.append(worker)
        log.debug("validation workers started: %d", len(self._workers),
                  extra={"event": "workers_started", "workers": len(self._workers)})

    async def _call(self, worker: _Worker, request: tuple) -> tuple:
        if worker.gone:  # its reader has ended: nobody would answer
            raise self._failure or WorkerError("a validation worker has exited")
        stdin = worker.stdin
        future = asyncio.get_running_loop().create_future()
        worker.pending.append(future)
        data = pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)
        stdin.write(len(data).to_bytes(4, "little"))
        stdin.write(data)
        try:
            await stdin.drain()
        except ConnectionError:
            pass  # the worker is gone: its reader fails ``future``
        return await future

    async def _read(self, worker: _Worker) -> None:
        """Answers of ``worker``, in the order of its requests, until it exits."""
        stdout = worker.stdout
        try:
            while True:
                size = int.from_bytes(await stdout.readexactly(4), "little")
                reply = pickle.loads(await stdout.readexactly(size))
                if reply[0] == "ready":
                    worker.ready = True
                    continue
                future = worker.pending.popleft()
                if not future.done():  # its caller may have been cancelled
                    future.set_result(reply)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        worker.gone = True  # before any await: no request may join ``pending`` from now on
        code = await worker.proc.wait()
        if self._closing:
            return
        if not worker.ready:  # it never started: the others (or the sync itself) validate
            self._workers.remove(worker)
            log.warning("a validation worker could not start (%s): pages are validated by the "
                        "others, or in the sync's own process", _exit_status(code),
                        extra={"event": "worker_failed_to_start"})
            return
        self._failure = WorkerError(
            f"a validation worker (pid {worker.proc.pid}) died ({_exit_status(code)}), maybe "
            "with pages not yet staged; nothing was committed. If the system ran out of "
            "memory, lower sync.parse_workers (0 validates in the sync's own process)")
        while worker.pending:
            future = worker.pending.popleft()
            if not future.done():
                future.set_exception(self._failure)

    @staticmethod
    def _failed(reply: tuple) -> BaseException:
        from .batches import staging_failure

        if reply[0] == "failed" and reply[1] == "staging":
            _, _, folder, errno, strerror = reply
            return staging_failure(Path(folder), OSError(errno, strerror))
        # A bug in the worker: its traceback, as the sync's own would be shown.
        return RuntimeError(f"a validation worker failed:\n{reply[-1]}")


def _exit_status(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"


# The worker process -------------------------------------------------------------------------


def _serve(requests: BinaryIO, answers: BinaryIO, batch_pages: int) -> None:
    """Answer requests until stdin closes (see the module docstring for the protocol)."""
    from .batches import BatchFiles
    from .models import EnvelopeError, PageDigest, parse_page
    from .normalize import staged_tables

    def answer(reply: tuple) -> None:
        data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        answers.write(len(data).to_bytes(4, "little") + data)
        answers.flush()

    pending: dict[str, list] = {}  # folder -> validated pages not yet written
    files: dict[str, BatchFiles] = {}
    failed: dict[str, tuple] = {}  # folder -> why writing its pages failed, told on next ask

    def write(folder: str) -> None:
        pages = pending.pop(folder, [])
        if pages:
            out = files.setdefault(folder, BatchFiles(Path(folder), f"w{os.getpid()}-"))
            out.write(staged_tables(pages))

    def fail(folder: str, e: BaseException) -> tuple:
        """Remember why ``folder``'s pages are lost: every later request about it is told."""
        pending.pop(folder, None)
        failed[folder] = (("failed", "staging", folder, e.errno, e.strerror or str(e))
                          if isinstance(e, OSError) else
                          ("failed", "bug", "".join(traceback.format_exception(e))))
        return failed[folder]

    answer(("ready",))
    while True:
        header = requests.read(4)
        if len(header) < 4:
            return
        request = pickle.loads(requests.read(int.from_bytes(header, "little")))
        op, folder = request[0], request[1]
        if folder in failed:
            answer(failed[folder])
        elif op == "flush":
            try:
                write(folder)
                answer(("flushed",))
            except Exception as e:  # OSError: a full disk under the staging folder
                answer(fail(folder, e))
        else:
            _, _, seq, number, body = request
            try:
                parsed = parse_page(body)
            except EnvelopeError as e:
                answer(("invalid", str(e)))
                continue
            except Exception as e:  # a bug: told to the sync, which shows it as its own
                answer(fail(folder, e))
                continue
            batch = pending.setdefault(folder, [])
            batch.append((seq, number, parsed))
            answer(("page", PageDigest.of(parsed)))  # the walk goes on while this writes
            if len(batch) >= batch_pages:
                try:
                    write(folder)
                except Exception as e:  # told at the next request, at the latest the flush
                    fail(folder, e)


def main(argv: list[str] | None = None) -> None:
    """``python -m runs_etl.engine.parallel BATCH_PAGES``: one validation worker."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # the sync's to handle
        signal.signal(sig, signal.SIG_IGN)
    from ..unused import skip_unused_imports

    skip_unused_imports()
    from .models import WALK_GC_THRESHOLD

    gc.set_threshold(WALK_GC_THRESHOLD, *gc.get_threshold()[1:])
    # The answers own the real stdout; anything else printed goes to stderr instead.
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    batch_pages = int((argv or sys.argv[1:])[0])
    with contextlib.suppress(BrokenPipeError):
        _serve(sys.stdin.buffer, answers, batch_pages)
    os._exit(0)  # nothing to tear down: every batch asked for is written


if __name__ == "__main__":
    main()
