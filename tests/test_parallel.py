"""Validation workers (``engine.parallel``): a long walk validates and stages its pages in worker
processes, and the warehouse is the same mirror as when the sync's own process does it all;
a worker's failure is one clear error and nothing committed."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fakeapi import make_run
from helpers import Gate, assert_mirror, cli_process, dump_tables, error_line, settings_for

from runs_etl.engine import parallel
from runs_etl.engine.models import EnvelopeError, PageDigest, parse_page
from runs_etl.engine.normalize import STAGED_SCHEMAS, staged_tables
from runs_etl.engine.parallel import START_AT_PAGE, ValidationPool
from runs_etl.engine.staging import Stage, StagingSink
from runs_etl.errors import WarehouseError, WorkerError
from runs_etl.jobs import run_syncs


def body_of(runs: list[dict], *, total: int = 1000) -> bytes:
    return json.dumps({"items": runs, "total": total, "page": 1, "size": 100,
                       "pages": -(-total // 100)}).encode()


def a_page(first: int, *, bad: bool = False) -> bytes:
    runs = [make_run(first + i) for i in range(5)]
    if bad:
        del runs[2]["created_at"]  # one record to reject, with its raw JSON
    return body_of(runs)


async def validated(pool: ValidationPool, folder: Path, seq: int, body: bytes,
                    number: int = START_AT_PAGE) -> PageDigest:
    """``pool.parse`` once a worker is ready (None until then: the caller validates)."""
    pool.start()
    deadline = time.monotonic() + 60
    while (digest := await pool.parse(folder, seq, number, body)) is None:
        assert time.monotonic() < deadline, "no validation worker became ready"
        await asyncio.sleep(0.02)
    return digest


def staged(folder: Path, kind: str) -> list[dict]:
    files = sorted(folder.glob(f"{kind}-*.parquet"))
    if not files:
        return []
    table = pa.concat_tables(pq.read_table(f) for f in files)
    return sorted(table.to_pylist(), key=lambda r: (r["_seq"], str(r.get("id") or r["run_id"])))


def test_a_worker_stages_exactly_what_the_sync_would_stage_itself(tmp_path):
    pages = [a_page(1), a_page(100, bad=True), a_page(200)]

    async def main():
        pool = ValidationPool(2, batch_pages=2)
        try:
            digests = [await validated(pool, tmp_path, seq, body)
                       for seq, body in enumerate(pages, 10)]
            await pool.flush(tmp_path)
            return digests
        finally:
            await pool.aclose()

    digests = asyncio.run(main())
    parsed = [parse_page(b) for b in pages]
    assert digests == [PageDigest.of(p) for p in parsed]
    assert [len(d.rejected) for d in digests] == [0, 1, 0]
    # The files the workers wrote hold the rows the sync's own staging would have written (a
    # batch keeps its freshest snapshot of each workflow: the merge takes the freshest of all).
    expected = staged_tables([(seq, START_AT_PAGE, p) for seq, p in enumerate(parsed, 10)])
    for kind in STAGED_SCHEMAS:
        want = sorted(expected[kind].to_pylist() if kind in expected else [],
                      key=lambda r: (r["_seq"], str(r.get("id") or r["run_id"])))
        got = staged(tmp_path, kind)
        if kind == "workflows":
            got = list({r["id"]: r for r in got}.values())  # sorted by _seq: the last wins
            got.sort(key=lambda r: (r["_seq"], r["id"]))
        assert got == want, kind
    assert not list(tmp_path.glob(".*.part")), "a half-written file was left behind"


def test_only_a_long_full_walk_starts_workers_and_a_body_that_is_no_page_is_told(tmp_path):
    async def main():
        pool = ValidationPool(1, batch_pages=5)
        sink = StagingSink(Stage(duckdb.connect(), 1, tmp_path), 5, pool)
        try:
            # Until a full walk announces enough pages the pool stays idle: the sync validates.
            for pages in (None, 1, START_AT_PAGE - 1):
                sink.expect(pages)
                assert await pool.parse(tmp_path, 1, START_AT_PAGE, a_page(1)) is None
            assert pool._starting is None
            sink.expect(START_AT_PAGE)
            assert pool._starting is not None
            await validated(pool, tmp_path, 2, a_page(1))
            with pytest.raises(EnvelopeError):
                await pool.parse(tmp_path, 3, START_AT_PAGE + 1, b'{"detail": "maintenance"}')
            with pytest.raises(EnvelopeError):
                await pool.parse(tmp_path, 4, START_AT_PAGE + 1, b'{"items": [{"id": "a"')
            # ...and the worker goes on with the next one.
            await validated(pool, tmp_path, 5, a_page(50))
        finally:
            await pool.aclose()

    asyncio.run(main())


def with_a_ready_worker(folder: Path, check):
    """Run ``await check(pool, worker)`` once a one-worker pool has validated a first page for
    ``folder`` (held in the worker, not yet written); the pool is closed after. Returns what
    ``check`` returned and the worker's process."""
    async def main():
        pool = ValidationPool(1, batch_pages=50)
        try:
            await validated(pool, folder, 1, a_page(1))
            [worker] = pool._workers
            return await check(pool, worker), worker.proc
        finally:
            await pool.aclose()

    return asyncio.run(main())


