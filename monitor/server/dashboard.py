"""The built-in live dashboard of the read app (:mod:`monitor.server.app`).

The page itself is static (``monitor/server/web/``: index.html, app.js, app.css; package data, no
third-party code, nothing fetched from a CDN). It polls the JSON API of the app serving it:
``/v1/runs`` (run selector, header, alerts), ``/v1/runs/{run}/history?since_step=`` (charts) and
``/v1/runs/{run}/spectra`` (current and peak eigenvalue spectra). This module holds the routes for
the page and its assets, and the history / spectra payloads. Torch-free: the sidecar image
imports it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from monitor.snapshot import Snapshot

ASSETS: tuple[str, ...] = ("index.html", "app.js", "app.css")
"""The page's files in ``monitor/server/web/`` (shipped as package data)."""

ASSET_PREFIX = "/ui"
"""Where ``app.js`` and ``app.css`` are served."""

_NO_CACHE = {"Cache-Control": "no-cache"}


def web_dir() -> resources.abc.Traversable:
    """The packaged ``monitor/server/web`` folder."""
    return resources.files("monitor.server").joinpath("web")


@cache
def index_html() -> str:
    """The dashboard page (read once from the package)."""
    return web_dir().joinpath("index.html").read_text(encoding="utf-8")


def _slug(text: str) -> str:
    """GitHub's heading anchor: lower case, spaces → '-', other punctuation dropped."""
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


@cache
def runbooks_html() -> str:
    """docs/runbooks.md (packaged as ``monitor/server/web/runbooks.md``) as a page whose headings
    carry GitHub's anchors, so the alerts' default ``runbook_url``
    (``docs/runbooks.md#repwatchrepresentationcollapse``) resolves to ``/runbooks#…``."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(web_dir().joinpath("runbooks.md").read_text(encoding="utf-8"))
    for i, tok in enumerate(tokens):
        if tok.type == "heading_open" and i + 1 < len(tokens):
            tok.attrSet("id", _slug(tokens[i + 1].content))
    body = md.renderer.render(tokens, md.options, {})
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<title>repwatch runbooks</title>"
            f"<link rel=\"stylesheet\" href=\"ui/app.css\"></head>"
            f"<body><main class=\"runbooks\">{body}</main></body></html>")


def mount_dashboard(app: FastAPI) -> None:
    """Serve the dashboard at ``/`` (``?run=NAME`` preselects a run), its assets at /ui and
    the runbooks at ``/runbooks``."""

    @app.get("/", response_class=HTMLResponse, summary="Live dashboard (HTML page)")
    def dashboard() -> HTMLResponse:
        return HTMLResponse(index_html(), headers=_NO_CACHE)

    @app.get("/runbooks", response_class=HTMLResponse, summary="Alert runbooks (HTML page)")
    def runbooks() -> HTMLResponse:
        return HTMLResponse(runbooks_html())

    app.mount(ASSET_PREFIX, StaticFiles(packages=[("monitor.server", "web")]),
              name="dashboard-assets")


def history_payload(snaps: Sequence[Snapshot], limit: int, since_step: int | None = None,
                    histograms: bool = True) -> list[dict[str, Any]]:
    """The last ``limit`` snapshots (oldest first) with ``step > since_step`` as JSON dicts;
    ``histograms=False`` leaves the cumulative histograms out (the page does not chart them)."""
    if since_step is not None:
        snaps = [s for s in snaps if s.step > since_step]
    out = [s.to_dict() for s in snaps[-limit:]]
    if not histograms:
        for d in out:
            d.pop("histograms", None)
    return out


def _finite_or_none(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def spectra_payload(snaps: Sequence[Snapshot]) -> dict[str, dict[str, Any]]:
    """Per stream: the latest eigenvalue spectrum (of ``S/n``, descending) and the peak the
    alerts use: the spectrum of the publish that set ``effective_rank_peak`` (the run
    tracker's peak after ``peak_warmup``: its effective rank equals the peak), the latest such
    among ``snaps`` (the history ring). None when no publish in ``snaps`` set it (before the
    warm-up, or the peak's publish has left the ring)."""
    out: dict[str, dict[str, Any]] = {}
    for snap in snaps:                                   # oldest first
        for stream, eig in snap.spectra.items():
            if not eig:
                continue
            values = snap.streams.get(stream, {})
            rank = values.get("effective_rank", math.nan)
            tracked = values.get("effective_rank_peak", math.nan)
            entry = out.setdefault(stream, {"peak": None})
            entry.update(step=snap.step, effective_rank=_finite_or_none(rank),
                         eigenvalues=list(eig))
            if math.isfinite(rank) and math.isfinite(tracked) and rank >= tracked:
                entry["peak"] = {"step": snap.step, "effective_rank": rank,
                                 "eigenvalues": list(eig)}
    return out
