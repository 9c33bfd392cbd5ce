"""The report's charts: inline SVG drawn from rows of the views, tooltips as SVG ``<title>``.

Each chart function takes plain rows (dicts from the views) and returns one ``<figure>``; no
script, no font, no URL. ``report.py`` collects the rows and lays out the page.
"""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import UTC, date, datetime
from html import escape

from .status import human_age

W, H = 920, 280  # chart size in SVG units (scaled by CSS to the page width)
PARTIAL_NOTE = "today, partial"
ML, MR, MT, MB = 56, 12, 16, 46  # margins: left, right, top, bottom
STATUS_COLORS = {"completed": "#2e7d32", "failed": "#c62828", "stopped": "#f9a825",
                 "running": "#1565c0", "queued": "#7b1fa2", "awaiting_human_feedback": "#00838f"}
PALETTE = ("#5d4037", "#455a64", "#ad1457", "#558b2f", "#ef6c00", "#283593", "#6d4c41")
DURATION_TICKS = ((0.1, "100 ms"), (1, "1 s"), (10, "10 s"), (60, "1 min"), (600, "10 min"),
                  (3600, "1 h"), (6 * 3600, "6 h"), (86400, "1 d"), (7 * 86400, "7 d"),
                  (30 * 86400, "30 d"), (365 * 86400, "1 y"))
PERCENTILE_ROWS = 20  # the most-run workflows get a row in the percentile chart


def duration(s: float | None) -> str:
    """A duration for an axis or a cell: ``850 ms``, ``42 s``, ``12 min``, ``3.5 h``, ``2.1 d``."""
    return "–" if s is None else f"{s * 1000:.0f} ms" if s < 1 else human_age(s)


def workflow_label(w: dict) -> str:
    """A workflow row's name, else its id."""
    return w["workflow_name"] or w["workflow_id"] or "unknown workflow"


# --- drawing -----------------------------------------------------------------------------------

def _linear(d0: float, d1: float, r0: float, r1: float):
    """Map the domain [d0, d1] onto the range [r0, r1] (SVG units)."""
    k = (r1 - r0) / ((d1 - d0) or 1)
    return lambda v: r0 + (v - d0) * k


def _nice_ticks(top: float, n: int = 5) -> list[float]:
    """0 and round steps (1, 2, 5 x 10^k) up to at least ``top``."""
    if top <= 0:
        return [0, 1]
    raw = top / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    return [i * step for i in range(int(math.ceil(top / step)) + 1)]


def _svg(chart_id: str, title: str, body: str, caption: str, height: int = H) -> str:
    return (f'<figure><svg id="{chart_id}" role="img" aria-labelledby="{chart_id}-title" '
            f'viewBox="0 0 {W} {height}"><title id="{chart_id}-title">{escape(title)}</title>'
            + (body or f'<text x="{W / 2}" y="{height / 2}" text-anchor="middle">no data'
                       " yet</text>")
            + f"</svg><figcaption>{escape(caption)}</figcaption></figure>")


def _y_axis(ticks: list[float], y, label) -> str:
    return "".join(f'<line class="grid" x1="{ML}" x2="{W - MR}" y1="{y(t):.1f}" y2="{y(t):.1f}"/>'
                   f'<text x="{ML - 6}" y="{y(t) + 4:.1f}" text-anchor="end">{label(t)}</text>'
                   for t in ticks)