async def killed(worker) -> None:
    os.kill(worker.proc.pid, signal.SIGKILL)
    await asyncio.wait_for(worker.reader, 10)  # the pool has seen it go


def test_when_every_worker_is_behind_the_sync_validates_the_next_page_itself(tmp_path):
    async def check(pool, worker):
        pool.share_at = 1
        first = asyncio.ensure_future(pool.parse(tmp_path, 2, START_AT_PAGE, a_page(10)))
        await asyncio.sleep(0)  # its request is on its way: the worker has one page waiting
        assert await pool.parse(tmp_path, 3, START_AT_PAGE, a_page(20)) is None
        assert isinstance(await first, PageDigest)
        assert await pool.parse(tmp_path, 4, START_AT_PAGE, a_page(30)) is not None

    with_a_ready_worker(tmp_path, check)


def test_a_worker_that_dies_fails_the_walk_with_a_clear_error(tmp_path):
    async def check(pool, worker):
        await killed(worker)
        with pytest.raises(WorkerError) as info:
            await pool.parse(tmp_path, 2, START_AT_PAGE, a_page(9))
        return str(info.value)

    text, _ = with_a_ready_worker(tmp_path, check)
    assert "killed by SIGKILL" in text and "nothing was committed" in text
    assert "sync.parse_workers" in text


def test_a_flush_after_a_worker_died_fails_at_once_instead_of_waiting_forever(tmp_path):
    async def check(pool, worker):
        await killed(worker)
        with pytest.raises(WorkerError):
            await asyncio.wait_for(pool.flush(tmp_path), 10)

    with_a_ready_worker(tmp_path, check)


def test_workers_leave_the_signals_that_stop_a_sync_to_the_sync(tmp_path):
    """systemd stops a service with SIGTERM to every process in it, and Ctrl-C reaches the
    whole process group: the sync decides (finish, or unwind); its workers carry on."""
    async def check(pool, worker):
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            os.kill(worker.proc.pid, sig)
        await asyncio.sleep(0.2)
        await validated(pool, tmp_path, 2, a_page(50))
        await pool.flush(tmp_path)
        assert worker.proc.returncode is None

    with_a_ready_worker(tmp_path, check)
    assert len(staged(tmp_path, "runs")) == 10


def test_a_worker_that_cannot_write_its_batches_says_where(tmp_path):
    gone = tmp_path / "no-such-folder"

    async def check(pool, worker):
        with pytest.raises(WarehouseError) as info:
            await pool.flush(gone)
        return str(info.value)

    text, proc = with_a_ready_worker(gone, check)
    assert "cannot write the sync's staged batches in" in text and str(gone) in text
    assert proc.returncode is not None, "a worker outlived its pool"


def test_the_default_leaves_the_sync_a_cpu_of_its_own(monkeypatch):
    monkeypatch.setattr(parallel, "_cpu_quota", lambda: None)
    for cpus, workers in ((1, 0), (2, 1), (4, 3), (64, parallel.MAX_DEFAULT_WORKERS)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _, n=cpus: set(range(n)),
                            raising=False)
        assert parallel.default_workers() == workers
    # A container limited to 1.5 CPUs on a 64-CPU host: two CPUs' worth, so one worker.
    monkeypatch.setattr(parallel, "_cpu_quota", lambda: 2)
    assert parallel.default_workers() == 1


