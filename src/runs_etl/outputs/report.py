"""``runs-etl report``: one self-contained HTML file with charts, read through the SQL views.

Everything is inline (CSS, SVG drawn by ``charts.py``, tooltips as SVG ``<title>``): no script,
no font, no CDN, so the file opens offline and can be mailed or attached to a ticket as is. With
several workspaces the page shows them all together, then a section per workspace, linked from
a table at the top (plain anchors: still no script).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html import escape
from pathlib import Path

from ..config import Settings
from ..errors import RunsEtlError, WarehouseError
from ..warehouse.connect import open_read_only
from .charts import (
    chart_duration_percentiles,
    chart_failure_rate,
    chart_hbars,
    chart_runs_per_day,
    chart_status_time,
    duration,
    workflow_label,
)
from .status import human_age

DEFAULT_NAME = "report.html"
DAYS_SHOWN = 90  # daily charts show the last 90 days that have runs
TOP_N = 10
MIN_FINISHED = 5  # below this, a failure rate says little: left out of "most failing"
STUCK_ROWS, SYNC_ROWS = 25, 10  # rows of the stuck-runs and last-syncs tables
# Narrower than this (a phone), a chart scrolls sideways instead of shrinking its 11 px text
# below ~9 px.
MIN_CHART_PX = 760
REQUIRED_VIEWS = ("run_facts", "status_daily", "workflow_duration_stats", "failure_rate_daily",
                  "open_runs", "sync_health", "sync_history")
CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;
max-width:980px;padding:16px 20px 48px;color:#212121;background:#fafafa}
h1{font-size:22px;margin:8px 0 2px}h2{font-size:17px;margin:28px 0 6px;border-bottom:1px solid
#ddd;padding-bottom:3px}.muted{color:#666}.cards{display:flex;flex-wrap:wrap;gap:10px;margin:14px 0}
.card{background:#fff;border:1px solid #e0e0e0;border-radius:6px;padding:8px 14px;min-width:120px}
.card b{display:block;font-size:20px}.bad b{color:#c62828}figure{margin:8px 0;background:#fff;
border:1px solid #e0e0e0;border-radius:6px;padding:6px;overflow-x:auto}
svg{width:100%;height:auto;display:block;min-width:%MINpx}.scroll{overflow-x:auto}
figcaption{font-size:12px;color:#666;padding:2px 6px}table{border-collapse:collapse;width:100%;
background:#fff;font-size:13px;margin:6px 0}th,td{border-bottom:1px solid #eee;padding:3px 8px;
text-align:left}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
svg text{font:11px system-ui,sans-serif;fill:#444}.grid{stroke:#eee}
""".replace("%MIN", str(MIN_CHART_PX))


@dataclass
class ReportData:
    """Everything the page shows, fetched from the views in one go."""

    generated_at: datetime
    stuck_after: float
    totals: dict = field(default_factory=dict)
    status_daily: list = field(default_factory=list)
    failure_daily: list = field(default_factory=list)
    workflows: list = field(default_factory=list)
    open_by_status: list = field(default_factory=list)
    stuck: list = field(default_factory=list)
    stuck_count: int = 0
    health: dict = field(default_factory=dict)
    syncs: list = field(default_factory=list)
    has_history: bool = False  # run_history has rows: the time-in-status chart is shown
    status_time: list = field(default_factory=list)


def _dicts(con, sql: str, params=None) -> list[dict]:
    cur = con.execute(sql, params or [])
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]


# sync_health has a row per workspace: together they read as one (the stalest freshness, since
# that is what needs attention; counts summed). One workspace reads as its own row.
HEALTH = """SELECT max(last_success_sync_id) AS last_success_sync_id,
    max(last_success_at) AS last_success_at,
    CASE WHEN count(*) = count(freshness_seconds) THEN max(freshness_seconds) END
        AS freshness_seconds,
    coalesce(sum(syncs), 0) AS syncs, coalesce(sum(successes), 0) AS successes,
    coalesce(sum(failures), 0) AS failures, coalesce(sum(abandoned), 0) AS abandoned,
    coalesce(sum(failures_since_success), 0) AS failures_since_success
    FROM sync_health"""


