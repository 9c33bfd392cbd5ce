"""HTTP access to the runs API: one request, classified once, retried with backoff and jitter.

``classify`` is the single place that decides what an HTTP outcome means. ``ApiClient`` holds
the concurrency limiter (``concurrency.Limiter``: adapts to the server up to ``api.concurrency``),
so every caller (page walks, single-run refreshes) shares one budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import Enum
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit
from urllib.request import getproxies

import httpx

from ..config import DEFAULT_MAX_RESPONSE_BYTES, ApiSettings, Settings, redact_url
from ..errors import (
    AuthError,
    ConfigError,
    FatalApiError,
    RetryableApiError,
    one_line,
)
from .concurrency import Limiter
from .models import EnvelopeError, PageDigest, ParsedPage, parse_page, parse_run

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)

RUNS_PATH = "/v1/runs"
USER_AGENT = "runs-etl/0.1"
# Retry-After is honoured up to this many seconds; a longer request is capped, not obeyed.
MAX_RETRY_AFTER = 300.0
# A wait longer than this is logged, so a sync sleeping on Retry-After is not silent.
LOG_WAITS_OVER = 5.0
# Same-origin redirects followed per request; more is a loop.
MAX_REDIRECTS = 5
# Server text quoted in an error message is cut to this many characters.
DETAIL_CHARS = 200

log = logging.getLogger("runs_etl.client")


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
    parsed: ParsedPage | PageDigest  # a digest when a worker validated and staged it
    request_id: str | None
    nbytes: int

    @property
    def count(self) -> int:
        return len(self.parsed.runs) + len(self.parsed.rejected)


def _cause(exc: BaseException, kind: type[E]) -> E | None:
    """The first exception of type ``kind`` in ``exc``'s chain of causes (httpx wraps
    httpcore's errors, which wrap the socket's and ssl's)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def tls_verification(api: ApiSettings) -> ssl.SSLContext | bool:
    """What checks the API's certificates: ``api.ca_bundle`` when set, else httpx's default
    (certifi's bundle). An ``http://`` API reached without a proxy opens no TLS connection
    (redirects are followed within the same origin only), so loading the bundle, ~30 ms per
    client that cron pays on every run, would buy nothing: it gets a context that trusts no
    certificate instead, with which any handshake would fail, never pass unverified."""
    if api.ca_bundle is not None:
        try:
            return ssl.create_default_context(cafile=str(api.ca_bundle))
        except (OSError, ssl.SSLError) as e:
            raise ConfigError([f"api.ca_bundle: cannot load {api.ca_bundle}: "
                               f"{getattr(e, 'strerror', None) or e}"]) from None
    if urlsplit(api.url).scheme == "http" and not getproxies():
        return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies hostnames, trusts no CA
    return True


