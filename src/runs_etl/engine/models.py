"""Pydantic models of what the runs API really sends, validated a whole page at a time.

Lenient where the API is loose (unknown fields kept in ``model_extra``, any status string, naive
timestamps read as UTC, ``node_ids`` as list, object or null), strict where the warehouse needs it
(a run without ``id`` or ``created_at``, with a timestamp outside ``TS_MIN``..``TS_MAX``, or
nested deeper than the parser goes cannot be stored and is rejected with its raw JSON).
Timestamps keep the offset they were sent with; ``normalize`` stores them as UTC instants.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

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
# Any status not in TERMINAL_STATUSES (queued, running, awaiting_human_feedback, or one a newer
# server invents) is open: such a run will still change.


def utc(value: datetime) -> datetime:
    """Naive timestamps are UTC. Used where Python compares instants; Arrow converts the rest
    (a per-field pydantic validator would cost a quarter of the validation time)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


class Workflow(BaseModel):
    """The workflow embedded in a run: a snapshot as of the request, not as of the run."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: str = Field(min_length=1)
    group_id: str | None = None
    name: str | None = None
    type: str | None = None
    definition: Any = None
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
    """One element of ``items``; fields keep their API names."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: str = Field(min_length=1)
    group_id: str | None = None
    workflow_id: str | None = None
    input: Any = None
    node_ids: list[str] | dict[str, Any] | None = None
    status: str
    progress: int | None = Field(None, ge=INT32_MIN, le=INT32_MAX)
    definitions: Any = None
    created_at: datetime = Field(ge=TS_MIN, le=TS_MAX)
    finished_at: datetime | None = Field(None, ge=TS_MIN, le=TS_MAX)
    workflow: Workflow | None = None
    source: str | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


class PageEnvelope(BaseModel):
    """fastapi-pagination's ``Page``; ``total``/``pages`` may be null on some servers."""

    items: list[Run]
    total: int | None = None
    page: int | None = None
    size: int | None = None
    pages: int | None = None


class _LooseEnvelope(BaseModel):
    items: list[Any]
    total: int | None = None
    page: int | None = None
    size: int | None = None
    pages: int | None = None


_PAGE = TypeAdapter(PageEnvelope)
_LOOSE_PAGE = TypeAdapter(_LooseEnvelope)
_RUN = TypeAdapter(Run)


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
class ParsedPage:
    runs: list[Run]
    rejected: list[Rejected]
    total: int | None
    pages: int | None


def _short_errors(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:5]:
        loc = ".".join(str(p) for p in e["loc"])
        parts.append(f"{loc}: {e['msg']}" if loc else e["msg"])
    return "; ".join(parts)


def _share_workflows(runs: list[Run]) -> list[Run]:
    """Point every run of a page at one instance per embedded workflow id, and keep one run
    per id (the last: a page is one instant, so copies are the same run).

    One response embeds the same snapshot in each of a workflow's runs (it is "as of the
    request"); keeping a single copy cuts a parsed page's memory several times over. One run
    per id and page makes (id, page) a key downstream."""
    if len({r.id for r in runs}) != len(runs):
        runs = list({r.id: r for r in runs}.values())
    shared: dict[str, Workflow] = {}
    for run in runs:
        wf = run.workflow
        if wf is not None:
            first = shared.setdefault(wf.id, wf)
            if first is not wf:
                run.__dict__["workflow"] = first  # frozen model: bypass the setattr guard
    return runs


def parse_page(body: bytes) -> ParsedPage:
    """Validate a page body in one pass; only on failure fall back to record-by-record."""
    try:
        env = _PAGE.validate_json(body)
        return ParsedPage(_share_workflows(env.items), [], env.total, env.pages)
    except ValidationError as err:
        if [e["type"] for e in err.errors()] == ["json_invalid"]:
            # Valid JSON the parser refuses (nesting past its limit) fails the whole body:
            # split it into records without a recursive parser, so one record is rejected.
            return _parse_split(body)
        if not all(e["loc"][:1] == ("items",) and len(e["loc"]) >= 2 for e in err.errors()):
            raise EnvelopeError(f"not a page envelope: {_short_errors(err)}") from None
    # Some records are bad but the envelope is fine: sort them out one by one.
    try:
        loose = _LOOSE_PAGE.validate_json(body)
    except ValidationError as err:  # pragma: no cover - the first pass already proved the shape
        raise EnvelopeError(f"not a page envelope: {_short_errors(err)}") from None
    runs: list[Run] = []
    rejected: list[Rejected] = []
    for i, item in enumerate(loose.items):
        try:
            runs.append(_RUN.validate_python(item))
        except ValidationError as err:
            run_id = item.get("id") if isinstance(item, dict) else None
            rejected.append(
                Rejected(i, json.dumps(item, ensure_ascii=False), _short_errors(err),
                         run_id if isinstance(run_id, str) else None)
            )
    return ParsedPage(_share_workflows(runs), rejected, loose.total, loose.pages)


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


def _parse_split(body: bytes) -> ParsedPage:
    """The record-by-record path for a body the one-pass parser refused as a whole: each
    ``items`` element is validated from its own bytes, so only the bad ones are rejected."""
    checked = True
    try:
        json.loads(body)
    except RecursionError:  # deeper than Python's parser goes: the slices are unchecked
        checked = False
    except ValueError as err:  # corrupt or truncated: the response is broken, retry it
        raise EnvelopeError(f"invalid JSON: {err}") from None
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
    try:
        loose = _LOOSE_PAGE.validate_json(body[:at] + b"[]" + body[after:])
    except ValidationError as err:
        raise EnvelopeError(f"not a page envelope: {_short_errors(err)}") from None
    runs: list[Run] = []
    rejected: list[Rejected] = []
    for i, (b, _, e) in enumerate(elements):
        raw = body[b:e].strip()
        try:
            runs.append(_RUN.validate_json(raw))
        except ValidationError as err:
            rejected.append(Rejected(i, _raw_json(raw, checked), _short_errors(err),
                                     _top_level_id(raw)))
    return ParsedPage(_share_workflows(runs), rejected, loose.total, loose.pages)


def _raw_json(raw: bytes, checked: bool) -> str:
    """A rejected record's bytes as text for a JSON column; bytes no parser could check are
    kept as one JSON string instead."""
    text = raw.decode("utf-8", "replace")
    if not checked:
        try:
            json.loads(raw)
        except (RecursionError, ValueError):
            return json.dumps(text, ensure_ascii=False)
    return text


def _top_level_id(raw: bytes) -> str | None:
    """The ``id`` of a record too deep to parse, read from its top level alone."""
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


def parse_run(body: bytes) -> Run:
    """Validate the body of ``GET /v1/runs/{id}``."""
    try:
        return _RUN.validate_json(body)
    except ValidationError as err:
        raise EnvelopeError(f"not a run: {_short_errors(err)}") from None
