"""The progress bar a person watches while a sync walks the API."""

from __future__ import annotations

import io

from rich.console import Console

from runs_etl.ops.console import BarProgress


def test_the_bar_labels_its_elapsed_and_remaining_times():
    bar = BarProgress(io.StringIO())
    bar.start_pass(1, 40)
    bar.advance(10, 1000)
    out = io.StringIO()
    Console(file=out, width=200).print(bar.bar.make_tasks_table(bar.bar.tasks))
    line = out.getvalue().strip()
    assert "walking runs" in line and "10/40" in line
    elapsed, left = line.index("elapsed"), line.index("left")
    assert elapsed < left  # "0:00:00 elapsed · 0:00:01 left"
