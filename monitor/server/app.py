"""The read app: every read route over a :class:`ReadSource`, and uvicorn serving an app from a
background thread.

Serves ``/metrics`` (Prometheus text format from :mod:`exporters.prometheus`), ``/healthz``,
``/readyz``, ``/v1/runs`` (status JSON), ``/v1/runs/{run}/history``, ``/v1/runs/{run}/spectra``
and the live dashboard at ``/`` (:mod:`monitor.server.dashboard`). An in-process Monitor serves
it over its one run (:class:`SingleRunSource`); the sidecar over every run it scores, with its
write route added. Every request reads plain-float Snapshots; no request touches a tensor.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Protocol

import uvicorn
from fastapi import FastAPI, HTTPException, Path, Query
from fastapi.responses import JSONResponse, Response
from prometheus_client.registry import Collector
from pydantic import BaseModel

from exporters.prometheus import CONTENT_TYPE, make_registry, render
from monitor._version import __version__
from monitor.alerts import DEFAULT_RULES, AlertRule
from monitor.server.dashboard import history_payload, mount_dashboard, spectra_payload
from monitor.snapshot import Snapshot
from monitor.validation import NAME_PATTERN


class ReadSource(Protocol):
    """What the read routes read."""

    @property
    def rules(self) -> Sequence[AlertRule]:
        """The alert rules (every rule's ``repwatch_alerts_firing`` series, 0 or 1)."""

    @property
    def ready(self) -> bool:
        """Whether the source takes data (``/readyz`` answers 200, else 503)."""

    def snapshots(self) -> list[Snapshot]:
        """The latest Snapshot of every run that has published, sorted by run."""

    def history(self, run: str) -> Sequence[Snapshot] | None:
        """Recent snapshots of ``run``, oldest first (None: no such run)."""


class SingleRunSource:
    """One run's snapshots: ``latest()`` (None before the first publish) and ``history()``
    (oldest first)."""

    ready = True

    def __init__(self, latest: Callable[[], Snapshot | None],
                 history: Callable[[], Sequence[Snapshot]],
                 rules: Sequence[AlertRule] = DEFAULT_RULES) -> None:
        self._latest = latest
        self._history = history
        self.rules = tuple(rules)

    def snapshots(self) -> list[Snapshot]:
        snap = self._latest()
        return [] if snap is None else [snap]

    def history(self, run: str) -> list[Snapshot] | None:
        return [s for s in self._history() if s.run == run] or None


class Health(BaseModel):
    """Liveness: whether any run has published, and the step of the newest snapshot."""

    status: str
    published: bool
    step: int | None


class ErrorBody(BaseModel):
    """Error answer: what was expected and what was got."""

    detail: str


RunName = Annotated[str, Path(pattern=NAME_PATTERN, description="Run name")]
_NO_RUN: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody, "description": "No such run"}}


def create_read_app(source: ReadSource, *, title: str = "repwatch",
                    description: str = "Live representation-health metrics of training runs.",
                    collectors: Sequence[Collector] = ()) -> FastAPI:
    """The read routes over ``source``; ``collectors`` add to ``/metrics``."""
    app = FastAPI(title=title, version=__version__, description=description)
    registry = make_registry(source.snapshots, source.rules)
    for collector in collectors:
        registry.register(collector)

    def snaps_of(run: str) -> Sequence[Snapshot]:
        snaps = source.history(run)
        if snaps is None:
            raise HTTPException(404, f"no run {run!r}")
        return snaps

    @app.get("/metrics", response_class=Response, summary="Prometheus metrics of every run")
    def metrics() -> Response:
        return Response(render(registry), media_type=CONTENT_TYPE)

    @app.get("/healthz", summary="Liveness")
    def healthz() -> Health:
        snaps = source.snapshots()
        newest = max(snaps, key=lambda s: s.time) if snaps else None
        return Health(status="ok", published=newest is not None,
                      step=None if newest is None else newest.step)

    @app.get("/readyz", summary="Readiness: 200 while the service takes data, else 503",
             responses={503: {"description": "Not taking data (the sidecar's scoring worker "
                                             "is not running)"}})
    def readyz() -> JSONResponse:
        if source.ready:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not ready"}, status_code=503)

    @app.get("/v1/runs", summary="Status of every run: streams, last step, latest values, "
                                 "firing alerts")
    def runs() -> list[dict[str, Any]]:
        return [s.to_dict() for s in source.snapshots()]

    @app.get("/v1/runs/{run}/history", summary="Recent snapshots of a run, oldest first",
             responses=_NO_RUN)
    def run_history(
        run: RunName,
        limit: Annotated[int, Query(ge=1, le=10_000, description="At most this many snapshots "
                                                               "(the newest)")] = 200,
        since_step: Annotated[int | None, Query(ge=-1, description="Only snapshots with a step "
                                                "above this one (poll with the last step seen)")
                              ] = None,
        histograms: Annotated[bool, Query(description="Include the cumulative histograms "
                                                      "(false: a smaller payload)")] = True,
    ) -> list[dict[str, Any]]:
        return history_payload(snaps_of(run), limit, since_step, histograms)

    @app.get("/v1/runs/{run}/spectra", responses=_NO_RUN,
             summary="Per stream: the latest eigenvalue spectrum and the run's peak spectrum")
    def run_spectra(run: RunName) -> dict[str, dict[str, Any]]:
        return spectra_payload(snaps_of(run))

    mount_dashboard(app)
    return app


def create_app(latest: Callable[[], Snapshot | None], history: Callable[[], Sequence[Snapshot]],
               rules: Sequence[AlertRule] = DEFAULT_RULES) -> FastAPI:
    """The read app over one run: ``create_read_app(SingleRunSource(latest, history, rules))``."""
    return create_read_app(SingleRunSource(latest, history, rules))


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
