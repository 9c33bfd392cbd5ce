"""Tests for the built-in API simulator, talking to it over real loopback HTTP."""

from __future__ import annotations

import http.client
import json
import select
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from runs_etl.sim import Faults, Simulator
from runs_etl.sim.server import main

NOW = datetime(2026, 11, 7, 12, 0, tzinfo=UTC)
RUN_KEYS = ["id", "group_id", "workflow_id", "input", "node_ids", "status", "progress",
            "definitions", "created_at", "finished_at", "workflow", "source"]
WF_KEYS = ["id", "group_id", "name", "type", "definition", "last_updated_at", "last_run_at",
           "created_at", "deleted_at", "runs_count", "author_name", "description", "saved",
           "error_handler"]
WF_TS = ("last_updated_at", "last_run_at", "created_at", "deleted_at")


def instant(value: str | None) -> datetime | None:
    """Parse an API timestamp; a naive one means UTC."""
    if value is None:
        return None
    d = datetime.fromisoformat(value)
    return d if d.tzinfo else d.replace(tzinfo=UTC)


def canonical(rec: dict) -> dict:
    """A record with every timestamp parsed, so wire and snapshot forms compare equal."""
    out = {**rec, **{k: instant(rec[k]) for k in ("created_at", "finished_at")}}
    if rec["workflow"] is not None:
        out["workflow"] = {**rec["workflow"], **{k: instant(rec["workflow"][k]) for k in WF_TS}}
    return out


def walk(client: httpx.Client, size: int = 100) -> list[dict]:
    """Fetch pages until an empty one, returning all items in the order served."""
    items: list[dict] = []
    page = 1
    while True:
        r = client.get("/v1/runs", params={"page": page, "size": size})
        assert r.status_code == 200, r.text
        got = r.json()["items"]
        if not got:
            return items
        items += got
        page += 1


def newest_key(rec: dict) -> tuple:
    return instant(rec["created_at"]), rec["id"]


@pytest.fixture
def sim():
    with Simulator(237, seed=1, now=NOW) as s:
        yield s


@pytest.fixture
def client(sim):
    with httpx.Client(base_url=sim.base_url, headers={"X-API-Key": sim.api_key}, timeout=10) as c:
        yield c


@pytest.fixture(scope="module")
def big():
    """A larger, read-only simulator for realism checks."""
    return Simulator(3000, seed=7, now=NOW)


# ---- envelope, paging, validation -----------------------------------------------------------

def test_envelope_and_totals(client):
    body = client.get("/v1/runs", params={"page": 2, "size": 50}).json()
    assert list(body) == ["items", "total", "page", "size", "pages"]
    assert (body["total"], body["page"], body["size"], body["pages"]) == (237, 2, 50, 5)
    assert len(body["items"]) == 50
    assert len(client.get("/v1/runs", params={"page": 5, "size": 50}).json()["items"]) == 37
    assert client.get("/v1/runs", params={"size": 100}).json()["pages"] == 3


def test_defaults_are_page_1_size_50(client):
    body = client.get("/v1/runs").json()
    assert (body["page"], body["size"], len(body["items"])) == (1, 50, 50)


def test_page_past_end_is_empty_200(client):
    r = client.get("/v1/runs", params={"page": 6, "size": 50})
    assert r.status_code == 200
    assert r.json() == {"items": [], "total": 237, "page": 6, "size": 50, "pages": 5}


def test_empty_workspace_has_zero_pages():
    with Simulator(0, now=NOW) as s:
        body = httpx.get(f"{s.base_url}/v1/runs", headers={"X-API-Key": s.api_key}).json()
    assert body == {"items": [], "total": 0, "page": 1, "size": 50, "pages": 0}


@pytest.mark.parametrize("query, name, kind", [
    ("page=0", "page", "greater_than_equal"), ("page=-3", "page", "greater_than_equal"),
    ("size=0", "size", "greater_than_equal"), ("size=101", "size", "less_than_equal"),
    ("page=abc", "page", "int_parsing"), ("size=1.5", "size", "int_parsing"),
    ("page=", "page", "int_parsing"),
])
def test_out_of_range_params_get_fastapi_422(client, query, name, kind):
    r = client.get(f"/v1/runs?{query}")
    assert r.status_code == 422
    [err] = r.json()["detail"]
    assert err["loc"] == ["query", name] and err["type"] == kind and err["msg"]


