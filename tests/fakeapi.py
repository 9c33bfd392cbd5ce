"""An in-test fake of ``GET /v1/runs`` over a Python list, served through ``httpx.MockTransport``.

The list can be changed between requests (``before(n, fn)`` / ``on_every_request(fn)``) to play a
source that grows, shrinks or reorders while it is walked. No network, no threads.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from runs_etl.engine.client import ApiClient

BASE_URL = "https://runs.test"
API_KEY = "sk-test-9f8e7d6c5b4a"
EPOCH = datetime(2024, 1, 1, tzinfo=UTC)


def run_id(i: int) -> str:
    return f"00000000-0000-4000-8000-{i:012d}"


def make_run(i: int, *, status: str = "completed", **fields: Any) -> dict:
    """A realistic run dict; run ``i`` is created ``i`` minutes after EPOCH (higher = newer)."""
    created = EPOCH + timedelta(minutes=i)
    wf = i % 3
    run = {
        "id": run_id(i),
        "group_id": "11111111-1111-4111-8111-111111111111",
        "workflow_id": f"22222222-2222-4222-8222-{wf:012d}",
        "input": {"prompt": f"run {i}", "n": i},
        "node_ids": [f"node-{i}-a", f"node-{i}-b"],
        "status": status,
        "progress": 100 if status == "completed" else 50,
        "definitions": None,
        "created_at": created.isoformat().replace("+00:00", "Z"),
        "finished_at": (created + timedelta(seconds=30)).isoformat()
        if status in ("completed", "failed", "stopped") else None,
        "workflow": {
            "id": f"22222222-2222-4222-8222-{wf:012d}",
            "group_id": "11111111-1111-4111-8111-111111111111",
            "name": f"workflow {wf}",
            "type": "flow",
            "definition": {"nodes": [], "edges": []},
            "last_updated_at": "2023-12-01T00:00:00Z",
            "last_run_at": None,
            "created_at": "2023-11-01T00:00:00Z",
            "deleted_at": None,
            "runs_count": 10,
            "author_name": "ana",
            "description": None,
            "saved": True,
            "error_handler": None,
        },
        "source": "api",
    }
    run.update(fields)
    return run


def make_runs(n: int, start: int = 0) -> list[dict]:
    return [make_run(i) for i in range(start, start + n)]


Hook = Callable[["FakeApi"], None]
Override = Callable[[httpx.Request, int], "httpx.Response | None"]


class FakeApi:
    """The runs API over ``self.runs``.

    order: ``"newest_first"`` (sorted by created_at desc on every request, the likely real order),
    ``"as_is"`` (list order) or ``"shuffle"`` (a new random order on every request).
    """

    def __init__(self, runs: list[dict] | None = None, *, order: str = "newest_first",
                 null_totals: bool = False, api_key: str | None = None,
                 yield_inside: bool = False, seed: int = 0):
        self.runs: list[dict] = list(runs or [])
        self.order = order
        self.null_totals = null_totals
        self.api_key = api_key
        self.yield_inside = yield_inside
        self.rng = random.Random(seed)
        self.requests: list[httpx.Request] = []
        self.pages: list[int] = []  # page numbers of list requests, in arrival order
        self.override: Override | None = None
        self._before: dict[int, list[Hook]] = {}
        self._every: list[Hook] = []
        self.in_flight = 0
        self.max_in_flight = 0

    # --- mutations between requests -----------------------------------------------------------

    def before(self, n: int, fn: Hook) -> None:
        """Run ``fn(api)`` just before serving the n-th request (1-based)."""
        self._before.setdefault(n, []).append(fn)

    def on_every_request(self, fn: Hook) -> None:
        self._every.append(fn)

    def insert(self, *runs: dict) -> None:
        self.runs.extend(runs)

    def delete(self, *ids: str) -> None:
        gone = set(ids)
        self.runs = [r for r in self.runs if r.get("id") not in gone]

    def ordered(self) -> list[dict]:
        if self.order == "newest_first":
            return sorted(self.runs, key=lambda r: (r["created_at"], r["id"]), reverse=True)
        if self.order == "shuffle":
            runs = list(self.runs)
            self.rng.shuffle(runs)
            return runs
        return list(self.runs)

    def ids(self) -> set[str]:
        return {r["id"] for r in self.runs}

    # --- HTTP -------------------------------------------------------------------------------

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.ahandle if self.yield_inside else self.handle)

    def client(self, *, page_size: int = 10, concurrency: int = 4, **kw: Any) -> ApiClient:
        """An ApiClient wired to this fake (call inside the event loop; ``aclose`` it after)."""
        http = httpx.AsyncClient(transport=self.transport(), base_url=BASE_URL,
                                 headers={"X-API-Key": self.api_key or API_KEY})
        kw.setdefault("sleep", _no_sleep)
        kw.setdefault("jitter", lambda: 0.5)
        return ApiClient(http=http, page_size=page_size, concurrency=concurrency, **kw)

    async def ahandle(self, request: httpx.Request) -> httpx.Response:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            for _ in range(3):  # let every other request in flight get this far too
                await asyncio.sleep(0)
            return self.handle(request)
        finally:
            self.in_flight -= 1

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        n = len(self.requests)
        for fn in self._every:
            fn(self)
        for fn in self._before.pop(n, []):
            fn(self)
        headers = {"x-request-id": f"req-{n}"}
        if self.api_key is not None and request.headers.get("x-api-key") != self.api_key:
            return httpx.Response(401, json={"detail": "Not authenticated"}, headers=headers)
        path = request.url.path
        if path.startswith("/v1/runs/"):
            wanted = path.rsplit("/", 1)[1]
            for r in self.runs:
                if r.get("id") == wanted:  # serialized as the pages are (as one API does)
                    return httpx.Response(200, content=json.dumps(r).encode(),
                                          headers={**headers, "content-type": "application/json"})
            return httpx.Response(404, json={"detail": "Run not found"}, headers=headers)
        if path != "/v1/runs":
            return httpx.Response(404, json={"detail": "Not Found"}, headers=headers)
        try:
            page = int(request.url.params.get("page", "1"))
            size = int(request.url.params.get("size", "50"))
        except ValueError:
            return _unprocessable("page", "Input should be a valid integer", headers)
        self.pages.append(page)
        if self.override is not None:
            response = self.override(request, page)
            if response is not None:
                return response
        if page < 1:
            return _unprocessable("page", "Input should be greater than or equal to 1", headers)
        if not 1 <= size <= 100:
            return _unprocessable("size", "Input should be less than or equal to 100", headers)
        return httpx.Response(200, content=json.dumps(self.page_body(page, size)).encode(),
                              headers={**headers, "content-type": "application/json"})

    def page_body(self, page: int, size: int) -> dict:
        runs = self.ordered()
        total = len(runs)
        items = runs[(page - 1) * size: page * size]
        return {"items": items,
                "total": None if self.null_totals else total,
                "page": page, "size": size,
                "pages": None if self.null_totals else math.ceil(total / size)}


def _unprocessable(name: str, msg: str, headers: dict) -> httpx.Response:
    detail = [{"loc": ["query", name], "msg": msg, "type": "value_error"}]
    return httpx.Response(422, json={"detail": detail}, headers=headers)


async def _no_sleep(seconds: float) -> None:
    return None


class Sleeps(list):
    """A fake ``sleep`` that records every wait instead of waiting."""

    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


def fetch_page_1(client: ApiClient):
    """Page 1 through ``client``, which is closed afterwards; errors propagate."""
    async def main():
        try:
            return await client.fetch_page(1)
        finally:
            await client.aclose()

    return asyncio.run(main())
