"""Synthetic data for the simulator: seed-deterministic workflows and runs shaped like what the
Noxus runs API sends, and their wire JSON, cached as bytes so a page is served by joining them.
"""

from __future__ import annotations

import bisect
import gc
import itertools
import json
import math
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from ..engine.models import TERMINAL_STATUSES

_OPEN = ("queued", "running", "awaiting_human_feedback")
_STATUS_JSON = {s: f'"{s}"' for s in (*TERMINAL_STATUSES, *_OPEN)}
_US = 1_000_000
_DAY = 86400 * _US
_EPOCH = datetime(1970, 1, 1)
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
    wf: int  # index into Workspace.wfs
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



# What a malformed record looks like: the field it breaks and the value it gets (None: dropped).
BAD_RECORDS = (("id", None), ("created_at", "not a date"))


class Workspace:
    """The workspace runs are drawn from (workflows and pooled values) and serialized against.

    All draws come from `rng`, shared with the simulator, so a seed and `now` fix every run.
    """

    def __init__(self, rng: random.Random, now: int, days: int, node_ids_object_rate: float,
                 extra_fields_rate: float):
        self.rng, self._now, self._days = rng, now, days
        self._obj_rate, self._extra_rate = node_ids_object_rate, extra_fields_rate
        self._tails: dict[tuple, bytes] = {}
        self.group = _uuid(rng)
        self._inputs = [_pv(_make_input(rng, i)) for i in range(512)]
        self._defs = [_pv(d) for d in _DEFS]
        self._sources = [_pv(s) for s in _SOURCES]
        self.edited = [_pv("edited"), _pv("re-edited")]
        self._extras = [(d, "," + _dump(d)[1:-1]) for d in (_make_extra(rng, i) for i in range(64))]
        ids = [_uuid(rng) for _ in _WORKFLOWS]
        self.wfs: list[_Workflow] = []
        for i, (name, typ, _, median, sigma, fail, big) in enumerate(_WORKFLOWS):
            n = 16 if big else rng.randint(3, 8)
            nodes = [f"node-{j}" for j in range(1, n + 1)]
            definition = {  # large ones carry a prompt in every node, as LLM flows do
                "nodes": [{"id": nid, "type": rng.choice(("llm", "http", "code", "branch"))} | (
                    {"name": f"Step {j} · {name}", "config": {"prompt": _PROMPT, "retries": j % 3}}
                    if big else {}) for j, nid in enumerate(nodes, 1)],
                "edges": [{"source": a, "target": b} for a, b in itertools.pairwise(nodes)]}
            pool = [_pv(nodes)] * 12 + [_pv(nodes[: max(1, n // 2)])] * 5 + [_pv(nodes[:1])] * 2
            created = now - (days + 1 + rng.randrange(200)) * _DAY  # before its first run
            self.wfs.append(_Workflow(
                id=ids[i], name=name, type=typ, mu=math.log(median), sigma=sigma, fail=fail,
                definition=definition, node_pool=pool + [_pv(None)], created=created,
                updated=created + int(rng.random() * (now - created)), author=_NAMES[i % 4],
                description=None if i % 3 == 2 else f"{name}: {typ} workflow", saved=i != 7,
                error_handler=ids[_ERROR_WF] if typ == "flow" and i % 2 == 0 else None,
                style=(0, 1, 0, 4)[i % 4]))
        self._cum = list(itertools.accumulate(w[2] for w in _WORKFLOWS))

    # ---- generation ------------------------------------------------------------------------
    def pick_wf(self, live: bool = False) -> int:
        while True:
            i = bisect.bisect(self._cum, self.rng.random() * self._cum[-1])
            if not (live and self.wfs[i].deleted is not None):
                return i

    def pick_style(self) -> int:
        return bisect.bisect(_STYLE_CUM, self.rng.random() * _STYLE_CUM[-1])

    def new_run(self, wi: int, created: int, status: str, progress: int | None,
                finished: int | None, style: int) -> _Run:
        """A new run of workflow `wi`, counted on that workflow."""
        rng, wf, rnd = self.rng, self.wfs[wi], self.rng.random
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
        wf.runs_count += 1
        wf.last_run = created if wf.last_run is None else max(wf.last_run, created)
        wf.cache = None
        return r

    def fresh_run(self, clock: int, status: str) -> _Run:
        """A run of a live workflow created just after `clock` (finished then if `status` is
        terminal), as the API makes one."""
        style = self.pick_style()
        created = clock + (1000 if _STYLES[style][3] else _US - clock % _US)
        return self.new_run(self.pick_wf(live=True), created, status,
                            100 if status == "completed" else 0,
                            created if status in TERMINAL_STATUSES else None, style)

    def advance(self, r: _Run, clock: int) -> None:
        """Move an open run one step at `clock`: queued -> running -> completed or failed."""
        if r.status == "queued":
            r.status, r.progress = "running", self.rng.randrange(1, 60)
        else:
            failed = self.rng.random() < self.wfs[r.wf].fail
            r.status = "failed" if failed else "completed"
            r.progress = self.rng.randrange(100) if failed else 100
            end = clock if _STYLES[r.style][3] else clock - clock % _US
            r.finished = max(end, r.created)
        r.head = r.tail = None

    def generate(self, n: int, shuffle: bool) -> tuple[dict, dict, list[_Run]]:
        """n runs over the last `days` before `now`, serialized: (all by id, the open ones by id,
        all oldest first or shuffled)."""
        gc.disable()  # millions of small objects: collector passes would dominate generation
        try:
            runs, open_ = self._generate(n)
            order = sorted(runs.values(), key=_sort_key)
            if shuffle:
                self.rng.shuffle(order)
            for r in order:  # serialize up front, so even a first walk joins cached bytes
                self.record(r)
            return runs, open_, order
        finally:
            gc.enable()

    def _generate(self, n: int) -> tuple[dict[str, _Run], dict[str, _Run]]:
        rng, now, span = self.rng, self._now, self._days * _DAY
        runs: dict[str, _Run] = {}
        open_: dict[str, _Run] = {}
        for _ in range(n):
            wi = self.pick_wf()
            wf, style = self.wfs[wi], self.pick_style()
            # a few percent land in the last hour, where runs are still open
            created = now - int(rng.random() * (3600 * _US if rng.random() < 0.03 else span))
            end = created + int(rng.lognormvariate(wf.mu, wf.sigma) * _US)
            if not _STYLES[style][3]:
                created, end = created - created % _US, end - end % _US
            if end <= now:
                x = rng.random() - wf.fail  # below 0: failed; a further 3%: stopped by a user
                status = "failed" if x < 0 else "stopped" if x < 0.03 else "completed"
                progress = 100 if status == "completed" else rng.randrange(100)
                r = self.new_run(wi, created, status, progress, end, style)
            else:
                progress = min(99, 100 * (now - created) // (end - created))
                if now - created < 20 * _US or rng.random() < 0.15:
                    status, progress = "queued", 0
                else:
                    status = "awaiting_human_feedback" if rng.random() < 0.1 else "running"
                r = self.new_run(wi, created, status, progress, None, style)
            runs[r.id] = r
            if r.status not in TERMINAL_STATUSES:
                open_[r.id] = r
        old = [r for r in runs.values() if now - r.created > 2 * _DAY]
        for r in rng.sample(old, min(len(old), 5, max(1, n // 300))):  # stuck: running for days
            r.status, r.progress, r.finished = "running", rng.randrange(5, 95), None
            open_[r.id] = r
        dead = self.wfs[_DELETED_WF]
        dead.deleted = min(now, (dead.last_run or now - 30 * _DAY) + 3600 * _US)
        return runs, open_

    # ---- serialization ---------------------------------------------------------------------
    def _wf_bytes(self, wf: _Workflow) -> bytes:
        if wf.cache is None:
            wf.cache = _dump(wf.as_dict(self.group, wf.style)).encode()
        return wf.cache

    def record(self, r: _Run) -> bytes:
        """Wire JSON of one run: its cached bytes around the current workflow's cached bytes."""
        head, tail = r.head, r.tail
        if head is None or tail is None:
            head, tail = r.head, r.tail = self._serialize(r)
        return head + (self._wf_bytes(self.wfs[r.wf]) if r.embed else b"null") + tail

    def _serialize(self, r: _Run) -> tuple[bytes, bytes]:
        head = (
            f'{{"id":"{r.id}","group_id":"{self.group}","workflow_id":"{self.wfs[r.wf].id}",'
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

    def page_body(self, order: list[_Run], page: int, size: int, null_totals: bool,
                  spoil: random.Random | None = None) -> bytes:
        """One page of `order` (served from its end); with `spoil`, one record drawn from it is
        served malformed (the stored run stays as it is)."""
        total = len(order)
        end = total - (page - 1) * size
        chunk = order[max(0, end - size): end] if end > 0 else []
        records = [self.record(r) for r in reversed(chunk)]
        if spoil is not None:  # draw even for an empty page: later draws must not depend on it
            where, (field, value) = spoil.random(), BAD_RECORDS[spoil.randrange(len(BAD_RECORDS))]
            if records:
                i = int(where * len(records))
                records[i] = _malformed(records[i], field, value)
        t, p = ("null", "null") if null_totals else (total, -(-total // size))
        rest = f'],"total":{t},"page":{page},"size":{size},"pages":{p}}}'
        return b'{"items":[' + b",".join(records) + rest.encode()

    def snapshot(self, order: list[_Run]) -> dict[str, dict]:
        """Runs of `order`, served first to last, as JSON-ready dicts with UTC 'Z' timestamps."""
        wfs = [w.as_dict(self.group, 0) for w in self.wfs]
        out = {}
        for r in reversed(order):
            out[r.id] = d = {
                "id": r.id, "group_id": self.group, "workflow_id": wfs[r.wf]["id"],
                "input": r.input[0], "node_ids": r.nodes[0], "status": r.status,
                "progress": r.progress, "definitions": r.defs[0], "created_at": _ts(r.created),
                "finished_at": _ts(r.finished),
                "workflow": dict(wfs[r.wf]) if r.embed else None, "source": r.source[0]}
            if r.extra:
                d.update(r.extra[0])
        return out


def _malformed(record: bytes, field: str, value: str | None) -> bytes:
    """The record with `field` set to `value`, or dropped when `value` is None."""
    d = json.loads(record)
    if value is None:
        del d[field]
    else:
        d[field] = value
    return _dump(d).encode()
