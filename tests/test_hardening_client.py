"""Hardening of the client side (issue 9): a hostile or broken server gets one clear error, never
a hang, a leaked key or a forged line. Real loopback servers from ``faultserver`` where the wire
matters; ``httpx.MockTransport`` where it does not."""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import ssl

import duckdb
import httpx
import pytest
from fakeapi import API_KEY, Sleeps, fetch_page_1
from faultserver import (
    HOSTILE,
    FaultServer,
    Reply,
    bad_gzip,
    json_reply,
    page,
    redirect,
    self_signed,
)

from runs_etl.config import load_settings, redact_url
from runs_etl.engine import client as client_module
from runs_etl.engine.client import MAX_REDIRECTS, ApiClient, FetchedPage, tls_verification
from runs_etl.engine.models import ParsedPage
from runs_etl.engine.staging import StagingSink
from runs_etl.engine.sync import sync
from runs_etl.errors import (
    EXIT_FAILURE,
    ConfigError,
    DeadlineError,
    FatalApiError,
    RetryableApiError,
    one_line,
)
from runs_etl.warehouse.connect import connect, duckdb_threads

GUARD = 60  # seconds: a hang fails the test instead of stalling the suite


def settings_at(url: str, tmp_path, **api):
    return load_settings(None, {"RUNS_ETL_API_URL": url, "RUNS_ETL_API_KEY": API_KEY,
                                "RUNS_ETL_DUCKDB_PATH": str(tmp_path / "runs.duckdb")},
                         {"api": {"max_attempts": 2, **api}}, cwd=tmp_path)


def fetch(settings, action=lambda c: c.fetch_page(1)):
    """Run ``action`` on a client built like a sync builds it (no real sleeping); the client is
    attached to any error raised, for its stats."""

    async def main():
        client = ApiClient.from_settings(settings)
        client.sleep = Sleeps()
        try:
            return await asyncio.wait_for(action(client), GUARD), client
        except Exception as e:
            e.client = client  # type: ignore[attr-defined]
            raise
        finally:
            await client.aclose()

    return asyncio.run(main())


# --- 1. redirects: the key never leaves the API's origin ----------------------------------------

@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_to_another_origin_is_refused_and_the_key_never_reaches_it(tmp_path, status):
    with FaultServer(lambda r: page()) as other, \
            FaultServer(lambda r: redirect(
                other.url.replace("//", "//user:hunter2@") + "/v1/runs", status)) as api:
        with pytest.raises(FatalApiError) as info:
            fetch(settings_at(api.url, tmp_path))
    assert other.requests == []  # not followed at all: the key went nowhere else
    assert len(api.requests) == 1  # and not retried: the answer would be the same
    msg = str(info.value)
    assert f"127.0.0.1:{other.port}" in msg and "another origin" in msg
    assert "hunter2" not in msg and API_KEY not in msg


def test_a_redirect_within_the_origin_is_followed_with_the_key(tmp_path):
    def respond(r):
        return page(4) if r.path.startswith("/moved/") else redirect("/moved/v1/runs?page=1")

    with FaultServer(respond) as api:
        fetched, _ = fetch(settings_at(api.url, tmp_path))
    assert len(fetched.parsed.runs) == 4
    assert [r.path.split("?")[0] for r in api.requests] == ["/v1/runs", "/moved/v1/runs"]
    assert all(r.headers["x-api-key"] == API_KEY for r in api.requests)


def test_a_redirect_loop_is_one_clear_fatal_error(tmp_path):
    with FaultServer(lambda r: redirect("/v1/runs?page=1&size=100")) as api:
        with pytest.raises(FatalApiError, match="redirected more than"):
            fetch(settings_at(api.url, tmp_path, max_attempts=3))
    assert len(api.requests) == MAX_REDIRECTS + 1  # one attempt: a loop is not retried


# --- 3. credentials in the URL ------------------------------------------------------------------

