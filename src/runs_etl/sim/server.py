"""Built-in simulator of the Noxus runs API (`GET /v1/runs`, `GET /v1/runs/{id}`) on loopback.

It serves deterministic, realistic runs (made by `data`), can change them in the middle of a
walk and inject faults, so the ETL is tested against a real HTTP stack. `python -m runs_etl.sim
--help` serves one.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import heapq
import random
import re
import signal
import socket
import socketserver
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import parse_qsl, urlsplit

from ..engine.models import TERMINAL_STATUSES
from .data import _US, Workspace, _dump, _sort_key, _to_us

DEFAULT_SIZE = 50
MAX_SIZE = 100
_JSON = "application/json"
_INT = re.compile(r"\s*[+-]?\d+\s*")


@dataclass
class Faults:
    """Fault injection knobs, read on every request; rates are per-request probabilities.

    `rate_bad_record` serves one record of a list page malformed (no "id", or "created_at": "not a
    date") in a valid 200 envelope, so a client must reject just that record; the run is unharmed.

    `rate_limit` is a token bucket of that many requests per second (holding one second's worth):
    a request finding it empty gets 429 with `Retry-After` = the seconds until the next token, as
    a decimal (e.g. `0.013`; servers that round up to whole seconds only make clients wait longer).
    """

    rate_429: float = 0.0
    retry_after: str | None = "0"  # Retry-After value sent with 429 (None: no header)
    rate_500: float = 0.0  # 500 / 502 / 503
    rate_truncated: float = 0.0  # 200 whose body is cut in half
    rate_bad_envelope: float = 0.0  # 200 with valid JSON that is not a page
    rate_bad_record: float = 0.0  # list page with one malformed record (none if the page is empty)
    latency: float = 0.0  # seconds added to each request
    rate_limit: float = 0.0  # requests per second before 429s (0: unlimited)
    only_list: bool = True  # when True, GET /v1/runs/{id} is never faulted


class Simulator:
    """A thread-safe in-memory runs API served over loopback HTTP; see the module docstring."""

    def __init__(self, n_runs: int = 1000, *, seed: int = 0, api_key: str = "sim-key",
                 order: str = "newest", null_totals: bool = False, now: datetime | None = None,
                 days: int = 60, faults: Faults | None = None, host: str = "127.0.0.1",
                 port: int = 0, auth_status: int = 401, node_ids_object_rate: float = 0.01,
                 extra_fields_rate: float = 0.02):
        if order not in ("newest", "random"):
            raise ValueError(f"order must be 'newest' or 'random', not {order!r}")
        self.api_key, self.order, self.null_totals = api_key, order, null_totals
        self.faults = faults or Faults()
        self.host, self.port, self.auth_status = host, port, auth_status
        self.base_url = ""
        self.request_count = self.list_request_count = self.single_request_count = 0
        self.throttled_count = 0  # 429s sent by the rate limit
        self._tokens: float | None = None  # the rate limit's bucket (None: full)
        self._refilled = 0.0
        self.bytes_sent = 0
        self._lock = threading.Lock()  # guards all state and counters below
        self._hooks: list = []
        self._rng = random.Random(seed)
        self._frng = random.Random(seed + 7919)  # faults draw apart, so data stays seed-stable
        self._clock = _to_us(now or datetime.now(UTC).replace(microsecond=0))
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._ws = Workspace(self._rng, self._clock, days, node_ids_object_rate, extra_fields_rate)
        # _order is the serving order reversed: its last element is served first
        self._runs, self._open, self._order = self._ws.generate(n_runs, order == "random")

    @property
    def now(self) -> datetime:
        """The simulator clock: `now` at creation, moved forward a little by each mutation."""
        return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=self._clock)

    # ---- inspection ------------------------------------------------------------------------
    def snapshot(self) -> dict[str, dict]:
        """Live runs in serving order as JSON-ready dicts, timestamps in UTC with 'Z'.

        Nested values (input, definition, ...) are shared with the simulator: do not mutate them.
        """
        with self._lock:
            return self._ws.snapshot(self._order)

    def run_ids(self) -> set[str]:
        with self._lock:
            return set(self._runs)

    def open_ids(self) -> set[str]:
        with self._lock:
            return set(self._open)

    # ---- mutations -------------------------------------------------------------------------
    def add_runs(self, k: int, *, status: str = "queued") -> list[str]:
        """Create k runs at the simulator clock, which moves forward so they are the newest."""
        with self._lock:
            self._clock += _US
            out = []
            for _ in range(k):
                r = self._ws.fresh_run(self._clock, status)
                self._clock = r.created
                self._runs[r.id] = r
                if status not in TERMINAL_STATUSES:
                    self._open[r.id] = r
                if self.order == "newest":
                    bisect.insort(self._order, r, key=_sort_key)
                else:
                    self._order.insert(self._rng.randrange(len(self._order) + 1), r)
                out.append(r.id)
            return out

    def transition(self, k: int | None = None, ids=None) -> list[str]:
        """Advance open runs one step (queued -> running -> completed/failed); all by default."""
        with self._lock:
            if ids is not None:
                todo = [self._open[i] for i in dict.fromkeys(ids) if i in self._open]
            else:
                todo = list(self._open.values())
                if k is not None and k < len(todo):
                    todo = self._rng.sample(todo, k)
            for r in todo:
                self._clock += 1000
                self._ws.advance(r, self._clock)
                if r.status in TERMINAL_STATUSES:
                    del self._open[r.id]
            return [r.id for r in todo]

    def delete(self, k: int | None = None, ids=None, *, where: str = "random") -> list[str]:
        """Hard-delete runs by id, or k of them (default 1) picked at random, newest or oldest."""
        with self._lock:
            if ids is not None:
                victims = [self._runs[i] for i in dict.fromkeys(ids) if i in self._runs]
            else:
                k = min(1 if k is None else k, len(self._runs))
                if where == "newest":
                    victims = heapq.nlargest(k, self._runs.values(), key=_sort_key)
                elif where == "oldest":
                    victims = heapq.nsmallest(k, self._runs.values(), key=_sort_key)
                elif where == "random":
                    victims = self._rng.sample(list(self._runs.values()), k)
                else:
                    raise ValueError(f"where must be random, newest or oldest, not {where!r}")
            for r in victims:
                del self._runs[r.id]
                self._open.pop(r.id, None)
                wf = self._ws.wfs[r.wf]
                wf.runs_count, wf.cache = wf.runs_count - 1, None
            if len(victims) > 16:
                gone = {r.id for r in victims}
                self._order = [r for r in self._order if r.id not in gone]
            elif self.order == "newest":  # sorted: bisect instead of scanning 100k runs per hook
                for r in victims:
                    del self._order[bisect.bisect_left(self._order, _sort_key(r), key=_sort_key)]
            else:
                for r in victims:
                    self._order.remove(r)
            return [r.id for r in victims]

    def touch_terminal(self, ids) -> None:
        """Edit runs after they finished (their `source` changes), as late server updates do."""
        with self._lock:
            for r in filter(None, map(self._runs.get, ids)):
                r.source = self._ws.edited[r.source is self._ws.edited[0]]
                r.head = r.tail = None

    def on_list_request(self, hook) -> None:
        """Add hook(sim, page, size, n), called before list request number n is served.

        n counts every request to the list endpoint; hooks run for those that pass auth and
        validation, before any fault is drawn, in the request's thread and outside the state lock
        (so a hook may block to hold its request while others are served). None removes all hooks.
        """
        with self._lock:
            if hook is None:
                self._hooks.clear()
            else:
                self._hooks.append(hook)

    # ---- HTTP ------------------------------------------------------------------------------
    def _respond(self, path: str, key: str | None, close: bool) -> bytes:
        """The whole HTTP response (status line, headers, body) to one GET request."""
        url = urlsplit(path)
        run_id = url.path[len("/v1/runs/"):] if url.path.startswith("/v1/runs/") else ""
        kind = "list" if url.path == "/v1/runs" else "one" if run_id and "/" not in run_id else ""
        faults = self.faults
        faulty = kind == "list" or (kind == "one" and not faults.only_list)
        if faulty and faults.latency > 0:
            time.sleep(faults.latency)  # outside the lock: slow requests must not serialize
        with self._lock:
            self.request_count += 1
            self.list_request_count += kind == "list"
            self.single_request_count += kind == "one"
            n, hooks = self.list_request_count, list(self._hooks)
            headers = [f"x-request-id: sim-{self.request_count}"]
        refusal, page, size = self._admit(kind, key, url.query)
        if refusal is None and kind == "list":
            for hook in hooks:  # not under the lock: a hook may block to hold this request
                hook(self, page, size, n)
        with self._lock:
            status, body, ctype = refusal or self._serve(kind, run_id, page, size, faulty, headers)
            head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", f"content-type: {ctype}",
                    f"content-length: {len(body)}", f"date: {formatdate(usegmt=True)}",
                    "server: noxus-sim", *headers, *(["connection: close"] if close else [])]
            data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
            self.bytes_sent += len(data)
            return data

    def _admit(self, kind: str, key: str | None, query: str) -> tuple:
        """(refusal, page, size): a 404/401/422 response the request gets instead, or None."""
        params = dict(parse_qsl(query, keep_blank_values=True))  # the last value wins
        errors: list = []  # FastAPI reports every bad parameter at once
        page = _int_param(params, "page", 1, None, errors)
        size = _int_param(params, "size", DEFAULT_SIZE, MAX_SIZE, errors)
        if not kind:
            return (404, b'{"detail":"Not Found"}', _JSON), page, size
        if key != self.api_key:
            detail = "Not authenticated" if key is None else "Invalid API key"
            return (self.auth_status, _dump({"detail": detail}).encode(), _JSON), page, size
        if errors and kind == "list":
            return (422, _dump({"detail": errors}).encode(), _JSON), page, size
        return None, page, size

    def _serve(self, kind: str, run_id: str, page: int, size: int, faulty: bool,
               headers: list) -> tuple[int, bytes, str]:
        """Status, body and content type of an admitted request; called under the lock."""
        if faulty and self.faults.rate_limit > 0:
            wait = self._take_token(self.faults.rate_limit)
            if wait is not None:
                self.throttled_count += 1
                headers.append(f"retry-after: {wait:.3f}")
                return 429, b'{"detail":"Too Many Requests"}', _JSON
        fault = self._pick_fault(kind) if faulty else None
        if fault == "429":
            if self.faults.retry_after is not None:
                headers.append(f"retry-after: {self.faults.retry_after}")
            return 429, b'{"detail":"Too Many Requests"}', _JSON
        if fault == "5xx":
            status = self._frng.choice((500, 502, 503))
            if status == 502:  # what a proxy in front of the API sends
                return status, b"<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html"
            return status, b'{"detail":"%s"}' % HTTPStatus(status).phrase.encode(), _JSON
        if fault == "bad_envelope":
            return 200, b'{"error":"oops"}', _JSON
        if kind == "list":
            spoil = self._frng if fault == "bad_record" else None
            body = self._ws.page_body(self._order, page, size, self.null_totals, spoil)
        elif run_id in self._runs:
            body = self._ws.record(self._runs[run_id])
        else:
            return 404, b'{"detail":"Run not found"}', _JSON
        return 200, body[: len(body) // 2] if fault == "truncated" else body, _JSON

    def _take_token(self, rate: float) -> float | None:
        """Take a token from the rate limit's bucket: None, or the seconds until one is free."""
        now = time.monotonic()
        tokens = rate if self._tokens is None else min(
            rate, self._tokens + (now - self._refilled) * rate)
        self._refilled = now
        if tokens >= 1:
            self._tokens = tokens - 1
            return None
        self._tokens = tokens
        return (1 - tokens) / rate

    def _pick_fault(self, kind: str) -> str | None:
        f, rnd = self.faults, self._frng.random
        for name, rate in (("429", f.rate_429), ("5xx", f.rate_500),
                           ("truncated", f.rate_truncated), ("bad_envelope", f.rate_bad_envelope),
                           ("bad_record", f.rate_bad_record if kind == "list" else 0.0)):
            if rate > 0 and rnd() < rate:
                return name
        return None

    def start(self) -> str:
        """Start serving in a background thread and return the base URL."""
        self._server = _Server((self.host, self.port), self)
        self.base_url = f"http://{self.host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name="runs-etl-sim", daemon=True)
        self._thread.start()
        return self.base_url

    def stop(self) -> None:
        """Stop serving and cut kept-alive connections, so clients see the server gone."""
        if self._server is not None:
            server, thread, self._server, self._thread = self._server, self._thread, None, None
            server.shutdown()
            server.close_connections()
            server.server_close()
            if thread is not None:
                thread.join()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _int_param(params: dict, name: str, default: int, hi: int | None, errors: list) -> int:
    """Read an integer query parameter (>= 1, <= hi), reporting errors as FastAPI does."""
    raw = params.get(name)
    if raw is None:
        return default
    loc, msg = ["query", name], "Input should be"
    if not _INT.fullmatch(raw):
        errors.append({"type": "int_parsing", "loc": loc, "input": raw,
                       "msg": f"{msg} a valid integer, unable to parse string as an integer"})
    elif int(raw) < 1:
        errors.append({"type": "greater_than_equal", "loc": loc, "input": raw, "ctx": {"ge": 1},
                       "msg": f"{msg} greater than or equal to 1"})
    elif hi is not None and int(raw) > hi:
        errors.append({"type": "less_than_equal", "loc": loc, "input": raw, "ctx": {"le": hi},
                       "msg": f"{msg} less than or equal to {hi}"})
    else:
        return int(raw)
    return default


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "noxus-sim"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, False)

    def do_GET(self) -> None:
        key = self.headers.get("x-api-key")
        self.wfile.write(self.server.sim._respond(self.path, key, self.close_connection))

    def log_message(self, format: str, *args) -> None:  # quiet: callers parse our stdout
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple, sim: Simulator):
        self.sim = sim
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # skips HTTPServer's getfqdn(), which can stall
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def track(self, conn: socket.socket, alive: bool) -> None:
        with self._conns_lock:
            (self._conns.add if alive else self._conns.discard)(conn)

    def close_connections(self) -> None:
        with self._conns_lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):  # already closed by the client
                    conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # a client hanging up is not an error
            super().handle_error(request, client_address)


