"""Pydantic models of what the runs API really sends, validated a whole page at a time.

Lenient where the API is loose (unknown fields kept, any status string, naive timestamps read as
UTC, ``node_ids`` as list, object or null), strict where the warehouse needs it (a run without
``id`` or ``created_at``, with a timestamp outside ``TS_MIN``..``TS_MAX``, or nested deeper than
the parser goes cannot be stored and is rejected with its raw JSON). Timestamps keep the offset
they were sent with; ``normalize`` stores them as UTC instants.

The models hold the typed fields only. The JSON-valued ones (``input``, ``definitions``, the
workflow's ``definition`` and every field the models do not know) become JSON columns, so they
are never turned into Python objects: a page's bytes are split once more by msgspec into each
record's top-level fields (``msgspec.Raw``: byte spans, not parsed values), and those spans are
kept verbatim in ``RawJson``. Building and re-serializing those Python trees was 40% of a
sync's CPU (measured at 100k runs); the text is also exactly what the API sent. The embedded
workflow is validated apart, once per distinct snapshot (``_snapshot``).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import msgspec
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

# Bounds of the warehouse columns (INTEGER, BIGINT): a value outside is a rejected record,
# not a crashed batch.
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# The instants a run's timestamps may hold, after the offset is applied (naive = UTC). Before
# the Unix epoch is a sentinel or a bug, not a run; past year 9999 (``9999-12-31T23:00-05:00``),
# like 1 BC (``0001-01-01T00:00:00+14:00``), is storable in DuckDB but not readable back into
# Python, and one such run broke every report after it. Checked by pydantic-core itself (a
# Python validator would cost a quarter of the validation time).
TS_MIN = datetime(1970, 1, 1, tzinfo=UTC)
TS_MAX = datetime.max.replace(tzinfo=UTC)

TERMINAL_STATUSES = frozenset({"completed", "failed", "stopped"})
# The cycle collector's first threshold while a walk parses pages (Python's default is 700):
# parsed pages are millions of short-lived, acyclic objects that it would rescan constantly
# (measured: ~15% faster extract at 100k runs); reference counting still frees them at once.
WALK_GC_THRESHOLD = 20_000
# Any status not in TERMINAL_STATUSES (queued, running, awaiting_human_feedback, or one a newer
# server invents) is open: such a run will still change.


def utc(value: datetime) -> datetime:
    """Naive timestamps are UTC. Used where Python compares instants; Arrow converts the rest
    (a per-field pydantic validator would cost a quarter of the validation time)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _grain(t: datetime) -> int:
    """The precision a timestamp was most likely sent with, in microseconds: whole seconds,
    milliseconds or microseconds (the string is gone; trailing zeros tell)."""
    us = t.microsecond
    return 1_000_000 if us == 0 else 1000 if us % 1000 == 0 else 1


def not_newer(a: datetime, b: datetime) -> bool:
    """``a <= b``, unless they differ only below the coarser precision of the two: a source
    mixing ``05Z`` and ``05.400Z`` is still newest-first when it sends them in that order."""
    if a <= b:
        return True
    g = max(_grain(a), _grain(b))
    return a - timedelta(microseconds=a.microsecond % g) <= \
        b - timedelta(microseconds=b.microsecond % g)


def order_of(created: list[datetime]) -> tuple[datetime, datetime, bool] | None:
    """A page's runs' creation times (UTC, in page order) as (first, last, newest-first within
    the page); None for a page without runs."""
    if not created:
        return None
    return created[0], created[-1], all(not_newer(b, a) for a, b in zip(created, created[1:]))