def test_422_lists_every_bad_param(client):
    detail = client.get("/v1/runs?page=0&size=500").json()["detail"]
    assert [e["loc"] for e in detail] == [["query", "page"], ["query", "size"]]


def test_unknown_params_are_ignored(client):
    plain = client.get("/v1/runs", params={"size": 20}).json()
    filtered = client.get("/v1/runs", params={"size": 20, "updated_since": "2030-01-01",
                                              "sort": "asc", "status": "running"}).json()
    assert filtered == plain


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong"}])
def test_bad_or_missing_key_is_401(sim, headers):
    for path in ("/v1/runs", f"/v1/runs/{next(iter(sim.run_ids()))}"):
        r = httpx.get(sim.base_url + path, headers=headers)
        assert r.status_code == 401 and isinstance(r.json()["detail"], str)


def test_auth_status_403_option():
    with Simulator(5, now=NOW, auth_status=403, api_key="k") as s:
        assert httpx.get(f"{s.base_url}/v1/runs", headers={"X-API-Key": "x"}).status_code == 403
        assert httpx.get(f"{s.base_url}/v1/runs", headers={"X-API-Key": "k"}).status_code == 200


def test_headers_request_id_and_json(client):
    responses = [client.get("/v1/runs", params={"size": 1}) for _ in range(3)]
    responses.append(client.get("/v1/runs", params={"size": 0}))
    responses.append(client.get("/v1/runs/nope"))
    ids = [r.headers["x-request-id"] for r in responses]
    assert len(set(ids)) == len(ids)
    assert all(r.headers["content-type"] == "application/json" for r in responses)


def test_keep_alive_reuses_one_connection(sim):
    conn = http.client.HTTPConnection("127.0.0.1", int(sim.base_url.rsplit(":", 1)[1]), timeout=5)
    socks = []
    for _ in range(3):
        conn.request("GET", "/v1/runs?size=3", headers={"X-API-Key": sim.api_key})
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["size"] == 3
        socks.append(conn.sock)
    conn.close()
    assert socks[0] is not None and socks.count(socks[0]) == 3


def test_unknown_path_is_404(client):
    assert client.get("/v1/nothing").status_code == 404


# ---- content -----------------------------------------------------------------------------

def test_walk_returns_each_run_once_and_equals_snapshot(sim, client):
    items = walk(client, size=100)
    snap = sim.snapshot()
    assert [r["id"] for r in items] == list(snap)  # each exactly once, in serving order
    assert sim.run_ids() == set(snap)
    for item in items:
        assert list(item)[: len(RUN_KEYS)] == RUN_KEYS
        assert canonical(item) == canonical(snap[item["id"]])


def test_newest_first_order(client):
    keys = [newest_key(r) for r in walk(client, size=37)]
    assert keys == sorted(keys, reverse=True)


def test_random_order_is_unsorted_but_stable():
    with Simulator(300, seed=2, now=NOW, order="random") as s, \
            httpx.Client(base_url=s.base_url, headers={"X-API-Key": s.api_key}) as c:
        first = walk(c)
        keys = [newest_key(r) for r in first]
        assert keys != sorted(keys, reverse=True) and keys != sorted(keys)
        assert [r["id"] for r in walk(c)] == [r["id"] for r in first]
        new = s.add_runs(5)
        ids = [r["id"] for r in walk(c)]
        assert len(ids) == len(set(ids)) == 305 and set(new) <= set(ids)
        assert ids[:5] != new  # inserted at random places, not on top


def test_null_totals():
    with Simulator(30, now=NOW, null_totals=True) as s:
        body = httpx.get(f"{s.base_url}/v1/runs?size=10", headers={"X-API-Key": s.api_key}).json()
    assert body["total"] is None and body["pages"] is None and len(body["items"]) == 10


def test_single_run_and_404(sim, client):
    snap = sim.snapshot()
    run_id = list(snap)[10]
    r = client.get(f"/v1/runs/{run_id}")
    assert r.status_code == 200 and canonical(r.json()) == canonical(snap[run_id])
    missing = client.get("/v1/runs/3c90c3cc-0d44-4b50-8888-8dd25736052a")
    assert missing.status_code == 404 and missing.json() == {"detail": "Run not found"}
    assert sim.single_request_count == 2


