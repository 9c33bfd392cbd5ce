"""HTTP client: one classification, retries with patched sleep, auth/fatal errors, concurrency."""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest
from fakeapi import API_KEY, BASE_URL, FakeApi, Sleeps, fetch_page_1, make_run, make_runs
from hypothesis import given, settings
from hypothesis import strategies as st

import runs_etl.engine.client as client_mod
from runs_etl.config import load_settings
from runs_etl.engine.client import MAX_RETRY_AFTER, ApiClient, Outcome, classify, parse_retry_after
from runs_etl.errors import AuthError, FatalApiError, RetryableApiError

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


def page_body(runs, total=None, size=10):
    total = len(runs) if total is None else total
    return {"items": runs, "total": total, "page": 1, "size": size, "pages": -(-total // size)}


def ok(runs=None, **headers) -> httpx.Response:
    body = page_body(make_runs(3) if runs is None else runs)
    return httpx.Response(200, json=body, headers=headers)


def scripted(*responses):
    """A handler answering with ``responses`` in turn (a callable or an exception is applied)."""
    queue = list(responses)
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        item = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(item, Exception):
            raise item
        return item

    handler.calls = calls  # type: ignore[attr-defined]
    return handler


def run_client(handler, action, *, sleeps=None, **kw):
    """Build an ApiClient over ``handler`` and return (``await action(client)``, client)."""
    kw.setdefault("max_attempts", 4)

    async def main():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler),
                                     base_url=BASE_URL) as http:
            client = ApiClient(http=http, page_size=kw.pop("page_size", 10),
                               sleep=sleeps if sleeps is not None else Sleeps(),
                               jitter=kw.pop("jitter", lambda: 0.5), **kw)
            try:
                return await action(client), client
            except Exception as e:  # hand the client back with the error for stats checks
                e.client = client  # type: ignore[attr-defined]
                raise

    return asyncio.run(main())


def page1(client):
    return client.fetch_page(1)


# --- classify ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("status", "outcome"), [
    (200, Outcome.OK), (204, Outcome.OK),
    (401, Outcome.AUTH), (403, Outcome.AUTH),
    (404, Outcome.NOT_FOUND),
    (408, Outcome.RETRY), (429, Outcome.RETRY),
    (500, Outcome.RETRY), (502, Outcome.RETRY), (503, Outcome.RETRY), (504, Outcome.RETRY),
    (400, Outcome.FATAL), (405, Outcome.FATAL), (422, Outcome.FATAL),
])
def test_classify_decides_what_each_status_means(status, outcome):
    assert classify(status) is outcome


# --- Retry-After ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "seconds"), [
    ("7", 7.0), (" 2.5 ", 2.5), ("0", 0.0), ("-3", 0.0),
    (format_datetime(NOW + timedelta(seconds=90), usegmt=True), 90.0),
    (format_datetime(NOW - timedelta(seconds=90), usegmt=True), 0.0),  # already past
    ("Sat, 01 Mar 2025 12:02:00 GMT", 120.0),
    (None, None), ("", None), ("soon", None),
])
def test_parse_retry_after_reads_seconds_and_http_dates(value, seconds):
    assert parse_retry_after(value, now=NOW) == seconds


def test_429_waits_the_retry_after_seconds_then_succeeds():
    sleeps = Sleeps()
    handler = scripted(httpx.Response(429, headers={"Retry-After": "7"}), ok())
    page, client = run_client(handler, page1, sleeps=sleeps)
    assert sleeps == [7.0]
    assert len(page.parsed.runs) == 3
    assert client.stats.retries == 1


def test_429_honours_retry_after_as_an_http_date(monkeypatch):
    class FrozenDatetime(datetime):
        @classmethod
        def now(cls, tz=None):
            return NOW

    monkeypatch.setattr(client_mod, "datetime", FrozenDatetime)
    when = format_datetime(NOW + timedelta(seconds=42), usegmt=True)
    sleeps = Sleeps()
    run_client(scripted(httpx.Response(429, headers={"Retry-After": when}), ok()), page1,
               sleeps=sleeps)
    assert sleeps == [42.0]


def test_absurd_retry_after_is_capped():
    sleeps = Sleeps()
    run_client(scripted(httpx.Response(503, headers={"Retry-After": "86400"}), ok()), page1,
               sleeps=sleeps)
    assert sleeps == [MAX_RETRY_AFTER]


