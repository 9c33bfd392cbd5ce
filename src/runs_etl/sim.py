"""Built-in simulator of the Noxus runs API (`GET /v1/runs`, `GET /v1/runs/{id}`) on loopback.

It serves deterministic, realistic runs, can change them in the middle of a walk and inject faults,
so the ETL is tested against a real HTTP stack. `python -m runs_etl.sim --help` serves one.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import gc
import heapq
import itertools
import json
import math
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

DEFAULT_SIZE = 50
MAX_SIZE = 100
TERMINAL = frozenset({"completed", "failed", "stopped"})
_OPEN = ("queued", "running", "awaiting_human_feedback")
_STATUS_JSON = {s: f'"{s}"' for s in (*TERMINAL, *_OPEN)}
_US = 1_000_000
_DAY = 86400 * _US
_EPOCH = datetime(1970, 1, 1)
_JSON = "application/json"
_INT = re.compile(r"\s*[+-]?\d+\s*")
_UUID_MASK = ~((0xF000 << 64) | (0xC000 << 48))  # version and variant bits of a UUID
_UUID_BITS = (0x4000 << 64) | (0x8000 << 48)
# Formatting timestamps is the hot path of serialization: memoize the date and clock parts.
_DATES: dict[int, str] = {}  # day number -> "YYYY-MM-DD"
_HMS: dict[int, str] = {}  # second of day -> "HH:MM:SS"
# Timestamp styles seen across server versions: (probability, suffix, shift in hours, fraction).
_STYLES = ((0.78, "Z", 0, True), (0.07, "+00:00", 0, True), (0.05, "+02:00", 2, True),
           (0.02, "-05:00", -5, True), (0.04, "", 0, True), (0.04, "Z", 0, False))
_STYLE_CUM = [sum(s[0] for s in _STYLES[: i + 1]) for i in range(len(_STYLES))]
# name, type, weight, median duration (s), lognormal sigma, failure rate, large definition
_WORKFLOWS = (
    ("Invoice extraction", "flow", 14, 40, 0.8, 0.05, False),
    ("café ☕ order summariser", "flow", 12, 8, 0.6, 0.03, False),
    ("数据 ingestion — nightly", "ingestion", 5, 1800, 0.9, 0.08, True),
    ("Support ticket triage", "handler", 14, 3, 0.5, 0.02, False),
    ("Slack escalation handler", "handler", 8, 20, 1.0, 0.04, False),
    ("Contract review", "flow", 4, 600, 1.0, 0.12, True),
    ("SharePoint sync", "ingestion", 5, 5400, 0.8, 0.10, False),
    ("Lead enrichment", "flow", 10, 15, 0.7, 0.06, False),
    ("Zoë's weekly report", "flow", 3, 240, 0.6, 0.02, False),
    ("Error notifier", "handler", 4, 2, 0.4, 0.01, False),
    ("Legacy importer", "ingestion", 2, 900, 1.2, 0.25, False),
    ("Knowledge base refresh", "ingestion", 4, 10800, 0.7, 0.07, False),
)
_DELETED_WF, _ERROR_WF = 10, 9  # the soft-deleted workflow; the one flows use as error handler
_WORDS = ("café ☕", "数据", "Zoë", "naïve résumé", "🚀 launch", "Łódź", "plain", "日本語テキスト")
_NAMES = ("Ana Souza", "Jürgen Müller", "李娜", "Sam O'Neil", None)
_TAGS = ("urgent", "eu", "nightly", "β-test", "finance")
_PROMPT = "Résumé the document, keep 数据 intact and answer in the user's language. " * 2
_DEFS: tuple[dict | None, ...] = (
    None, {}, {}, {"model": "gpt-4o-mini", "temperature": 0.2}, {"retries": 2},
    {"schedule": "0 3 * * *", "tz": "Europe/Lisbon"}, {"variables": {"ünï": True}})
_SOURCES = ("api",) * 5 + ("ui",) * 3 + ("schedule", "schedule", "webhook", "slack", None, None)


def _dump(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _pv(obj) -> tuple:
    """A pooled value: the object and its JSON text, serialized once and shared by many runs."""
    return obj, _dump(obj)


def _pick(seq, rnd):
    return seq[int(rnd() * len(seq))]  # rng.choice is several times slower on the generation path


def _uuid(rng: random.Random) -> str:
    """A version-4 UUID drawn from `rng`: what uuid.uuid4 makes, but reproducible."""
    h = f"{rng.getrandbits(128) & _UUID_MASK | _UUID_BITS:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _to_us(dt: datetime) -> int:
    delta = (dt if dt.tzinfo else dt.replace(tzinfo=UTC)) - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86400 + delta.seconds) * _US + delta.microseconds


def _ts(us: int | None, style: int = 0) -> str | None:
    """Render an instant (µs since the epoch) in a wire style; style 0 is UTC with 'Z'."""
    if us is None:
        return None
    _, suffix, shift, frac = _STYLES[style]
    day, t = divmod(us + shift * 3600 * _US, _DAY)
    sec, micro = divmod(t, _US)
    date = _DATES.get(day)
    if date is None:
        date = _DATES[day] = (_EPOCH + timedelta(days=day)).date().isoformat()
    hms = _HMS.get(sec)
    if hms is None:
        hms = _HMS[sec] = f"{sec // 3600:02d}:{sec // 60 % 60:02d}:{sec % 60:02d}"
    return f"{date}T{hms}.{micro:06d}{suffix}" if frac else f"{date}T{hms}{suffix}"


def _jts(us: int | None, style: int) -> str:
    return "null" if us is None else f'"{_ts(us, style)}"'


def _make_input(rng: random.Random, i: int) -> dict | None:
    w = rng.choice(_WORDS)
    if i % 29 == 0:
        return None
    return {} if i % 31 == 0 else (
        {"query": f"{w} #{i}", "lang": rng.choice(("en", "pt", "zh", "de"))},
        {"text": f"{w} order {i}", "customer": {"name": rng.choice(_NAMES), "tier": None}},
        {"file": f"数据/{i}.csv", "rows": rng.randrange(10**6), "dry_run": rng.random() < 0.2},
        {"url": f"https://example.com/{i}?b=ç", "tags": rng.sample(_TAGS, 2), "depth": None},
        {"prompt": f"{w} — {i}", "temperature": round(rng.random(), 2), "max_tokens": 512},
        {"ticket": {"id": i, "subject": f"Re: {w}", "body": 'line1\nline2 "quoted" \\ \t'}},
    )[i % 6]


def _make_extra(rng: random.Random, i: int) -> dict:
    """Fields sibling endpoints send and the list endpoint may start sending."""
    return (
        {"output": {"result": "ok", "tokens": rng.randrange(10, 5000), "text": "résumé ✓"}},
        {"meta": {"tags": rng.sample(_TAGS, 2), "icon": "🚀"}},
        {"workflow_version_id": _uuid(rng)},
        {"progress_details": {"step": 2, "of": 5}, "single_node_id": "node-2"},
    )[i % 4]


@dataclass
class Faults:
    """Fault injection knobs, read on every request; rates are per-request probabilities."""

    rate_429: float = 0.0
    retry_after: str | None = "0"  # Retry-After value sent with 429 (None: no header)
    rate_500: float = 0.0  # 500 / 502 / 503
    rate_truncated: float = 0.0  # 200 whose body is cut in half
    rate_bad_envelope: float = 0.0  # 200 with valid JSON that is not a page
    latency: float = 0.0  # seconds added to each request
    only_list: bool = True  # when True, GET /v1/runs/{id} is never faulted


@dataclass(eq=False)
class _Workflow:
    id: str
    name: str
    type: str
    mu: float  # log of the median run duration in seconds
    sigma: float
    fail: float
    definition: dict
    node_pool: list
    created: int
    updated: int
    author: str | None
    description: str | None
    saved: bool
    error_handler: str | None
    style: int
    last_run: int | None = None
    deleted: int | None = None
    runs_count: int = 0
    cache: bytes | None = None  # wire JSON, dropped whenever runs_count / last_run change

    def as_dict(self, group_id: str, style: int) -> dict:
        return {"id": self.id, "group_id": group_id, "name": self.name, "type": self.type,
                "definition": self.definition, "last_updated_at": _ts(self.updated, style),
                "last_run_at": _ts(self.last_run, style), "created_at": _ts(self.created, style),
                "deleted_at": _ts(self.deleted, style), "runs_count": self.runs_count,
                "author_name": self.author, "description": self.description, "saved": self.saved,
                "error_handler": self.error_handler}


@dataclass(slots=True, eq=False)
class _Run:
    """One run: nested values are pooled `(object, json)` pairs; head/tail cache its wire bytes."""

    id: str
    wf: int  # index into Simulator._wfs
    embed: bool  # False: `workflow` is sent as null
    created: int  # µs since the epoch, UTC
    finished: int | None
    status: str
    progress: int | None
    input: tuple
    nodes: tuple
    defs: tuple
    source: tuple
    extra: tuple | None  # (dict, ',"key":value' JSON text) of unknown fields
    style: int  # index into _STYLES: how this record's timestamps look on the wire
    head: bytes | None = None
    tail: bytes | None = None


def _sort_key(r: _Run) -> tuple:
    return r.created, r.id


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
        self.bytes_sent = 0
        self._lock = threading.Lock()  # guards all state and counters below
        self._hooks: list = []
        self._rng = random.Random(seed)
        self._frng = random.Random(seed + 7919)  # faults draw apart, so data stays seed-stable
        self._now = self._clock = _to_us(now or datetime.now(UTC).replace(microsecond=0))
        self._obj_rate, self._extra_rate = node_ids_object_rate, extra_fields_rate
        self._runs: dict[str, _Run] = {}
        self._open: dict[str, _Run] = {}
        self._order: list[_Run] = []  # reversed serving order: the last element is served first
        self._tails: dict[tuple, bytes] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._build_pools(days)
        gc.disable()  # millions of small objects: collector passes would dominate generation
        try:
            self._generate(n_runs, days)
        finally:
            gc.enable()

    @property
    def now(self) -> datetime:
        """The simulator clock: `now` at creation, moved forward a little by each mutation."""
        return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=self._clock)

    # ---- data generation -------------------------------------------------------------------
    def _build_pools(self, days: int) -> None:
        rng = self._rng
        self._group = _uuid(rng)
        self._inputs = [_pv(_make_input(rng, i)) for i in range(512)]
        self._defs = [_pv(d) for d in _DEFS]
        self._sources = [_pv(s) for s in _SOURCES]
        self._edited = [_pv("edited"), _pv("re-edited")]
        self._extras = [(d, "," + _dump(d)[1:-1]) for d in (_make_extra(rng, i) for i in range(64))]
        ids = [_uuid(rng) for _ in _WORKFLOWS]
        self._wfs: list[_Workflow] = []
        for i, (name, typ, _, median, sigma, fail, big) in enumerate(_WORKFLOWS):
            n = 16 if big else rng.randint(3, 8)
            nodes = [f"node-{j}" for j in range(1, n + 1)]
            definition = {  # large ones carry a prompt in every node, as LLM flows do
                "nodes": [{"id": nid, "type": rng.choice(("llm", "http", "code", "branch"))} | (
                    {"name": f"Step {j} · {name}", "config": {"prompt": _PROMPT, "retries": j % 3}}
                    if big else {}) for j, nid in enumerate(nodes, 1)],
                "edges": [{"source": a, "target": b} for a, b in itertools.pairwise(nodes)]}
            pool = [_pv(nodes)] * 12 + [_pv(nodes[: max(1, n // 2)])] * 5 + [_pv(nodes[:1])] * 2
            created = self._now - (days + 1 + rng.randrange(200)) * _DAY  # before its first run
            self._wfs.append(_Workflow(
                id=ids[i], name=name, type=typ, mu=math.log(median), sigma=sigma, fail=fail,
                definition=definition, node_pool=pool + [_pv(None)], created=created,
                updated=created + int(rng.random() * (self._now - created)), author=_NAMES[i % 4],
                description=None if i % 3 == 2 else f"{name}: {typ} workflow", saved=i != 7,
                error_handler=ids[_ERROR_WF] if typ == "flow" and i % 2 == 0 else None,
                style=(0, 1, 0, 4)[i % 4]))
        self._cum = list(itertools.accumulate(w[2] for w in _WORKFLOWS))

    def _pick_wf(self, live: bool = False) -> int:
        while True:
            i = bisect.bisect(self._cum, self._rng.random() * self._cum[-1])
            if not (live and self._wfs[i].deleted is not None):
                return i

    def _pick_style(self) -> int:
        return bisect.bisect(_STYLE_CUM, self._rng.random() * _STYLE_CUM[-1])

    def _new_run(self, wi: int, created: int, status: str, progress: int | None,
                 finished: int | None, style: int) -> _Run:
        rng, wf, rnd = self._rng, self._wfs[wi], self._rng.random
        run_id, progress = _uuid(rng), None if rnd() < 0.02 else progress
        embed, inp = rnd() >= 0.01, _pick(self._inputs, rnd)
        if rnd() < self._obj_rate:  # newer servers may send node_ids as an object
            nodes = _pv({"a": "node-1", "b": f"node-{rng.randint(1, 3)}"})
        else:
            nodes = _pick(wf.node_pool, rnd)
        defs, source = _pick(self._defs, rnd), _pick(self._sources, rnd)
        extra = _pick(self._extras, rnd) if rnd() < self._extra_rate else None
        r = _Run(run_id, wi, embed, created, finished, status, progress, inp, nodes, defs, source,
                 extra, style)
        self._runs[r.id] = r
        if status not in TERMINAL:
            self._open[r.id] = r
        wf.runs_count += 1
        wf.last_run = created if wf.last_run is None else max(wf.last_run, created)
        wf.cache = None
        return r

    def _generate(self, n: int, days: int) -> None:
        rng, now, span = self._rng, self._now, days * _DAY
        for _ in range(n):
            wi = self._pick_wf()
            wf, style = self._wfs[wi], self._pick_style()
            # a few percent land in the last hour, where runs are still open
            created = now - int(rng.random() * (3600 * _US if rng.random() < 0.03 else span))
            end = created + int(rng.lognormvariate(wf.mu, wf.sigma) * _US)
            if not _STYLES[style][3]:
                created, end = created - created % _US, end - end % _US
            if end <= now:
                x = rng.random() - wf.fail  # below 0: failed; a further 3%: stopped by a user
                status = "failed" if x < 0 else "stopped" if x < 0.03 else "completed"
                progress = 100 if status == "completed" else rng.randrange(100)
                self._new_run(wi, created, status, progress, end, style)
                continue
            progress = min(99, 100 * (now - created) // (end - created))
            if now - created < 20 * _US or rng.random() < 0.15:
                status, progress = "queued", 0
            else:
                status = "awaiting_human_feedback" if rng.random() < 0.1 else "running"
            self._new_run(wi, created, status, progress, None, style)
        old = [r for r in self._runs.values() if now - r.created > 2 * _DAY]
        for r in rng.sample(old, min(len(old), 5, max(1, n // 300))):  # stuck: running for days
            r.status, r.progress, r.finished = "running", rng.randrange(5, 95), None
            self._open[r.id] = r
        dead = self._wfs[_DELETED_WF]
        dead.deleted = min(now, (dead.last_run or now - 30 * _DAY) + 3600 * _US)
        self._order = sorted(self._runs.values(), key=_sort_key)
        if self.order == "random":
            rng.shuffle(self._order)
        for r in self._order:  # serialize up front, so even a first walk joins cached bytes
            self._record(r)

    # ---- serialization ---------------------------------------------------------------------
    def _wf_bytes(self, wf: _Workflow) -> bytes:
        if wf.cache is None:
            wf.cache = _dump(wf.as_dict(self._group, wf.style)).encode()
        return wf.cache

    def _record(self, r: _Run) -> bytes:
        """Wire JSON of one run: its cached bytes around the current workflow's cached bytes."""
        head, tail = r.head, r.tail
        if head is None or tail is None:
            head, tail = r.head, r.tail = self._serialize(r)
        return head + (self._wf_bytes(self._wfs[r.wf]) if r.embed else b"null") + tail

    def _serialize(self, r: _Run) -> tuple[bytes, bytes]:
        head = (
            f'{{"id":"{r.id}","group_id":"{self._group}","workflow_id":"{self._wfs[r.wf].id}",'
            f'"input":{r.input[1]},"node_ids":{r.nodes[1]},'
            f'"status":{_STATUS_JSON.get(r.status) or _dump(r.status)},'
            f'"progress":{"null" if r.progress is None else r.progress},'
            f'"definitions":{r.defs[1]},"created_at":{_jts(r.created, r.style)},'
            f'"finished_at":{_jts(r.finished, r.style)},"workflow":').encode()
        key = (r.source[1], r.extra[1] if r.extra else "")
        tail = self._tails.get(key)  # few distinct tails: share them to keep 1M runs compact
        if tail is None:
            tail = self._tails[key] = f',"source":{key[0]}{key[1]}}}'.encode()
        return head, tail

    def _page_body(self, page: int, size: int) -> bytes:
        total = len(self._order)
        end = total - (page - 1) * size
        chunk = self._order[max(0, end - size): end] if end > 0 else []
        items = b",".join([self._record(r) for r in reversed(chunk)])
        t, p = ("null", "null") if self.null_totals else (total, -(-total // size))
        rest = f'],"total":{t},"page":{page},"size":{size},"pages":{p}}}'
        return b'{"items":[' + items + rest.encode()

    # ---- inspection ------------------------------------------------------------------------
    def snapshot(self) -> dict[str, dict]:
        """Live runs in serving order as JSON-ready dicts, timestamps in UTC with 'Z'.

        Nested values (input, definition, ...) are shared with the simulator: do not mutate them.
        """
        with self._lock:
            wfs = [w.as_dict(self._group, 0) for w in self._wfs]
            out = {}
            for r in reversed(self._order):
                out[r.id] = d = {
                    "id": r.id, "group_id": self._group, "workflow_id": wfs[r.wf]["id"],
                    "input": r.input[0], "node_ids": r.nodes[0], "status": r.status,
                    "progress": r.progress, "definitions": r.defs[0], "created_at": _ts(r.created),
                    "finished_at": _ts(r.finished),
                    "workflow": dict(wfs[r.wf]) if r.embed else None, "source": r.source[0]}
                if r.extra:
                    d.update(r.extra[0])
            return out

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
                style = self._pick_style()
                self._clock += 1000 if _STYLES[style][3] else _US - self._clock % _US
                r = self._new_run(self._pick_wf(live=True), self._clock, status,
                                  100 if status == "completed" else 0,
                                  self._clock if status in TERMINAL else None, style)
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
                if r.status == "queued":
                    r.status, r.progress = "running", self._rng.randrange(1, 60)
                else:
                    failed = self._rng.random() < self._wfs[r.wf].fail
                    r.status = "failed" if failed else "completed"
                    r.progress = self._rng.randrange(100) if failed else 100
                    end = self._clock if _STYLES[r.style][3] else self._clock - self._clock % _US
                    r.finished = max(end, r.created)
                    del self._open[r.id]
                r.head = r.tail = None
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
                wf = self._wfs[r.wf]
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
                r.source = self._edited[r.source is self._edited[0]]
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
        fault = self._pick_fault() if faulty else None
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
            body = self._page_body(page, size)
        elif run_id in self._runs:
            body = self._record(self._runs[run_id])
        else:
            return 404, b'{"detail":"Run not found"}', _JSON
        return 200, body[: len(body) // 2] if fault == "truncated" else body, _JSON

    def _pick_fault(self) -> str | None:
        f, rnd = self.faults, self._frng.random
        for name, rate in (("429", f.rate_429), ("5xx", f.rate_500),
                           ("truncated", f.rate_truncated), ("bad_envelope", f.rate_bad_envelope)):
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
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--rate-429", type=float, default=0.0)
    p.add_argument("--rate-500", type=float, default=0.0)
    a = p.parse_args(argv)
    faults = Faults(latency=a.latency, rate_429=a.rate_429, rate_500=a.rate_500)
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


if __name__ == "__main__":
    sys.exit(main())
