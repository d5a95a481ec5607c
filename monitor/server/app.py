"""In-process HTTP server: FastAPI app on uvicorn in a background thread.

Serves ``/metrics`` (Prometheus text format from :mod:`exporters.prometheus`), ``/healthz``,
``/v1/runs`` (status JSON), ``/v1/runs/{run}/history``, ``/v1/runs/{run}/spectra`` and the live
dashboard at ``/`` (:mod:`monitor.server.dashboard`, shared with the sidecar). Every request reads
plain-float Snapshots; no request touches a tensor.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.responses import Response

from exporters.prometheus import CONTENT_TYPE, make_registry, render
from monitor._version import __version__
from monitor.alerts import DEFAULT_RULES, AlertRule
from monitor.server.dashboard import (HISTOGRAMS, HISTORY_LIMIT, SINCE_STEP, history_payload,
                                      mount_dashboard, spectra_payload)
from monitor.snapshot import Snapshot

def create_app(latest: Callable[[], Snapshot | None], history: Callable[[], Sequence[Snapshot]],
               rules: Sequence[AlertRule] = DEFAULT_RULES) -> FastAPI:
    """The repwatch HTTP app over a snapshot source."""
    app = FastAPI(title="repwatch", version=__version__,
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

    def snaps_of(run: str) -> list[Snapshot]:
        snaps = [s for s in history() if s.run == run]
        if not snaps:
            raise HTTPException(404, f"no run {run!r}")
        return snaps

    @app.get("/v1/runs/{run}/history", summary="Recent snapshots of a run, oldest first")
    def run_history(run: str, limit: int = HISTORY_LIMIT, since_step: int | None = SINCE_STEP,
                    histograms: bool = HISTOGRAMS) -> list[dict[str, Any]]:
        return history_payload(snaps_of(run), limit, since_step, histograms)

    @app.get("/v1/runs/{run}/spectra",
             summary="Per stream: the latest eigenvalue spectrum and the run's peak spectrum")
    def run_spectra(run: str) -> dict[str, dict[str, Any]]:
        return spectra_payload(snaps_of(run))

    mount_dashboard(app)
    return app


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