def test_redact_url_drops_userinfo_only():
    assert redact_url("https://user:p%40ss@gw.example.com:8443/noxus/") == \
        "https://***@gw.example.com:8443/noxus/"
    assert redact_url("https://backend.noxus.ai/v1") == "https://backend.noxus.ai/v1"


def test_credentials_in_the_api_url_reach_no_error_and_no_ledger_row(tmp_path):
    with FaultServer(lambda r: json_reply({"detail": "nope"}, 400)) as api:
        url = api.url.replace("//", "//ana:s3cr3t-pw@")
        settings = settings_at(url, tmp_path)
        con = duckdb.connect(str(tmp_path / "runs.duckdb"))
        with pytest.raises(FatalApiError) as info:
            sync(settings, con)
    err = info.value
    assert "s3cr3t-pw" not in str(err) and "s3cr3t-pw" not in (err.url or "")
    assert "***@127.0.0.1" in str(err)
    rows = con.execute("SELECT api_url, error FROM sync_runs").fetchall()
    assert rows and all("s3cr3t-pw" not in (u or "") + (e or "") for u, e in rows)


# --- 4. server text: one line, no control characters ---------------------------------------------

def test_one_line_escapes_controls_and_caps_length():
    out = one_line(HOSTILE)
    assert "\n" not in out and "\r" not in out and "\x1b" not in out and "\u202e" not in out
    assert "\\x1b[2J" in out  # visible, harmless
    assert len(one_line("x" * 500, 50)) == 50


def test_a_hostile_detail_gives_exactly_one_error_line(tmp_path, run_cli):
    with FaultServer(lambda r: json_reply({"detail": HOSTILE}, 400)) as api:
        code, out, err = run_cli(None, "sync", "-q", RUNS_ETL_API_URL=api.url,
                                 RUNS_ETL_API_KEY=API_KEY)
    assert code == EXIT_FAILURE
    error_lines = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1, err
    assert "everything is fine" in error_lines[0]  # quoted inside the one line, not a line
    assert "\x1b" not in err + out and "\u202e" not in err + out
    assert "Traceback" not in err
    con = duckdb.connect(str(tmp_path / "runs.duckdb"), read_only=True)
    (stored,) = con.execute("SELECT error FROM sync_runs").fetchall()[0]
    assert "\n" not in stored and "\x1b" not in stored


def test_a_long_detail_is_cut(tmp_path):
    with FaultServer(lambda r: json_reply({"detail": "y" * 100_000}, 400)) as api:
        with pytest.raises(FatalApiError) as info:
            fetch(settings_at(api.url, tmp_path))
    assert len(str(info.value)) < 500


# --- 5. memory_limit never reaches SQL unvalidated ----------------------------------------------

def test_connect_refuses_a_memory_limit_that_is_not_a_size(tmp_path):
    db = tmp_path / "w.duckdb"
    with pytest.raises(ConfigError, match="memory_limit"):
        connect(db, memory_limit="256MB'; CREATE TABLE pwned (x INT); --")
    con = duckdb.connect(str(db))
    assert con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'pwned'"
                       ).fetchall() == [(0,)]


@pytest.mark.parametrize(("limit", "cpus", "threads"), [
    ("128MB", 8, 2), ("256MB", 32, 4), ("256MB", 2, 2), ("100MB", 8, 1), ("1.5GiB", 8, 8),
    ("0.5 GB", 64, 7), ("512KB", 4, 1)])
def test_duckdb_gets_a_thread_per_64mb_of_memory_limit_and_no_more_than_the_cpus(limit, cpus,
                                                                                  threads):
    """DuckDB's default (a thread per CPU) ran the 1M-run export out of 128MB with 4 or 8
    threads: on a bigger machine the default memory_limit would fail where it passes here."""
    assert duckdb_threads(limit, cpus) == threads


def test_a_warehouse_connection_is_sized_by_its_memory_limit(tmp_path):
    con = connect(tmp_path / "w.duckdb", memory_limit="64MB")
    assert con.execute("SELECT current_setting('threads')").fetchall() == [(1,)]
    con.close()