def test_429_without_retry_after_uses_backoff():
    sleeps = Sleeps()
    run_client(scripted(httpx.Response(429), ok()), page1, sleeps=sleeps, backoff_base=2.0)
    assert sleeps == [2.0 * 0.75]  # jitter 0.5 -> 75% of the first ceiling


# --- backoff -------------------------------------------------------------------------------------

def test_backoff_doubles_with_jitter_and_stops_at_backoff_max():
    sleeps = Sleeps()
    handler = scripted(httpx.Response(503))
    with pytest.raises(RetryableApiError):
        run_client(handler, page1, sleeps=sleeps, max_attempts=6, backoff_base=1.0,
                   backoff_max=5.0, jitter=lambda: 0.5, adaptive=False)  # no pacing sleeps
    # ceilings 1, 2, 4, 5 (capped), 5 -> waits at 75% with jitter 0.5
    assert sleeps == [0.75, 1.5, 3.0, 3.75, 3.75]
    assert len(handler.calls) == 6


def test_backoff_jitter_spans_half_to_full_ceiling():
    low, high = Sleeps(), Sleeps()
    for sleeps, jitter in ((low, lambda: 0.0), (high, lambda: 1.0)):
        with pytest.raises(RetryableApiError):
            run_client(scripted(httpx.Response(500)), page1, sleeps=sleeps, max_attempts=3,
                       backoff_base=4.0, backoff_max=100.0, jitter=jitter)
    assert low == [2.0, 4.0]
    assert high == [4.0, 8.0]


@settings(max_examples=60, deadline=None)
@given(attempt=st.integers(1, 60), base=st.floats(0, 10), cap=st.floats(0, 60),
       jitter=st.floats(0, 1, exclude_max=True))
def test_backoff_never_exceeds_backoff_max(attempt, base, cap, jitter):
    client = ApiClient.__new__(ApiClient)  # backoff needs no HTTP client
    client.backoff_base, client.backoff_max, client.jitter = base, cap, lambda: jitter
    wait = ApiClient.backoff(client, attempt, None)
    ceiling = min(cap, base * 2 ** (attempt - 1))
    assert 0 <= wait <= cap
    assert ceiling / 2 <= wait <= ceiling


# --- what gets retried ---------------------------------------------------------------------------

@pytest.mark.parametrize("failure", [
    httpx.Response(500), httpx.Response(502), httpx.Response(503), httpx.Response(504),
    httpx.Response(408),
    httpx.ReadTimeout("read timed out"),
    httpx.ConnectTimeout("connect timed out"),
    httpx.ConnectError("connection refused"),
    httpx.RemoteProtocolError("server disconnected"),
    httpx.Response(200, content=b'{"items": [{"id": "a", "status": "compl'),  # truncated
    httpx.Response(200, json={"detail": "maintenance"}),  # not the page envelope
    httpx.Response(200, json=[1, 2, 3]),
    httpx.Response(200, content=b"<html>Bad gateway</html>"),
], ids=["500", "502", "503", "504", "408", "read-timeout", "connect-timeout", "connect-error",
        "disconnect", "truncated-json", "non-envelope", "json-array", "html"])
def test_transient_failures_are_retried_until_a_good_page(failure):
    sleeps = Sleeps()
    handler = scripted(failure, failure, ok())
    # adaptive=False: no pacing after a 503 (the limiter paces by the real clock, so whether it
    # sleeps depends on how fast this machine got there)
    page, client = run_client(handler, page1, sleeps=sleeps, adaptive=False)
    assert len(handler.calls) == 3
    assert len(sleeps) == 2
    assert [r.id for r in page.parsed.runs] == [r["id"] for r in make_runs(3)]
    assert client.stats.retries == 2 and client.stats.requests == 3


def test_gives_up_after_max_attempts_naming_page_status_and_request_id():
    sleeps = Sleeps()
    n = iter(range(1, 100))

    def handler(request):
        return httpx.Response(503, headers={"x-request-id": f"req-{next(n)}"})

    with pytest.raises(RetryableApiError) as info:
        run_client(handler, lambda c: c.fetch_page(7), sleeps=sleeps, max_attempts=3,
                   adaptive=False)  # no pacing sleeps
    err = info.value
    assert (err.page, err.status, err.request_id, err.attempts) == (7, 503, "req-3", 3)
    text = str(err)
    assert "page 7" in text and "HTTP 503" in text and "req-3" in text and "3 attempts" in text
    assert len(sleeps) == 2  # no sleep after the last attempt


