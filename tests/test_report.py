"""``runs-etl report`` writes one self-contained HTML file whose charts come from the views."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from datetime import UTC, date, datetime, timedelta
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

import pytest
from helpers import (
    LIVE,
    SYNCS,
    TERMINAL,
    handmade_warehouse,
    insert_fixture,
    settings_for,
    settings_for_db,
)

from runs_etl import jobs, warehouse
from runs_etl.cli import main
from runs_etl.errors import WarehouseError
from runs_etl.outputs.charts import chart_failure_rate, chart_runs_per_day, chart_status_time
from runs_etl.outputs.report import DAYS_SHOWN, write_report

CHARTS = ("chart-runs-per-day", "chart-failure-rate", "chart-duration-percentiles",
          "chart-slowest", "chart-most-failing")
VOID = {"meta", "br", "hr", "img", "input", "link", "source", "wbr"}  # HTML void elements
CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium"),
                             shutil.which("chromium-browser")) if p and os.path.exists(p)), None)


class Page(HTMLParser):
    """Collects ids, <svg> titles, URL-bearing attributes; checks that every tag is closed."""

    def __init__(self, html: str):
        super().__init__()
        self.stack: list[str] = []
        self.ids: set[str] = set()
        self.svg_titles: dict[str, str] = {}
        self.urls: list[str] = []
        self.tags: set[str] = set()
        self._title_of: str | None = None
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        self.ids.update([a["id"]] if "id" in a else [])
        self.urls += [v for k, v in attrs if k in ("src", "href", "xlink:href", "action") and v]
        if tag == "svg":
            self._title_of = a.get("id")
        if tag == "title" and self._title_of and self.stack and self.stack[-1] == "svg":
            self.svg_titles[self._title_of] = ""
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1:]}>"
        self.stack.pop()

    def handle_data(self, data):
        if self.stack and self.stack[-1] == "title" and self._title_of in self.svg_titles:
            self.svg_titles[self._title_of] += data


@pytest.fixture
def db(tmp_path) -> Path:
    """The hand-made warehouse of ``helpers``, views applied, file closed."""
    return handmade_warehouse(tmp_path / "wh" / "runs.duckdb")


def test_report_is_well_formed_html_with_every_chart(db):
    path = write_report(settings_for_db(db))
    assert path == db.parent / "report.html"  # the default: beside the database
    html = path.read_text(encoding="utf-8")
    page = Page(html)
    assert not page.stack, f"unclosed tags: {page.stack}"
    assert set(CHARTS) <= page.ids
    assert set(page.svg_titles) == set(CHARTS) and all(page.svg_titles.values())
    assert {"runs-per-day", "failure-rate", "durations", "slowest", "failing", "open",
            "stuck", "sync"} <= page.ids
    assert html.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in html


def test_report_is_self_contained(db):
    html = write_report(settings_for_db(db)).read_text(encoding="utf-8")
    page = Page(html)
    assert not [u for u in page.urls if re.match(r"^(https?:)?//", u)], page.urls
    assert not page.urls  # nothing to fetch at all, not even a local file
    assert not {"script", "link", "img", "iframe", "object"} & page.tags
    assert "@import" not in html and "url(" not in html
    assert "http://" not in html and "https://" not in html


def test_report_shows_the_numbers_of_the_views(db):
    html = write_report(settings_for_db(db)).read_text(encoding="utf-8")
    # one stacked segment per (UTC day, status) of the last DAYS_SHOWN days, count as tooltip
    days = {r.id: r.created.astimezone(UTC).date() for r in LIVE}
    since = max(days.values()) - timedelta(days=DAYS_SHOWN)
    segments = {(days[r.id], r.status) for r in LIVE if days[r.id] > since}
    assert 0 < len(segments) < len({(days[r.id], r.status) for r in LIVE})
    assert html.count("</title></rect>") == len(segments)
    assert "Support &lt;triage&gt;" in html and "Support <triage>" not in html  # escaped
    assert "数据 ingestion" in html
    finished = [r for r in LIVE if r.status in TERMINAL]
    failed = sum(r.status == "failed" for r in finished)
    assert f"{failed / len(finished):.1%}" in html  # overall failure rate card
    assert "2 run(s) open for more than 24.0 h" in html  # a6 and b5
    assert "Last successful sync: #3" in html and "1 failed since the last success" in html


def test_stuck_runs_follow_the_analytics_stuck_after_setting(db):
    html = write_report(settings_for_db(db, stuck_after="2d")).read_text(encoding="utf-8")
    assert "1 run(s) open for more than 2.0 d" in html


def test_an_empty_warehouse_gives_a_report_with_empty_charts(tmp_path):
    path = tmp_path / "empty.duckdb"
    con = warehouse.connect(path)
    warehouse.migrate(con)
    warehouse.apply_views(con)
    con.close()
    html = write_report(settings_for_db(path), out=tmp_path / "out" / "r.html").read_text()
    page = Page(html)
    assert set(CHARTS) <= page.ids and html.count("no data yet") == len(CHARTS)


def test_a_warehouse_without_views_asks_for_a_sync(tmp_path):
    path = tmp_path / "noviews.duckdb"
    con = warehouse.connect(path)
    warehouse.migrate(con)
    con.close()
    with pytest.raises(WarehouseError, match="runs-etl sync"):
        write_report(settings_for_db(path))
    assert not (tmp_path / "report.html").exists()


def test_a_missing_database_is_an_error_not_a_new_file(tmp_path):
    with pytest.raises(WarehouseError, match="no warehouse"):
        write_report(settings_for_db(tmp_path / "nope.duckdb"))
    assert not (tmp_path / "nope.duckdb").exists()


def test_write_report_reuses_an_open_connection(db, tmp_path):
    con = warehouse.connect(db)
    try:
        out = write_report(settings_for_db(db), out=tmp_path / "r.html", con=con)
    finally:
        con.close()
    assert set(CHARTS) <= Page(out.read_text(encoding="utf-8")).ids


def test_cli_report_writes_the_file_and_says_where(db, tmp_path, monkeypatch, capsys):
    for name in [k for k in os.environ if k.startswith("RUNS_ETL_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "cli.html"
    assert main(["report", "--duckdb-path", str(db), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"report written to {out}"
    assert set(CHARTS) <= Page(out.read_text(encoding="utf-8")).ids


def test_report_renders_in_a_headless_browser_when_one_is_installed(db, tmp_path):
    """Always checks the page; where chromium exists, also that the rendered DOM keeps it all."""
    path = write_report(settings_for_db(db))
    page = Page(path.read_text(encoding="utf-8"))
    assert set(CHARTS) <= page.ids and not page.urls
    if CHROMIUM is None:
        return  # no browser on this machine (CI installs none): the checks above are the test
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={tmp_path / 'chromium'}", "--dump-dom",
         path.resolve().as_uri()],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rendered = Page(done.stdout)
    assert set(CHARTS) <= rendered.ids
    assert set(rendered.svg_titles) == set(CHARTS)
    assert "Noxus runs report" in done.stdout


# --- several workspaces ------------------------------------------------------------------------

@pytest.fixture
def two_workspaces(tmp_path) -> Path:
    """The hand-made runs as workspaces ``a`` and ``b`` (same ids); ``b`` has 2 more failures."""
    db = tmp_path / "runs.duckdb"
    con = warehouse.connect(db)
    warehouse.migrate(con)
    insert_fixture(con, workspace="a")
    insert_fixture(con, workspace="b", sync_offset=len(SYNCS))
    for sid in (9, 10):
        con.execute("INSERT INTO sync_runs (workspace, sync_id, started_at, outcome, error) "
                    "VALUES ('b', ?, now(), 'failed', 'HTTP 401')", [sid])
    warehouse.apply_views(con)
    con.close()
    return db


def sections(html: str) -> dict[str, str]:
    return dict(re.findall(r'<section class="ws" id="ws-([^"]+)">(.*?)</section>', html, re.S))


def test_a_single_workspace_report_has_no_workspace_sections(db):
    html = write_report(settings_for_db(db)).read_text(encoding="utf-8")
    assert "<section" not in html and 'id="workspaces"' not in html


def test_several_workspaces_get_all_together_then_a_section_each_without_script(two_workspaces):
    html = write_report(settings_for_db(two_workspaces)).read_text(encoding="utf-8")
    page = Page(html)
    assert "script" not in page.tags
    ids = re.findall(r'\bid="([^"]+)"', html)
    assert len(ids) == len(set(ids)), "an id repeats across sections"
    assert list(sections(html)) == ["all", "a", "b"]
    for key in ("all", "a", "b"):
        assert {f"ws-{key}-{c}" for c in CHARTS} <= page.ids
    labelled = re.findall(r'aria-labelledby="([^"]+)"', html)
    assert labelled and set(labelled) <= page.ids
    # the overview table links to each section, and only inside the page
    assert page.urls == ["#ws-all", "#ws-a", "#ws-b"]


def test_each_workspace_section_shows_that_workspaces_numbers(two_workspaces):
    html = write_report(settings_for_db(two_workspaces)).read_text(encoding="utf-8")
    overview = {label: cells for label, cells in re.findall(
        r'<tr><td><a href="#ws-[^"]+">([^<]+)</a></td>(.*?)</tr>', html)}
    live = lambda label: re.findall(r"<td class=n>([^<]*)</td>", overview[label])[0]  # noqa: E731
    assert (live("a"), live("b"), live("all workspaces")) == (
        str(len(LIVE)), str(len(LIVE)), str(2 * len(LIVE)))
    parts = sections(html)
    assert "1 failed since the last success" in parts["a"]
    assert "3 failed since the last success" in parts["b"]
    assert parts["all"].count("<td>b / Invoice extraction</td>") == 1  # rows name workspaces
    assert "HTTP 401" in parts["b"] and "HTTP 401" not in parts["a"]


# --- the partial last day and a phone's width (issue 9, item 29) ------------------------------

def _three_days(generated_at: datetime, last: date) -> tuple[str, str]:
    """The runs-per-day and failure-rate charts of three days ending ``last``."""
    days = [last - timedelta(days=k) for k in (2, 1, 0)]
    status_daily = [{"created_date": d, "status": s, "runs": 10}
                    for d in days for s in ("completed", "failed")]
    failure_daily = [{"created_date": d, "workflow_type": "flow", "failed": 1, "finished": 10}
                     for d in days]
    return (chart_runs_per_day(status_daily, generated_at, DAYS_SHOWN),
            chart_failure_rate(failure_daily, generated_at))


def _marked(svg: str) -> list[str]:
    """The elements drawn as partial, by tag."""
    return re.findall(r'<(\w+)[^>]* class="partial"', svg)


def test_todays_partial_day_is_drawn_apart_and_labelled():
    now = datetime(2024, 5, 3, 9, 30, tzinfo=UTC)
    bars, rate = _three_days(now, now.date())
    assert _marked(bars) == ["rect", "rect"]  # both segments of today's bar, no others
    assert all("2024-05-03" in t for t in re.findall(r'class="partial"[^>]*><title>(.*?)</title>',
                                                      bars))
    assert _marked(rate) == ["polyline"] * 2  # the dashed last segment of each line
    for svg in (bars, rate):
        assert "today, partial" in svg.split("<figcaption>")[0]  # on the chart
        assert "today, partial" in svg.split("<figcaption>")[1]  # and in the caption
    # Every solid line stops before today; its dashed segment joins the last whole day to it.
    solid = re.findall(r'<polyline points="([^"]*)"', rate)
    dashed = re.findall(r'<polyline class="partial" points="([^"]*)"', rate)
    assert all(len(p.split()) == 2 for p in solid) and all(len(p.split()) == 2 for p in dashed)
    assert [s.split()[-1] for s in solid] == [p.split()[0] for p in dashed]


def test_a_report_whose_last_day_is_over_marks_nothing():
    now = datetime(2024, 5, 3, 9, 30, tzinfo=UTC)
    for svg in _three_days(now, now.date() - timedelta(days=1)):
        assert _marked(svg) == [] and "partial" not in svg


def test_charts_and_tables_scroll_on_a_phone_instead_of_shrinking_their_text(db):
    html = write_report(settings_for_db(db)).read_text(encoding="utf-8")
    css = re.search(r"<style>(.*?)</style>", html, re.S).group(1).replace("\n", "")
    svg_rule = re.search(r"(?<![\w-])svg\{([^}]*)\}", css).group(1)
    min_px = int(re.search(r"min-width:(\d+)px", svg_rule).group(1))
    text_px = int(re.search(r"svg text\{font:(\d+)px", css).group(1))
    viewbox_w = int(re.search(r'viewBox="0 0 (\d+) ', html).group(1))
    assert text_px * min_px / viewbox_w >= 9  # never smaller on screen than 9 px
    assert "overflow-x:auto" in re.search(r"(?<![\w-])figure\{([^}]*)\}", css).group(1)
    assert html.count("<svg") == html.count("<figure>") == len(CHARTS)
    assert html.count("<table>") == html.count('<div class="scroll"><table>') > 0


# --- time in queued / awaiting_human_feedback (issue 14) --------------------------------------

@pytest.fixture
def with_history(make_sim, tmp_path):
    """Runs seen queued and awaiting feedback by one sync, moved on before the next, so
    time_in_status has closed rows for both statuses; then the report."""
    sim = make_sim(200, now=datetime.now(UTC) - timedelta(hours=3))  # runs before the syncs
    db = tmp_path / "runs.duckdb"
    queued = sim.add_runs(6, status="queued")
    awaiting = sim.add_runs(4, status="awaiting_human_feedback")
    for step in range(3):
        jobs.run_sync(settings_for(sim, db), quiet=True)
        if step < 2:
            sim.transition(ids=queued + awaiting)
    return sim, db, queued, awaiting


def _wait_rows(svg: str) -> list[str]:
    """The tooltip of each row of the time-in-status chart."""
    return re.findall(r"<g><title>([^<]*)</title>", svg)


def test_report_charts_time_in_queued_and_awaiting_per_workflow(with_history):
    sim, db, queued, awaiting = with_history
    html = write_report(settings_for_db(db)).read_text(encoding="utf-8")
    page = Page(html)
    assert not page.stack and not page.urls and "script" not in page.tags
    assert {"status-time", "chart-status-time"} <= page.ids
    assert page.svg_titles["chart-status-time"].startswith(
        "Time in queued and awaiting feedback per workflow")
    svg = html.split('id="chart-status-time"')[1].split("</figure>")[0]
    # One row per workflow and status of the runs that left it, named after the workflow.
    snap = sim.snapshot()
    expected = {(snap[i]["workflow"]["name"], "queued") for i in queued} | {
        (snap[i]["workflow"]["name"], "awaiting_human_feedback") for i in awaiting}
    tips = _wait_rows(svg)
    left = {tuple(t.split(": median")[0].rsplit(", ", 1)) for t in tips if ": median" in t}
    assert expected <= {(unescape(n), s) for n, s in left}
    # Each drawn row has its median bar (thick) and p90 bar (thin), and says how many runs.
    assert svg.count('<rect class="p50"') == svg.count('<rect class="p90"') == len(left)
    runs = sum(int(re.search(r"\((\d+) runs? left it", t).group(1)) for t in tips
               if "median" in t)
    assert runs >= len(queued) + len(awaiting)
    # Each run was seen in its status by one sync only, and had waited since its creation three
    # hours before that sync: the bounds read 0 to 3 hours and more.
    bounds = [re.search(r"median between (.+?) and (.+?), p90 between (.+?) and (.+?) \(", t)
              for t in tips if "median" in t]
    assert bounds and all(b.group(1) == b.group(3) == "0 ms" for b in bounds)
    assert all(b.group(k).endswith(" h") and float(b.group(k)[:-2]) >= 3
               for b in bounds for k in (2, 4))
    assert svg.count("<g><title>") <= 2 * 10  # top 10 workflows, two statuses each


def test_a_warehouse_without_history_has_no_time_in_status_chart(db):
    html = write_report(settings_for_db(db)).read_text(encoding="utf-8")
    assert "chart-status-time" not in html and 'id="status-time"' not in html


def test_a_workflow_whose_runs_all_still_wait_gets_a_row_without_bars():
    rows = [{"workspace": "default", "workflow_id": "w1", "workflow_name": "Nightly <batch>",
             "status": "queued", "runs": 0, "ongoing": 3, "p50_lower": None, "p50_upper": None,
             "p90_lower": None, "p90_upper": None}]
    svg = chart_status_time(rows)
    assert _wait_rows(svg) == ["Nightly &lt;batch&gt;, queued: no run has left it yet, 3 still "
                               "queued"]
    assert "none left yet, 3 still queued" in svg and '<rect class="p50"' not in svg