def workspaces(con) -> list[str]:
    """The workspaces with runs or syncs, by name."""
    return [w for (w,) in con.execute("SELECT workspace FROM run_facts UNION "
                                      "SELECT workspace FROM sync_history ORDER BY 1").fetchall()]


def collect(con, stuck_after_seconds: float, workspace: str | None = None) -> ReportData:
    """Query the views (``workspace``'s rows only, if given); a warehouse that has never
    finished a sync has none: WarehouseError."""
    have = {v for (v,) in con.execute("SELECT view_name FROM duckdb_views()").fetchall()}
    missing = [v for v in REQUIRED_VIEWS if v not in have]
    if missing:
        raise WarehouseError(f"the warehouse has no {', '.join(missing)} view(s) yet: run "
                             "`runs-etl sync` once (every sync creates the views)")
    d = ReportData(generated_at=datetime.now(UTC), stuck_after=stuck_after_seconds)
    # ``ws``: the workspace filter of every query (``true``: every workspace).
    ws, p = ("workspace = ?", [workspace]) if workspace is not None else ("true", [])
    (d.totals,) = _dicts(con, f"""SELECT count(*) AS runs,
        count(*) FILTER (is_terminal) AS finished, count(*) FILTER (status = 'failed') AS failed,
        count(*) FILTER (NOT is_terminal) AS open FROM run_facts WHERE {ws}""", p)
    recent = (f"{ws} AND created_date > (SELECT max(created_date) FROM run_facts WHERE {ws}) "
              f"- {DAYS_SHOWN}")
    by = "workspace, " if workspace is None else ""  # all together: sum the workspaces' rows
    d.status_daily = _dicts(con, f"SELECT created_date, status, sum(runs) AS runs "
                                 f"FROM status_daily WHERE {recent} GROUP BY ALL ORDER BY 1, 2",
                            p + p)
    d.failure_daily = _dicts(con, f"SELECT * FROM failure_rate_daily WHERE {recent} "
                                  "ORDER BY created_date", p + p)
    d.workflows = _dicts(con, f"SELECT * FROM workflow_duration_stats WHERE {ws} "
                              f"ORDER BY runs DESC, {by}workflow_id", p)
    d.open_by_status = _dicts(con, "SELECT status, count(*) AS runs, max(age_seconds) AS oldest "
                                   f"FROM open_runs WHERE {ws} GROUP BY status "
                                   "ORDER BY runs DESC", p)
    stuck = f"FROM open_runs WHERE {ws} AND age_seconds > ?"
    (d.stuck_count,) = con.execute(f"SELECT count(*) {stuck}",
                                   [*p, stuck_after_seconds]).fetchall()[0]
    d.stuck = _dicts(con, f"SELECT * {stuck} ORDER BY age_seconds DESC LIMIT {STUCK_ROWS}",
                     [*p, stuck_after_seconds])
    (d.health,) = _dicts(con, f"{HEALTH} WHERE {ws}", p)
    d.syncs = _dicts(con, f"SELECT * FROM sync_history WHERE {ws} "
                          f"ORDER BY sync_id DESC LIMIT {SYNC_ROWS}", p)
    # time_in_status came with run_history: a warehouse last synced before it has neither.
    if "time_in_status" in have:
        (d.has_history,) = con.execute(f"SELECT EXISTS (FROM run_history WHERE {ws})",
                                       p).fetchall()[0]
        d.status_time = _status_time(_dicts(con, STATUS_TIME.format(ws=ws), p))
    return d