class Workflow(BaseModel):
    """The workflow embedded in a run: a snapshot as of the request, not as of the run. Its
    ``definition`` and unknown fields are JSON text (``WorkflowSnapshot``)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str = Field(min_length=1)
    group_id: str | None = None
    name: str | None = None
    type: str | None = None
    last_updated_at: datetime | None = None
    last_run_at: datetime | None = None
    created_at: datetime | None = None
    deleted_at: datetime | None = None
    runs_count: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    author_name: str | None = None
    description: str | None = None
    saved: bool | None = None
    error_handler: str | None = None


class Run(BaseModel):
    """One element of ``items``; fields keep their API names. ``input``, ``definitions`` and
    unknown fields are JSON text in ``RawJson``; the embedded ``workflow`` is validated once
    per page and snapshot (``RawJson.workflows``)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str = Field(min_length=1)
    group_id: str | None = None
    workflow_id: str | None = None
    node_ids: list[str] | dict[str, Any] | None = None
    status: str
    progress: int | None = Field(None, ge=INT32_MIN, le=INT32_MAX)
    created_at: datetime = Field(ge=TS_MIN, le=TS_MAX)
    finished_at: datetime | None = Field(None, ge=TS_MIN, le=TS_MAX)
    source: str | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


# The JSON-valued fields: JSON text columns, never parsed into Python objects.
RUN_JSON_FIELDS = ("input", "definitions")
WORKFLOW_JSON_FIELDS = ("definition",)
# The top-level fields the warehouse has columns for; any other goes to ``extra``.
RUN_FIELDS = frozenset(Run.model_fields) | frozenset(RUN_JSON_FIELDS) | {"workflow"}
WORKFLOW_FIELDS = frozenset(Workflow.model_fields) | frozenset(WORKFLOW_JSON_FIELDS)


class _Envelope(BaseModel):
    """fastapi-pagination's ``Page`` apart from its items; ``total``/``pages`` may be null."""

    total: int | None = None
    page: int | None = None
    size: int | None = None
    pages: int | None = None


class PageEnvelope(_Envelope):
    items: list[Run]


_PAGE = TypeAdapter(PageEnvelope)
_ENVELOPE = TypeAdapter(_Envelope)
_RUN = TypeAdapter(Run)
_WORKFLOW = TypeAdapter(Workflow | None)


class _FieldsPage(msgspec.Struct):
    items: list[dict[str, msgspec.Raw]]


class _ItemsPage(msgspec.Struct):
    items: list[msgspec.Raw]


# msgspec splits JSON into byte spans (``Raw``) without building the values.
_SPLIT_PAGE = msgspec.json.Decoder(_FieldsPage)
_SPLIT_ITEMS = msgspec.json.Decoder(_ItemsPage)
_SPLIT_OBJECT = msgspec.json.Decoder(dict[str, msgspec.Raw])
_json_string = msgspec.json.encode


class EnvelopeError(ValueError):
    """The body is not JSON or not the page envelope: the response itself is broken."""


@dataclass(frozen=True, slots=True)
class Rejected:
    """A record that could not be validated, kept with its raw JSON and the reason."""

    index: int
    raw: str
    error: str
    run_id: str | None


@dataclass(frozen=True, slots=True)
class WorkflowSnapshot:
    """One embedded workflow of a page, with its JSON-valued parts as the API sent them."""

    workflow: Workflow
    definition: bytes | None
    extra: bytes | None  # the fields ``Workflow`` does not know, as one JSON object


@dataclass(slots=True)
class RawJson:
    """The JSON-valued fields of a page's runs, verbatim (UTF-8 JSON text; None for absent or
    null), column-wise and aligned with ``ParsedPage.runs``, and one snapshot per workflow id."""

    input: list[bytes | None] = field(default_factory=list)
    definitions: list[bytes | None] = field(default_factory=list)
    extra: list[bytes | None] = field(default_factory=list)  # unknown fields, one JSON object
    workflows: dict[str, WorkflowSnapshot] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ParsedPage:
    runs: list[Run]
    rejected: list[Rejected]
    total: int | None
    pages: int | None
    raw: RawJson = field(default_factory=RawJson)  # must match ``runs`` (empty only if they are)

    def order(self) -> tuple[datetime, datetime, bool] | None:
        """``order_of`` this page's runs."""
        return order_of([utc(r.created_at) for r in self.runs])

    @classmethod
    def of(cls, pages: Iterable[ParsedPage]) -> ParsedPage:
        """The runs of ``pages`` (single runs fetched by id) as one page without totals."""
        runs: list[Run] = []
        raw = RawJson()
        for p in pages:
            runs.extend(p.runs)
            raw.input.extend(p.raw.input)
            raw.definitions.extend(p.raw.definitions)
            raw.extra.extend(p.raw.extra)
            raw.workflows.update(p.raw.workflows)
        return cls(runs, [], None, None, raw)


