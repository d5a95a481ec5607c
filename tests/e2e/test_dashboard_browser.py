"""The built-in dashboard in a real headless Chromium (Debian's, driven by Playwright).

The collapse demo trains in a thread with its in-process server on a free loopback port; the
page must show the collapse alert and live effective-rank points, draw the spectra with the
run's peak, switch to dark mode, fit a phone's width, and log no console error or failed request.
Screenshots land in ``test-artifacts/``. A second test serves the sidecar's app and checks that
its ``/`` is the same page and renders a run that was posted to it.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from monitor.server.dashboard import index_html
from monitor.server import BackgroundServer
from monitor.sidecar.service import Sidecar, SidecarConfig, create_sidecar_app
from monitor.transport.wire import encode_batch

pytestmark = pytest.mark.e2e

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
COLLAPSE = "RepwatchRepresentationCollapse"


class _Stop(Exception):
    """Raised from the demo's publish callback to end training at teardown."""


@pytest.fixture(scope="module")
def demo_url() -> Iterator[str]:
    """The collapse demo (stop-gradient removed after step 5) serving on a free port."""
    from monitor.tools.demo import run_demo

    started = threading.Event()
    stop = threading.Event()
    box: dict[str, Any] = {}

    def on_start(url: str | None) -> None:
        box["url"] = url
        started.set()

    def on_publish(_snap: Any, _loss: float) -> None:
        if stop.is_set():
            raise _Stop

    def train() -> None:
        try:
            run_demo(steps=3000, collapse_at=5, every=5, window=512, device="cpu", port=0,
                     on_start=on_start, on_publish=on_publish, linger=0)
        except _Stop:
            pass
        except BaseException as exc:             # surfaced by the fixture below
            box["error"] = exc
            started.set()

    thread = threading.Thread(target=train, name="demo", daemon=True)
    thread.start()
    try:
        assert started.wait(60), "the demo did not start its server within 60 s"
        assert "error" not in box, box.get("error")
        assert box["url"], "the demo has no server"
        yield box["url"]
    finally:
        stop.set()
        thread.join(60)
        assert not thread.is_alive(), "the demo did not stop"


class PageWatch:
    """Console errors, uncaught page errors, failed requests and HTTP errors of one page."""

    def __init__(self, page: Any) -> None:
        self.problems: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.problems.append(
            f"console: {m.text}"))
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: self.problems.append(
            f"request failed: {r.url} {r.failure}"))
        page.on("response", lambda r: r.status >= 400 and self.problems.append(
            f"HTTP {r.status}: {r.url}"))


def _open(browser: Any, url: str, **context: Any) -> tuple[Any, Any, PageWatch]:
    ctx = browser.new_context(**context)
    page = ctx.new_page()
    watch = PageWatch(page)
    page.goto(url)
    return ctx, page, watch


def _points(page: Any, chart: str) -> int:
    return int(page.get_attribute(f'svg[data-chart="{chart}"]', "data-points") or 0)


