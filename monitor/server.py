"""In-process HTTP server: FastAPI app on uvicorn in a background thread.

Serves ``/metrics`` (Prometheus text format from :mod:`exporters.prometheus`), ``/healthz``,
``/v1/runs`` (status JSON), ``/v1/runs/{run}/history`` and a small status page at ``/``.
Every request reads the latest plain-float Snapshot; no request touches a tensor.
"""

from __future__ import annotations

import html
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse, Response

from exporters.prometheus import CONTENT_TYPE, make_registry, render
from monitor.alerts import DEFAULT_RULES, AlertRule
from monitor.snapshot import Snapshot

_PAGE_SIGNALS: tuple[tuple[str, str], ...] = (
    ("effective_rank", "RankMe"), ("effective_rank_ratio", "RankMe / min(n,d)"),
    ("effective_rank_peak_ratio", "of peak"), ("participation_ratio", "PR"),
    ("spectrum_alpha", "α"), ("srank", "srank"), ("embedding_std_ratio", "std ratio"),
    ("mean_cosine_similarity", "mean cos"), ("window_samples", "n"), ("embedding_dim", "d"),
)


def create_app(latest: Callable[[], Snapshot | None], history: Callable[[], Sequence[Snapshot]],
               rules: Sequence[AlertRule] = DEFAULT_RULES) -> FastAPI:
    """The repwatch HTTP app over a snapshot source."""
    app = FastAPI(title="repwatch", version="0.1.0",
                  description="Live representation-health metrics of a training run.")
    registry = make_registry(latest, rules)

    @app.get("/metrics", response_class=Response, summary="Prometheus metrics")
    def metrics() -> Response:
        return Response(render(registry), media_type=CONTENT_TYPE)

    @app.get("/healthz", summary="Liveness")
    def healthz() -> dict[str, Any]:
        snap = latest()
        return {"status": "ok", "published": snap is not None,
                "step": snap.step if snap else None}

    @app.get("/v1/runs", summary="Status of the run: streams, latest values, firing alerts")
    def runs() -> list[dict[str, Any]]:
        snap = latest()
        return [] if snap is None else [snap.to_dict()]

    @app.get("/v1/runs/{run}/history", summary="Recent snapshots of a run, oldest first")
    def run_history(run: str, limit: int = Query(200, ge=1, le=10_000)) -> list[dict[str, Any]]:
        snaps = [s for s in history() if s.run == run]
        if not snaps:
            raise HTTPException(404, f"no run {run!r}")
        return [s.to_dict() for s in snaps[-limit:]]

    @app.get("/", response_class=HTMLResponse, summary="Status page")
    def index() -> HTMLResponse:
        return HTMLResponse(_page(latest()))

    return app


_LAYER_SIGNALS: tuple[tuple[str, str], ...] = (
    ("dormant_units_ratio{tau=0}", "dead"), ("dormant_units_ratio{tau=0.1}", "dormant τ=0.1"),
    ("low_activity_units_ratio", "low activity"), ("effective_rank", "effective rank"),
    ("effective_rank_peak_ratio", "÷ peak"), ("activation_units", "units"))


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return "–"
    return f"{v:.0f}" if abs(v) >= 1000 or float(v).is_integer() else f"{v:.3g}"


def _page(snap: Snapshot | None) -> str:
    head = ("<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='refresh' "
            "content='5'><meta name='viewport' content='width=device-width'><title>repwatch"
            "</title><style>body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}"
            "table{border-collapse:collapse}td,th{padding:.3rem .6rem;border-bottom:1px solid "
            "#ddd;text-align:right}th:first-child,td:first-child{text-align:left}"
            ".crit{color:#b00020}.warn{color:#a66300}@media(prefers-color-scheme:dark){body"
            "{background:#111;color:#eee}td,th{border-color:#333}}</style></head><body>")
    if snap is None:
        return head + "<h1>repwatch</h1><p>No publish yet.</p></body></html>"
    e = html.escape
    rows = []
    for stream in snap.stream_names:
        vals = snap.streams[stream]
        cells = "".join(f"<td>{_fmt(vals.get(k, math.nan))}</td>" for k, _ in _PAGE_SIGNALS)
        rows.append(f"<tr><td>{e(stream)}</td>{cells}</tr>")
    header = "".join(f"<th>{e(label)}</th>" for _, label in _PAGE_SIGNALS)
    alerts = "".join(
        f"<li class='{'crit' if a.severity == 'critical' else 'warn'}'><b>{e(a.name)}</b> "
        f"[{e(a.severity)}] on <code>{e(a.stream)}</code> since step {a.since_step}: "
        f"{e(a.description)} <a href='{e(a.runbook_url)}'>runbook</a></li>" for a in snap.alerts
    ) or "<li>none</li>"
    errors = ", ".join(f"{e(k)}: {v}" for k, v in sorted(snap.errors.items())) or "none"
    layers = ""
    if snap.layers:
        lrows = "".join(
            f"<tr><td>{e(name)}</td>"
            + "".join(f"<td>{_fmt(v.get(k, math.nan))}</td>" for k, _ in _LAYER_SIGNALS) + "</tr>"
            for name, v in sorted(snap.layers.items()))
        lhead = "".join(f"<th>{e(label)}</th>" for _, label in _LAYER_SIGNALS)
        layers = (f"<h2>Activation layers (plasticity)</h2><table><tr><th>layer</th>{lhead}</tr>"
                  f"{lrows}</table>")
    return (head + f"<h1>repwatch — run <code>{e(snap.run)}</code></h1>"
            f"<p>step {snap.step} · published {time.strftime('%H:%M:%S', time.localtime(snap.time))}"
            f" · publish took {snap.publish_duration_seconds * 1e3:.1f} ms · errors: {errors}</p>"
            f"<h2>Firing alerts</h2><ul>{alerts}</ul>"
            f"<h2>Streams</h2><table><tr><th>stream</th>{header}</tr>{''.join(rows)}</table>"
            f"{layers}<p><a href='/metrics'>/metrics</a> · <a href='/v1/runs'>/v1/runs</a> · "
            "<a href='/docs'>API</a></p></body></html>")


class BackgroundServer:
    """uvicorn serving ``app`` from a daemon thread; ``start()`` returns once it listens."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 9400) -> None:
        self.host = host
        self.config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                                     access_log=False, lifespan="off")
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self._run, name="repwatch-http", daemon=True)
        self.port = port
        self._failure: BaseException | None = None

    def _run(self) -> None:
        try:
            self.server.run()
        except BaseException as exc:  # uvicorn exits via SystemExit when it cannot bind
            self._failure = exc

    def start(self, timeout: float = 15.0) -> None:
        """Start serving; raise OSError when the server cannot listen."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise OSError(f"repwatch could not serve on {self.host}:{self.config.port} "
                              f"({self._failure!r}); is the port in use? Pass port=0 for a free "
                              "port or port=None for no server")
            time.sleep(0.01)
        sockets = [s for srv in self.server.servers for s in srv.sockets]
        if sockets:
            self.port = int(sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and join the thread."""
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout)