@dataclass
class ApiClient:
    """Fetch pages and single runs through an ``httpx.AsyncClient`` (inject a MockTransport)."""

    http: httpx.AsyncClient
    page_size: int
    concurrency: int = 8  # the most requests in flight
    max_attempts: int = 6
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    deadline: float | None = None  # seconds for one whole response, redirects included
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    adaptive: bool = True  # False: always ``concurrency`` in flight (a plain semaphore)
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    jitter: Callable[[], float] = random.random
    stats: RequestStats = field(default_factory=RequestStats)
    # A bound shared with other workspaces' clients (requests in flight across all of them).
    shared: asyncio.Semaphore | None = None
    # Called with (seq, "page" | "run", page number | path, body) for every body accepted:
    # raw page retention writes them out (see ``pages.py``) instead of keeping them.
    on_body: Callable[[int, str, int | str, bytes], None] | None = None
    # Validates page bodies elsewhere (``parallel``), called with (seq, page number, body): the
    # page's digest, or None to validate it here.
    page_parser: Callable[[int, int, bytes], Awaitable[PageDigest | None]] | None = None

    def __post_init__(self) -> None:
        self.limiter = Limiter(self.concurrency, adaptive=self.adaptive, sleep=self.sleep)
        self._seq = itertools.count(1)

    @classmethod
    def from_settings(cls, settings: Settings, transport: httpx.AsyncBaseTransport | None = None,
                      shared: asyncio.Semaphore | None = None):
        api = settings.api
        http = httpx.AsyncClient(
            base_url=api.url.rstrip("/"),
            headers={"X-API-Key": settings.api_key(), "User-Agent": USER_AGENT},
            timeout=api.timeout,
            limits=httpx.Limits(max_connections=api.concurrency,
                                max_keepalive_connections=api.concurrency),
            transport=transport,
            verify=tls_verification(api),
            follow_redirects=False,  # _exchange follows same-origin redirects only
        )
        return cls(http, api.page_size, api.concurrency, api.max_attempts, api.backoff_base,
                   api.backoff_max, deadline=api.request_deadline or 2 * api.timeout,
                   max_response_bytes=api.max_response_bytes, shared=shared)

    def next_seq(self) -> int:
        """A seq later than every response so far (for snapshots assembled by the caller)."""
        return next(self._seq)

    async def aclose(self) -> None:
        await self.http.aclose()

    def url_for(self, path: str) -> str:
        """The absolute URL of ``path`` as shown in messages: one slash, no credentials."""
        return redact_url(str(self.http.base_url).rstrip("/") + path)

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

    async def fetch_run(self, run_id: str) -> ParsedPage | None:
        """``GET /v1/runs/{id}`` as a page of one run; None when it no longer exists (404)."""
        try:
            run, _ = await self._get(f"{RUNS_PATH}/{quote(run_id, safe='')}", None, page=None,
                                     parse=parse_run, missing_ok=True)
        finally:
            self.stats.single_requests += 1
        assert not isinstance(run, PageDigest)  # only pages are validated elsewhere
        return run

    async def _get(self, path: str, params: dict | None, *, page: int | None,
                   parse: Callable[[bytes], T], missing_ok: bool = False
                   ) -> tuple[T | PageDigest | None, _Response]:
        """GET with retries: the parsed body (None for a 404 when ``missing_ok``) and the
        response it came from. Raises the last retryable error once attempts run out."""
        url = self.url_for(path)
        last: RetryableApiError | None = None
        for attempt in range(1, self.max_attempts + 1):
            if last is not None:
                self.stats.retries += 1
                wait = self.backoff(attempt - 1, last.retry_after)
                if wait > LOG_WAITS_OVER:
                    asked = ("" if last.retry_after is None else
                             f" (the server asked for {last.retry_after:.0f}s with Retry-After"
                             f"{'; capped' if last.retry_after > wait else ''})")
                    log.warning("waiting %.0fs before attempt %d of %d for %s%s", wait, attempt,
                                self.max_attempts, url, asked,
                                extra={"event": "retry_wait", "wait_seconds": wait,
                                       "page": page, "status": last.status})
                await self.sleep(wait)
            try:
                response = await self._send(path, params, url=url, page=page,
                                            retry=last is not None)
                parsed = await self._judged(response, parse, url=url, page=page,
                                            missing_ok=missing_ok)
                if self.on_body is not None and parsed is not None:
                    self.on_body(response.seq, "run" if page is None else "page",
                                 path if page is None else page, response.body)
                return parsed, response
            except RetryableApiError as e:
                last = e
        assert last is not None
        raise RetryableApiError(f"giving up: {last.message}", url=last.url, status=last.status,
                                page=last.page, request_id=last.request_id,
                                attempts=self.max_attempts)

    async def _send(self, path: str, params: dict | None, *, url: str, page: int | None,
                    retry: bool = False) -> _Response:
        """One attempt on the wire, within the concurrency budget and ``deadline``; transport
        failures, timeouts and undecodable bodies are retryable."""
        try:
            ticket = await self.limiter.acquire(waited=retry)
            try:
                # Other workspaces' clients share one bound on requests in flight.
                async with self.shared or contextlib.nullcontext():
                    self.stats.requests += 1
                    # The read timeout is per chunk: a server trickling bytes never trips it.
                    async with asyncio.timeout(self.deadline):
                        response, body = await self._exchange(path, params, url=url, page=page)
                    seq = next(self._seq)
            except BaseException:
                self.limiter.release(ticket, healthy=False)
                raise
        except TimeoutError:
            raise RetryableApiError(f"no complete response from {url} within {self.deadline:g}s",
                                    url=url, page=page) from None
        except httpx.TimeoutException as e:
            raise RetryableApiError(f"timeout fetching {url}: {type(e).__name__}", url=url,
                                    page=page) from None
        except httpx.DecodingError as e:  # e.g. Content-Encoding: gzip on a body that is not
            raise RetryableApiError(f"undecodable body from {url}: {self._scrub(e)}", url=url,
                                    page=page) from None
        except httpx.TransportError as e:
            rejected = _cause(e, ssl.SSLCertVerificationError)
            if rejected is not None:  # a certificate does not start to verify by itself
                raise FatalApiError(
                    f"cannot verify the TLS certificate of {url} "
                    f"({rejected.verify_message or rejected.reason}); not retried. If the API's "
                    "certificate comes from a private CA, set api.ca_bundle to that CA's PEM "
                    "file", url=url, page=page) from None
            raise RetryableApiError(f"cannot reach {url}: {self._scrub(e)}", url=url,
                                    page=page) from None
        request_id = response.headers.get("x-request-id")
        self.stats.last_request_id = request_id or self.stats.last_request_id
        self.stats.bytes += len(body)
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        status = response.status_code
        self.limiter.release(ticket, overloaded=status in (429, 503) or retry_after is not None,
                             retry_after=min(retry_after or 0.0, MAX_RETRY_AFTER),
                             healthy=status < 500)
        return _Response(status, body, request_id, retry_after, seq)

    async def _exchange(self, path: str, params: dict | None, *, url: str,
                        page: int | None) -> tuple[httpx.Response, bytes]:
        """GET ``path`` following redirects within the API's origin only: the key header is
        sent to no other host (httpx would strip only ``Authorization``)."""
        target = httpx.URL(str(self.http.base_url).rstrip("/") + path, params=params)
        for _ in range(MAX_REDIRECTS + 1):
            async with self._streamed(target) as response:
                if not response.is_redirect:
                    return response, await self._read(response, url=url, page=page)
                location = response.url.join(response.headers["location"])
                if _origin(location) != _origin(response.url):
                    shown = one_line(redact_url(str(location)), DETAIL_CHARS)
                    raise FatalApiError(
                        f"{url} redirected to another origin, {shown}; not followed, so the API "
                        "key stays with the API. If the API has moved, set api.url to it",
                        url=url, status=response.status_code, page=page)
                target = location
        raise FatalApiError(f"{url} redirected more than {MAX_REDIRECTS} times (a redirect "
                            "loop?)", url=url, page=page)

    @contextlib.asynccontextmanager
    async def _streamed(self, url: httpx.URL) -> AsyncIterator[httpx.Response]:
        """GET ``url``, its body left to stream: ``AsyncClient.stream`` without the layer
        around the transport it does not need here (the auth and redirect flows, event hooks),
        which cost ~0.35 ms of CPU per request of ~1.4 ms (measured over 1000 pages). What that
        layer does for this client is kept: the client's headers, cookies and timeouts (its
        ``build_request``), credentials in ``api.url`` (basic auth, as httpx sends them), the
        transport it would pick for the URL (an injected one, or the environment's proxy;
        ``_transport_for_url`` is private but has been httpx's since 0.18, and pyproject
        keeps httpx below 1.0). ``_exchange`` follows redirects itself. Streamed, so the body
        is ours alone: httpx keeps a read body on the Response, which sits in reference cycles
        until the cycle collector runs (~90 MB of bodies at 100k runs)."""
        request = self.http.build_request("GET", url)
        if url.username or url.password:
            request = next(httpx.BasicAuth(url.username, url.password).sync_auth_flow(request))
        response = await self.http._transport_for_url(url).handle_async_request(request)
        response.request = request
        try:
            if "set-cookie" in response.headers:  # (the cookie jar costs ~16 us to find none)
                self.http.cookies.extract_cookies(response)
            yield response
        finally:
            await response.aclose()

    async def _read(self, response: httpx.Response, *, url: str, page: int | None) -> bytes:
        """The body, refused beyond ``max_response_bytes`` (decoded bytes are counted, so a
        compressed bomb is caught too): no page is that large, and retrying will not help."""
        limit = self.max_response_bytes
        declared = response.headers.get("content-length", "")
        too_big = declared.isdigit() and int(declared) > limit
        chunks: list[bytes] = []
        size = 0
        if not too_big:
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limit:
                    too_big = True
                    break
                chunks.append(chunk)
        if too_big:
            raise FatalApiError(f"response from {url} is larger than api.max_response_bytes "
                                f"({limit} bytes); raise it if pages really are that large",
                                url=url, status=response.status_code, page=page)
        return b"".join(chunks)

    def _scrub(self, e: Exception) -> str:
        """An httpx error's text without the API key (an illegal header value is quoted)."""
        text = str(e) or type(e).__name__
        key = self.http.headers.get("x-api-key")
        return one_line(text.replace(key, "***") if key else text, DETAIL_CHARS)

    async def _judged(self, response: _Response, parse: Callable[[bytes], T], *, url: str,
                      page: int | None, missing_ok: bool) -> T | PageDigest | None:
        """``_judge``, a page body validated by ``page_parser`` when that takes it."""
        if self.page_parser is not None and page is not None \
                and classify(response.status) is Outcome.OK:
            try:
                digest = await self.page_parser(response.seq, page, response.body)
            except EnvelopeError as e:
                raise self._malformed(e, response, url=url, page=page) from None
            if digest is not None:
                return digest
        return self._judge(response, parse, url=url, page=page, missing_ok=missing_ok)

    @staticmethod
    def _malformed(e: EnvelopeError, response: _Response, *, url: str,
                   page: int | None) -> RetryableApiError:
        return RetryableApiError(f"malformed response from {url}: {e}", url=url,
                                 status=response.status, page=page,
                                 request_id=response.request_id)

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
                raise self._malformed(e, response, url=url, page=page) from None
        if outcome is Outcome.AUTH:
            raise AuthError("the API rejected the API key: check RUNS_ETL_API_KEY "
                            "(or RUNS_ETL_API_KEY_FILE / [api] key) for this workspace", **kw)
        if outcome is Outcome.NOT_FOUND and missing_ok:
            return None
        if outcome is Outcome.RETRY:
            raise RetryableApiError(f"{url} answered {response.status}",
                                    retry_after=response.retry_after, **kw)
        raise FatalApiError(f"{url} answered {response.status}: {_detail(response.body)}", **kw)


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    default = {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, url.port or default


def _detail(body: bytes) -> str:
    """The server's ``detail`` (FastAPI), shortened to one printable line, so a 422 says which
    parameter was wrong and nothing the server sends can forge lines or drive the terminal."""
    try:
        detail = json.loads(body).get("detail")
    except (ValueError, AttributeError, RecursionError):
        return one_line(body[:DETAIL_CHARS].decode("utf-8", "replace"), DETAIL_CHARS)
    if isinstance(detail, list):
        text = "; ".join(
            f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail[:3]
            if isinstance(d, dict)
        )
    else:
        text = str(detail)
    return one_line(text, DETAIL_CHARS)