@pytest.mark.slow
def test_demo_dashboard_shows_collapse_live(browser: Any, demo_url: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    t0 = time.monotonic()
    ctx, page, watch = _open(browser, f"{demo_url}/", viewport={"width": 1280, "height": 900},
                             color_scheme="light")
    try:
        # the collapse alert appears on the page while the demo trains (polling, no reload)
        page.wait_for_selector(f'#alerts li[data-alert="{COLLAPSE}"]', timeout=90_000)
        alert = page.locator(f'#alerts li[data-alert="{COLLAPSE}"]').first
        text = alert.inner_text()
        assert "projector" in text and "since step" in text and "critical" in text.lower()
        assert "runbook" in text.lower()
        # the runbook link opens the runbooks this server serves, at the alert's section
        href = alert.locator("a", has_text="runbook").get_attribute("href")
        assert href == f"runbooks#{COLLAPSE.lower()}", href
        runbook = page.request.get(f"{demo_url}/{href.split('#')[0]}")
        assert runbook.ok and f'id="{COLLAPSE.lower()}"' in runbook.text()
        rank_chart = "stream:projector:effective_rank"
        page.wait_for_function(
            f"() => +document.querySelector('svg[data-chart=\"{rank_chart}\"]')"
            "?.dataset.points >= 3", timeout=30_000)
        # the charts keep growing without a reload
        before = _points(page, rank_chart)
        page.wait_for_function(
            f"() => +document.querySelector('svg[data-chart=\"{rank_chart}\"]').dataset.points"
            f" > {before}", timeout=30_000)
        # header: step and samples scored are numbers from the run, not placeholders
        step = int(page.inner_text("#f-step").replace(",", ""))
        samples = int(page.inner_text("#f-samples").replace(",", ""))
        assert step >= 5 and samples > 0
        assert page.input_value("#run") == "demo-collapse"
        # every primary family of both streams is charted; the Q-Score low-quality ratio and
        # the ÷ peak ratio have a chart from the start but values only after the Monitor's
        # peak_warmup (100 steps), so they are not waited for
        for stream in ("backbone", "projector"):
            for signal in ("effective_rank_ratio", "embedding_std_ratio",
                           "top_eigenvalue_share", "participation_ratio", "spectrum_alpha"):
                assert _points(page, f"stream:{stream}:{signal}") > 0, (stream, signal)
            for signal in ("low_quality_samples_ratio", "effective_rank_peak_ratio"):
                assert page.locator(f'svg[data-chart="stream:{stream}:{signal}"]').count() == 1
        # spectra: current and, once there is one, the alerts' peak (counted from the Monitor's
        # peak_warmup, 100 steps: never the random init's higher rank before it), log scale
        assert _points(page, "spectrum:projector") > 0
        legend = page.inner_text('[data-card="spectrum:projector"] .legend')
        assert "now, step" in legend
        assert "no peak yet" in legend or "alert's peak" in legend, legend
        for peak_step in re.findall(r"alert's peak(?:, step|: rank \S+ at step) (\d+)", legend):
            assert int(peak_step) >= 100, legend
        # hover shows the value at the nearest step
        svg = page.locator(f'svg[data-chart="{rank_chart}"]')
        box = svg.bounding_box()
        svg.hover(position={"x": box["width"] * 0.6, "y": box["height"] * 0.5})
        page.wait_for_selector(f'svg[data-chart="{rank_chart}"] .tiptext', timeout=5_000)
        tip = svg.locator(".tiptext").all_text_contents()
        assert tip and tip[0].startswith("step ") and tip[1].startswith("projector: ")
        print(f"collapse shown and charted after {time.monotonic() - t0:.1f} s")
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

        # the toggle switches to dark and back to the system's (light) scheme
        light_bg = page.evaluate("getComputedStyle(document.body).backgroundColor")
        page.click("#theme")
        assert page.get_attribute("html", "data-theme") == "dark"
        dark_bg = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert dark_bg != light_bg and _luminance(dark_bg) < 0.2 < _luminance(light_bg)
        page.click("#theme")
        page.click("#theme")
        assert page.get_attribute("html", "data-theme") is None
        assert watch.problems == []
    finally:
        ctx.close()

    # prefers-color-scheme: dark, at a phone's width: dark, and nothing wider than the screen
    ctx, page, watch = _open(browser, f"{demo_url}/", viewport={"width": 380, "height": 800},
                             color_scheme="dark", device_scale_factor=2)
    try:
        page.wait_for_selector(f'#alerts li[data-alert="{COLLAPSE}"]', timeout=30_000)
        page.wait_for_function("() => +document.querySelector("
                               "'svg[data-chart=\"stream:projector:effective_rank\"]')"
                               "?.dataset.points > 0", timeout=30_000)
        assert _luminance(page.evaluate("getComputedStyle(document.body).backgroundColor")) < 0.2
        assert page.evaluate("document.documentElement.scrollWidth") <= 380
        page.screenshot(path=str(ARTIFACTS / "dashboard-phone-dark.png"), full_page=True)
        assert watch.problems == []
    finally:
        ctx.close()


def _luminance(css: str) -> float:
    """Relative brightness (0–1) of an ``rgb(r, g, b)`` colour."""
    r, g, b = (int(x) for x in css[css.index("(") + 1:css.index(")")].split(",")[:3])
    return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255


@pytest.fixture
def sidecar_url() -> Iterator[tuple[str, Sidecar]]:
    """The sidecar app (numpy backend) on a free loopback port."""
    config = SidecarConfig(every=1, window=512)
    sc = Sidecar(config)
    server = BackgroundServer(create_sidecar_app(config, sc), "127.0.0.1", 0)
    server.start()
    try:
        yield server.url, sc
    finally:
        server.stop()
        sc.close()


def test_sidecar_serves_the_same_dashboard(browser: Any,
                                           sidecar_url: tuple[str, Sidecar]) -> None:
    import httpx

    url, sc = sidecar_url
    assert httpx.get(f"{url}/", timeout=10).text == index_html()
    rng = np.random.default_rng(0)
    for step in range(1, 8):                     # healthy, then collapsed rows
        rows = (rng.standard_normal((300, 8)) if step < 3 else np.ones((300, 8))).astype(
            np.float32)
        headers, body = encode_batch(rows, step=step)
        r = httpx.post(f"{url}/v1/runs/side/streams/emb/batches", headers=headers,
                       content=body, timeout=10)
        assert r.status_code == 202, r.text
    assert sc.wait_idle()
    ctx, page, watch = _open(browser, f"{url}/?run=side", viewport={"width": 1000, "height": 800})
    try:
        page.wait_for_selector(f'#alerts li[data-alert="{COLLAPSE}"]', timeout=20_000)
        assert page.input_value("#run") == "side"
        page.wait_for_function("() => +document.querySelector("
                               "'svg[data-chart=\"stream:emb:effective_rank\"]')"
                               "?.dataset.points >= 2", timeout=20_000)
        latest = httpx.get(f"{url}/v1/runs", timeout=10).json()[0]
        assert int(page.inner_text("#f-step").replace(",", "")) == latest["step"]
        samples = sum(c["samples"] for c in latest["counters"].values())
        assert samples >= 1500 and int(page.inner_text("#f-samples").replace(",", "")) == samples
        assert _points(page, "spectrum:emb") > 0        # now (collapsed)
        # 7 steps, all before the warm-up (peak_warmup 100): the alerts have no peak yet, so
        # the healthy steps' higher rank is not drawn as one
        hist = httpx.get(f"{url}/v1/runs/side/history", timeout=10).json()
        assert all(h["streams"].get("emb", {}).get("effective_rank_peak") is None for h in hist)
        assert "no peak yet" in page.inner_text('[data-card="spectrum:emb"] .legend')
        assert page.locator('svg[data-chart="spectrum:emb"] path.dash').count() == 0
        page.screenshot(path=str(ARTIFACTS / "dashboard-sidecar.png"), full_page=True)
        assert watch.problems == []
    finally:
        ctx.close()


def test_dashboard_loads_nothing_from_outside_its_server() -> None:
    """The page's assets are package data (monitor/server/web/*; the wheel's content is checked in
    tests/test_packaging.py) and load nothing from outside the server that serves them."""
    from importlib import resources

    from monitor.server.dashboard import ASSETS

    web = resources.files("monitor.server").joinpath("web")
    page = index_html()
    assert '<script src="/ui/app.js"' in page and 'href="/ui/app.css"' in page
    for asset in ASSETS:                           # no CDN: no absolute URL but the SVG namespace
        assert web.joinpath(asset).is_file(), asset
        text = web.joinpath(asset).read_text(encoding="utf-8")
        assert "https://" not in text and "http://" not in text.replace(
            '"http://www.w3.org/2000/svg"', ""), asset
