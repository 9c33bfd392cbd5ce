"""A sync's staged batches on disk: numbered Parquet files in the sync's staging folder.

Written by the sync's own process (``staging.Stage``) and by its validation workers
(``parallel``), each under a prefix of its own. A file appears under its final name only once
complete (written under a hidden name, then renamed), so DuckDB, which reads the folder with a
glob while workers may still be writing, never sees half a file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import WarehouseError, first_line


class BatchFiles:
    """Writes batches of staged tables (kind -> table) as ``<kind>-<prefix><n>.parquet``."""

    def __init__(self, folder: Path, prefix: str = ""):
        self.folder = folder
        self.prefix = prefix
        self.count = 0

    def write(self, tables: dict[str, pa.Table], *, empty_too: bool = False) -> None:
        """One batch; a kind with no rows is skipped unless ``empty_too``. Raises OSError."""
        n = self.count
        self.count += 1
        for kind, table in tables.items():
            if table.num_rows or empty_too:
                name = f"{kind}-{self.prefix}{n:06d}.parquet"
                part = self.folder / f".{name}.part"
                pq.write_table(table, part, compression="snappy")
                os.replace(part, self.folder / name)


def staging_failure(folder: Path, exc: OSError) -> WarehouseError:
    """A full disk (or a folder gone read-only) while staging is an operating condition."""
    detail = os.strerror(exc.errno) if exc.errno else first_line(exc)
    return WarehouseError(f"cannot write the sync's staged batches in {folder} ({detail}); "
                          "nothing was committed. Check free disk space beside the database")
