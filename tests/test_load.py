"""The staged upsert: ``engine/staging.py`` (``Stage``: batches as Parquet files) and
``engine/load.py`` (``merge``: one set-based upsert of the freshest snapshot of each run).

Property tests (hypothesis) pin the invariants: Arrow -> DuckDB -> read back is lossless; the same
pages upserted twice equal once; any arrival order of the pages gives the same warehouse.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import duckdb
import pytest
from fakeapi import make_run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runs_etl import warehouse
from runs_etl.engine.load import (
    RUN_COLUMNS,
    WORKFLOW_COLUMNS,
    MergeCounts,
    apply_staged,
    merge,
)
from runs_etl.engine.models import parse_page
from runs_etl.engine.normalize import staged_tables
from runs_etl.engine.staging import Stage
from runs_etl.warehouse.connect import connect
from runs_etl.warehouse.ledger import SyncResult

PROPERTY = settings(max_examples=15, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def new_con() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(":memory:")
    warehouse.migrate(con)
    return con


@pytest.fixture
def con():
    c = new_con()
    yield c
    c.close()


def parsed(run_dicts: list[dict]):
    body = {"items": run_dicts, "total": None, "page": 1, "size": 100, "pages": None}
    page = parse_page(json.dumps(body).encode())
    assert page.rejected == [], page.rejected
    return page


def upsert(con, sync_id: int, pages: list[tuple[int, list[dict]]],
           batches: list[list[int]] | None = None) -> MergeCounts:
    """One sync: stage ``pages`` ((seq, run dicts) each; grouped per ``batches``), then merge."""
    stage = Stage(con, sync_id)
    try:
        groups = batches or [[i] for i in range(len(pages))]
        for group in groups:
            stage.add(staged_tables([(pages[i][0], 1, parsed(pages[i][1])) for i in group]))
        return merge(con, "default", sync_id)
    finally:
        stage.close()


def snapshot(con, *, system: bool = True) -> dict:
    """The whole warehouse as Python values (system timestamps optional)."""
    run_cols = RUN_COLUMNS + (["_first_seen_at", "_synced_at", "_deleted_at", "_sync_id"]
                              if system else [])
    wf_cols = WORKFLOW_COLUMNS + (["_first_seen_at", "_synced_at", "_sync_id"] if system else [])
    return {
        "runs": con.execute(f"SELECT {', '.join(run_cols)} FROM runs ORDER BY id").fetchall(),
        "workflows": con.execute(
            f"SELECT {', '.join(wf_cols)} FROM workflows ORDER BY id").fetchall(),
        "run_nodes": con.execute(
            "SELECT run_id, position, node_id FROM run_nodes ORDER BY ALL").fetchall(),
    }


def row(con, run_id: str) -> dict:
    cur = con.execute("SELECT * FROM runs WHERE id = ?", [run_id])
    names = [d[0] for d in cur.description]
    rows = cur.fetchall()
    assert len(rows) == 1, f"{run_id} stored {len(rows)} times"
    return dict(zip(names, rows[0]))


def nodes(con, run_id: str) -> list[tuple[int, str]]:
    return con.execute("SELECT position, node_id FROM run_nodes WHERE run_id = ? ORDER BY 1",
                       [run_id]).fetchall()


A, B, C, D = (make_run(i) for i in range(4))


# --- merge ---------------------------------------------------------------------------------------

def test_first_sync_inserts_every_run_as_new(con):
    counts = upsert(con, 1, [(1, [A, B]), (2, [C])])
    assert (counts.rows_new, counts.rows_updated, counts.rows_unchanged) == (3, 0, 0)
    assert counts.workflows_new == 3
    assert con.execute("SELECT count(*) FROM runs").fetchall()[0][0] == 3
    assert row(con, A["id"])["_sync_id"] == 1
    assert nodes(con, A["id"]) == [(0, A["node_ids"][0]), (1, A["node_ids"][1])]


def test_merge_counts_new_updated_and_unchanged(con):
    upsert(con, 1, [(1, [A, B, C])])
    b2 = B | {"status": "failed", "progress": 70}
    counts = upsert(con, 2, [(1, [A, b2, D])])  # C not seen this time: not touched
    assert (counts.rows_new, counts.rows_updated, counts.rows_unchanged) == (1, 1, 1)
    assert counts.rows_undeleted == 0
    assert row(con, B["id"])["status"] == "failed"
    assert con.execute("SELECT count(*) FROM runs").fetchall()[0][0] == 4


def test_an_unchanged_run_is_not_rewritten(con):
    upsert(con, 1, [(1, [A])])
    before = row(con, A["id"])
    counts = upsert(con, 2, [(5, [A])])
    assert counts.rows_unchanged == 1 and counts.rows_updated == 0
    after = row(con, A["id"])
    assert after["_sync_id"] == 1
    assert after["_synced_at"] == before["_synced_at"]


def _stage_many(con, stage: Stage, n: int, *, changed: int | None = None) -> None:
    """``n`` runs with API-sized JSON (~0.8 KB each), staged as the walk stages them: files of
    2000 runs; run ``changed`` (if any) with another status."""
    for lo in range(0, n, 2000):
        con.execute(f"""
            COPY (SELECT 'run-' || i AS id, 'g' AS group_id, 'wf-' || (i % 7) AS workflow_id,
                         '{{"prompt": "' || repeat(md5(i::VARCHAR), 12) || '"}}' AS input,
                         ['a-' || i, 'b-' || i] AS node_ids,
                         CASE WHEN i = {-1 if changed is None else changed}
                              THEN 'failed' ELSE 'completed' END AS status,
                         100::INTEGER AS progress,
                         '[' || repeat('{{"k": "' || md5((i + 1)::VARCHAR) || '"}},', 8)
                             || '1]' AS definitions,
                         TIMESTAMPTZ '2026-01-01 00:00:00+00' + to_seconds(i) AS created_at,
                         TIMESTAMPTZ '2026-01-01 00:01:00+00' + to_seconds(i) AS finished_at,
                         NULL::VARCHAR AS source, NULL::VARCHAR AS extra,
                         {lo // 2000 + 1}::BIGINT AS _seq
                  FROM range({lo}, {min(n, lo + 2000)}) t(i))
            TO '{stage.dir}/runs-{lo:09d}.parquet' (FORMAT parquet)""")


def test_a_full_refresh_of_many_runs_merges_within_a_small_memory_limit(tmp_path):
    """Each staged run is compared with its stored row by a hash of its columns, computed as
    each side is read: comparing the wide rows themselves held them all at once, and a full
    refresh of 100k runs ran out of a 64MB memory_limit (1M runs, of 128MB)."""
    con = connect(tmp_path / "w.duckdb", memory_limit="64MB")
    warehouse.migrate(con)
    n = 100_000
    for sync_id, changed in ((1, None), (2, 4242)):
        stage = Stage(con, sync_id)
        try:
            _stage_many(con, stage, n, changed=changed)
            counts = merge(con, "default", sync_id)
        finally:
            stage.close()
    assert (counts.rows_new, counts.rows_updated, counts.rows_unchanged) == (0, 1, n - 1)
    assert row(con, "run-4242")["status"] == "failed"
    assert row(con, "run-4242")["_sync_id"] == 2 and row(con, "run-4241")["_sync_id"] == 1
    con.close()


def test_a_change_in_any_column_is_an_update(con):
    upsert(con, 1, [(1, [A])])
    # Each variant differs from the one before it in one column; runs are compared by a hash
    # (``load._row_hash``), so the pairs a plain hash confuses are here too: no list and an
    # empty one, no text and an empty one, two columns trading values.
    variants = [{"input": {"prompt": "changed"}}, {"node_ids": ["x"]}, {"finished_at": None},
                {"source": None}, {"new_field": 1}, {"definitions": {"a": 1}},
                {"node_ids": None}, {"node_ids": []}, {"node_ids": None}, {"source": ""},
                {"source": None}, {"group_id": "g", "workflow_id": "w"},
                {"group_id": "w", "workflow_id": "g"}, {"progress": 0}, {"progress": None}]
    current = A
    for sync_id, change in enumerate(variants, start=2):
        current = current | change
        counts = upsert(con, sync_id, [(1, [current])])
        assert counts.rows_updated == 1, change
        assert row(con, A["id"])["_sync_id"] == sync_id, change
    counts = upsert(con, len(variants) + 2, [(1, [current])])
    assert (counts.rows_updated, counts.rows_unchanged) == (0, 1)


def test_an_updated_run_keeps_first_seen_and_gets_the_new_sync(con):
    upsert(con, 1, [(1, [A])])
    first = row(con, A["id"])
    upsert(con, 2, [(1, [A | {"status": "stopped"}])])
    updated = row(con, A["id"])
    assert updated["_first_seen_at"] == first["_first_seen_at"]
    assert updated["_sync_id"] == 2 and updated["_synced_at"] >= first["_synced_at"]
    assert updated["status"] == "stopped"


def test_run_nodes_are_replaced_on_update(con):
    upsert(con, 1, [(1, [A | {"node_ids": ["a", "b", "c"]}])])
    upsert(con, 2, [(1, [A | {"node_ids": ["z"]}])])
    assert nodes(con, A["id"]) == [(0, "z")]
    upsert(con, 3, [(1, [A | {"node_ids": None}])])
    assert nodes(con, A["id"]) == []


def test_run_nodes_are_node_ids_with_their_positions(con):
    obj = {"n1": {"label": "start"}, "n2": None}
    upsert(con, 1, [(1, [A | {"node_ids": ["a", "b", "c"]}, B | {"node_ids": None},
                         C | {"node_ids": []}, D | {"node_ids": ["d", "d"]}]),
                    (2, [make_run(5, node_ids=obj)])])
    assert nodes(con, A["id"]) == [(0, "a"), (1, "b"), (2, "c")]
    assert nodes(con, B["id"]) == nodes(con, C["id"]) == []
    assert nodes(con, D["id"]) == [(0, "d"), (1, "d")]
    assert nodes(con, make_run(5)["id"]) == [(0, "n1"), (1, "n2")]  # an object: its keys


@pytest.mark.parametrize("order", [[0, 1], [1, 0]])
def test_a_run_seen_twice_in_one_sync_lands_once_with_the_highest_seq_state(con, order):
    old = A | {"status": "running", "node_ids": ["n1"], "finished_at": None}
    new = A | {"status": "completed", "node_ids": ["n1", "n2"]}
    pages = [(3, [old]), (9, [new])]
    counts = upsert(con, 1, [pages[i] for i in order])
    assert counts.rows_new == 1
    stored = row(con, A["id"])
    assert stored["status"] == "completed"
    assert nodes(con, A["id"]) == [(0, "n1"), (1, "n2")]


def test_a_page_listing_the_same_run_twice_stores_it_once(con):
    upsert(con, 1, [(1, [A, A, B])])
    row(con, A["id"])  # asserts exactly one row
    assert len(nodes(con, A["id"])) == len(A["node_ids"])


def test_a_deleted_run_that_reappears_is_undeleted(con):
    upsert(con, 1, [(1, [A])])
    con.execute("UPDATE runs SET _deleted_at = now() WHERE id = ?", [A["id"]])
    counts = upsert(con, 2, [(1, [A])])
    assert (counts.rows_updated, counts.rows_undeleted) == (1, 1)
    assert row(con, A["id"])["_deleted_at"] is None


def test_workflows_keep_the_freshest_snapshot_and_count_changes(con):
    wf = A["workflow"]
    upsert(con, 1, [(1, [A])])
    later = [(4, [A | {"workflow": wf | {"runs_count": 99}}]),
             (2, [B | {"workflow": wf | {"runs_count": 50}}]),
             (3, [C])]  # C embeds a workflow not seen before
    counts = upsert(con, 2, later)
    assert (counts.workflows_new, counts.workflows_updated) == (1, 1)
    (runs_count,) = con.execute("SELECT runs_count FROM workflows WHERE id = ?",
                                [wf["id"]]).fetchall()[0]
    assert runs_count == 99


def test_an_unchanged_workflow_is_not_rewritten(con):
    upsert(con, 1, [(1, [A])])
    counts = upsert(con, 2, [(1, [A])])
    assert (counts.workflows_new, counts.workflows_updated) == (0, 0)
    assert con.execute("SELECT _sync_id FROM workflows").fetchall() == [(1,)]


# --- property tests ------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids,
                                                              max_size=3),
    max_leaves=6,
)
OFFSETS = [None, UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))]
instants = st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1),
                        timezones=st.sampled_from(OFFSETS))
texts = st.text(max_size=12)
KNOWN_RUN_FIELDS = {"id", "group_id", "workflow_id", "input", "node_ids", "status", "progress",
                    "definitions", "created_at", "finished_at", "workflow", "source"}


def iso(value: datetime) -> str:
    return value.isoformat()


def as_instant(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


@st.composite
def workflows(draw, wf_id: str):
    return {
        "id": wf_id, "group_id": draw(st.none() | texts), "name": draw(st.none() | texts),
        "type": draw(st.sampled_from(["flow", "handler", "ingestion"])),
        "definition": draw(json_values),
        "last_updated_at": draw(st.none() | instants.map(iso)),
        "created_at": draw(st.none() | instants.map(iso)),
        "runs_count": draw(st.none() | st.integers(0, 2**62)),
        "saved": draw(st.none() | st.booleans()),
        "description": draw(st.none() | texts),
        **draw(st.dictionaries(st.text(min_size=1, max_size=4).map(lambda k: "wx_" + k),
                               json_values, max_size=2)),
    }


@st.composite
def run_dicts(draw, run_id: str, wf_ids=None):
    run = {
        "id": run_id,
        "group_id": draw(st.none() | texts),
        "workflow_id": draw(st.none() | texts),
        "input": draw(json_values),
        "node_ids": draw(st.none() | st.lists(texts, max_size=4)
                         | st.dictionaries(texts, json_values, max_size=3)),
        "status": draw(st.sampled_from(["queued", "running", "completed", "failed"]) | texts),
        "progress": draw(st.none() | st.integers(-(2**31), 2**31 - 1)),
        "definitions": draw(json_values),
        "created_at": iso(draw(instants)),
        "finished_at": draw(st.none() | instants.map(iso)),
        "source": draw(st.none() | texts),
        "workflow": draw(st.none() | workflows(
            draw(wf_ids) if wf_ids is not None else "wf-" + run_id)),
        **draw(st.dictionaries(st.text(min_size=1, max_size=4).map(lambda k: "x_" + k),
                               json_values, max_size=3)),
    }
    return run


def expected_row(run: dict) -> dict:
    extra = {k: v for k, v in run.items() if k not in KNOWN_RUN_FIELDS}
    node_ids = run["node_ids"]
    if isinstance(node_ids, dict):
        extra["node_ids"] = node_ids
        node_ids = list(node_ids)
    return {**{k: run[k] for k in ("id", "group_id", "workflow_id", "status", "progress",
                                   "source", "input", "definitions")},
            "node_ids": node_ids, "extra": extra or None,
            "created_at": as_instant(datetime.fromisoformat(run["created_at"])),
            "finished_at": None if run["finished_at"] is None
            else as_instant(datetime.fromisoformat(run["finished_at"]))}


EXPECTED_KEYS = ["id", "group_id", "workflow_id", "status", "progress", "source", "input",
                 "definitions", "node_ids", "extra", "created_at", "finished_at"]


def stored_row(con, run_id: str) -> dict:
    r = row(con, run_id)
    for col in ("input", "definitions", "extra"):
        r[col] = None if r[col] is None else json.loads(r[col])
    return {k: r[k] for k in EXPECTED_KEYS}



@PROPERTY
@given(st.integers(1, 6).flatmap(
    lambda n: st.tuples(*(run_dicts(f"run-{i}") for i in range(n)))))
def test_arrow_to_duckdb_and_back_is_lossless(runs):
    con = new_con()
    upsert(con, 1, [(1, list(runs))])
    for run in runs:
        assert stored_row(con, run["id"]) == expected_row(run)
        assert [n for _, n in nodes(con, run["id"])] == (expected_row(run)["node_ids"] or [])
        wf = run["workflow"]
        if wf is not None:
            got = con.execute("SELECT name, definition, runs_count, saved, extra, created_at "
                              "FROM workflows WHERE id = ?", [wf["id"]]).fetchall()[0]
            extra = {k: v for k, v in wf.items() if k.startswith("wx_")}
            assert got[0] == wf["name"]
            assert (None if got[1] is None else json.loads(got[1])) == wf["definition"]
            assert (got[2], got[3]) == (wf["runs_count"], wf["saved"])
            assert (None if got[4] is None else json.loads(got[4])) == (extra or None)
            assert got[5] == (None if wf["created_at"] is None
                              else as_instant(datetime.fromisoformat(wf["created_at"])))
    con.close()


POOL = [f"run-{i}" for i in range(6)]
WF_POOL = [f"wf-{i}" for i in range(3)]


@st.composite
def pages_of_changing_runs(draw):
    """Pages (seq, runs) where a run may show different states on different pages."""
    n_pages = draw(st.integers(1, 5))
    pages = []
    for seq in range(1, n_pages + 1):
        page_ids = draw(st.lists(st.sampled_from(POOL), unique=True, max_size=4))
        pages.append((seq, [draw(run_dicts(i, st.sampled_from(WF_POOL))) for i in page_ids]))
    return pages


@PROPERTY
@given(pages_of_changing_runs(), st.integers(0, 1000))
def test_the_same_pages_upserted_twice_equal_once(pages, later):
    con = new_con()
    upsert(con, 1, pages)
    once = snapshot(con)
    again = [(seq + later + len(pages), runs) for seq, runs in pages]  # a later sync's seqs
    counts = upsert(con, 2, again)
    distinct = len({r["id"] for _, runs in pages for r in runs})
    assert (counts.rows_new, counts.rows_updated, counts.rows_unchanged) == (0, 0, distinct)
    assert (counts.workflows_new, counts.workflows_updated) == (0, 0)
    assert snapshot(con) == once  # system columns included: nothing was rewritten
    con.close()


def load(con, sync_id: int, pages: list[tuple[int, list[dict]]], at: datetime) -> SyncResult:
    """One sync's whole load (``apply_staged``: merge, deletes, history), stamped ``at``."""
    stage = Stage(con, sync_id)
    try:
        for seq, runs in pages:
            stage.add(staged_tables([(seq, 1, parsed(runs))]))
        result = SyncResult(sync_id=sync_id)
        apply_staged(con, result, "default", [], max_fraction=None, started_at=at, at=at)
        return result
    finally:
        stage.close()


@PROPERTY
@given(pages_of_changing_runs())
def test_a_first_load_writes_what_the_general_upsert_writes(pages):
    """A workspace's first load takes a shorter path (there is nothing to compare with): the
    runs, nodes and history versions it writes, system columns included, and its counts are
    those the general upsert writes for the same pages."""
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    first, general = new_con(), new_con()
    other = make_run(900)  # the warehouse holds a run of the workspace: the general path
    load(general, 1, [(1, [other])], at - timedelta(days=1))
    theirs = load(general, 2, pages, at)
    ours = load(first, 2, pages, at)
    counts = ("rows_new", "rows_updated", "rows_unchanged", "rows_undeleted", "workflows_new")
    assert [getattr(ours, c) for c in counts] == [getattr(theirs, c) for c in counts]
    assert ours.rows_new == len({r["id"] for _, runs in pages for r in runs})

    def without_other(con) -> dict:
        tables = snapshot(con) | {"run_history": con.execute(
            "SELECT * FROM run_history ORDER BY run_id, valid_from").fetchall()}
        return {name: [r for r in rows if other["id"] not in r and other["workflow_id"] not in r]
                for name, rows in tables.items()}

    assert without_other(first) == without_other(general)
    first.close()
    general.close()


@st.composite
def batching(draw, n: int):
    """A staging order of pages 0..n-1 cut into consecutive batches."""
    order = draw(st.permutations(range(n)))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, n - 1)), max_size=n)))
    bounds = [0, *[c for c in cuts if c < n], n]
    return [list(order[a:b]) for a, b in zip(bounds, bounds[1:]) if a < b]