@pytest.mark.parametrize(("text", "cpus"), [("150000 100000\n", 2), ("100000 100000", 1),
                                            ("50000 100000", 1), ("max 100000", None),
                                            ("garbage", None)])
def test_a_cgroup_cpu_quota_is_read_as_whole_cpus(tmp_path, text, cpus):
    (tmp_path / "cpu.max").write_text(text)
    assert parallel._cpu_quota(str(tmp_path / "cpu.max")) == cpus
    assert parallel._cpu_quota(str(tmp_path / "missing")) is None


def _workers_pages(caplog) -> int:
    stopped = [r for r in caplog.records if getattr(r, "event", None) == "workers_stopped"]
    assert stopped, "no validation worker was started"
    return stopped[-1].pages


def test_a_long_walk_through_workers_mirrors_a_source_that_moves_under_it(make_sim, tmp_path,
                                                                         caplog):
    sim = make_sim(20_000, seed=3)
    moved = []

    def move(sim, page, size, n):  # runs created, finished and deleted mid-walk
        if n in (60, 120):
            moved.append((sim.add_runs(30), sim.transition(40), sim.delete(5)))

    sim.on_list_request(move)
    caplog.set_level(logging.DEBUG, logger="runs_etl.parallel")
    db = tmp_path / "runs.duckdb"
    settings = settings_for(sim, db, sync={"parse_workers": 2})
    [first] = run_syncs(settings)
    assert len(moved) == 2
    assert _workers_pages(caplog) > 0
    assert first.result.verified and first.result.walk_passes >= 2  # it saw the source move
    # Runs deleted after the walk saw them stay until a full walk confirms them gone (as
    # without workers: test_sync_integration); every other run is there once, up to date.
    deleted = {i for _, _, gone in moved for i in gone}
    assert_mirror(db, sim, stale=deleted)
    sim.on_list_request(None)
    caplog.clear()
    run_syncs(settings, full_refresh=True)
    assert _workers_pages(caplog) > 0
    assert_mirror(db, sim)


def test_workers_or_not_the_warehouse_is_the_same(make_sim, tmp_path, caplog):
    sim = make_sim(20_000, seed=5)
    caplog.set_level(logging.DEBUG, logger="runs_etl.parallel")
    dumps = []
    for workers in (0, 2):
        db = tmp_path / f"w{workers}" / "runs.duckdb"
        db.parent.mkdir()
        run_syncs(settings_for(sim, db, sync={"parse_workers": workers}))
        con = duckdb.connect(str(db), read_only=True)
        dumps.append({t: con.execute(f"SELECT * EXCLUDE (_first_seen_at, _synced_at) FROM {t} "
                                     "ORDER BY ALL").fetchall()
                      for t in ("runs", "workflows")})
        dumps[-1]["run_nodes"] = con.execute("SELECT * FROM run_nodes ORDER BY ALL").fetchall()
        con.close()
    assert _workers_pages(caplog) > 0
    assert dumps[0] == dumps[1]


def test_a_worker_killed_mid_sync_is_one_error_line_and_nothing_committed(make_sim, tmp_path,
                                                                          sim_env):
    sim = make_sim(20_000, seed=9)
    env = sim_env(sim)
    db = Path(env["RUNS_ETL_DUCKDB_PATH"])
    with cli_process(["sync"], env, tmp_path) as first:  # a committed warehouse to keep
        assert first.wait(120) == 0
    before = dump_tables(db)
    sim.add_runs(10)
    # Holds one request of the second sync's walk, well past START_AT_PAGE.
    gate = Gate(sim, sim.list_request_count + 150)
    with cli_process(["sync", "--full-refresh"], env, tmp_path) as proc:
        gate.wait_entered()
        workers = _children(proc.pid)
        deadline = time.monotonic() + 30
        while len(workers) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
            workers = _children(proc.pid)
        assert workers, "the sync started no validation worker"
        os.kill(workers[0], signal.SIGKILL)
        gate.open()
        code = proc.wait(120)
    err = (tmp_path / "child.stderr").read_text()
    assert code == 1
    line = error_line(err)
    assert "validation worker" in line and "killed by SIGKILL" in line, line
    assert dump_tables(db) == before


def _children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.extend(int(c) for c in text)
    return found
