"""Opening the DuckDB warehouse: the writer's read-write connection and readers' read-only one.

Merges (``engine/load.py``) and the ledger run inside the sync's single transaction, so a kill at
any instant leaves the previous good commit.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import os
from collections.abc import Container
from pathlib import Path

import duckdb

from ..config import DEFAULT_MEMORY_LIMIT, MEMORY_LIMIT, WarehouseSettings
from ..errors import ConfigError, LockedError, WarehouseError, first_line
from .migrations import check_readable

# A file holding these tables was written by runs-etl.
REQUIRED_TABLES = ("runs", "workflows", "run_nodes", "sync_runs")


def connect(path: Path, *, memory_limit: str = DEFAULT_MEMORY_LIMIT, read_only: bool = False,
            storage_compatibility: str | None = None):
    """Open (creating its folder) a DuckDB file; one held by another process is LockedError,
    one that is not a readable DuckDB database is WarehouseError. ``storage_compatibility``
    applies to a file created here (DuckDB keeps a file's storage version for its life)."""
    path = Path(path)
    memory_limit = memory_limit.strip()
    if not MEMORY_LIMIT.match(memory_limit):  # it is formatted into SQL below: nothing else passes
        raise ConfigError([f"warehouse.memory_limit: {memory_limit!r} is not a memory size "
                           "(use e.g. 256MB, 2GB, 1.5GiB)"])
    config: dict[str, str | bool | int | float | list[str]] = {}
    if storage_compatibility is not None:
        config["storage_compatibility_version"] = storage_compatibility
    for attempt in (1, 2):
        try:
            if not read_only:
                path.parent.mkdir(parents=True, exist_ok=True)
            con = duckdb.connect(str(path), read_only=read_only, config=config)
            break
        except duckdb.IOException as e:
            if _locked_by_another_process(path, read_only):
                raise LockedError(f"cannot open {path}: another process has it open "
                                  f"({first_line(e)})") from None
            if attempt == 2:  # not a lock that was let go in between: the file itself is bad
                raise WarehouseError(f"cannot open {path}: {first_line(e)}") from None
        except (duckdb.Error, OSError) as e:
            raise WarehouseError(f"cannot open {path}: {first_line(e)}") from None
    try:
        con.execute(f"SET memory_limit = '{memory_limit}'")
        con.execute(f"SET threads = {duckdb_threads(memory_limit)}")
        con.execute("SET preserve_insertion_order = false")
        con.execute("SET TimeZone = 'UTC'")  # analysts see UTC, whatever the host's zone
    except duckdb.Error as e:
        con.close()
        raise ConfigError([f"warehouse.memory_limit: {memory_limit!r} is not a DuckDB memory "
                           f"size ({first_line(e)})"]) from None
    return con


# DuckDB's working memory grows with its threads (each builds its own hash tables and
# buffers). Measured on the 1M-run warehouse, the Parquet export passes with 2 threads at 128MB
# and 4 at 256MB, and runs out of memory with 4 or 8 at 128MB and 16 at 256MB: DuckDB's default
# of a thread per CPU would make the default memory_limit fail on a bigger machine.
MEMORY_PER_THREAD = 64_000_000  # bytes (DuckDB's MB is 1000**2)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def duckdb_threads(memory_limit: str, cpus: int | None = None) -> int:
    """Threads for a connection limited to ``memory_limit`` (a valid ``MEMORY_LIMIT``): one per
    ``MEMORY_PER_THREAD``, at least one, at most one per CPU."""
    number, unit = MEMORY_LIMIT.match(memory_limit.strip()).group(1, 2)  # type: ignore[union-attr]
    size = float(number) * _UNITS[unit.lower()]
    return max(1, min(cpus or os.cpu_count() or 1, int(size // MEMORY_PER_THREAD)))


def _locked_by_another_process(path: Path, read_only: bool) -> bool:
    """Whether another process holds the POSIX lock DuckDB takes on its files (a shared one
    blocks a writer, an exclusive one everybody). Only a real conflict is "busy, retry later"
    (exit 75); a corrupt or foreign file is not."""
    try:
        fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.lockf(fd, (fcntl.LOCK_SH if read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as e:
        return e.errno in (errno.EACCES, errno.EAGAIN)
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def sql_string(text: str) -> str:
    """A SQL string literal (quotes doubled)."""
    return "'" + text.replace("'", "''") + "'"


def column_types(con, table: str) -> dict[str, str]:
    """``table``'s columns, in order, with their DuckDB types (``JSON``, ``VARCHAR[]``, ...)."""
    return dict(con.execute("SELECT column_name, data_type FROM duckdb_columns() WHERE "
                            "schema_name = 'main' AND table_name = ? ORDER BY column_index",
                            [table]).fetchall())


def select_list(con, table: str, *, alias: str = "", drop: Container[str] = ()) -> str:
    """Every column of ``table`` as a select list, JSON cast to text (Parquet and Delta have no
    JSON type), each qualified with ``alias`` (e.g. ``"t."``), those in ``drop`` left out."""
    return ", ".join(f'CAST({alias}"{c}" AS VARCHAR) AS "{c}"' if typ == "JSON"
                     else f'{alias}"{c}"' for c, typ in column_types(con, table).items()
                     if c not in drop)


def sql_glob(folder: Path, pattern: str) -> str:
    """``folder/pattern`` as a literal for ``read_parquet``: glob characters in the folder
    ("x[1]", from the database path) are escaped, or DuckDB would read them as part of the
    pattern and find no file."""
    return sql_string(str(Path(glob.escape(str(folder))) / pattern))


def open_read_only(wh: WarehouseSettings, *, views: bool = False):
    """Open the warehouse read-only: never creates a file, never takes the writer's lock. A
    missing file or a file that is not ours is WarehouseError; so is, with ``views``, one that
    has no analytics views yet (no sync has committed: only failed attempts were published)."""
    path = Path(wh.duckdb_path)
    if not path.is_file():
        raise WarehouseError(f"no warehouse at {path}: run `runs-etl sync` first, or point "
                             "--duckdb-path / RUNS_ETL_DUCKDB_PATH at an existing database")
    con = connect(path, read_only=True, memory_limit=wh.memory_limit)
    tables = {t for (t,) in con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main'").fetchall()}
    missing = [t for t in REQUIRED_TABLES if t not in tables]
    if missing:
        con.close()
        raise WarehouseError(f"{path} is not a runs-etl warehouse (no {', '.join(missing)} "
                             "table): run `runs-etl sync` first")
    try:
        check_readable(con, path)
        if views and not con.execute("SELECT count(*) FROM duckdb_views() WHERE NOT internal "
                                     "AND schema_name = 'main'").fetchall()[0][0]:
            raise WarehouseError(f"{path} holds no committed sync yet (`runs-etl status` shows "
                                 "the attempts): run `runs-etl sync` first")
    except WarehouseError:
        con.close()
        raise
    return con