# Per workspace, workflow and waiting status: the median and p90 of the runs' lower and upper
# bounds. Bounds are monotone, so the true quantile lies between those of the bounds.
STATUS_TIME = """SELECT t.workspace, t.workflow_id, any_value(f.name) AS workflow_name, t.status,
    count(*) FILTER (NOT t.ongoing) AS runs, count(*) FILTER (t.ongoing) AS ongoing,
    quantile_cont(t.lower_seconds, 0.5) FILTER (NOT t.ongoing) AS p50_lower,
    quantile_cont(t.upper_seconds, 0.5) FILTER (NOT t.ongoing) AS p50_upper,
    quantile_cont(t.lower_seconds, 0.9) FILTER (NOT t.ongoing) AS p90_lower,
    quantile_cont(t.upper_seconds, 0.9) FILTER (NOT t.ongoing) AS p90_upper
    FROM (SELECT * FROM time_in_status WHERE {ws}) AS t
    LEFT JOIN workflows AS f ON f.workspace = t.workspace AND f.id = t.workflow_id
    WHERE t.status IN ('queued', 'awaiting_human_feedback')
    GROUP BY t.workspace, t.workflow_id, t.status"""


def _status_time(rows: list[dict]) -> list[dict]:
    """The rows of the TOP_N workflows with the most runs observed waiting, most first; per
    workflow queued before awaiting_human_feedback."""
    seen: dict[tuple, int] = {}
    for r in rows:
        key = (r["workspace"], r["workflow_id"])
        seen[key] = seen.get(key, 0) + r["runs"] + r["ongoing"]
    top = sorted(seen, key=lambda k: (-seen[k], str(k)))[:TOP_N]
    rank = {k: i for i, k in enumerate(top)}
    kept = [r for r in rows if (r["workspace"], r["workflow_id"]) in rank]
    return sorted(kept, key=lambda r: (rank[r["workspace"], r["workflow_id"]],
                                       r["status"] != "queued"))


# --- formatting --------------------------------------------------------------------------------

def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.1%}"


def _failure_rate(totals: dict) -> str:
    """Failed among finished runs; ``–`` while none has finished."""
    return _pct(totals["failed"] / totals["finished"] if totals["finished"] else None)


def _ago(seconds: float | None) -> str:
    return "never" if seconds is None else f"{human_age(seconds)} ago"


def _ts(t: datetime | None) -> str:
    return "–" if t is None else t.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _e(x) -> str:
    """A cell or inline value: escaped, ``–`` for NULL, thousands separators for counts."""
    if x is None:
        return "–"
    return escape(f"{x:,}" if isinstance(x, int) and not isinstance(x, bool) else str(x))


def _table(headers: list[str], rows: list[list], numeric: AbstractSet[int] = frozenset()) -> str:
    head = "".join(f'<th{" class=n" if i in numeric else ""}>{_e(h)}</th>'
                   for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f'<td{" class=n" if i in numeric else ""}>{_e(c)}</td>'
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    if not rows:
        body = f'<tr><td colspan="{len(headers)}" class="muted">none</td></tr>'
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
            "</table></div>")


# --- page ----------------------------------------------------------------------------------

def render(d: ReportData, source: str = "") -> str:
    """The whole HTML page as a string."""
    return "\n".join([*_head(d, source), *_dashboard(d), "</body></html>\n"])


def _head(d: ReportData, source: str, css: str = "") -> list[str]:
    h = d.health
    return [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Noxus runs report</title><style>{CSS}{css}</style></head><body>",
        "<h1>Noxus runs report</h1>",
        f'<p class="muted">Generated {_ts(d.generated_at)} from {_e(source)}; data as of sync '
        f'#{_e(h["last_success_sync_id"])} ({_ts(h["last_success_at"])}). All times UTC.</p>']


