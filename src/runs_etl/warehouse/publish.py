"""Readers never wait: the writer works on a private file and publishes read-only snapshots.

The sync holds ``.runs.duckdb.work`` (hidden, beside the database) for as long as it likes; after
every sync it publishes the warehouse at the path users know, ``runs.duckdb``, by copying the
checkpointed working file to a temporary name and renaming it into place. The rename is atomic:
a reader that is open keeps the snapshot it opened (its inode), a new connection gets the newest,
and nobody ever sees a partial sync. Neither side waits for the other, because they never share
a file.

Published files are read-only (mode 0444) and written in a storage format DuckDB 1.x reads
(``warehouse.storage_compatibility``). A read-write connection on a published file (root ignores
the mode) that writes leaves ``runs.duckdb.wal`` by path, which would break every later reader of
the next snapshot ("WAL does not match database file"): publishing removes such a stale WAL, which
belongs to no published file.

A working file is built whole before it is used: from the published snapshot when there is one
(so an existing warehouse, or one whose working file was lost, migrates with its history), into a
temporary file that is renamed into place only once complete.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb

from ..config import WarehouseSettings
from ..errors import LockedError, WarehouseError, first_line
from .connect import connect, sql_string

log = logging.getLogger("runs_etl.publish")

WORK_SUFFIX = ".work"
WAIT_POLL_SECONDS = 0.2
READ_ONLY_MODE = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH  # 0444


def working_path(db_path: Path | str) -> Path:
    """The writer's private file: ``.runs.duckdb.work`` beside ``runs.duckdb``."""
    db_path = Path(db_path)
    return db_path.with_name(f".{db_path.name}{WORK_SUFFIX}")


def is_in_memory(db_path: Path | str) -> bool:
    return str(db_path).startswith(":memory:")


def open_working(wh: WarehouseSettings, wait: float = 0.0):
    """The writer's read-write connection. Creates the working file on first use: empty, or a
    copy of the published warehouse (a warehouse written by an earlier version migrates here).

    Only a process that opened the private file itself can hold it; if one does, wait up to
    ``wait`` seconds for it to let go, then LockedError."""
    if is_in_memory(wh.duckdb_path):
        return connect(wh.duckdb_path, memory_limit=wh.memory_limit)
    work = working_path(wh.duckdb_path)
    _remove_leftovers(Path(wh.duckdb_path))
    deadline = time.monotonic() + wait
    announced = False
    while True:
        try:
            if not work.exists():
                _create_working(wh, work)
            return connect(work, memory_limit=wh.memory_limit)
        except LockedError as e:
            if time.monotonic() >= deadline:
                raise LockedError(f"{e}; the sync writes this file alone: close whatever "
                                  "opened it (readers should open "
                                  f"{wh.duckdb_path})") from None
            if not announced:
                log.info("waiting up to %gs: %s", wait, e, extra={"event": "lock_wait"})
                announced = True
            time.sleep(WAIT_POLL_SECONDS)


def _remove_leftovers(published: Path) -> None:
    """Temporary files of a writer that was killed mid-publish or mid-takeover (the caller
    holds the writer lock, so no live writer owns them)."""
    folder, name = published.parent, glob.escape(published.name)
    for pattern in (f".{name}.publish-*", f".{name}{WORK_SUFFIX}.new-*"):
        for leftover in folder.glob(pattern):
            with contextlib.suppress(OSError):
                leftover.unlink()


@contextlib.contextmanager
def new_database(wh: WarehouseSettings, target: Path, tmp: Path) -> Iterator:
    """A connection to a new DuckDB file at ``tmp`` (in the warehouse's storage version) that
    is renamed to ``target`` when the block ends, or removed with its WAL when it fails."""
    remove_db_files(tmp)  # a killed process's
    con = connect(tmp, memory_limit=wh.memory_limit,
                  storage_compatibility=wh.storage_compatibility)
    try:
        yield con
    except BaseException:
        con.close()
        remove_db_files(tmp)
        raise
    con.close()
    os.replace(tmp, target)


def _create_working(wh: WarehouseSettings, work: Path) -> None:
    published = Path(wh.duckdb_path)
    with new_database(wh, work, work.with_name(f"{work.name}.new-{os.getpid()}")) as con:
        if published.exists():
            t0 = time.perf_counter()
            (name,) = con.execute("SELECT current_database()").fetchall()[0]
            try:
                con.execute(f"ATTACH {sql_string(str(published))} AS published (READ_ONLY)")
                con.execute(f'COPY FROM DATABASE published TO "{name}"')
                con.execute("DETACH published")
            except duckdb.Error as e:
                raise WarehouseError(
                    f"cannot read the existing warehouse {published} to take it over: "
                    f"{first_line(e)}. Move it away to start afresh, or restore it") from None
            log.info("took over the warehouse %s (%.1fs); the sync now writes %s and publishes "
                     "read-only snapshots to %s", published, time.perf_counter() - t0, work,
                     published, extra={"event": "warehouse_taken_over"})
        con.execute("CHECKPOINT")


def publish(con, wh: WarehouseSettings) -> float:
    """Publish the working database (``con``, no transaction open) at ``wh.duckdb_path``;
    returns the seconds it took. A failure leaves the previous snapshot in place."""
    published = Path(wh.duckdb_path)
    if is_in_memory(published):
        return 0.0
    t0 = time.perf_counter()
    (source,) = con.execute("SELECT path FROM duckdb_databases() "
                            "WHERE database_name = current_database()").fetchall()[0]
    tmp = published.with_name(f".{published.name}.publish-{os.getpid()}")
    try:
        con.execute("CHECKPOINT")  # everything in the file, nothing pending in its WAL
        shutil.copyfile(source, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, READ_ONLY_MODE)
        _remove_stale_wal(published)
        os.replace(tmp, published)
        _fsync_dir(published.parent)
    except (OSError, duckdb.Error) as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        detail = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
        raise WarehouseError(f"cannot publish the warehouse snapshot {published}: {detail}. "
                             "Readers keep the previous snapshot; the next sync publishes "
                             "again") from None
    return time.perf_counter() - t0


def _remove_stale_wal(published: Path) -> None:
    """A WAL at the published path was written by a reader that opened a snapshot read-write:
    it matches no file we publish and would make every new connection fail."""
    wal = published.with_name(published.name + ".wal")
    if wal.exists():
        log.warning("removing %s: a reader opened the published snapshot read-write and wrote "
                    "to it (open it with read_only=True / duckdb -readonly)", wal,
                    extra={"event": "stale_wal_removed"})
        with contextlib.suppress(FileNotFoundError):
            wal.unlink()


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_db_files(path: Path) -> None:
    """A DuckDB file and its WAL, if there."""
    for p in (path, path.with_name(path.name + ".wal")):
        p.unlink(missing_ok=True)


def remove_warehouse(db_path: Path | str) -> None:
    """Delete a warehouse and everything runs-etl keeps beside it (the demo starts afresh)."""
    db_path = Path(db_path)
    work = working_path(db_path)
    for p in (db_path, work):
        remove_db_files(p)
    for folder in (work.with_name(work.name + ".staging"),
                   db_path.with_name(db_path.name + ".staging")):
        shutil.rmtree(folder, ignore_errors=True)
