"""The read app: every read route over a :class:`ReadSource`, and uvicorn serving an app from a
background thread.

Serves ``/metrics`` (:mod:`exporters.prometheus`'s registry through prometheus_client's own ASGI
app: the Prometheus text format, OpenMetrics when the scraper's ``Accept`` asks for it, gzip on
``Accept-Encoding: gzip``; with ``repwatch_build_info`` and the process collector's ``process_*``
metrics), ``/healthz``,
``/readyz``, ``/v1/runs`` (status JSON), ``/v1/runs/{run}/history``, ``/v1/runs/{run}/spectra``
and the live dashboard at ``/`` (:mod:`monitor.server.dashboard`). An in-process Monitor serves
it over its one run (:class:`SingleRunSource`); the sidecar over every run it scores, with its
write route added. Every request reads plain-float Snapshots; no request touches a tensor.

The OpenAPI document is at ``/openapi.json``; there is no ``/docs`` or ``/redoc`` page (FastAPI's
load their scripts from a public CDN, so they would not work offline). To browse the schema,
open ``/openapi.json`` in any OpenAPI viewer (e.g. Swagger UI or Redoc run locally, or an
editor's OpenAPI preview), or read it with ``curl -s http://HOST:PORT/openapi.json | jq``.

Both servers (the in-process :class:`BackgroundServer` and ``repwatch serve``) take their uvicorn
settings from :func:`server_config`: a request head must be complete within ``header_timeout``
seconds of the connection opening (or of the previous response), an idle kept-alive connection
is closed after ``keep_alive`` seconds, and at most ``max_connections`` connections stay open
(requests beyond answer 503, connections beyond are closed at once).
"""

from __future__ import annotations

import logging

import asyncio
import importlib.util
import threading
import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Protocol

import uvicorn
from fastapi import FastAPI, HTTPException, Path, Query
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import make_asgi_app
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exporters.prometheus import BuildInfoCollector, make_registry
from monitor._version import __version__
from monitor.alerts import DEFAULT_RULES, AlertRule
from monitor.server.dashboard import history_payload, mount_dashboard, spectra_payload
from monitor.snapshot import Snapshot
from monitor.validation import NAME_PATTERN, is_loopback


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


class AsgiRoute(APIRoute):
    """A route served by ``asgi``, a plain ASGI app, and documented in OpenAPI as an
    :class:`APIRoute` with the rest of the arguments; ``endpoint`` never runs."""

    def __init__(self, path: str, asgi: ASGIApp, **declaration: Any) -> None:
        super().__init__(path, **declaration)
        self.app = asgi


def metrics_app(registry: CollectorRegistry) -> ASGIApp:
    """prometheus_client's ASGI app over ``registry`` (format negotiation, gzip), run in a
    worker thread as the sync route it replaces was: collecting a registry (every run's
    snapshot in the sidecar) must not hold the event loop that takes the batches. The app
    reads only the request's headers; its one ``receive()`` is answered with an empty body.
    The query string is not passed on: prometheus_client's ``name[]`` filter finds a collector
    by the names it describes, and repwatch's collectors describe none (their families depend
    on the snapshots), so a filter would silently drop them; every scrape gets everything."""
    inner = make_asgi_app(registry)

    async def no_body() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        messages: list[Message] = []

        async def keep(message: Message) -> None:
            messages.append(message)

        await run_in_threadpool(asyncio.run, inner({**scope, "query_string": b""}, no_body, keep))
        for message in messages:
            await send(message)

    return app


def _metrics_doc() -> Response:  # the OpenAPI declaration of /metrics (metrics_app serves it)
    raise NotImplementedError       # no docstring: it would become the route's description


RunName = Annotated[str, Path(pattern=NAME_PATTERN, description="Run name")]
_NO_RUN: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody, "description": "No such run"}}


def create_read_app(source: ReadSource, *, title: str = "repwatch",
                    description: str = "Live representation-health metrics of training runs.",
                    collectors: Sequence[Collector] = ()) -> FastAPI:
    """The read routes over ``source``; ``collectors`` add to ``/metrics``, beside
    ``repwatch_build_info`` and the process collector (``process_*``: CPU, memory, file
    descriptors of this process; nothing where ``/proc`` is missing)."""
    app = FastAPI(title=title, version=__version__, description=description, docs_url=None,
                  redoc_url=None)          # their pages need a CDN; /openapi.json stays
    registry = make_registry(source.snapshots, source.rules)
    for collector in collectors:
        registry.register(collector)
    registry.register(BuildInfoCollector(__version__))
    ProcessCollector(registry=registry)

    def snaps_of(run: str) -> Sequence[Snapshot]:
        snaps = source.history(run)
        if snaps is None:
            raise HTTPException(404, f"no run {run!r}")
        return snaps

    app.router.routes.append(AsgiRoute(
        "/metrics", metrics_app(registry), endpoint=_metrics_doc, name="metrics",
        methods=["GET"], response_class=Response, summary="Prometheus metrics of every run"))

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


