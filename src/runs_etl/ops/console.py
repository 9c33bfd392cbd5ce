"""What a person sees on a terminal: a live progress bar while a sync walks the API."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, TextIO

from ..engine.walk import NullProgress

if TYPE_CHECKING:
    from rich.progress import TaskID


class BarProgress:
    """Rich progress bar: pages done / total, rows/s, ETA. Use as a context manager."""

    def __init__(self, stream: TextIO | None = None):
        # Imported here: a sync under cron (no terminal) never shows a bar, nor pays for rich.
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = Console(file=stream or sys.stderr)
        self.bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("pages · {task.fields[rows]:,} runs · {task.fields[rate]:,.0f} runs/s"),
            # Two bare clocks side by side read as one; say which is which.
            TimeElapsedColumn(), TextColumn("elapsed ·"), TimeRemainingColumn(),
            TextColumn("left"), console=self.console, transient=True,
        )
        self.task: TaskID | None = None
        self.rows = 0
        self.t0 = time.perf_counter()

    def __enter__(self) -> BarProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def start_pass(self, number: int, pages: int | None) -> None:
        label = "walking runs" if number == 1 else f"re-walk {number} (source moved)"
        if self.task is not None:
            self.bar.remove_task(self.task)
        self.task = self.bar.add_task(label, total=pages, rows=self.rows, rate=0.0)

    def advance(self, pages: int, rows: int) -> None:
        self.rows += rows
        if self.task is None:
            return
        rate = self.rows / max(time.perf_counter() - self.t0, 1e-6)
        self.bar.update(self.task, advance=pages, rows=self.rows, rate=rate)
        task = next(t for t in self.bar.tasks if t.id == self.task)
        if task.total is not None and task.completed > task.total:  # the source grew
            self.bar.update(self.task, total=task.completed)


def make_progress(*, quiet: bool, stream: TextIO | None = None) -> BarProgress | NullProgress:
    """A bar on a terminal; nothing when quiet or when stderr is a pipe, a file or cron mail."""
    stream = stream or sys.stderr
    if quiet or not stream.isatty():
        return NullProgress()
    return BarProgress(stream)
