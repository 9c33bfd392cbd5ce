"""Normalize: validated runs -> typed Arrow tables, JSON kept as text, nothing unknown dropped."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import duckdb
import pyarrow as pa
import pytest
from fakeapi import make_run, make_runs

from runs_etl import warehouse
from runs_etl.engine.models import ParsedPage, parse_page
from runs_etl.engine.normalize import (
    RUNS_SCHEMA,
    WORKFLOWS_SCHEMA,
    normalize,
    runs_table,
    workflows_table,
)

TRICKY = {
    "text": "日本語 ✓ émoji 😀 \"quoted\" back\\slash \n newline \u0000 nul",
    "nested": [1, 2.5, None, True, {"k": "é", "empty": {}}],
    "big": 2**70,
    "neg": -(2**63),
    "float": 0.1,
    "exp": 1.5e-300,
}


def page_of(*dicts) -> ParsedPage:
    body = {"items": list(dicts), "total": len(dicts), "page": 1, "size": 100, "pages": 1}
    page = parse_page(json.dumps(body, ensure_ascii=False).encode())
    assert page.rejected == []
    return page


def pages(*dicts, seqs: list[int] | None = None) -> list[tuple[int, ParsedPage]]:
    """One page of ``dicts`` (arrival seq 1), or with ``seqs`` one page per run, each with its
    own arrival seq."""
    if seqs is None:
        return [(1, page_of(*dicts))]
    return [(seq, page_of(d)) for d, seq in zip(dicts, seqs, strict=True)]


def column(table: pa.Table, name: str) -> list:
    return table.column(name).to_pylist()


def test_tables_have_exactly_the_declared_schemas():
    batch = normalize(pages(*make_runs(3), seqs=[1, 2, 3]))
    assert batch.runs.schema.equals(RUNS_SCHEMA)
    assert batch.workflows.schema.equals(WORKFLOWS_SCHEMA)
    assert batch.runs.num_rows == 3 and batch.workflows.num_rows == 3


def test_no_runs_give_empty_tables_with_the_schemas():
    batch = normalize([])
    assert batch.runs.num_rows == batch.workflows.num_rows == 0
    assert batch.runs.schema.equals(RUNS_SCHEMA)
    assert batch.workflows.schema.equals(WORKFLOWS_SCHEMA)


ARROW_TO_DUCKDB = {
    pa.string(): {"VARCHAR", "JSON"},
    pa.list_(pa.string()): {"VARCHAR[]"},
    pa.int32(): {"INTEGER"},
    pa.int64(): {"BIGINT"},
    pa.bool_(): {"BOOLEAN"},
    pa.timestamp("us", tz="UTC"): {"TIMESTAMP WITH TIME ZONE"},
}


@pytest.mark.parametrize(("schema", "table"), [(RUNS_SCHEMA, "runs"),
                                                (WORKFLOWS_SCHEMA, "workflows")])
def test_arrow_column_types_match_the_warehouse_columns(schema, table):
    con = duckdb.connect(":memory:")
    warehouse.migrate(con)
    types = dict(con.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ?",
        [table]).fetchall())
    for field in schema:
        if field.name == "_seq":
            continue
        assert types[field.name] in ARROW_TO_DUCKDB[field.type], field.name


def test_scalar_columns_carry_the_api_values():
    raw = make_run(7, status="awaiting_human_feedback", progress=40, source="webhook")
    t = runs_table(pages(raw, seqs=[11]))
    row = t.to_pylist()[0]
    assert row["id"] == raw["id"] and row["group_id"] == raw["group_id"]
    assert row["workflow_id"] == raw["workflow_id"]
    assert row["status"] == "awaiting_human_feedback" and row["progress"] == 40
    assert row["source"] == "webhook" and row["_seq"] == 11
    assert row["node_ids"] == raw["node_ids"]


@pytest.mark.parametrize("text", ["2024-05-01T12:00:00+02:00", "2024-05-01T10:00:00Z",
                                  "2024-05-01T10:00:00", "2024-05-01T06:00:00-04:00"])
def test_timestamps_become_utc_microseconds(text):
    t = runs_table(pages(make_run(1, created_at=text, finished_at=None)))
    assert column(t, "created_at") == [datetime(2024, 5, 1, 10, tzinfo=UTC)]
    assert column(t, "finished_at") == [None]


def test_a_batch_mixing_naive_and_offset_timestamps_converts_each_right():
    t = runs_table(pages(make_run(1, created_at="2024-05-01T10:00:00.000001"),
                         make_run(2, created_at="2024-05-01T12:00:00.000001+02:00")))
    assert column(t, "created_at") == [datetime(2024, 5, 1, 10, 0, 0, 1, tzinfo=UTC)] * 2


def test_json_objects_stay_json_text_that_round_trips_unicode():
    t = runs_table(pages(make_run(1, input=TRICKY, definitions={"x": ["ü", {"y": None}]})))
    (text,) = column(t, "input")
    assert isinstance(text, str)
    assert json.loads(text) == TRICKY
    assert "日本語" in text  # stored readable, not \\u-escaped
    assert json.loads(column(t, "definitions")[0]) == {"x": ["ü", {"y": None}]}


@pytest.mark.parametrize("value", ["just a string", 42, [1, "two"], True, {}])
def test_non_object_json_values_are_json_text_too(value):
    t = runs_table(pages(make_run(1, input=value)))
    assert json.loads(column(t, "input")[0]) == value


def test_null_json_is_sql_null_not_the_text_null():
    t = runs_table(pages(make_run(1, input=None, definitions=None)))
    assert column(t, "input") == [None] and column(t, "definitions") == [None]


def test_extra_holds_unknown_fields_losslessly():
    unknown = {"output": TRICKY, "progress_details": [{"step": 1, "ok": False}],
               "meta": None, "workflow_version_id": "v-9"}
    t = runs_table(pages(make_run(1, **unknown), make_run(2), seqs=[1, 1]))
    extra = column(t, "extra")
    assert json.loads(extra[0]) == unknown
    assert extra[1] is None  # no unknown fields, no extra


def test_workflow_unknown_fields_go_to_workflow_extra():
    wf = make_run(1)["workflow"] | {"workflow_hash": "h1", "meta": {"tags": ["ß"]}}
    t = workflows_table(pages(make_run(1, workflow=wf)))
    assert json.loads(column(t, "extra")[0]) == {"workflow_hash": "h1", "meta": {"tags": ["ß"]}}
    assert json.loads(column(t, "definition")[0]) == {"nodes": [], "edges": []}


def test_node_ids_object_becomes_its_keys_and_the_object_is_kept_in_extra():
    obj = {"n1": {"label": "start"}, "n2": None, "n3": [1, 2]}
    batch = normalize(pages(make_run(1, node_ids=obj, output=1), seqs=[5]))
    assert column(batch.runs, "node_ids") == [["n1", "n2", "n3"]]
    assert json.loads(column(batch.runs, "extra")[0]) == {"output": 1, "node_ids": obj}


def test_workflows_keep_the_freshest_snapshot_per_id():
    wf = make_run(0)["workflow"]
    old = wf | {"runs_count": 5, "name": "old"}
    new = wf | {"runs_count": 9, "name": "new"}
    other = make_run(1)["workflow"]
    t = workflows_table(pages(make_run(10, workflow=new), make_run(11, workflow=old),
                              make_run(12, workflow=None), make_run(13, workflow=other),
                              seqs=[8, 3, 9, 4]))
    by_id = {r["id"]: r for r in t.to_pylist()}
    assert set(by_id) == {wf["id"], other["id"]}
    assert (by_id[wf["id"]]["name"], by_id[wf["id"]]["runs_count"], by_id[wf["id"]]["_seq"]) \
        == ("new", 9, 8)
    assert by_id[other["id"]]["_seq"] == 4


def test_workflow_timestamps_and_flags_are_typed():
    wf = make_run(0)["workflow"] | {"deleted_at": "2024-02-01T01:00:00+01:00", "saved": False}
    row = workflows_table(pages(make_run(1, workflow=wf))).to_pylist()[0]
    assert row["deleted_at"] == datetime(2024, 2, 1, tzinfo=UTC)
    assert row["saved"] is False and row["last_run_at"] is None



@pytest.mark.parametrize("field", ["progress", "workflow.runs_count"])
def test_an_integer_too_large_for_its_column_is_rejected_not_a_crash(field):
    """One bad record costs that record (rejected), never the whole page or sync."""
    huge = 2**31 if field == "progress" else 2**63
    bad = make_run(1, progress=huge) if field == "progress" else \
        make_run(1, workflow=make_run(1)["workflow"] | {"runs_count": huge})
    body = {"items": [bad, make_run(2)], "total": 2, "page": 1, "size": 10, "pages": 1}
    page = parse_page(json.dumps(body).encode())
    batch = normalize([(1, page)])
    assert column(batch.runs, "id") == [make_run(2)["id"]]
    (rejected,) = page.rejected
    assert rejected.run_id == bad["id"] and field.split(".")[-1] in rejected.error