# --- 6. TLS settings ------------------------------------------------------------------------------

def test_an_unreadable_ca_bundle_is_a_config_error(tmp_path):
    settings = settings_at("https://api.example.com", tmp_path,
                           ca_bundle=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="api.ca_bundle"):
        ApiClient.from_settings(settings)


def test_a_plain_http_api_skips_the_ca_bundle_but_never_verifies_nothing(tmp_path,
                                                                        monkeypatch):
    proxies: dict[str, str] = {}  # what the environment (or the OS) says about proxies
    monkeypatch.setattr(client_module, "getproxies", lambda: proxies)
    ctx = tls_verification(settings_at("http://127.0.0.1:9", tmp_path).api)
    # No TLS is opened for it; were one ever, the handshake fails: hostnames checked, no CA.
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.cert_store_stats()["x509_ca"] == 0
    # An https API, or any API behind a proxy (which may itself be https), verifies as before.
    assert tls_verification(settings_at("https://api.example.com", tmp_path).api) is True
    proxies["http"] = "https://proxy.example.com:3128"
    assert tls_verification(settings_at("http://127.0.0.1:9", tmp_path).api) is True


def test_a_certificate_that_does_not_verify_fails_at_once_naming_the_fix(tmp_path):
    cert, tls = self_signed(tmp_path)
    with FaultServer(lambda r: page(3), tls=tls) as api:
        with pytest.raises(FatalApiError, match=r"cannot verify the TLS certificate of https://"
                                                r".*not retried.*api\.ca_bundle"):
            fetch(settings_at(api.url, tmp_path))
        assert api.connections == 1  # one handshake: a certificate does not fix itself
        assert api.requests == []  # the key never left over an unverified connection
        # The same server, its certificate trusted through api.ca_bundle: verified and read.
        parsed, _ = fetch(settings_at(api.url, tmp_path, ca_bundle=str(cert)))
        assert len(parsed.parsed.runs) == 3
        assert len(api.requests) == 1


# --- 7. a total deadline per request ------------------------------------------------------------

def test_a_trickling_server_is_cut_off_by_the_request_deadline_and_retried(tmp_path):
    body = page(30).body
    with FaultServer(lambda r: Reply(200, body, {"Content-Type": "application/json"},
                                     byte_delay=0.05)) as api:
        # Each byte arrives well within the read timeout; the whole body never within the
        # deadline.
        with pytest.raises(RetryableApiError, match="no complete response") as info:
            fetch(settings_at(api.url, tmp_path, timeout=5, request_deadline=0.5))
    assert len(api.requests) == 2  # retried like a timeout, then given up
    assert info.value.attempts == 2


def test_the_default_deadline_is_twice_the_timeout(tmp_path):
    client = ApiClient.from_settings(settings_at("https://api.example.com", tmp_path, timeout=7))
    assert client.deadline == 14
    asyncio.run(client.aclose())


# --- 9. a response size cap -----------------------------------------------------------------------

@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "no-length"])
def test_a_body_beyond_max_response_bytes_is_a_fatal_error(tmp_path, chunked):
    huge = b"[" + b"0," * 400_000 + b"0]"
    with FaultServer(lambda r: Reply(200, huge, chunked=chunked)) as api:
        with pytest.raises(FatalApiError, match="max_response_bytes") as info:
            fetch(settings_at(api.url, tmp_path, max_response_bytes=100_000))
    assert len(api.requests) == 1  # retrying would fetch the same body
    assert info.value.client.stats.bytes == 0  # nothing of it kept


# --- 16. undecodable bodies are retried; one clear error at the end ------------------------------

def test_a_bad_gzip_body_is_retried_then_the_good_page_is_taken(tmp_path):
    replies = [bad_gzip(), page(5)]
    with FaultServer(lambda r: replies.pop(0) if len(replies) > 1 else replies[0]) as api:
        fetched, client = fetch(settings_at(api.url, tmp_path))
    assert len(fetched.parsed.runs) == 5 and client.stats.retries == 1
    assert len(api.requests) == 2