def _x_days(days: list[date], x, width: float) -> str:
    every = max(1, len(days) // 10)
    return "".join(f'<text x="{x(i) + width / 2:.1f}" y="{H - MB + 16}" text-anchor="middle">'
                   f'{d.strftime("%m-%d")}</text>' for i, d in enumerate(days) if i % every == 0)


def _legend(names: list[str], colors: dict[str, str], y: float = H - 12) -> str:
    out, xpos = [], ML
    for name in names:
        out.append(f'<rect x="{xpos}" y="{y - 9}" width="10" height="10" fill="{colors[name]}"/>'
                   f'<text x="{xpos + 14}" y="{y}">{escape(name)}</text>')
        xpos += 24 + 7 * len(name)
    return "".join(out)


def _colors(names) -> dict[str, str]:
    others = iter(PALETTE * 10)
    return {n: STATUS_COLORS.get(n) or next(others) for n in names}


def _partial(days: list[date], generated_at: datetime) -> bool:
    """Is the last day shown today (UTC), still filling up as the report is made?"""
    return bool(days) and days[-1] == generated_at.astimezone(UTC).date()


def _partial_label(x: float, y: float) -> str:
    return (f'<text class="partial-label" x="{x:.1f}" y="{y:.1f}" text-anchor="end">'
            f"{PARTIAL_NOTE}</text>")


def _log_axis(lo: float, hi: float, left: float, height: float):
    """A log-scale duration axis covering [lo, hi] from ``left``: (x, its grid and labels).
    ``x`` puts anything below the first tick on it (a zero wait, say)."""
    first = max([i for i, (t, _) in enumerate(DURATION_TICKS) if t <= lo] or [0])
    last = min([i for i, (t, _) in enumerate(DURATION_TICKS) if t >= hi] or [-1])
    end = len(DURATION_TICKS) if last == -1 else max(last + 1, first + 2)
    ticks = DURATION_TICKS[first:end]
    log_x = _linear(math.log10(ticks[0][0]), math.log10(ticks[-1][0]), left, W - MR - 20)

    def x(v: float) -> float:
        return log_x(math.log10(max(v, ticks[0][0])))

    grid = "".join(f'<line class="grid" x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{MT}" '
                   f'y2="{height - MB}"/><text x="{x(t):.1f}" y="{height - MB + 16}" '
                   f'text-anchor="middle">{label}</text>' for t, label in ticks)
    return x, grid


# --- charts ------------------------------------------------------------------------------------

def chart_runs_per_day(status_daily: list[dict], generated_at: datetime, days_shown: int) -> str:
    """Stacked bars of ``status_daily`` rows (created_date, status, runs), today drawn apart."""
    days = sorted({r["created_date"] for r in status_daily})
    cap = f"Runs created per UTC day, stacked by current status (last {days_shown} days with data)."
    if not days:
        return _svg("chart-runs-per-day", "Runs per day by status", "", cap)
    per_day: dict = defaultdict(dict)
    for r in status_daily:
        per_day[r["created_date"]][r["status"]] = r["runs"]
    known = list(STATUS_COLORS)
    statuses = sorted({r["status"] for r in status_daily},
                      key=lambda s: (known.index(s) if s in known else len(known), s))
    colors = _colors(statuses)
    ticks = _nice_ticks(max(sum(v.values()) for v in per_day.values()))
    y, x = _linear(0, ticks[-1], H - MB, MT), _linear(0, len(days), ML, W - MR)
    bw = (W - ML - MR) / len(days)
    partial = _partial(days, generated_at)
    parts = [_y_axis(ticks, y, lambda t: f"{t:,.0f}")]
    for i, day in enumerate(days):
        base = 0
        # Today's bar is still growing: lighter, outlined dashed, and labelled as such.
        look = ' class="partial" fill-opacity="0.4" stroke-dasharray="3 2"' \
            if partial and i == len(days) - 1 else ""
        note = f" ({PARTIAL_NOTE})" if look else ""
        for s in statuses:
            n = per_day[day].get(s, 0)
            if n:
                parts.append(f'<rect x="{x(i) + bw * 0.1:.1f}" y="{y(base + n):.1f}" '
                             f'width="{bw * 0.8:.1f}" height="{y(base) - y(base + n):.1f}" '
                             f'fill="{colors[s]}" stroke="{colors[s]}"{look}><title>{day} '
                             f"{escape(s)}: {n:,}{note}</title></rect>")
            base += n
    if partial:
        cap += f" The last day is today ({PARTIAL_NOTE}): drawn lighter."
        parts.append(_partial_label(W - MR, MT - 4))
    parts += [_x_days(days, x, bw), _legend(statuses, colors)]
    return _svg("chart-runs-per-day", "Runs per day by status", "".join(parts), cap)


def chart_failure_rate(failure_daily: list[dict], generated_at: datetime) -> str:
    """Lines of failed / finished per day from ``failure_rate_daily`` rows: all and per type."""
    cap = ("Failed / finished runs per UTC creation day: all workflows (thick) and per "
           "workflow type.")
    days = sorted({r["created_date"] for r in failure_daily})
    if not days:
        return _svg("chart-failure-rate", "Failure rate over time", "", cap)
    sums: dict = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for r in failure_daily:
        for key in ("all", r["workflow_type"] or "unknown"):
            sums[key][r["created_date"]][0] += r["failed"]
            sums[key][r["created_date"]][1] += r["finished"]
    names = ["all"] + sorted(k for k in sums if k != "all")
    colors = _colors(names) | {"all": "#212121"}
    top = max(f / n for s in sums.values() for f, n in s.values())
    ticks = _nice_ticks(max(top, 0.01))
    y, x = _linear(0, ticks[-1], H - MB, MT), _linear(0, len(days), ML, W - MR)
    step = (W - ML - MR) / len(days)
    parts = [_y_axis(ticks, y, lambda t: f"{t:.0%}" if ticks[-1] >= 0.05 else f"{t:.1%}")]
    today = days[-1] if _partial(days, generated_at) else None
    for name in names:
        pts = [(x(i) + step / 2, y(sums[name][day][0] / sums[name][day][1]), day)
               for i, day in enumerate(days) if sums[name][day][1]]
        # Today's rate rests on the runs finished so far: its segment is dashed.
        whole = [p for p in pts if p[2] != today]
        width = 2.5 if name == "all" else 1.2
        stroke = f'fill="none" stroke="{colors[name]}" stroke-width="{width}"'
        path = " ".join(f"{px:.1f},{py:.1f}" for px, py, _ in whole)
        parts.append(f'<polyline points="{path}" {stroke}><title>{escape(name)}</title>'
                     "</polyline>")
        if pts and pts[-1][2] == today:
            tail = " ".join(f"{px:.1f},{py:.1f}" for px, py, _ in pts[-2:])
            parts.append(f'<polyline class="partial" points="{tail}" {stroke} '
                         f'stroke-dasharray="5 4"><title>{escape(name)} ({PARTIAL_NOTE})'
                         "</title></polyline>")
        if name == "all":
            parts += [f'<circle cx="{px:.1f}" cy="{py:.1f}" r="2.5" fill="'
                      f'{"#fff" if day == today else colors[name]}" stroke="{colors[name]}">'
                      f"<title>{day}: {sums[name][day][0]:,} failed of "
                      f"{sums[name][day][1]:,} finished"
                      f"{f' ({PARTIAL_NOTE})' if day == today else ''}</title></circle>"
                      for px, py, day in pts]
    if today is not None:
        cap += f" The last day is today ({PARTIAL_NOTE}): its segment is dashed."
        parts.append(_partial_label(W - MR, MT - 4))
    parts += [_x_days(days, x, step), _legend(names, colors)]
    return _svg("chart-failure-rate", "Failure rate over time", "".join(parts), cap)


def chart_duration_percentiles(workflows: list[dict]) -> str:
    """Log-scale p50..p99 bars per workflow of ``workflow_duration_stats`` (most-run first)."""
    rows = [w for w in workflows if w["p50_seconds"] is not None][:PERCENTILE_ROWS]
    height = MT + MB + 22 * max(len(rows), 3)
    cap = (f"Duration of finished runs per workflow ({len(rows)} most-run), log scale: bar from "
           "p50 to p99, ticks at p90 and p95, dot at the maximum.")
    if not rows:
        return _svg("chart-duration-percentiles", "Duration percentiles per workflow", "", cap,
                    height)
    left = 230
    x, axis = _log_axis(min(w["p50_seconds"] for w in rows), max(w["max_seconds"] for w in rows),
                        left, height)
    parts = [axis]
    for i, w in enumerate(rows):
        yy = MT + 22 * i + 11
        name = workflow_label(w)
        tip = escape(f"{name}: p50 {duration(w['p50_seconds'])}, p90 {duration(w['p90_seconds'])}, "
                     f"p95 {duration(w['p95_seconds'])}, p99 {duration(w['p99_seconds'])}, "
                     f"max {duration(w['max_seconds'])} ({w['finished']:,} finished)")
        parts.append(
            f'<g><title>{tip}</title><text x="{left - 8}" y="{yy + 4}" text-anchor="end">'
            f'{escape(name[:34])}</text><rect x="{x(w["p50_seconds"]):.1f}" y="{yy - 6}" '
            f'width="{max(x(w["p99_seconds"]) - x(w["p50_seconds"]), 1.5):.1f}" height="12" '
            f'fill="#90caf9"/>' + "".join(
                f'<line x1="{x(w[k]):.1f}" x2="{x(w[k]):.1f}" y1="{yy - 7}" y2="{yy + 7}" '
                f'stroke="#0d47a1" stroke-width="2"/>' for k in ("p90_seconds", "p95_seconds"))
            + f'<circle cx="{x(w["max_seconds"]):.1f}" cy="{yy}" r="3" fill="#c62828"/></g>')
    return _svg("chart-duration-percentiles", "Duration percentiles per workflow",
                "".join(parts), cap, height)


def chart_hbars(chart_id: str, title: str, items: list[tuple[str, float, str]],
                caption: str, color: str) -> str:
    """Horizontal bars: (label, value, text shown at the end of the bar)."""
    height = MT + 10 + 22 * max(len(items), 3)
    if not items:
        return _svg(chart_id, title, "", caption, height)
    left, top = 230, max(v for _, v, _ in items) or 1
    scale = (W - left - MR - 90) / top
    parts = []
    for i, (label, value, text) in enumerate(items):
        yy = MT + 22 * i
        parts.append(f'<g><title>{escape(f"{label}: {text}")}</title>'
                     f'<text x="{left - 8}" y="{yy + 15}" text-anchor="end">'
                     f'{escape(label[:34])}</text><rect x="{left}" y="{yy + 4}" '
                     f'width="{max(value * scale, 1):.1f}" height="14" fill="{color}"/>'
                     f'<text x="{left + value * scale + 6:.1f}" y="{yy + 15}">{escape(text)}'
                     "</text></g>")
    return _svg(chart_id, title, "".join(parts), caption, height)



WAIT_STATUSES = ("queued", "awaiting_human_feedback")
WAIT_LABELS = {"queued": "queued", "awaiting_human_feedback": "awaiting feedback"}


def chart_status_time(rows: list[dict]) -> str:
    """Time in ``queued`` / ``awaiting_human_feedback`` per workflow, as observed bounds.

    ``rows``: one per workflow and status, in the order drawn, with ``runs`` (runs that left the
    status), ``ongoing`` (still in it) and ``p50_lower``, ``p50_upper``, ``p90_lower``,
    ``p90_upper`` (seconds; NULL when no run left it yet).
    """
    chart_id, title = "chart-status-time", "Time in queued and awaiting feedback per workflow"
    height = MT + MB + 22 * max(len(rows), 3)
    cap = ("Time runs spent queued or awaiting human feedback, per workflow (the most-observed), "
           "log scale. A sync sees only the present, so each run's time is known between a lower "
           "and an upper bound: the thick bar spans the median of the lower bounds to the median "
           "of the upper ones (the true median lies in it), the thin bar under it the same for "
           "p90. Runs "
           "still in the status are counted in the tooltip, not in the bars.")
    drawn = [r for r in rows if r["runs"]]
    if not rows:
        return _svg(chart_id, title, "", cap, height)
    left = 260
    lo = min([r["p50_lower"] for r in drawn if r["p50_lower"]] or [DURATION_TICKS[0][0]])
    hi = max([r["p90_upper"] for r in drawn] or [lo])
    x, axis = _log_axis(lo, hi, left, height)
    colors = _colors(list(WAIT_STATUSES))
    parts = [axis]
    for i, r in enumerate(rows):
        yy = MT + 22 * i + 11
        name, status = workflow_label(r), r["status"]
        label = f"{name[:30]} · {WAIT_LABELS.get(status, status)}"
        still = f", {r['ongoing']:,} still {WAIT_LABELS.get(status, status)}" \
            if r["ongoing"] else ""
        if r["runs"]:
            tip = (f"{name}, {status}: median between {duration(r['p50_lower'])} and "
                   f"{duration(r['p50_upper'])}, p90 between {duration(r['p90_lower'])} and "
                   f"{duration(r['p90_upper'])} ({r['runs']:,} "
                   f"{'run' if r['runs'] == 1 else 'runs'} left it{still})")
            # The median's bar, and under it a thin one for p90: apart, so neither hides.
            bars = "".join(
                f'<rect class="{q}" x="{x(r[f"{q}_lower"]):.1f}" y="{yy + top}" '
                f'width="{max(x(r[f"{q}_upper"]) - x(r[f"{q}_lower"]), 1.5):.1f}" '
                f'height="{h}" fill="{colors[status]}" fill-opacity="{o}"/>'
                for q, top, h, o in (("p50", -7, 10, 1), ("p90", 5, 3, 0.6)))
        else:
            tip = f"{name}, {status}: no run has left it yet{still}"
            bars = f'<text x="{left + 4}" y="{yy + 4}">none left yet{escape(still)}</text>'
        parts.append(f'<g><title>{escape(tip)}</title><text x="{left - 8}" y="{yy + 4}" '
                     f'text-anchor="end">{escape(label)}</text>{bars}</g>')
    parts.append(_legend(list(WAIT_STATUSES), colors, height - 12))
    return _svg(chart_id, title, "".join(parts), cap, height)
