"""Models: lenient where the API is loose, strict where the warehouse needs it."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from fakeapi import make_run, make_runs
from hypothesis import given, settings
from hypothesis import strategies as st

from runs_etl.engine.models import EnvelopeError, ParsedPage, Run, parse_page, parse_run


def body(items, **envelope) -> bytes:
    doc = {"items": items, "total": len(items), "page": 1, "size": 50, "pages": 1}
    doc.update(envelope)
    return json.dumps(doc, ensure_ascii=False).encode()  # as a FastAPI server sends it


def instant_of(value: datetime) -> datetime:
    """The documented reading of an API timestamp: naive means UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def one_page(**fields) -> ParsedPage:
    return parse_run(json.dumps(make_run(1, **fields), ensure_ascii=False).encode())


def one(**fields) -> Run:
    (run,) = one_page(**fields).runs
    return run


def test_a_clean_page_parses_every_run_with_its_totals():
    page = parse_page(body(make_runs(5), total=120, pages=3))
    assert [r.id for r in page.runs] == [r["id"] for r in make_runs(5)]
    assert page.rejected == []
    assert (page.total, page.pages) == (120, 3)


def test_unknown_fields_are_kept_as_json_text():
    page = one_page(output={"answer": "ünïcode ✓"}, meta={"tags": ["a"]}, single_node_id=None)
    assert json.loads(page.raw.extra[0]) == {"output": {"answer": "ünïcode ✓"},
                                             "meta": {"tags": ["a"]}, "single_node_id": None}
    assert list(page.raw.workflows) == [make_run(1)["workflow"]["id"]]


def test_unknown_workflow_fields_are_kept_too():
    wf = make_run(1)["workflow"] | {"workflow_hash": "abc", "meta": {"icon": "x"}}
    page = one_page(workflow=wf)
    snapshot = page.raw.workflows[wf["id"]]
    assert snapshot.workflow.id == wf["id"]
    assert json.loads(snapshot.extra) == {"workflow_hash": "abc", "meta": {"icon": "x"}}
    assert json.loads(snapshot.definition) == wf["definition"]


def test_json_values_are_kept_exactly_as_sent():
    """Digits, key order and escapes of JSON values are the API's: nothing is re-encoded."""
    run = json.dumps(make_run(1, input=None, workflow=None, output=None))
    run = run.replace('"input": null', '"input": {"b": 1.10, "a": 12345678901234567890123}')
    run = run.replace('"output": null', '"output": "caf\\u00e9"')
    page = parse_page(b'{"items": [' + run.encode() + b'], "total": 1}')
    assert page.raw.input == [b'{"b": 1.10, "a": 12345678901234567890123}']
    assert page.raw.extra == [b'{"output":"caf\\u00e9"}']


@pytest.mark.parametrize("status", ["awaiting_human_feedback", "paused", "RUNNING", ""])
def test_status_outside_the_documented_enum_is_accepted(status):
    run = one(status=status)
    assert run.status == status
    assert not run.is_terminal


@pytest.mark.parametrize("status", ["completed", "failed", "stopped"])
def test_terminal_statuses(status):
    assert one(status=status).is_terminal


@pytest.mark.parametrize(("text", "instant"), [
    ("2024-05-01T10:00:00Z", datetime(2024, 5, 1, 10, 0, 0, tzinfo=UTC)),
    ("2024-05-01T12:00:00+02:00", datetime(2024, 5, 1, 10, 0, 0, tzinfo=UTC)),
    ("2024-05-01T05:30:00-04:30", datetime(2024, 5, 1, 10, 0, 0, tzinfo=UTC)),
    ("2024-05-01T10:00:00", datetime(2024, 5, 1, 10, 0, 0, tzinfo=UTC)),  # naive = UTC
    ("2024-05-01T10:00:00.123456Z", datetime(2024, 5, 1, 10, 0, 0, 123456, tzinfo=UTC)),
    ("2024-05-01T10:00:00.5", datetime(2024, 5, 1, 10, 0, 0, 500000, tzinfo=UTC)),
    ("2024-05-01T00:30:00.250+01:00", datetime(2024, 4, 30, 23, 30, 0, 250000, tzinfo=UTC)),
])
def test_timestamps_parse_to_the_right_utc_instant(text, instant):
    """The model may keep the sent offset (normalize stores UTC); the instant must be right."""
    run = one(created_at=text, finished_at=text)
    for value in (run.created_at, run.finished_at):
        assert instant_of(value) == instant


