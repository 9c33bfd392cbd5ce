"""Validated runs -> Arrow tables ``runs``, ``workflows`` and ``run_nodes``, typed for DuckDB.

JSON objects stay JSON text (DuckDB ``JSON``), timestamps are UTC microseconds, unknown fields
go to ``extra`` losslessly. A ``node_ids`` object (newer servers) becomes its keys, with the
original object kept in ``extra.node_ids``. ``_seq`` orders snapshots: higher is fresher.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
from pydantic_core import to_json

from .models import Run, Workflow

TS = pa.timestamp("us", tz="UTC")
JSON_TEXT = pa.string()

RUNS_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("group_id", pa.string()),
    ("workflow_id", pa.string()),
    ("input", JSON_TEXT),
    ("node_ids", pa.list_(pa.string())),
    ("status", pa.string()),
    ("progress", pa.int32()),
    ("definitions", JSON_TEXT),
    ("created_at", TS),
    ("finished_at", TS),
    ("source", pa.string()),
    ("extra", JSON_TEXT),
    ("_seq", pa.int64()),
])

WORKFLOWS_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("group_id", pa.string()),
    ("name", pa.string()),
    ("type", pa.string()),
    ("definition", JSON_TEXT),
    ("last_updated_at", TS),
    ("last_run_at", TS),
    ("created_at", TS),
    ("deleted_at", TS),
    ("runs_count", pa.int64()),
    ("author_name", pa.string()),
    ("description", pa.string()),
    ("saved", pa.bool_()),
    ("error_handler", pa.string()),
    ("extra", JSON_TEXT),
    ("_seq", pa.int64()),
])

RUN_NODES_SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("position", pa.int32()),
    ("node_id", pa.string()),
    ("_seq", pa.int64()),
])


def data_columns(schema: pa.Schema) -> list[str]:
    """The columns a schema carries from the API (``_seq`` and other ``_`` columns are ours)."""
    return [name for name in schema.names if not name.startswith("_")]


@dataclass(frozen=True, slots=True)
class Batch:
    runs: pa.Table
    workflows: pa.Table
    run_nodes: pa.Table


def _json_column(values: Iterable) -> pa.Array:
    """JSON text of each value (None stays NULL); UTF-8 checked once for the whole column
    by Arrow instead of decoded value by value."""
    return pa.array([None if v is None else to_json(v) for v in values],
                    pa.binary()).cast(JSON_TEXT)


def _extra(model: Run | Workflow, node_ids_object=None) -> dict | None:
    """Unknown fields (plus an object ``node_ids``, kept losslessly), or None."""
    extra = model.__pydantic_extra__
    if node_ids_object is not None:
        extra = {**(extra or {}), "node_ids": node_ids_object}
    return extra or None


def _node_list(run: Run) -> list[str] | None:
    if isinstance(run.node_ids, dict):
        return [str(k) for k in run.node_ids]
    return run.node_ids


def runs_table(runs: Sequence[Run], seqs: Sequence[int]) -> pa.Table:
    cols = {
        "id": [r.id for r in runs],
        "group_id": [r.group_id for r in runs],
        "workflow_id": [r.workflow_id for r in runs],
        "input": _json_column(r.input for r in runs),
        "node_ids": [_node_list(r) for r in runs],
        "status": [r.status for r in runs],
        "progress": [r.progress for r in runs],
        "definitions": _json_column(r.definitions for r in runs),
        "created_at": [r.created_at for r in runs],
        "finished_at": [r.finished_at for r in runs],
        "source": [r.source for r in runs],
        "extra": _json_column(
            _extra(r, r.node_ids if isinstance(r.node_ids, dict) else None) for r in runs),
        "_seq": list(seqs),
    }
    return pa.table(cols, schema=RUNS_SCHEMA)


def workflows_table(runs: Sequence[Run], seqs: Sequence[int]) -> pa.Table:
    """One row per workflow id: the freshest embedded snapshot in this batch."""
    latest: dict[str, tuple[int, Workflow]] = {}
    for run, seq in zip(runs, seqs):
        wf = run.workflow
        if wf is not None and (wf.id not in latest or latest[wf.id][0] <= seq):
            latest[wf.id] = (seq, wf)
    items = list(latest.values())
    wfs = [w for _, w in items]
    cols = {
        "id": [w.id for w in wfs],
        "group_id": [w.group_id for w in wfs],
        "name": [w.name for w in wfs],
        "type": [w.type for w in wfs],
        "definition": _json_column(w.definition for w in wfs),
        "last_updated_at": [w.last_updated_at for w in wfs],
        "last_run_at": [w.last_run_at for w in wfs],
        "created_at": [w.created_at for w in wfs],
        "deleted_at": [w.deleted_at for w in wfs],
        "runs_count": [w.runs_count for w in wfs],
        "author_name": [w.author_name for w in wfs],
        "description": [w.description for w in wfs],
        "saved": [w.saved for w in wfs],
        "error_handler": [w.error_handler for w in wfs],
        "extra": _json_column(_extra(w) for w in wfs),
        "_seq": [s for s, _ in items],
    }
    return pa.table(cols, schema=WORKFLOWS_SCHEMA)


def run_nodes_table(runs: pa.Table) -> pa.Table:
    """Explode ``node_ids`` column-wise: one row per (run_id, position)."""
    lists = runs.column("node_ids").combine_chunks()
    if len(lists) == 0:
        return RUN_NODES_SCHEMA.empty_table()
    parents = pc.list_parent_indices(lists)
    flat = pc.list_flatten(lists)
    # position = index within its list = flat index - offset of the list's first element
    offsets = pc.take(lists.offsets, parents)
    position = pc.subtract(pa.array(range(len(flat)), pa.int64()), offsets)
    return pa.table({
        "run_id": pc.take(runs.column("id"), parents),
        "position": pc.cast(position, pa.int32()),
        "node_id": flat,
        "_seq": pc.take(runs.column("_seq"), parents),
    }, schema=RUN_NODES_SCHEMA)


def normalize(runs: Sequence[Run], seqs: Sequence[int]) -> Batch:
    """Turn validated runs (with the arrival seq of each) into the three staging tables."""
    table = runs_table(runs, seqs)
    return Batch(table, workflows_table(runs, seqs), run_nodes_table(table))