class RunKey(NamedTuple):
    """What the walk needs of a run that a worker process validated and staged (``parallel``):
    its id, creation time (UTC microseconds since the epoch: an int crosses processes ten
    times cheaper than a datetime) and status."""

    id: str
    created_us: int
    status: str

    @property
    def created_at(self) -> datetime:
        return _EPOCH + timedelta(microseconds=self.created_us)

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class PageDigest:
    """A page validated and staged by a worker process: what the walk reads of a
    ``ParsedPage`` (its runs as ``RunKey``, its ``order``), without the runs themselves."""

    runs: list[RunKey]
    rejected: list[Rejected]
    total: int | None
    pages: int | None
    page_order: tuple[datetime, datetime, bool] | None

    @classmethod
    def of(cls, page: ParsedPage) -> PageDigest:
        one_us = timedelta(microseconds=1)
        created = [utc(r.created_at) for r in page.runs]
        order = order_of(created)
        if order is not None:  # with datetime's own UTC, which pickles far cheaper
            order = (order[0].astimezone(UTC), order[1].astimezone(UTC), order[2])
        return cls([RunKey(r.id, (t - _EPOCH) // one_us, r.status)
                    for r, t in zip(page.runs, created)],
                   page.rejected, page.total, page.pages, order)

    def order(self) -> tuple[datetime, datetime, bool] | None:
        return self.page_order

    def __reduce__(self):
        # Across processes as three plain lists: pickling 100 RunKeys cost six times as much.
        ids, created, statuses = ([list(c) for c in zip(*self.runs)] if self.runs
                                  else ([], [], []))
        return _digest, (ids, created, statuses, self.rejected, self.total, self.pages,
                         self.page_order)


def _digest(ids: list[str], created_us: list[int], statuses: list[str], *rest) -> PageDigest:
    return PageDigest(list(map(RunKey, ids, created_us, statuses)), *rest)


def _short_errors(err: ValidationError, within: str = "") -> str:
    parts = []
    for e in err.errors()[:5]:
        loc = ".".join(str(p) for p in ((within,) if within else ()) + e["loc"])
        parts.append(f"{loc}: {e['msg']}" if loc else e["msg"])
    return "; ".join(parts)


def _value(raw: Any) -> bytes | None:
    """A field's JSON text; None when absent or null (SQL NULL, not the text ``null``)."""
    if raw is None:
        return None
    text = bytes(raw)
    return None if text == b"null" else text


def _object(members: Iterable[tuple[str, Any]]) -> bytes | None:
    """One JSON object of (name, JSON text) members; None when there are none."""
    parts = [_json_string(k) + b":" + bytes(v) for k, v in members]
    return b"{" + b",".join(parts) + b"}" if parts else None


@functools.lru_cache(maxsize=1024)
def _snapshot(raw: bytes) -> WorkflowSnapshot | str | None:
    """An embedded workflow validated, with its JSON parts cut out; None for ``null``; the
    error text when it is invalid (which rejects the runs embedding it).

    Cached by its exact bytes: the same snapshot recurs on page after page (13 distinct in
    30,000 embedded on the simulator's first 300 pages) and each validation cost ~30 us; the
    answer for given bytes never changes, and the results are immutable."""
    try:
        wf = _WORKFLOW.validate_json(raw)
    except ValidationError as err:
        return _short_errors(err, "workflow")
    if wf is None:
        return None
    fields = _split_object(raw)
    return WorkflowSnapshot(wf, _value(fields.get("definition")),
                            _object((k, v) for k, v in fields.items() if k not in WORKFLOW_FIELDS))


def _page(records: list[tuple[int, Run, Mapping[str, Any]]], rejected: list[Rejected],
          total: int | None, pages: int | None) -> ParsedPage:
    """Assemble a page from validated runs (with each one's index in ``items`` and top-level
    fields as JSON spans).

    Keeps one run per id (the last: a page is one instant, so copies are the same run), which
    makes (id, page) a key downstream. One response embeds the same workflow snapshot in each
    of a workflow's runs (it is "as of the request"), byte for byte: each distinct snapshot is
    validated and cut up once (``_snapshot``), and a run whose embedded workflow is invalid is
    rejected."""
    if len({r.id for _, r, _ in records}) != len(records):
        last = {r.id: k for k, (_, r, _) in enumerate(records)}  # first position, last copy
        records = [records[k] for k in last.values()]
    runs: list[Run] = []
    kept: list[Mapping[str, Any]] = []
    workflows: dict[str, WorkflowSnapshot] = {}
    for index, run, f in records:
        embedded = f.get("workflow")
        if embedded is not None:
            snap = _snapshot(bytes(embedded))
            if isinstance(snap, str):
                rejected.append(Rejected(index, (_object(f.items()) or b"{}").decode(), snap,
                                         run.id))
                continue
            if snap is not None:
                workflows.setdefault(snap.workflow.id, snap)
        runs.append(run)
        kept.append(f)
    rejected.sort(key=lambda r: r.index)
    raw = RawJson([_value(f.get("input")) for f in kept],
                  [_value(f.get("definitions")) for f in kept],
                  [None if f.keys() <= RUN_FIELDS and not isinstance(r.node_ids, dict)
                   else _extra(r, f) for r, f in zip(runs, kept)], workflows)
    return ParsedPage(runs, rejected, total, pages, raw)


def _extra(run: Run, fields: Mapping[str, Any]) -> bytes | None:
    """The fields ``Run`` does not know, as one JSON object; an object ``node_ids`` too (its
    keys are the node list, the object is kept)."""
    extra = [(k, v) for k, v in fields.items() if k not in RUN_FIELDS]
    if isinstance(run.node_ids, dict):
        extra.append(("node_ids", fields["node_ids"]))
    return _object(extra)


def parse_page(body: bytes) -> ParsedPage:
    """Validate a page body in one pass; only on failure fall back to record-by-record."""
    try:
        env = _PAGE.validate_json(body)
    except ValidationError as err:
        if [e["type"] for e in err.errors()] == ["json_invalid"]:
            # Valid JSON the parser refuses (nesting past its limit) fails the whole body:
            # split it into records without a recursive parser, so one record is rejected.
            return _parse_each(body, deep=True)
        if not all(e["loc"][:1] == ("items",) and len(e["loc"]) >= 2 for e in err.errors()):
            raise EnvelopeError(f"not a page envelope: {_short_errors(err)}") from None
        # Some records are bad but the envelope is fine: sort them out one by one.
        return _parse_each(body, deep=False)
    try:
        fields = _SPLIT_PAGE.decode(body).items
    except msgspec.DecodeError:  # JSON pydantic reads but msgspec does not (NaN): the slow way
        return _parse_each(body, deep=False)
    return _page(list(zip(range(len(fields)), env.items, fields)), [], env.total, env.pages)


def _parse_each(body: bytes, *, deep: bool) -> ParsedPage:
    """The record-by-record path: each ``items`` element is validated from its own bytes, so
    only the bad ones are rejected, each with its exact text."""
    if deep:
        try:
            json.loads(body)
        except RecursionError:  # deeper than Python's parser goes: the records say which
            pass
        except ValueError as err:  # corrupt or truncated: the response is broken, retry it
            raise EnvelopeError(f"invalid JSON: {err}") from None
    envelope, items = _split_items(body, deep)
    try:
        env = _ENVELOPE.validate_json(envelope)
    except ValidationError as err:
        raise EnvelopeError(f"not a page envelope: {_short_errors(err)}") from None
    records: list[tuple[int, Run, Mapping[str, Any]]] = []
    rejected: list[Rejected] = []
    for i, raw in enumerate(items):
        try:
            run = _RUN.validate_json(raw)
        except ValidationError as err:
            rejected.append(Rejected(i, _raw_json(raw), _short_errors(err), _top_level_id(raw)))
        else:
            records.append((i, run, _split_object(raw)))
    return _page(records, rejected, env.total, env.pages)


def _split_items(body: bytes, deep: bool) -> tuple[bytes, list[bytes]]:
    """The envelope to validate (the page, or for a body too deep to parse the page with
    ``items`` emptied) and each item's bytes."""
    if not deep:
        try:
            return body, [bytes(r) for r in _SPLIT_ITEMS.decode(body).items]
        except msgspec.DecodeError:
            pass
    top = body.find(b"{")
    members, _ = _members(body, top) if top >= 0 else ([], 0)
    items = next(((c + 1, e) for b, c, e in members
                  if c > 0 and body[b:c].strip() == b'"items"'), None)
    if items is None:
        raise EnvelopeError("not a page envelope: no items array")
    value = body[items[0]:items[1]]
    at = items[0] + len(value) - len(value.lstrip())
    if body[at:at + 1] != b"[":
        raise EnvelopeError("not a page envelope: items is not an array")
    elements, after = _members(body, at)
    return body[:at] + b"[]" + body[after:], [body[b:e].strip() for b, _, e in elements]


def _split_object(raw: bytes) -> Mapping[str, Any]:
    """A JSON object's top-level fields as byte spans of their values."""
    try:
        return _SPLIT_OBJECT.decode(raw)
    except msgspec.DecodeError:  # too deep for msgspec, or JSON only pydantic reads (NaN)
        start = raw.find(b"{")
        return {json.loads(raw[b:c]): raw[c + 1:e].strip()
                for b, c, e in _members(raw, start)[0] if c > 0}


# One JSON string or one structural character: all a scan for a container's members needs to
# see (a string may hold brackets and commas). Unrolled, so a long string is one fast match.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},:]', re.DOTALL)
_OPEN, _CLOSE, _COMMA, _COLON = frozenset(b"[{"), frozenset(b"]}"), ord(","), ord(":")


def _members(body: bytes, start: int) -> tuple[list[tuple[int, int, int]], int]:
    """The direct children of the array or object opening at ``body[start]``, as (begin,
    colon or -1, end) byte spans, and the index just past its end. Iterative, so nesting depth
    costs nothing; the children are not checked (their own parse does that)."""
    depth, begin, colon = 0, start + 1, -1
    spans: list[tuple[int, int, int]] = []
    for m in _TOKEN.finditer(body, start):
        tok = body[m.start()]
        if tok in _OPEN:
            depth += 1
        elif depth > 1:
            depth -= tok in _CLOSE
        elif tok == _COMMA:
            spans.append((begin, colon, m.start()))
            begin, colon = m.end(), -1
        elif tok == _COLON:
            colon = m.start() if colon < 0 else colon
        elif tok in _CLOSE:
            if spans or body[begin:m.start()].strip():
                spans.append((begin, colon, m.start()))
            return spans, m.end()
    raise EnvelopeError("truncated JSON: a bracket never closes")


def _raw_json(raw: bytes) -> str:
    """A rejected record's bytes as text for a JSON column; bytes no parser can check (too
    deep, or not JSON) are kept as one JSON string instead."""
    text = raw.decode("utf-8", "replace")
    try:
        json.loads(raw)
    except (RecursionError, ValueError):
        return json.dumps(text, ensure_ascii=False)
    return text


def _top_level_id(raw: bytes) -> str | None:
    """The ``id`` of a rejected record, read from its top level alone (it may be too deep to
    parse)."""
    if not raw.startswith(b"{"):
        return None
    try:
        for b, c, e in _members(raw, 0)[0]:
            if c > 0 and raw[b:c].strip() == b'"id"' and raw[c + 1:e].strip()[:1] == b'"':
                value = json.loads(raw[c + 1:e])
                return value if isinstance(value, str) else None
    except (EnvelopeError, ValueError):
        pass
    return None


def parse_run(body: bytes) -> ParsedPage:
    """Validate the body of ``GET /v1/runs/{id}``: a page of one run."""
    try:
        run = _RUN.validate_json(body)
    except ValidationError as err:
        raise EnvelopeError(f"not a run: {_short_errors(err)}") from None
    page = _page([(0, run, _split_object(body))], [], None, None)
    if page.rejected:  # its embedded workflow is invalid
        raise EnvelopeError(f"not a run: {page.rejected[0].error}")
    return page
