"""Raw page retention (``[retention] raw_pages``): every body a sync fetched, kept verbatim so
``runs-etl replay`` can rebuild the warehouse without the API.

One file per sync and workspace, ``<duckdb_path>.pages/<workspace>/<sync_id>.jsonl.zst``: zstd
(pyarrow's codec, readable by the ``zstd`` tool) over JSON lines: a ``sync`` header, one line per
body in arrival order (``seq``, ``kind`` page or run, ``ref`` the page number or the path, the
body as a string), and a ``commit`` line written once the sync committed (its load time and the
runs it marked deleted). Bodies are written as they arrive, never held in memory. A sync that
fails keeps nothing; files older than the retention are removed by the next sync.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa

log = logging.getLogger("runs_etl.pages")

PAGES_SUFFIX = ".pages"
FILE_SUFFIX = ".jsonl.zst"
PART_SUFFIX = ".part"
CODEC = "zstd"
READ_CHUNK = 1 << 20


def pages_root(db_path: Path | str) -> Path:
    """``runs.duckdb.pages/`` beside the warehouse."""
    db_path = Path(db_path)
    return db_path.with_name(db_path.name + PAGES_SUFFIX)


class PageRecorder:
    """Writes one sync's bodies as they arrive (``record`` is ``ApiClient.on_body``)."""

    def __init__(self, root: Path, workspace: str, sync_id: int, started_at: datetime):
        folder = root / workspace
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{sync_id}{FILE_SUFFIX}"
        self.part = folder / f".{sync_id}{FILE_SUFFIX}{PART_SUFFIX}"
        self.bodies = 0
        self._out: Any = pa.CompressedOutputStream(str(self.part), CODEC)
        self._write({"kind": "sync", "sync_id": sync_id, "workspace": workspace,
                     "started_at": started_at.isoformat()})

    def _write(self, record: dict) -> None:
        self._out.write(json.dumps(record).encode() + b"\n")

    def record(self, seq: int, kind: str, ref: int | str, body: bytes) -> None:
        # surrogateescape + JSON's \udcxx escapes: any byte survives, valid UTF-8 or not.
        self._write({"seq": seq, "kind": kind, "ref": ref,
                     "body": body.decode("utf-8", "surrogateescape")})
        self.bodies += 1

    def commit(self, loaded_at: datetime, deleted: list[str]) -> Path:
        """Close the file as the record of a committed sync (after the warehouse commit)."""
        self._write({"kind": "commit", "loaded_at": loaded_at.isoformat(), "deleted": deleted})
        self._out.close()
        os.replace(self.part, self.path)
        return self.path

    def discard(self) -> None:
        """A sync that committed nothing keeps nothing."""
        if not self._out.closed:
            self._out.close()
        self.part.unlink(missing_ok=True)


def prune(root: Path, workspace: str, keep: timedelta, now: float | None = None) -> list[Path]:
    """Remove ``workspace``'s files older than ``keep``, and what killed syncs left (``.part``);
    only called by the warehouse's single writer."""
    folder = root / workspace
    if not folder.is_dir():
        return []
    cutoff = (time.time() if now is None else now) - keep.total_seconds()
    removed = []
    for f in folder.iterdir():
        try:
            if f.name.endswith(PART_SUFFIX) or (f.name.endswith(FILE_SUFFIX)
                                                and f.stat().st_mtime < cutoff):
                f.unlink()
                removed.append(f)
        except FileNotFoundError:
            continue
    if removed:
        log.info("removed %d expired raw page files of workspace %s", len(removed), workspace,
                 extra={"event": "pages_pruned", "workspace": workspace, "files": len(removed)})
    return removed


@dataclass(frozen=True)
class RetainedSync:
    sync_id: int
    workspace: str
    started_at: datetime
    path: Path


def records(path: Path) -> Iterator[dict]:
    """The records of a retained file, in order, streamed."""
    with pa.input_stream(str(path), compression=CODEC) as f:
        tail = b""
        while chunk := f.read(READ_CHUNK):
            lines = (tail + chunk).split(b"\n")
            tail = lines.pop()
            for line in lines:
                yield json.loads(line)
        if tail.strip():
            yield json.loads(tail)


def body_of(record: dict) -> bytes:
    return record["body"].encode("utf-8", "surrogateescape")


def retained(root: Path, since: datetime | None = None) -> list[RetainedSync]:
    """The committed syncs kept under ``root`` (every workspace), in commit order (sync id),
    those that started at or after ``since`` only."""
    found = []
    for path in root.glob(f"*/*{FILE_SUFFIX}"):
        header = next(records(path))
        started = datetime.fromisoformat(header["started_at"])
        if since is None or started >= since:
            found.append(RetainedSync(header["sync_id"], header["workspace"], started, path))
    return sorted(found, key=lambda s: s.sync_id)
