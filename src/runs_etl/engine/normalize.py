"""Validated runs -> Arrow tables ``runs`` and ``workflows``, typed for DuckDB.

JSON values stay JSON text (DuckDB ``JSON``) exactly as the API sent them, timestamps are UTC
microseconds, unknown fields go to ``extra`` losslessly. A ``node_ids`` object (newer servers)
becomes its keys, with the original object kept in ``extra.node_ids``. ``_seq`` orders
snapshots: higher is fresher.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pyarrow as pa

from .models import ParsedPage, Run, WorkflowSnapshot

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

# A record that failed validation, staged with its raw JSON and the reason.
REJECTED_SCHEMA = pa.schema([("page", pa.int32()), ("item_index", pa.int32()),
                             ("run_id", pa.string()), ("error", pa.string()),
                             ("raw", pa.string()), ("_seq", pa.int64())])
# The tables a staged batch is made of.
STAGED_SCHEMAS = {"runs": RUNS_SCHEMA, "workflows": WORKFLOWS_SCHEMA, "rejected": REJECTED_SCHEMA}


def data_columns(schema: pa.Schema) -> list[str]:
    """The columns a schema carries from the API (``_seq`` and other ``_`` columns are ours)."""
    return [name for name in schema.names if not name.startswith("_")]


@dataclass(frozen=True, slots=True)
class Batch:
    runs: pa.Table
    workflows: pa.Table


# A staged batch: each page with its arrival seq.
Pages = Sequence[tuple[int, ParsedPage]]


def _json_column(texts: Iterable[bytes | None]) -> pa.ChunkedArray:
    """JSON text as the API sent it (None stays NULL); UTF-8 checked once for the whole column
    by Arrow (a full validation: unlike a cast, it needs no ``pyarrow.compute``, whose import
    cost a validation worker ~35 ms of its start-up and an incremental sync ~25 ms)."""
    built = pa.array(texts, pa.binary())
    chunks = built.chunks if isinstance(built, pa.ChunkedArray) else [built]  # > 2 GiB: several
    column = pa.chunked_array([c.view(JSON_TEXT) for c in chunks], JSON_TEXT)
    column.validate(full=True)
    return column


def _node_list(run: Run) -> list[str] | None:
    if isinstance(run.node_ids, dict):
        return [str(k) for k in run.node_ids]
    return run.node_ids


def runs_table(pages: Pages) -> pa.Table:
    runs = [r for _, p in pages for r in p.runs]
    cols = {
        "id": [r.id for r in runs],
        "group_id": [r.group_id for r in runs],
        "workflow_id": [r.workflow_id for r in runs],
        "input": _json_column(x for _, p in pages for x in p.raw.input),
        "node_ids": [_node_list(r) for r in runs],
        "status": [r.status for r in runs],
        "progress": [r.progress for r in runs],
        "definitions": _json_column(x for _, p in pages for x in p.raw.definitions),
        "created_at": [r.created_at for r in runs],
        "finished_at": [r.finished_at for r in runs],
        "source": [r.source for r in runs],
        "extra": _json_column(x for _, p in pages for x in p.raw.extra),
        "_seq": [seq for seq, p in pages for _ in p.runs],
    }
    return pa.table(cols, schema=RUNS_SCHEMA)


def workflows_table(pages: Pages) -> pa.Table:
    """One row per workflow id: the freshest embedded snapshot in this batch."""
    latest: dict[str, tuple[int, WorkflowSnapshot]] = {}
    for seq, page in pages:
        for wf_id, snap in page.raw.workflows.items():
            if wf_id not in latest or latest[wf_id][0] <= seq:
                latest[wf_id] = (seq, snap)
    snaps = [s for _, s in latest.values()]
    wfs = [s.workflow for s in snaps]
    cols = {
        "id": [w.id for w in wfs],
        "group_id": [w.group_id for w in wfs],
        "name": [w.name for w in wfs],
        "type": [w.type for w in wfs],
        "definition": _json_column(s.definition for s in snaps),
        "last_updated_at": [w.last_updated_at for w in wfs],
        "last_run_at": [w.last_run_at for w in wfs],
        "created_at": [w.created_at for w in wfs],
        "deleted_at": [w.deleted_at for w in wfs],
        "runs_count": [w.runs_count for w in wfs],
        "author_name": [w.author_name for w in wfs],
        "description": [w.description for w in wfs],
        "saved": [w.saved for w in wfs],
        "error_handler": [w.error_handler for w in wfs],
        "extra": _json_column(s.extra for s in snaps),
        "_seq": [seq for seq, _ in latest.values()],
    }
    return pa.table(cols, schema=WORKFLOWS_SCHEMA)


def staged_tables(pages: Sequence[tuple[int, int, ParsedPage]]) -> dict[str, pa.Table]:
    """A batch of validated pages, each with its arrival seq and page number, as the tables
    staged for the merge (``rejected`` only when a record was)."""
    batch = normalize([(seq, page) for seq, _, page in pages])
    tables = {"runs": batch.runs, "workflows": batch.workflows}
    rejected = [(number, r.index, r.run_id, r.error, r.raw, seq)
                for seq, number, page in pages for r in page.rejected]
    if rejected:
        tables["rejected"] = pa.table(dict(zip(REJECTED_SCHEMA.names, map(list, zip(*rejected)))),
                                      schema=REJECTED_SCHEMA)
    return tables


def normalize(pages: Pages) -> Batch:
    """Turn validated pages (each with its arrival seq) into the staging tables. ``run_nodes``
    is not one of them: the merge unnests ``node_ids`` of the runs it writes (0.1 s for 500k
    nodes, where exploding and staging them cost more and took a join to merge)."""
    return Batch(runs_table(pages), workflows_table(pages))
