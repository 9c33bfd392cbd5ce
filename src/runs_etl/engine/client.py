"""HTTP access to the runs API: one request, classified once, retried with backoff and jitter.

``classify`` is the single place that decides what an HTTP outcome means. ``ApiClient`` holds
the concurrency limit, so every caller (page walks, single-run refreshes) shares one budget.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import Enum
from typing import Any, TypeVar
from urllib.parse import quote

import httpx

from ..config import Settings
from ..errors import (
    AuthError,
    FatalApiError,
    RetryableApiError,
)
from .models import EnvelopeError, ParsedPage, Run, parse_page, parse_run

T = TypeVar("T")

RUNS_PATH = "/v1/runs"
USER_AGENT = "runs-etl/0.1"
# Retry-After is honoured up to this many seconds; a longer request is capped, not obeyed.
MAX_RETRY_AFTER = 300.0


class Outcome(Enum):
    OK = "ok"
    RETRY = "retry"
    AUTH = "auth"
    NOT_FOUND = "not_found"
    FATAL = "fatal"


def classify(status: int) -> Outcome:
    """What an HTTP status means for us: the only place that decides it."""
    if 200 <= status < 300:
        return Outcome.OK
    if status in (401, 403):
        return Outcome.AUTH
    if status == 404:
        return Outcome.NOT_FOUND
    if status in (408, 425, 429) or status >= 500:
        return Outcome.RETRY
    return Outcome.FATAL


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds: a number, or an HTTP date relative to ``now``."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


@dataclass
class RequestStats:
    """Counters of one sync's traffic, reported in the ledger."""

    requests: int = 0
    retries: int = 0
    bytes: int = 0
    list_requests: int = 0
    single_requests: int = 0
    last_request_id: str | None = None


@dataclass(frozen=True, slots=True)
class _Response:
    """One HTTP response, read whole."""

    status: int
    body: bytes
    request_id: str | None
    retry_after: float | None  # seconds the server asked us to wait, if it did
    seq: int  # order of arrival


@dataclass(frozen=True, slots=True)
class FetchedPage:
    number: int
    seq: int  # order of arrival: a higher seq is a fresher view of a run
    parsed: ParsedPage
    request_id: str | None
    nbytes: int

    @property
    def count(self) -> int:
        return len(self.parsed.runs) + len(self.parsed.rejected)


