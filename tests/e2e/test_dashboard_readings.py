"""What the dashboard's numbers and curves say (issue 19, point 10), in headless Chromium.

Fixed snapshots, served by the real read app, so that every value on the page is known:

* the dashed spectrum is the peak the alerts use (``effective_rank_peak``: counted after the
  warm-up), never the random init's higher rank before it, and a peak is never drawn entirely
  below the current spectrum only because the embeddings changed scale;
* ratio charts keep a 0–1 reference: 0.82–0.825 of noise is not stretched to full height;
* the header's samples scored is per stream, not the sum over streams.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from monitor.alerts import DEFAULT_RULES, AlertRule
from monitor.server import BackgroundServer
from monitor.server.app import create_read_app
from monitor.snapshot import Snapshot

pytestmark = pytest.mark.e2e

D = 8
PER_STREAM = 353_280


def _spectrum(decay: float, scale: float) -> list[float]:
    """Eigenvalues ``scale * i^-decay``, largest first."""
    return [scale * (i + 1) ** -decay for i in range(D)]


def _rank(eig: Sequence[float]) -> float:
    """RankMe of a spectrum of S/n (singular values ∝ sqrt of the eigenvalues)."""
    s = [math.sqrt(v) for v in eig]
    p = [v / sum(s) + 1e-7 for v in s]
    return math.exp(-sum(q * math.log(q) for q in p))


def _snap(run: str, step: int, eig: list[float], peak: float, std: float,
          peak_rank: float | None = None) -> Snapshot:
    rank = _rank(eig)
    values = {"effective_rank": rank, "effective_rank_peak": peak,
              "effective_rank_peak_ratio": rank / peak if peak > 0 else math.nan,
              "embedding_std_ratio": std, "window_samples": 512.0, "embedding_dim": float(D)}
    other = {"effective_rank": 5.0, "embedding_std_ratio": std}
    return Snapshot(run=run, step=step, time=1.7e9 + step,
                    streams={"proj": values, "backbone": other},
                    counters={"proj": {"samples": float(PER_STREAM)},
                              "backbone": {"samples": float(PER_STREAM)}},
                    spectra={"proj": eig})


def _runs() -> dict[str, list[Snapshot]]:
    # run "init": the random init (step 10, before the warm-up) has the highest rank; the
    # alerts' peak is step 100's; then the rank falls. The server's /spectra keeps the
    # highest-rank spectrum of its history (step 10), which is not the alerts' peak.
    flat, mid, steep = _spectrum(0.2, 1.0), _spectrum(1.0, 1.0), _spectrum(3.0, 1.0)
    p = _rank(mid)
    init = [_snap("init", 10, flat, math.nan, 0.82)]
    init += [_snap("init", 100, mid, p, 0.825)]
    init += [_snap("init", s, steep, p, 0.82 if s % 20 else 0.825) for s in range(110, 210, 10)]
    # run "scale": peak at step 100 on small embeddings, then they grow ×10⁴ while the rank
    # falls: every raw eigenvalue of the peak lies below the current ones, not its shares
    small, big = _spectrum(0.5, 1e-4), _spectrum(2.5, 1.0)
    q = _rank(small)
    scale = [_snap("scale", 100, small, q, 0.9)]
    scale += [_snap("scale", s, big, q, 0.9) for s in range(110, 160, 10)]
    assert all(a < b for a, b in zip(small, big))
    return {"init": init, "scale": scale}


class _Runs:
    """A read source over fixed snapshots of several runs."""

    ready = True

    def __init__(self, runs: dict[str, list[Snapshot]],
                 rules: Sequence[AlertRule] = DEFAULT_RULES) -> None:
        self.runs, self.rules = runs, tuple(rules)

    def snapshots(self) -> list[Snapshot]:
        return [h[-1] for _, h in sorted(self.runs.items())]

    def history(self, run: str) -> list[Snapshot] | None:
        return self.runs.get(run)


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    server = BackgroundServer(create_read_app(_Runs(_runs())), "127.0.0.1", 0)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def _open(browser: Any, url: str) -> tuple[Any, Any, list[str]]:
    ctx = browser.new_context(viewport={"width": 1200, "height": 900})
    page = ctx.new_page()
    problems: list[str] = []
    page.on("console", lambda m: m.type == "error" and problems.append(m.text))
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(url)
    page.wait_for_function("() => +document.querySelector("
                           "'svg[data-chart=\"spectrum:proj\"]')?.dataset.points > 0",
                           timeout=20_000)
    return ctx, page, problems


def _paths(page: Any, chart: str) -> dict[str, list[tuple[float, float]]]:
    """The points of the solid and the dashed path of a chart."""
    out: dict[str, list[tuple[float, float]]] = {}
    for cls in ("line", "line dash"):
        ds = page.eval_on_selector_all(f'svg[data-chart="{chart}"] path',
                                       f"ps => ps.filter(p => p.getAttribute('class') === '{cls}')"
                                       ".map(p => p.getAttribute('d'))")
        pts = [(float(x), float(y)) for d in ds
               for x, y in re.findall(r"[ML]([-\d.]+) ([-\d.]+)", d)]
        out["dash" if "dash" in cls else "solid"] = pts
    return out


def test_peak_spectrum_is_the_alerts_peak_not_the_random_init(browser: Any, url: str) -> None:
    ctx, page, problems = _open(browser, f"{url}/?run=init")
    try:
        legend = page.inner_text('[data-card="spectrum:proj"] .legend')
        # the highest-rank spectrum in history is step 10's, before the warm-up: not drawn, not
        # called a peak; the alerts' peak (step 100, whose rank set effective_rank_peak) is
        # served by /spectra and drawn dashed
        assert "step 10 " not in legend and "step 10)" not in legend, legend
        peak = _runs()["init"][1].streams["proj"]["effective_rank"]
        assert f"alert's peak, step 100 (rank {peak:.3g})" in legend, legend
        assert len(_paths(page, "spectrum:proj")["dash"]) > 0
        # samples scored: per stream (both streams scored the same 353,280 rows), not 706,560
        assert page.inner_text("#f-samples") == f"{PER_STREAM:,}"
        assert page.text_content("#f-samples-label") == "samples scored / stream"
        assert page.get_attribute("#f-samples", "title") == (
            f"proj: {PER_STREAM:,}, backbone: {PER_STREAM:,}")
        # a ratio that wobbles between 0.82 and 0.825 is drawn on an axis that shows 0-1
        svg = 'svg[data-chart="stream:proj:embedding_std_ratio"]'
        page.wait_for_selector(svg)
        lo, hi = (float(page.get_attribute(svg, f"data-y{k}")) for k in ("min", "max"))
        assert lo <= 0.0 and hi >= 1.0, (lo, hi)
        ticks = page.eval_on_selector_all(f"{svg} > g > text", "ts => ts.map(t => t.textContent)")
        assert "0" in ticks and "1" in ticks, ticks
        # effective rank starts at 0 too
        rank_svg = 'svg[data-chart="stream:proj:effective_rank"]'
        assert float(page.get_attribute(rank_svg, "data-ymin")) <= 0.0
        assert problems == []
    finally:
        ctx.close()


def test_peak_is_drawn_by_shape_and_not_below_the_current(browser: Any, url: str) -> None:
    ctx, page, problems = _open(browser, f"{url}/?run=scale")
    try:
        legend = page.inner_text('[data-card="spectrum:proj"] .legend')
        assert "alert's peak, step 100" in legend, legend
        paths = _paths(page, "spectrum:proj")
        now, peak = paths["solid"], paths["dash"]
        assert len(now) == len(peak) == D
        # SVG y grows downwards: the peak (higher rank) has a lower top share and higher tail
        # shares than the collapsed current spectrum; it does not lie entirely below it
        assert peak[0][1] > now[0][1] and peak[-1][1] < now[-1][1], (now, peak)
        assert problems == []
    finally:
        ctx.close()