def test_gives_up_on_timeouts_with_a_retryable_error():
    with pytest.raises(RetryableApiError) as info:
        run_client(scripted(httpx.ReadTimeout("slow")), page1, max_attempts=2)
    assert "timeout" in str(info.value).lower() and info.value.page == 1
    assert info.value.attempts == 2


def test_a_single_attempt_means_no_retry():
    handler = scripted(httpx.Response(500))
    sleeps = Sleeps()
    with pytest.raises(RetryableApiError):
        run_client(handler, page1, sleeps=sleeps, max_attempts=1)
    assert len(handler.calls) == 1 and sleeps == []


# --- auth and fatal ------------------------------------------------------------------------------

@pytest.mark.parametrize("status", [401, 403])
def test_rejected_key_is_an_auth_error_that_names_the_setting_but_not_the_key(status):
    settings_ = load_settings(None, {"RUNS_ETL_API_URL": BASE_URL, "RUNS_ETL_API_KEY": API_KEY})
    seen = []

    def handler(request):
        seen.append(request.headers["x-api-key"])
        return httpx.Response(status, json={"detail": f"bad key {API_KEY}"},
                              headers={"x-request-id": "req-auth"})

    client = ApiClient.from_settings(settings_, transport=httpx.MockTransport(handler))
    client.sleep = Sleeps()

    with pytest.raises(AuthError) as info:
        fetch_page_1(client)
    assert seen == [API_KEY]  # sent once as X-API-Key, never retried
    err = info.value
    assert "RUNS_ETL_API_KEY" in str(err)
    assert API_KEY not in str(err) and API_KEY not in repr(err)
    assert err.status == status and err.request_id == "req-auth"
    assert err.exit_code == 3


def test_422_is_fatal_with_the_server_detail_and_not_retried():
    api = FakeApi(make_runs(3))
    sleeps = Sleeps()

    client = api.client(page_size=500, sleep=sleeps)

    with pytest.raises(FatalApiError) as info:
        fetch_page_1(client)
    assert len(api.requests) == 1 and sleeps == []
    assert info.value.status == 422
    assert "query.size" in str(info.value) and "less than or equal to 100" in str(info.value)
    assert not isinstance(info.value, RetryableApiError)


@pytest.mark.parametrize(("response", "detail"), [
    (httpx.Response(400, json={"detail": "bad request, friend"}), "bad request, friend"),
    (httpx.Response(400, text="plain text failure"), "plain text failure"),
    (httpx.Response(404, json={"detail": "Not Found"}), "Not Found"),
])
def test_other_4xx_on_a_page_is_fatal_with_its_detail(response, detail):
    handler = scripted(response)
    with pytest.raises(FatalApiError) as info:
        run_client(handler, page1)
    assert detail in str(info.value) and len(handler.calls) == 1


# --- requests as sent ----------------------------------------------------------------------------

def test_page_request_sends_page_and_size():
    handler = scripted(ok())
    run_client(handler, lambda c: c.fetch_page(4), page_size=37)
    (request,) = handler.calls
    assert request.url.path == "/v1/runs"
    assert dict(request.url.params) == {"page": "4", "size": "37"}


def test_from_settings_sends_key_and_user_agent():
    settings_ = load_settings(None, {"RUNS_ETL_API_URL": BASE_URL + "/",
                                     "RUNS_ETL_API_KEY": API_KEY})
    handler = scripted(ok())

    client = ApiClient.from_settings(settings_, transport=httpx.MockTransport(handler))

    fetch_page_1(client)
    (request,) = handler.calls
    assert request.headers["x-api-key"] == API_KEY
    assert request.headers["user-agent"].startswith("runs-etl/")
    assert str(request.url).startswith(BASE_URL + "/v1/runs?")  # no double slash


# --- concurrency ---------------------------------------------------------------------------------