def test_workflow_timestamps_are_utc_too():
    wf = make_run(1)["workflow"] | {"last_run_at": "2024-05-01T12:00:00+02:00",
                                    "deleted_at": "2024-05-02T00:00:00"}
    workflow = one_page(workflow=wf).raw.workflows[wf["id"]].workflow
    assert instant_of(workflow.last_run_at) == datetime(2024, 5, 1, 10, tzinfo=UTC)
    assert instant_of(workflow.deleted_at) == datetime(2024, 5, 2, tzinfo=UTC)


def test_unfinished_run_has_null_finished_at():
    assert one(status="running", finished_at=None).finished_at is None


def test_null_workflow_is_accepted():
    page = one_page(workflow=None)
    assert len(page.runs) == 1 and page.raw.workflows == {}


def test_one_snapshot_per_workflow_and_an_invalid_one_rejects_exactly_its_runs():
    """The same workflow embedded in many runs is one snapshot; an invalid embedded workflow
    rejects the runs that carry it (their own fields may be fine), and no other."""
    good = make_run(0)["workflow"]
    bad = make_run(1)["workflow"] | {"runs_count": "many"}
    items = [make_run(10, workflow=good), make_run(11, workflow=bad),
             make_run(12, workflow=good), make_run(13, workflow=bad), make_run(14, workflow=5)]
    page = parse_page(body(items))
    assert [r.id for r in page.runs] == [items[0]["id"], items[2]["id"]]
    assert list(page.raw.workflows) == [good["id"]]
    assert [(r.index, r.run_id) for r in page.rejected] == [
        (1, items[1]["id"]), (3, items[3]["id"]), (4, items[4]["id"])]
    assert "workflow.runs_count" in page.rejected[0].error
    assert json.loads(page.rejected[0].raw) == items[1]


@pytest.mark.parametrize("node_ids", [None, [], ["a", "b"], {"a": {"x": 1}, "b": None}])
def test_node_ids_may_be_null_a_list_or_an_object(node_ids):
    assert one(node_ids=node_ids).node_ids == node_ids


def test_null_progress_input_definitions_and_source_are_accepted():
    page = one_page(progress=None, input=None, definitions=None, source=None)
    assert (page.runs[0].progress, page.runs[0].source) == (None, None)
    assert page.raw.input == page.raw.definitions == [None]  # SQL NULL, not the text null


def test_a_record_without_id_is_rejected_with_its_raw_json_and_the_others_kept():
    items = make_runs(4)
    broken = dict(items[2])
    del broken["id"]
    broken["input"] = {"text": "héllo"}
    items[2] = broken
    page = parse_page(body(items))
    assert [r.id for r in page.runs] == [items[i]["id"] for i in (0, 1, 3)]
    (rej,) = page.rejected
    assert rej.index == 2 and rej.run_id is None
    assert json.loads(rej.raw) == broken
    assert "héllo" in rej.raw  # raw JSON kept readable, not \u-escaped
    assert "id" in rej.error
    assert page.total == 4


def test_rejected_record_keeps_its_id_when_it_has_one():
    items = make_runs(2)
    items[1] = dict(items[1], created_at="not a date")
    page = parse_page(body(items))
    (rej,) = page.rejected
    assert rej.run_id == items[1]["id"] and rej.index == 1
    assert "created_at" in rej.error


