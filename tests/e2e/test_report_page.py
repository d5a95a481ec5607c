"""`repwatch report` pages in a real headless Chromium (Debian's, driven by Playwright; fixtures
in tests/e2e/conftest.py): opened from a file:// URL, they draw the dashboard's charts from the
embedded data alone, with alert markers, log no console error and request nothing but the page.

The logs come from a tiny in-process Monitor (tests/test_history.py:write_log): one run that
collapses at step 20 (rows of rank 1: RepwatchRepresentationCollapse fires) and a healthy one.
Screenshots land in ``test-artifacts/`` (report.png, report-compare.png).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from monitor.cli.main import main
from tests.cli.test_report import assert_offline
from tests.test_history import COLLAPSE, write_log

pytestmark = pytest.mark.e2e

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The report of the collapsing run, the comparison of both runs, and the report of a log
    that holds spectra (the collapsing run's snapshots written with ``to_dict(spectra=True)``,
    which the Monitor's own log leaves out)."""
    d = tmp_path_factory.mktemp("report")
    live = write_log(d / "collapse.jsonl", run="collapse", collapse_at=20)
    write_log(d / "healthy.jsonl", run="healthy", collapse_at=None, seed=1)
    (d / "spectra.jsonl").write_text(
        "".join(json.dumps(s.to_dict(spectra=True)) + "\n" for s in live))
    out = {"one": d / "one.html", "cmp": d / "cmp.html", "spectra": d / "spectra.html"}
    assert main(["report", str(d / "collapse.jsonl"), "-o", str(out["one"])]) == 0
    assert main(["report", str(d / "collapse.jsonl"), str(d / "healthy.jsonl"),
                 "-o", str(out["cmp"])]) == 0
    assert main(["report", str(d / "spectra.jsonl"), "-o", str(out["spectra"])]) == 0
    return out


class Opened:
    """A report page in a fresh browser context, with every console message, page error and
    request it caused."""

    def __init__(self, browser: Any, path: Path, **context: Any) -> None:
        self.ctx = browser.new_context(**context)
        self.page = self.ctx.new_page()
        self.problems: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: m.type in ("error", "warning") and self.problems.append(
            f"console {m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("requestfailed", lambda r: self.problems.append(f"request failed: {r.url}"))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.url = path.resolve().as_uri()
        self.page.goto(self.url)
        self.page.wait_for_selector("body[data-rendered=true]", timeout=15_000)

    def points(self, chart: str) -> int:
        return int(self.page.get_attribute(f'svg[data-chart="{chart}"]', "data-points") or 0)

    def check_clean(self) -> None:
        assert self.problems == [], self.problems
        assert self.requests == [self.url], self.requests    # the page itself, nothing else


@pytest.fixture
def opened(browser: Any) -> Iterator[list[Opened]]:
    pages: list[Opened] = []
    yield pages
    for p in pages:
        p.ctx.close()


def test_report_draws_the_run_with_its_alert(browser: Any, reports: dict[str, Path],
                                             opened: list[Opened]) -> None:
    assert_offline(reports["one"].read_text(encoding="utf-8"))
    o = Opened(browser, reports["one"], viewport={"width": 1280, "height": 900},
               color_scheme="light")
    opened.append(o)
    page = o.page
    # the charts: every primary chart is a drawn path; effective rank has all 20 publishes
    assert o.points("stream:z:effective_rank") == 20
    drawn = page.eval_on_selector_all(
        "svg[data-chart] path.line", "ps => ps.filter(p => (p.getAttribute('d') || '').length > 10).length")
    assert drawn >= 10, drawn
    # the alert: listed with its span, and marked on the stream's charts where it fired
    item = page.locator(f'#alerts li[data-alert="{COLLAPSE}"]')
    assert item.count() == 1
    text = item.inner_text()
    assert "stream z" in text and "still firing at the end" in text and "critical" in text.lower()
    markers = page.locator('[data-group="stream:z"] svg line.marker.critical')
    assert markers.count() >= 5
    assert "fired at step" in (markers.first.locator("title").text_content() or "")
    # plasticity layers, with the labelled dormant-unit keys
    assert page.locator('[data-group^="layer:"] svg[data-chart$=":dormant_units_ratio{tau=0.1}"]').count() >= 1
    assert page.locator("#no-spectra").count() == 1       # the Monitor's log has no spectra
    # hover shows the value at a step
    box = page.locator('svg[data-chart="stream:z:effective_rank"] rect.hit').bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] * 0.1, box["y"] + box["height"] / 2)
    tip = page.locator('svg[data-chart="stream:z:effective_rank"] text.tiptext')
    assert tip.count() >= 2 and (tip.first.text_content() or "").startswith("step ")
    # "more signals" draws when opened; the theme toggle redraws in dark
    sec = page.locator('[data-group="stream:z"] details.more')
    sec.locator("summary").click()
    page.wait_for_function("""() => document.querySelectorAll(
        '[data-group="stream:z"] .grid.secondary svg[data-chart]').length > 0""")
    page.click("#theme")
    assert page.get_attribute("html", "data-theme") == "dark"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
    o.check_clean()


def test_comparison_overlays_the_runs(browser: Any, reports: dict[str, Path],
                                      opened: list[Opened]) -> None:
    assert_offline(reports["cmp"].read_text(encoding="utf-8"))
    o = Opened(browser, reports["cmp"], viewport={"width": 1280, "height": 900})
    opened.append(o)
    page = o.page
    chart = 'svg[data-chart="stream:z:effective_rank"]'
    assert page.locator(chart).count() == 1                 # one chart, both runs on it
    assert o.points("stream:z:effective_rank") == 40
    strokes = page.eval_on_selector_all(f"{chart} path.line", "ps => ps.map(p => p.getAttribute('stroke'))")
    assert len(strokes) == 2 and len(set(strokes)) == 2, strokes
    legend = page.locator('figure[data-card="stream:z:effective_rank"] .legend').inner_text()
    assert "collapse" in legend and "healthy" in legend
    assert page.locator("#runs-body tr").count() == 2
    assert page.locator(f'#alerts li[data-alert="{COLLAPSE}"][data-run="collapse"]').count() == 1
    assert page.locator('#alerts li[data-run="healthy"]').count() == 0
    assert page.locator(f"{chart} line.marker.critical").count() >= 1
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "report-compare.png"), full_page=True)
    o.check_clean()


def test_spectra_are_drawn_when_the_log_has_them(browser: Any, reports: dict[str, Path],
                                                 opened: list[Opened]) -> None:
    o = Opened(browser, reports["spectra"], viewport={"width": 1280, "height": 900})
    opened.append(o)
    page = o.page
    assert page.locator("#no-spectra").count() == 0
    chart = 'svg[data-chart="spectrum:z"]'
    assert o.points("spectrum:z") > 32                     # several spectra of d = 32
    legend = page.locator('figure[data-card="spectrum:z"] .legend').inner_text()
    assert "first" in legend and "peak" in legend and "last" in legend
    assert page.locator(f"{chart} path.line.dash").count() == 1     # the peak, dashed
    o.check_clean()