@dataclass
class ApiClient:
    """Fetch pages and single runs through an ``httpx.AsyncClient`` (inject a MockTransport)."""

    http: httpx.AsyncClient
    page_size: int
    concurrency: int = 8
    max_attempts: int = 6
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    jitter: Callable[[], float] = random.random
    stats: RequestStats = field(default_factory=RequestStats)

    def __post_init__(self) -> None:
        self._slots = asyncio.Semaphore(self.concurrency)
        self._seq = itertools.count(1)

    @classmethod
    def from_settings(cls, settings: Settings, transport: httpx.AsyncBaseTransport | None = None):
        api = settings.api
        http = httpx.AsyncClient(
            base_url=api.url.rstrip("/"),
            headers={"X-API-Key": settings.api_key(), "User-Agent": USER_AGENT},
            timeout=api.timeout,
            limits=httpx.Limits(max_connections=api.concurrency,
                                max_keepalive_connections=api.concurrency),
            transport=transport,
            follow_redirects=True,
        )
        return cls(http, api.page_size, api.concurrency, api.max_attempts, api.backoff_base,
                   api.backoff_max)

    def next_seq(self) -> int:
        """A seq later than every response so far (for snapshots assembled by the caller)."""
        return next(self._seq)

    async def aclose(self) -> None:
        await self.http.aclose()

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        """Wait before attempt ``attempt + 1``: Retry-After if sent, else jittered backoff."""
        if retry_after is not None:
            return min(retry_after, MAX_RETRY_AFTER)
        ceiling = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))
        return ceiling * (0.5 + 0.5 * self.jitter())

    async def fetch_page(self, number: int) -> FetchedPage:
        """One page, retried until it is a valid envelope; bad records are rejected, not fatal."""
        params = {"page": number, "size": self.page_size}
        parsed, response = await self._get(RUNS_PATH, params, page=number, parse=parse_page)
        self.stats.list_requests += 1
        assert parsed is not None  # only single-run requests may be missing
        return FetchedPage(number, response.seq, parsed, response.request_id, len(response.body))

    async def fetch_run(self, run_id: str) -> Run | None:
        """``GET /v1/runs/{id}``; None when the run no longer exists (404)."""
        try:
            run, _ = await self._get(f"{RUNS_PATH}/{quote(run_id, safe='')}", None, page=None,
                                     parse=parse_run, missing_ok=True)
        finally:
            self.stats.single_requests += 1
        return run

    async def _get(self, path: str, params: dict | None, *, page: int | None,
                   parse: Callable[[bytes], T], missing_ok: bool = False
                   ) -> tuple[T | None, _Response]:
        """GET with retries: the parsed body (None for a 404 when ``missing_ok``) and the
        response it came from. Raises the last retryable error once attempts run out."""
        url = f"{self.http.base_url}{path}"
        last: RetryableApiError | None = None
        for attempt in range(1, self.max_attempts + 1):
            if last is not None:
                self.stats.retries += 1
                await self.sleep(self.backoff(attempt - 1, last.retry_after))
            try:
                response = await self._send(path, params, url=url, page=page)
                return self._judge(response, parse, url=url, page=page,
                                   missing_ok=missing_ok), response
            except RetryableApiError as e:
                last = e
        assert last is not None
        raise RetryableApiError(f"giving up: {last.message}", url=last.url, status=last.status,
                                page=last.page, request_id=last.request_id,
                                attempts=self.max_attempts)

    async def _send(self, path: str, params: dict | None, *, url: str,
                    page: int | None) -> _Response:
        """One attempt on the wire, within the concurrency budget; transport failures are
        retryable."""
        try:
            async with self._slots:
                self.stats.requests += 1
                # Streamed, so the body is ours alone: httpx keeps a read body on the Response,
                # which sits in reference cycles until the cycle collector runs (measured: ~90
                # MB of page bodies held at 100k runs).
                async with self.http.stream("GET", path, params=params) as response:
                    body = b"".join([chunk async for chunk in response.aiter_bytes()])
                seq = next(self._seq)
        except httpx.TimeoutException as e:
            raise RetryableApiError(f"timeout fetching {url}: {type(e).__name__}", url=url,
                                    page=page) from None
        except httpx.TransportError as e:
            raise RetryableApiError(f"cannot reach {url}: {e or type(e).__name__}", url=url,
                                    page=page) from None
        request_id = response.headers.get("x-request-id")
        self.stats.last_request_id = request_id or self.stats.last_request_id
        self.stats.bytes += len(body)
        return _Response(response.status_code, body, request_id,
                         parse_retry_after(response.headers.get("retry-after")), seq)

    def _judge(self, response: _Response, parse: Callable[[bytes], T], *, url: str,
               page: int | None, missing_ok: bool) -> T | None:
        """What a response means (see ``classify``): the parsed body, None for a run that is
        gone, or the error to raise (``RetryableApiError`` is retried by ``_get``)."""
        kw: dict[str, Any] = dict(url=url, status=response.status, page=page,
                                  request_id=response.request_id)
        outcome = classify(response.status)
        if outcome is Outcome.OK:
            try:
                return parse(response.body)
            except EnvelopeError as e:
                raise RetryableApiError(f"malformed response from {url}: {e}", **kw) from None
        if outcome is Outcome.AUTH:
            raise AuthError("the API rejected the API key: check RUNS_ETL_API_KEY "
                            "(or RUNS_ETL_API_KEY_FILE / [api] key) for this workspace", **kw)
        if outcome is Outcome.NOT_FOUND and missing_ok:
            return None
        if outcome is Outcome.RETRY:
            raise RetryableApiError(f"{url} answered {response.status}",
                                    retry_after=response.retry_after, **kw)
        raise FatalApiError(f"{url} answered {response.status}: {_detail(response.body)}", **kw)


def _detail(body: bytes) -> str:
    """The server's ``detail`` (FastAPI), shortened, so a 422 says which parameter was wrong."""
    try:
        detail = json.loads(body).get("detail")
    except (ValueError, AttributeError):
        return body[:200].decode("utf-8", "replace")
    if isinstance(detail, list):
        return "; ".join(
            f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail[:3]
            if isinstance(d, dict)
        )
    return str(detail)[:200]