def test_timestamps_vary_on_the_wire_but_keep_the_instant(big):
    with big, httpx.Client(base_url=big.base_url, headers={"X-API-Key": big.api_key}) as c:
        items = walk(c)
    snap = big.snapshot()
    styles = Counter()
    for item in items:
        for value, expected in ((item["created_at"], snap[item["id"]]["created_at"]),
                                (item["finished_at"], snap[item["id"]]["finished_at"])):
            assert instant(value) == instant(expected)
            if value is not None:
                frac = "." in value
                tail = value[19:].split(".")[-1].lstrip("0123456789")
                styles[(tail or "naive", frac)] += 1
    wanted = {("Z", True), ("+00:00", True), ("+02:00", True), ("naive", True), ("Z", False)}
    assert wanted <= set(styles)
    canon = [v for r in snap.values() for v in (r["created_at"], r["finished_at"]) if v]
    assert all(v.endswith("Z") for v in canon)


def test_records_are_realistic(big):
    runs = list(big.snapshot().values())
    statuses = Counter(r["status"] for r in runs)
    assert {"completed", "failed", "stopped", "running", "queued"} <= set(statuses)
    assert statuses["completed"] > len(runs) / 2
    age = {r["id"]: NOW - instant(r["created_at"]) for r in runs}
    assert any(r["status"] == "running" and age[r["id"]] > timedelta(days=2) for r in runs)  # stuck
    recent = [r for r in runs if age[r["id"]] < timedelta(hours=1)]
    assert any(r["status"] in ("queued", "running", "awaiting_human_feedback") for r in recent)
    for r in runs:
        open_ = r["status"] not in ("completed", "failed", "stopped")
        assert (r["finished_at"] is None) == open_
        assert r["progress"] is None or 0 <= r["progress"] <= 100
        if r["finished_at"]:
            assert instant(r["finished_at"]) >= instant(r["created_at"])
        assert instant(r["created_at"]) <= NOW
    wfs = {r["workflow"]["id"]: r["workflow"] for r in runs if r["workflow"]}
    assert 10 <= len(wfs) <= 14
    assert {w["type"] for w in wfs.values()} == {"flow", "handler", "ingestion"}
    assert all(list(w) == WF_KEYS for w in wfs.values())
    assert sum(w["deleted_at"] is not None for w in wfs.values()) == 1
    assert max(len(json.dumps(w["definition"])) for w in wfs.values()) > 2000
    per_wf = Counter(r["workflow_id"] for r in runs)
    assert all(w["runs_count"] == per_wf[w["id"]] for w in wfs.values())
    assert any(r["workflow"] is None for r in runs)
    assert any(r["input"] is None for r in runs) and any(r["node_ids"] is None for r in runs)
    assert any(isinstance(r["node_ids"], dict) for r in runs)
    assert any(set(r) - set(RUN_KEYS) for r in runs)  # unknown extra fields
    text = json.dumps(runs, ensure_ascii=False)
    assert "☕" in text and "数据" in text


def test_same_seed_same_data():
    a, b = Simulator(200, seed=5, now=NOW), Simulator(200, seed=5, now=NOW)
    assert a.snapshot() == b.snapshot()
    assert Simulator(200, seed=6, now=NOW).snapshot() != a.snapshot()


# ---- faults ------------------------------------------------------------------------------

def test_429_with_and_without_retry_after(sim, client):
    sim.faults.rate_429 = 1.0
    sim.faults.retry_after = "7"
    r = client.get("/v1/runs")
    assert r.status_code == 429 and r.headers["retry-after"] == "7" and "x-request-id" in r.headers
    sim.faults.retry_after = "Wed, 21 Oct 2026 07:28:00 GMT"
    assert client.get("/v1/runs").headers["retry-after"] == "Wed, 21 Oct 2026 07:28:00 GMT"
    sim.faults.retry_after = None
    assert "retry-after" not in client.get("/v1/runs").headers


def test_5xx_fault(sim, client):
    sim.faults.rate_500 = 1.0
    codes = {client.get("/v1/runs").status_code for _ in range(30)}
    assert codes == {500, 502, 503}


def test_truncated_body_fault(sim, client):
    sim.faults.rate_truncated = 1.0
    r = client.get("/v1/runs")
    assert r.status_code == 200 and len(r.content) == int(r.headers["content-length"]) > 0
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.content)


def test_bad_envelope_fault(sim, client):
    sim.faults.rate_bad_envelope = 1.0
    r = client.get("/v1/runs")
    assert r.status_code == 200 and "items" not in r.json()