@pytest.mark.parametrize("bad", [
    {"status": "completed"},  # no id, no created_at
    {"id": "", "status": "x", "created_at": "2024-01-01T00:00:00Z"},  # empty id
    {"id": "x", "created_at": "2024-01-01T00:00:00Z"},  # no status
    "just a string",
    None,
    {"id": "x", "status": "completed", "created_at": "2024-01-01T00:00:00Z",
     "node_ids": [1, 2]},
])
def test_each_unstorable_record_is_rejected_alone(bad):
    items = [make_run(1), bad, make_run(2)]
    page = parse_page(body(items))
    assert [r.id for r in page.runs] == [make_run(1)["id"], make_run(2)["id"]]
    assert len(page.rejected) == 1 and page.rejected[0].index == 1
    assert json.loads(page.rejected[0].raw) == bad


@pytest.mark.parametrize("raw", [
    b"",
    b"not json",
    b'{"items": [',  # truncated
    b"[]",
    b'{"detail": "Internal Server Error"}',
    b'{"items": null, "total": 3}',
    b'{"items": [], "total": "many"}',
    b'{"items": {"id": "x"}}',
])
def test_invalid_json_or_a_non_envelope_is_an_envelope_error(raw):
    with pytest.raises(EnvelopeError):
        parse_page(raw)


def test_null_total_and_pages_are_accepted():
    page = parse_page(body(make_runs(2), total=None, pages=None, page=None, size=None))
    assert (page.total, page.pages) == (None, None)
    assert len(page.runs) == 2


def test_empty_workspace_page():
    page = parse_page(body([], total=0, pages=0))
    assert page.runs == [] and page.rejected == [] and page.total == 0


def test_parse_run_rejects_a_non_run_body():
    with pytest.raises(EnvelopeError):
        parse_run(b'{"detail": "oops"}')


def test_a_run_repeated_within_one_page_is_kept_once_in_its_last_form():
    first, other = make_run(1), make_run(2)
    again = {**first, "status": "completed", "progress": 100}
    page = parse_page(body([first, other, again]))
    assert [r.id for r in page.runs] == [first["id"], other["id"]]
    assert page.runs[0].status == "completed" and page.runs[0].progress == 100


# --- property: whatever a server sends, the validator answers with a page or a data error ------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                 max_size=4),
    max_leaves=20)
GOOD = body(make_runs(3))
RUN_KEYS = sorted(make_run(0))


@st.composite
def mutated_pages(draw) -> bytes:
    """A valid page body, then bytes flipped, cut, inserted or a field replaced by any JSON."""
    kind = draw(st.sampled_from(["bytes", "cut", "insert", "field", "envelope"]))
    data = bytearray(GOOD)
    if kind == "bytes":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    elif kind == "cut":
        del data[draw(st.integers(0, len(data) - 1)):]
    elif kind == "insert":
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=20))
    else:
        doc = json.loads(GOOD)
        if kind == "field":
            doc["items"][draw(st.integers(0, 2))][draw(st.sampled_from(RUN_KEYS))] = \
                draw(JSON_VALUES)
        else:
            doc[draw(st.sampled_from(["items", "total", "pages", "page", "size"]))] = \
                draw(JSON_VALUES)
        data = bytearray(json.dumps(doc).encode())
    return bytes(data)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=300), mutated_pages()))
def test_any_body_is_a_page_or_a_data_error(raw: bytes):
    try:
        page = parse_page(raw)
    except EnvelopeError:
        return  # the response is broken: retried, then one clear error
    assert isinstance(page, ParsedPage)
    assert all(isinstance(r, Run) for r in page.runs)
    n = len(page.runs)
    assert len(page.raw.input) == len(page.raw.definitions) == len(page.raw.extra) == n
    for text in page.raw.input + page.raw.definitions + page.raw.extra:
        assert text is None or json.loads(text) is not None  # JSON, never the text null