HEADER_TIMEOUT_SECONDS = 10.0
"""Default time a connection has to send a complete request head, from its opening or from the
end of the previous response (uvicorn has no such limit: a partial head was kept forever)."""
KEEP_ALIVE_SECONDS = 5.0
"""Default time an idle kept-alive connection stays open between requests (uvicorn's)."""
MAX_CONNECTIONS = 128
"""Default cap on open connections (and on requests in progress)."""


class _ConnectionGuard(asyncio.Protocol):
    """Mixed into a uvicorn HTTP protocol class by :func:`guarded_protocol`: closes a connection
    whose request head is not complete ``header_timeout`` s after it opened or after its
    previous response ended, and a connection that opens while ``max_connections`` are open.

    Relies only on what uvicorn's h11 and httptools protocols share: ``connections`` (the
    server's open connections), ``cycle`` (the current request, None before the first head is
    complete; ``response_complete`` once answered) and ``on_response_complete``."""

    header_timeout: float = HEADER_TIMEOUT_SECONDS
    max_connections: int | None = None
    _head_timer: asyncio.TimerHandle | None = None
    # set by the uvicorn protocol class
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    connections: set[Any]
    cycle: Any

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            transport.close()                  # over the cap: not kept (connection_lost follows)
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if not self.transport.is_closing():
            self._arm_head_timer()             # the next request's head (or keep-alive's end)

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_deadline)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_deadline(self) -> None:
        self._head_timer = None
        cycle = self.cycle                     # a request whose head came in: not ours to time
        if (cycle is None or cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()


def guarded_protocol(http: str = "auto", header_timeout: float = HEADER_TIMEOUT_SECONDS,
                     max_connections: int | None = MAX_CONNECTIONS) -> type[asyncio.Protocol]:
    """uvicorn's HTTP/1.1 protocol class ``http`` (``auto``: httptools when installed, else h11)
    with :class:`_ConnectionGuard`'s header timeout and connection cap."""
    if http == "auto":
        http = "httptools" if importlib.util.find_spec("httptools") is not None else "h11"
    if http == "httptools":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    elif http == "h11":
        from uvicorn.protocols.http.h11_impl import H11Protocol as base  # type: ignore[assignment]
    else:
        raise ValueError(f"http must be auto, h11 or httptools, got {http!r}")
    return type(f"Guarded{base.__name__}", (_ConnectionGuard, base),
                {"header_timeout": float(header_timeout), "max_connections": max_connections})


def _positive_seconds(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 3600:
        raise ValueError(f"{name} must be a number of seconds in (0, 3600], got {value!r}")
    return float(value)


def server_config(app: Any, host: str, port: int, *, log_level: str = "warning",
                  header_timeout: float = HEADER_TIMEOUT_SECONDS,
                  keep_alive: float = KEEP_ALIVE_SECONDS, max_connections: int = MAX_CONNECTIONS,
                  http: str = "auto") -> uvicorn.Config:
    """The uvicorn settings of every repwatch server (in process and ``repwatch serve``):
    request heads complete within ``header_timeout`` s, idle kept-alive connections closed after
    ``keep_alive`` s, at most ``max_connections`` connections open (further ones closed on
    arrival) and as many requests in progress (503 beyond); no access log, no lifespan, no
    WebSockets."""
    header_timeout = _positive_seconds("header_timeout", header_timeout)
    keep_alive = _positive_seconds("keep_alive", keep_alive)
    if isinstance(max_connections, bool) or not isinstance(max_connections, int) or (
            max_connections < 1):
        raise ValueError(f"max_connections must be an int >= 1, got {max_connections!r}")
    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=False, lifespan="off",
        ws="none", http=guarded_protocol(http, header_timeout, max_connections),
        timeout_keep_alive=keep_alive,  # type: ignore[arg-type]  # a float works (call_later)
        # uvicorn answers 503 once `connections >= limit` counting the asking one, and the
        # guard keeps at most max_connections open: +1 lets every open connection be served
        limit_concurrency=max_connections + 1)


class BackgroundServer:
    """uvicorn serving ``app`` from a daemon thread; ``start()`` returns once it listens.
    ``limits`` (``header_timeout``, ``keep_alive``, ``max_connections``, ``http``) go to
    :func:`server_config`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 9400,
                 **limits: Any) -> None:
        self.host = host
        self.config = server_config(app, host, port, **limits)
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


def serve_run(source: SingleRunSource, host: str, port: int) -> BackgroundServer:
    """Serve one run's read app from a background thread (OSError when it cannot listen). On a
    host that is not loopback it warns once: the read server has no authentication."""
    server = BackgroundServer(create_read_app(source), host, port)
    server.start()
    logger = logging.getLogger("repwatch")
    logger.info("repwatch serving on %s", server.url)
    if not is_loopback(host):
        logger.warning("repwatch's read server on %s (host=%r) is reachable from other hosts "
                       "without authentication (metrics, dashboard, run history); bind "
                       "host='127.0.0.1', or put a reverse proxy that authenticates in front "
                       "of it", server.url, host)
    return server