def _dashboard(d: ReportData) -> list[str]:
    """Cards, charts and tables of one ``ReportData``: the page of one workspace."""
    t, h, fresh = d.totals, d.health, d.health["freshness_seconds"]
    ago = _ago(fresh)
    cards = [("live runs", t["runs"], False), ("open runs", t["open"], False),
             ("failure rate", _failure_rate(t), False),
             (f"stuck (open > {duration(d.stuck_after)})", d.stuck_count, d.stuck_count > 0),
             ("last successful sync", ago, fresh is None or h["failures_since_success"] > 0)]
    slow = sorted((w for w in d.workflows if w["p95_seconds"] is not None),
                  key=lambda w: -w["p95_seconds"])[:TOP_N]
    failing = sorted((w for w in d.workflows if w["finished"] >= MIN_FINISHED and w["failed"]),
                     key=lambda w: (-w["failure_rate"], -w["failed"]))[:TOP_N]
    wf_rows = [[workflow_label(w), w["workflow_type"], w["runs"], w["finished"],
                _pct(w["failure_rate"])]
               + [duration(w[f"p{q}_seconds"]) for q in (50, 90, 95, 99)]
               + [duration(w["max_seconds"]), _ts(w["last_run_at"])] for w in d.workflows]
    stuck_rows = [[r["run_id"], r["workflow_name"] or r["workflow_id"], r["status"],
                   r["progress"], _ts(r["created_at"]), duration(r["age_seconds"])]
                  for r in d.stuck]
    sync_rows = [[s["sync_id"], _ts(s["started_at"]), s["outcome"], s["mode"], s["runs_seen"],
                  s["rows_changed"], duration(s["seconds_total"]), (s["error"] or "")[:80]]
                 for s in d.syncs]
    return [
        '<div class="cards">' + "".join(f'<div class="card{" bad" if bad else ""}"><b>{_e(v)}'
                                        f"</b>{_e(k)}</div>" for k, v, bad in cards) + "</div>",
        '<h2 id="runs-per-day">Runs per day by status</h2>',
        chart_runs_per_day(d.status_daily, d.generated_at, DAYS_SHOWN),
        '<h2 id="failure-rate">Failure rate over time</h2>',
        chart_failure_rate(d.failure_daily, d.generated_at),
        '<h2 id="durations">Duration percentiles per workflow</h2>',
        chart_duration_percentiles(d.workflows),
        _table(["workflow", "type", "runs", "finished", "failure rate", "p50", "p90", "p95",
                "p99", "max", "last run"], wf_rows, set(range(2, 10))),
        '<h2 id="slowest">Slowest workflows</h2>',
        chart_hbars("chart-slowest", "Slowest workflows by p95 duration",
                    [(workflow_label(w), w["p95_seconds"], duration(w["p95_seconds"]))
                     for w in slow],
                    f"Top {TOP_N} workflows by 95th-percentile duration of finished runs.",
                    "#1565c0"),
        '<h2 id="failing">Most failing workflows</h2>',
        chart_hbars("chart-most-failing", "Most failing workflows by failure rate",
                    [(workflow_label(w), w["failure_rate"], f"{_pct(w['failure_rate'])} "
                      f"({w['failed']:,}/{w['finished']:,})") for w in failing],
                    f"Top {TOP_N} by failed / finished, workflows with at least {MIN_FINISHED} "
                    "finished runs.", "#c62828"),
        *(['<h2 id="status-time">Time in queued and awaiting feedback</h2>',
           chart_status_time(d.status_time)] if d.has_history else []),
        '<h2 id="open">Open and stuck runs</h2>',
        _table(["status", "open runs", "oldest"],
               [[r["status"], r["runs"], duration(r["oldest"])] for r in d.open_by_status], {1, 2}),
        f'<p id="stuck">{d.stuck_count:,} run(s) open for more than {duration(d.stuck_after)} '
        f"(analytics.stuck_after){'; the oldest:' if d.stuck else '.'}</p>",
        _table(["run", "workflow", "status", "progress", "created", "age"], stuck_rows, {3, 5})
        if d.stuck else "",
        '<h2 id="sync">Sync freshness</h2>',
        f'<p>Last successful sync: #{_e(h["last_success_sync_id"])}, finished '
        f'{_ts(h["last_success_at"])} ({ago}). {h["syncs"]:,} attempts: {h["successes"]:,} '
        f'succeeded, {h["failures"]:,} failed, {h["abandoned"]:,} abandoned; '
        f'{h["failures_since_success"]:,} failed since the last success.</p>',
        _table(["#", "started", "outcome", "mode", "runs seen", "rows changed", "took", "error"],
               sync_rows, {0, 4, 5, 6})]