@PROPERTY
@given(pages_of_changing_runs().flatmap(lambda p: st.tuples(st.just(p), batching(len(p)))))
def test_staging_order_and_batching_do_not_matter_the_highest_seq_wins(case):
    pages, batches = case
    canonical, shuffled = new_con(), new_con()
    upsert(canonical, 1, pages)
    upsert(shuffled, 1, pages, batches)
    assert snapshot(shuffled, system=False) == snapshot(canonical, system=False)
    latest = {}
    for _, runs in sorted(pages, key=lambda p: p[0]):
        for run in runs:
            latest[run["id"]] = run
    for run in latest.values():
        assert stored_row(canonical, run["id"]) == expected_row(run)
    canonical.close()
    shuffled.close()


@st.composite
def static_source_pages(draw):
    """A still source (one state per run) read as overlapping pages: repeats, no conflicts."""
    wfs = {w: draw(workflows(w)) for w in WF_POOL}
    source = {}
    for i in POOL:
        run = draw(run_dicts(i))
        run["workflow"] = draw(st.none() | st.sampled_from(sorted(wfs)).map(wfs.get))
        source[i] = run
    pages = draw(st.lists(st.lists(st.sampled_from(POOL), unique=True, max_size=4),
                          min_size=1, max_size=5))
    return [[source[i] for i in page] for page in pages]


@PROPERTY
@given(static_source_pages().flatmap(
    lambda p: st.tuples(st.just(p), st.permutations(range(len(p))), batching(len(p)))))
def test_any_arrival_order_of_the_pages_gives_the_same_warehouse(case):
    pages, arrival, batches = case
    in_order = [(seq, runs) for seq, runs in enumerate(pages, start=1)]
    # seqs are handed out by arrival: page arrival[k] is the (k+1)-th to arrive
    shuffled = [(arrival.index(i) + 1, runs) for i, runs in enumerate(pages)]
    a, b = new_con(), new_con()
    upsert(a, 1, in_order)
    upsert(b, 1, shuffled, batches)
    assert snapshot(b, system=False) == snapshot(a, system=False)
    a.close()
    b.close()