@pytest.mark.parametrize("limit", [1, 3])
def test_never_more_than_concurrency_requests_in_flight(limit):
    state = {"now": 0, "max": 0}

    async def handler(request):
        state["now"] += 1
        state["max"] = max(state["max"], state["now"])
        for _ in range(5):
            await asyncio.sleep(0)
        state["now"] -= 1
        return ok()

    async def many(client):
        return await asyncio.gather(*(client.fetch_page(n) for n in range(1, 21)))

    pages, _ = run_client(handler, many, concurrency=limit)
    assert len(pages) == 20
    assert state["max"] == limit


def test_seq_follows_arrival_order():
    async def two(client):
        a = await client.fetch_page(2)
        b = await client.fetch_page(1)
        return a, b

    (a, b), _ = run_client(scripted(ok()), two)
    assert b.seq > a.seq


# --- single runs ---------------------------------------------------------------------------------

def test_fetch_run_returns_the_run():
    api = FakeApi([make_run(1), make_run(2, status="running")])

    async def main():
        client = api.client()
        try:
            return await client.fetch_run(make_run(2)["id"]), client.stats.single_requests
        finally:
            await client.aclose()

    page, single = asyncio.run(main())
    (run,) = page.runs
    assert run.id == make_run(2)["id"] and run.status == "running" and not run.is_terminal
    assert single == 1


def test_fetch_run_of_a_deleted_run_returns_none():
    api = FakeApi([make_run(1)])

    async def main():
        client = api.client()
        try:
            return await client.fetch_run("gone"), client.stats
        finally:
            await client.aclose()

    run, stats = asyncio.run(main())
    assert run is None
    assert stats.single_requests == 1 and stats.retries == 0
    assert api.requests[0].url.path == "/v1/runs/gone"


def test_fetch_run_with_a_broken_body_is_retried():
    sleeps = Sleeps()
    good = httpx.Response(200, json=make_run(5))
    page, _ = run_client(scripted(httpx.Response(200, json={"id": "x"}), good),
                         lambda c: c.fetch_run(make_run(5)["id"]), sleeps=sleeps)
    assert page.runs[0].id == make_run(5)["id"] and len(sleeps) == 1


# --- stats ---------------------------------------------------------------------------------------

def test_stats_count_requests_retries_bytes_and_last_request_id():
    good = ok(**{"x-request-id": "req-good"})
    bad = httpx.Response(502, content=b"oops", headers={"x-request-id": "req-bad"})
    handler = scripted(bad, httpx.ConnectError("refused"), good)

    async def both(client):
        first = await client.fetch_page(1)
        return first, await client.fetch_page(2)

    (first, second), client = run_client(handler, both)
    s = client.stats
    assert s.requests == 4 and s.retries == 2 and s.list_requests == 2
    body = len(good.content)
    assert s.bytes == len(b"oops") + 2 * body
    assert s.last_request_id == "req-good"
    assert first.request_id == "req-good" and first.nbytes == body
    assert first.count == 3


def test_page_with_a_bad_record_is_not_retried():
    """A record that fails validation is rejected; the page itself is fine."""
    runs = make_runs(3)
    del runs[1]["id"]
    handler = scripted(httpx.Response(200, content=json.dumps(page_body(runs)).encode()))
    page, client = run_client(handler, page1)
    assert len(handler.calls) == 1
    assert len(page.parsed.runs) == 2 and len(page.parsed.rejected) == 1
    assert page.count == 3


# --- what the client layer did that the direct GET keeps ---------------------------------------

def test_credentials_in_the_api_url_are_sent_and_cookies_sent_back():
    """``api.url = https://user:pass@host`` is basic auth, as httpx itself would send it; a
    cookie the API sets (a load balancer's sticky session) comes back on the next request."""
    handler = scripted(ok(**{"set-cookie": "AWSALB=sticky; Path=/"}), ok())

    async def main():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler),
                                     base_url="https://us%40er:pa%3Ass@api.example") as http:
            client = ApiClient(http=http, page_size=10, sleep=Sleeps())
            await client.fetch_page(1)
            await client.fetch_page(2)

    asyncio.run(main())
    first, second = handler.calls
    expected = "Basic " + base64.b64encode(b"us@er:pa:ss").decode()
    assert first.headers["authorization"] == second.headers["authorization"] == expected
    assert "cookie" not in first.headers and second.headers["cookie"] == "AWSALB=sticky"