# --- several workspaces: all together, then a section each ---------------------------------

WS_CSS = "section.ws{margin-top:36px}h2.ws{font-size:20px;border-bottom:2px solid #212121}"
ID_ATTR = re.compile(r'\b(id|aria-labelledby)="([^"]+)"')


def _scoped(html: str, prefix: str) -> str:
    """``html`` with every id (and reference to one) prefixed: sections repeat the charts."""
    return ID_ATTR.sub(lambda m: f'{m.group(1)}="{prefix}{m.group(2)}"', html)


def _overview(everything: ReportData, per: dict[str, ReportData]) -> str:
    """The workspaces side by side, each linking to its section."""
    def row(anchor: str, label: str, d: ReportData) -> str:
        t, h = d.totals, d.health
        cells = [t["runs"], t["open"], _failure_rate(t), d.stuck_count,
                 _ago(h["freshness_seconds"]), h["failures_since_success"]]
        return (f'<tr><td><a href="#{anchor}">{_e(label)}</a></td>'
                + "".join(f"<td class=n>{_e(c)}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th{' class=n' if i else ''}>{h}</th>" for i, h in enumerate(
        ["workspace", "live runs", "open runs", "failure rate", "stuck",
         "last successful sync", "failed since"]))
    rows = [row("ws-all", "all workspaces", everything)] + [
        row(f"ws-{name}", name, d) for name, d in per.items()]
    return (f'<table id="workspaces"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}'
            "</tbody></table>")


def render_workspaces(everything: ReportData, per: dict[str, ReportData],
                      source: str = "") -> str:
    """The page of several workspaces: an overview table, all of them together, then one
    section per workspace with the charts and tables of a single-workspace report."""
    # The same workflow id in two workspaces is two rows.
    for w in everything.workflows + everything.status_time:
        w["workflow_name"] = f"{w['workspace']} / {workflow_label(w)}"
    for r in everything.stuck:
        r["run_id"] = f"{r['workspace']} / {r['run_id']}"
    sections = [("all", "All workspaces", everything)] + [
        (name, f"Workspace {name}", d) for name, d in per.items()]
    return "\n".join([
        *_head(everything, source, WS_CSS), '<h2 id="overview">Workspaces</h2>',
        _overview(everything, per),
        *(f'<section class="ws" id="ws-{key}"><h2 class="ws">{_e(title)}</h2>\n'
          + _scoped("\n".join(_dashboard(d)), f"ws-{key}-") + "</section>"
          for key, title, d in sections),
        "</body></html>\n"])


def write_report(settings: Settings, out: Path | None = None, con=None) -> Path:
    """Write the report (default ``report.html`` beside the DuckDB file); returns its path."""
    db = Path(settings.warehouse.duckdb_path)
    out = Path(out) if out is not None else db.parent / DEFAULT_NAME
    owned = con is None
    con = open_read_only(settings.warehouse, views=True) if owned else con
    stuck_after = settings.analytics.stuck_after.total_seconds()
    try:
        data = collect(con, stuck_after)
        names = workspaces(con)
        per = {name: collect(con, stuck_after, name) for name in names} if len(names) > 1 \
            else None
    finally:
        if owned:
            con.close()
    page = render(data, source=str(db)) if per is None else \
        render_workspaces(data, per, source=str(db))
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, out)  # a browser refreshing mid-write sees the old or the new report
    except OSError as e:
        with contextlib.suppress(OSError):  # on a read-only filesystem even this fails
            tmp.unlink()
        raise RunsEtlError(f"cannot write the report to {out}: {e.strerror or e}; choose "
                           "another file with --out") from None
    return out