def test_bad_record_fault_spoils_one_record_of_an_otherwise_valid_page(sim, client):
    snap = sim.snapshot()
    order = list(snap)
    sim.faults.rate_bad_record = 1.0
    kinds = Counter()
    for n in range(20):
        page = n % 5 + 1
        r = client.get("/v1/runs", params={"page": page, "size": 50})
        body = r.json()
        assert r.status_code == 200
        assert (body["total"], body["page"], body["size"], body["pages"]) == (237, page, 50, 5)
        served = order[(page - 1) * 50: page * 50]
        assert len(body["items"]) == len(served)
        spoiled = [(item, run_id) for item, run_id in zip(body["items"], served)
                   if item.get("id") != run_id or item["created_at"] == "not a date"]
        [(item, run_id)] = spoiled  # exactly one; every other record is served intact
        assert all(canonical(i) == canonical(snap[i["id"]]) for i in body["items"] if i != item)
        if "id" not in item:
            kinds["no id"] += 1
            repaired = item | {"id": run_id}
        else:
            assert item["id"] == run_id and item["created_at"] == "not a date"
            kinds["bad created_at"] += 1
            repaired = item | {"created_at": snap[run_id]["created_at"]}
        assert canonical(repaired) == canonical(snap[run_id])  # only that field is broken
    assert set(kinds) == {"no id", "bad created_at"}
    empty = client.get("/v1/runs", params={"page": 6, "size": 50}).json()
    assert empty["items"] == [] and empty["total"] == 237
    sim.faults.only_list = False  # a single run is never spoiled: the knob is per list page
    assert canonical(client.get(f"/v1/runs/{order[0]}").json()) == canonical(snap[order[0]])
    sim.faults.rate_bad_record = 0.0  # the stored runs were never changed
    assert sim.snapshot() == snap
    assert [canonical(i) for i in walk(client)] == [canonical(snap[i]) for i in order]


def test_faults_spare_single_run_unless_asked(sim, client):
    run_id = next(iter(sim.run_ids()))
    sim.faults = Faults(rate_429=1.0)
    assert client.get(f"/v1/runs/{run_id}").status_code == 200
    sim.faults.only_list = False
    assert client.get(f"/v1/runs/{run_id}").status_code == 429


def test_latency_fault(sim, client):
    sim.faults.latency = 0.2
    t = time.perf_counter()
    assert client.get("/v1/runs", params={"size": 1}).status_code == 200
    assert time.perf_counter() - t >= 0.2


# ---- mutations ---------------------------------------------------------------------------

def test_add_runs_are_newest_and_counted(sim, client):
    new = sim.add_runs(3)
    body = client.get("/v1/runs", params={"size": 10}).json()
    assert body["total"] == 240
    assert [r["id"] for r in body["items"][:3]] == new[::-1]
    assert all(r["status"] == "queued" and r["finished_at"] is None for r in body["items"][:3])
    assert set(new) <= sim.open_ids()
    per_wf = Counter(r["workflow_id"] for r in sim.snapshot().values())
    embedded = [r for r in walk(client) if r["workflow"]]
    assert all(r["workflow"]["runs_count"] == per_wf[r["workflow_id"]] for r in embedded)


def test_transition_moves_runs_to_terminal(sim, client):
    new = sim.add_runs(4)
    assert sorted(sim.transition(ids=new)) == sorted(new)
    assert {client.get(f"/v1/runs/{i}").json()["status"] for i in new} == {"running"}
    sim.transition(ids=new)
    for i in new:
        run = client.get(f"/v1/runs/{i}").json()
        assert run["status"] in ("completed", "failed")
        assert instant(run["finished_at"]) >= instant(run["created_at"])
    assert not set(new) & sim.open_ids()
    assert sim.transition(ids=new) == []  # terminal runs stay put
    n_open = len(sim.open_ids())
    assert len(sim.transition(k=2)) == min(2, n_open)
    sim.transition()
    sim.transition()  # every open run was at most two steps from the end
    assert sim.open_ids() == set()


def test_delete_by_id_and_position(sim, client):
    order = list(sim.snapshot())
    victim = order[5]
    assert sim.delete(ids=[victim, "no-such-id"]) == [victim]
    assert client.get(f"/v1/runs/{victim}").status_code == 404
    assert client.get("/v1/runs").json()["total"] == 236
    assert sim.delete(2, where="newest") == order[:2]
    assert sorted(sim.delete(2, where="oldest")) == sorted(order[-2:])
    assert len(sim.delete(20)) == 20
    ids = [r["id"] for r in walk(client)]
    assert ids == list(sim.snapshot()) and len(ids) == 237 - 25
    with pytest.raises(ValueError):
        sim.delete(1, where="middle")