def main(argv: list[str] | None = None) -> int:
    """Serve in the foreground until SIGTERM/SIGINT, printing `SIM_URL=...` once listening."""
    p = argparse.ArgumentParser(prog="python -m runs_etl.sim", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=1000)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default="sim-key")
    p.add_argument("--order", choices=("newest", "random"), default="newest")
    p.add_argument("--now", type=datetime.fromisoformat, help="simulator clock, ISO 8601")
    p.add_argument("--days", type=int, default=60)
    p.add_argument("--null-totals", action="store_true")
    p.add_argument("--latency", type=float, default=0.0, help="seconds added to each request")
    p.add_argument("--rate-limit", type=float, default=0.0, metavar="N",
                   help="answer 429 + Retry-After beyond N requests per second (token bucket)")
    p.add_argument("--rate-429", type=float, default=0.0, help="share of requests answered 429")
    p.add_argument("--rate-500", type=float, default=0.0, help="share answered 500/502/503")
    p.add_argument("--rate-bad-record", type=float, default=0.0, help="share of list pages with "
                   "one malformed record (no id, or created_at not a date) in a valid envelope")
    a = p.parse_args(argv)
    faults = Faults(latency=a.latency, rate_limit=a.rate_limit, rate_429=a.rate_429,
                    rate_500=a.rate_500, rate_bad_record=a.rate_bad_record)
    sim = Simulator(a.runs, seed=a.seed, api_key=a.api_key, order=a.order, now=a.now,
                    null_totals=a.null_totals, days=a.days, faults=faults, host=a.host, port=a.port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with sim:
        print(f"SIM_URL={sim.base_url}", flush=True)
        while not stop.wait(0.2):
            pass
    return 0