def test_a_body_that_is_never_decodable_ends_in_a_retryable_error(tmp_path):
    with FaultServer(lambda r: bad_gzip()) as api:
        with pytest.raises(RetryableApiError, match="undecodable body") as info:
            fetch(settings_at(api.url, tmp_path, max_attempts=3))
    assert info.value.attempts == 3 and len(api.requests) == 3


# --- 10. Retry-After waits are logged -------------------------------------------------------------

@pytest.mark.parametrize(("retry_after", "logged"), [("120", True), ("2", False)])
def test_long_retry_after_waits_are_logged(tmp_path, caplog, retry_after, logged):
    replies = [json_reply({}, 429, **{"Retry-After": retry_after}), page()]
    with FaultServer(lambda r: replies.pop(0) if len(replies) > 1 else replies[0]) as api:
        with caplog.at_level(logging.INFO, logger="runs_etl"):
            _, client = fetch(settings_at(api.url, tmp_path))
    assert client.sleep == [float(retry_after)]
    waits = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
    if logged:
        assert len(waits) == 1 and "120s" in waits[0] and "Retry-After" in waits[0]
    else:
        assert waits == []


# --- 10. sync.max_duration ------------------------------------------------------------------------

def test_a_sync_past_max_duration_stops_commits_nothing_and_records_failed(tmp_path):
    async def stall(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(3600)  # within every per-request limit (api.timeout is 30 s)
        raise AssertionError("unreachable")

    settings = load_settings(None, {"RUNS_ETL_API_URL": "https://api.example.com",
                                    "RUNS_ETL_API_KEY": API_KEY},
                             {"sync": {"max_duration": 0.5}}, cwd=tmp_path)
    con = duckdb.connect(str(tmp_path / "runs.duckdb"))

    async def guarded():  # the guard: a sync that ignored its deadline fails here
        return await asyncio.wait_for(asyncio.to_thread(
            sync, settings, con, transport=httpx.MockTransport(stall)), GUARD)

    with pytest.raises(DeadlineError, match="sync.max_duration") as info:
        asyncio.run(guarded())
    assert info.value.exit_code == EXIT_FAILURE
    assert con.execute("SELECT outcome FROM sync_runs").fetchall() == [("failed",)]
    assert con.execute("SELECT count(*) FROM runs").fetchall() == [(0,)]


# --- 8. staging failure while workers wait on a full queue ---------------------------------------

class DiskFullStage:
    def add(self, batch, rejected=None) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_staging_failure_reaches_workers_blocked_on_the_full_queue():
    empty = ParsedPage(runs=[], rejected=[], total=0, pages=0)

    async def main():
        sink = StagingSink(DiskFullStage(), batch_pages=2)  # type: ignore[arg-type]
        workers = [asyncio.ensure_future(sink.put(FetchedPage(n, n, empty, None, 0)))
                   for n in range(12)]
        try:
            done = await asyncio.wait_for(
                asyncio.gather(*workers, return_exceptions=True), GUARD)
        finally:
            await sink.aclose()
        return done

    results = asyncio.run(main())
    failures = [r for r in results if isinstance(r, OSError)]
    assert failures and all(r.errno == errno.ENOSPC for r in failures)


# --- 27. an API URL with a path -------------------------------------------------------------------

def test_an_api_url_with_a_path_keeps_one_slash(tmp_path):
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(400, json={"detail": "stop here"})

    settings = settings_at("https://gw.example.com/noxus/", tmp_path)

    client = ApiClient.from_settings(settings, transport=httpx.MockTransport(handler))

    with pytest.raises(FatalApiError) as info:
        fetch_page_1(client)
    assert seen == ["/noxus/v1/runs"]
    assert "https://gw.example.com/noxus/v1/runs answered 400" in str(info.value)
    assert not re.search(r"[^:]//", str(info.value))