def test_touch_terminal_changes_a_finished_run(sim, client):
    snap = sim.snapshot()
    run_id = next(i for i, r in snap.items() if r["finished_at"])
    sim.touch_terminal([run_id])
    after = client.get(f"/v1/runs/{run_id}").json()
    assert after["source"] != snap[run_id]["source"]
    assert canonical(after) == canonical(sim.snapshot()[run_id])


def test_hook_sees_every_list_request(sim, client):
    calls = []
    sim.on_list_request(lambda s, page, size, n: calls.append((page, size, n)))
    client.get("/v1/runs", params={"page": 2, "size": 7})
    client.get("/v1/runs", params={"size": 0})  # 422: not served, no hook
    client.get("/v1/runs")
    client.get(f"/v1/runs/{next(iter(sim.run_ids()))}")
    assert calls == [(2, 7, 1), (1, 50, 3)]
    sim.on_list_request(None)
    client.get("/v1/runs")
    assert len(calls) == 2 and sim.list_request_count == 4 and sim.request_count == 5


def test_insert_mid_walk_repeats_a_run(sim, client):
    before = list(sim.snapshot())
    sim.on_list_request(lambda s, page, size, n: s.add_runs(1) if n == 2 else None)
    ids = [r["id"] for r in walk(client, size=50)]
    assert len(ids) == 238 and set(ids) == set(before)  # the new run is not seen ...
    assert [i for i, c in Counter(ids).items() if c > 1] == [before[49]]  # ... and one repeats


def test_delete_mid_walk_skips_a_run(sim, client):
    before = list(sim.snapshot())
    sim.on_list_request(lambda s, page, size, n: s.delete(1, where="newest") if n == 2 else None)
    ids = [r["id"] for r in walk(client, size=50)]
    assert set(before) - set(ids) == {before[50]}  # shifted up past the page boundary


def test_a_blocking_hook_holds_only_its_own_request(sim, client):
    entered, release, result = threading.Event(), threading.Event(), []

    def hold_first(s, page, size, n):
        if n == 1:
            entered.set()
            release.wait(10)

    sim.on_list_request(hold_first)
    held = threading.Thread(target=lambda: result.append(client.get("/v1/runs").status_code))
    held.start()
    assert entered.wait(5)
    with httpx.Client(base_url=sim.base_url, headers={"X-API-Key": sim.api_key}) as other:
        assert other.get("/v1/runs", params={"size": 5}).status_code == 200
    assert sim.add_runs(1) and len(sim.snapshot()) == 238  # state stays usable meanwhile
    release.set()
    held.join(5)
    assert result == [200]


def test_concurrent_walks_during_mutations(sim):
    errors = []

    def walker():
        try:
            with httpx.Client(base_url=sim.base_url, headers={"X-API-Key": sim.api_key}) as c:
                for _ in range(3):
                    walk(c, size=25)
        except (AssertionError, httpx.HTTPError) as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=walker) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in range(30):
        sim.add_runs(2)
        sim.transition(k=3)
        sim.delete(1)
    for t in threads:
        t.join()
    assert not errors
    assert len(sim.run_ids()) == 237 + 30
    assert sim.bytes_sent > 0 and sim.list_request_count >= 4 * 3 * 10


def test_stop_closes_kept_alive_connections():
    s = Simulator(10, now=NOW)
    with httpx.Client(base_url=s.start(), headers={"X-API-Key": s.api_key}) as c:
        assert c.get("/v1/runs").status_code == 200
        s.stop()
        with pytest.raises(httpx.TransportError):
            c.get("/v1/runs")


# ---- command line ------------------------------------------------------------------------

def test_module_cli_prints_url_and_serves_until_sigterm():
    proc = subprocess.Popen(
        [sys.executable, "-m", "runs_etl.sim", "--runs", "40", "--port", "0", "--seed", "3",
         "--api-key", "cli-key"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        assert ready, "simulator did not print its URL"
        line = proc.stdout.readline()
        assert line.startswith("SIM_URL=http://127.0.0.1:")
        url = line.strip().split("=", 1)[1]
        body = httpx.get(f"{url}/v1/runs", headers={"X-API-Key": "cli-key"}).json()
        assert body["total"] == 40
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert proc.stdout.read() == "" and proc.stderr.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_module_cli_help_documents_the_fault_knobs(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--latency", "--rate-429", "--rate-500", "--rate-bad-record"):
        assert flag in out
