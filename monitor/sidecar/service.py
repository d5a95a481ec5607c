"""``repwatch serve``: the sidecar ingest service (FastAPI) and its scoring backend.

A trainer (``Monitor(sink=...)``) posts sampled embedding batches; the handler authenticates,
checks limits and parses the body (:mod:`monitor.transport.wire`), then hands the batch to ONE
scoring worker thread through a bounded queue. A full queue answers 429 with ``Retry-After``
and drops the batch (counted), so memory stays bounded by ``queue_batches × max_body_bytes``.
The worker feeds a backend; the torch backend runs one :class:`monitor.Monitor` per run, so
metric names, alerts and the Snapshot are exactly those of in-process mode.

Accounting (on ``/metrics``): a batch's rows enter ``repwatch_received_samples_total`` at the
moment its fate is decided — scored by the worker, or dropped (``overload``: queue full,
``dimension``: 409 dimension change, ``nonfinite``: rows with NaN/Inf, ``error``: the backend
raised, ``shutdown``: still queued at close) — and always together with that outcome, under one
lock, so ``received = scored + dropped`` holds at every scrape. Rows waiting in the queue are
shown by ``repwatch_sidecar_queued_samples``. Requests refused before their rows are parsed
(401, 409 cardinality limits, 413, 415, 400 on headers, 422) are not "received"; they count in
``repwatch_sidecar_rejected_requests_total{reason}`` (no run label: refused names must not
create series).

Limits (all in :class:`SidecarConfig`): body bytes (413, from ``Content-Length`` before the body
is read and again while it streams in), rows per batch and dimension (400), runs per service and
streams per run (409 "too many runs/streams"), stream dimension fixed by its first batch (409).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Protocol

import numpy as np
from fastapi import Depends, FastAPI, Path
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from exporters.catalogue import BY_NAME, PREFIX
from monitor.alerts import AlertRule
from monitor.engine.run import BatchClock
from monitor.errors import ErrorLog
from monitor.server.app import ErrorBody, RunName, create_read_app
from monitor.sidecar.config import SidecarConfig
from monitor.snapshot import Snapshot
from monitor.transport import wire
from monitor.transport.errors import REJECT_REASONS, Rejected
from monitor.transport.wire import ProtocolError
from monitor.validation import NAME_PATTERN, check_name

log = logging.getLogger("repwatch.sidecar")




def limit_native_threads(threads: int) -> bool:
    """Cap the BLAS/OpenMP thread pools of this process (numpy's eigendecomposition at publish)
    at ``threads``, as ONNX Runtime is capped by :attr:`SidecarConfig.threads`. Without it
    OpenBLAS runs one thread per core and spins them between calls: on 2 cores, 3.1 instead of
    1.5 CPU ms per scored 256×128 batch (benchmarks/sidecar_throughput.py). Process-wide, so
    ``repwatch serve`` calls it, not the library. False when ``threadpoolctl`` is missing."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return False
    threadpool_limits(limits=threads)
    return True


class Backend(Protocol):
    """What the service needs from a scoring backend (torch now; ONNX Runtime later)."""

    def ingest(self, run: str, stream: str, rows: np.ndarray, labels: np.ndarray | None,
               step: int | None) -> None:
        """Score ``rows`` (float32 ``(b, d)``) of ``stream`` of ``run``; called by one thread."""

    def snapshots(self) -> list[Snapshot]:
        """The latest Snapshot of every run that has published, sorted by run."""

    def history(self, run: str) -> list[Snapshot] | None:
        """Recent snapshots of ``run``, oldest first (None: no such run)."""

    def close(self) -> None:
        """Release everything."""


class _Run:
    """One run of the torch backend: its Monitor and how its step advances."""

    def __init__(self, monitor: Any) -> None:
        self.monitor = monitor
        self.clock = BatchClock()


class TorchBackend:
    """One :class:`monitor.Monitor` per run, on ``device``; the same scorers as in-process.

    The run's step advances by :class:`monitor.engine.run.BatchClock` (``Monitor.step``, which
    publishes on the ``every`` cadence), as in the ONNX backend.
    """

    def __init__(self, config: SidecarConfig) -> None:
        import torch

        self._torch = torch
        self.config = config
        self.device = self._resolve(config.device)
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()
        self._errors = ErrorLog()

    def _resolve(self, device: str) -> Any:
        torch = self._torch
        if device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but CUDA is not available "
                             "(use --device cpu or auto)")
        return dev

    def _run(self, run: str) -> _Run:
        r = self._runs.get(run)
        if r is None:
            from monitor.monitor import Monitor

            opts = {"history": self.config.history, **self.config.monitor_options}
            mon = Monitor(run=run, every=self.config.every, max_rows=self.config.window,
                          window=self.config.window, port=None, rules=self.config.rules,
                          strict=True, **opts)
            r = _Run(mon)
            with self._lock:
                self._runs[run] = r
        return r

    def ingest(self, run: str, stream: str, rows: np.ndarray, labels: np.ndarray | None,
               step: int | None) -> None:
        r = self._run(run)
        mon = r.monitor
        try:                                   # a failing publish is not this batch's fault
            steps = r.clock.advance(stream, step, mon.step_count)
            if steps:
                mon.step(steps)
        except Exception as exc:  # noqa: BLE001 - counted and logged once; scoring goes on
            self._errors.record("publish", exc, key=f"publish[{run}]")
        torch = self._torch
        x = torch.from_numpy(rows).to(self.device, non_blocking=True)        # (b, d) float32
        y = torch.from_numpy(labels).to(self.device) if labels is not None else None  # (b,)
        mon.observe(stream, x, labels=y)       # strict Monitor: raises, the service counts it
        r.clock.scored(stream)

    def snapshots(self) -> list[Snapshot]:
        with self._lock:
            runs = sorted(self._runs.items())
        return [r.monitor.latest for _, r in runs if r.monitor.latest is not None]

    def history(self, run: str) -> list[Snapshot] | None:
        with self._lock:
            r = self._runs.get(run)
        return None if r is None else r.monitor.history

    def close(self) -> None:
        with self._lock:
            runs, self._runs = list(self._runs.values()), {}
        for r in runs:
            r.monitor.close()


def _onnx_backend(config: SidecarConfig) -> Backend:
    from monitor.sidecar.onnx_backend import OnnxBackend

    return OnnxBackend(config)


def _auto_backend(config: SidecarConfig) -> Backend:
    """ONNX Runtime when it is installed (the sidecar image), else torch."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return TorchBackend(config)
    return _onnx_backend(config)


BACKENDS: dict[str, Callable[[SidecarConfig], Backend]] = {
    "auto": _auto_backend, "onnx": _onnx_backend, "torch": TorchBackend}
"""``onnx``: the ONNX Runtime kernels + numpy publish, no torch (spectral, collapse and Q-Score
signals; NC1/NC2 with labels); ``torch``: one in-process Monitor per run (every signal)."""


@dataclass
class _Batch:
    run: str
    stream: str
    rows: np.ndarray        # (b, d) float32
    labels: np.ndarray | None
    step: int | None

    @property
    def b(self) -> int:
        return int(self.rows.shape[0])


class Sidecar:
    """Per-run state of the service: admission, accounting, the bounded queue and its worker;
    the read app's source (:class:`monitor.server.ReadSource`) of every run."""

    def __init__(self, config: SidecarConfig, backend: Backend | None = None) -> None:
        self.config = config
        self.backend: Backend = backend if backend is not None else BACKENDS[config.backend](config)
        self._queue: queue.Queue[_Batch] = queue.Queue(maxsize=config.queue_batches)
        self._lock = threading.Lock()
        self._dims: dict[str, dict[str, int]] = {}                # run → stream → dimension
        self._received: dict[tuple[str, str], int] = {}
        self._scored: dict[tuple[str, str], int] = {}
        self._dropped: dict[tuple[str, str], int] = {}            # (run, reason)
        self._queued: dict[str, int] = {}                         # run → rows waiting
        self._reserved = 0                                        # places held by readers
        self._rejected: dict[str, int] = {}
        self._errors = ErrorLog()
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._work, name="repwatch-sidecar-scorer",
                                        daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ admission

    @property
    def ready(self) -> bool:
        """True while the scoring worker runs."""
        return self._worker.is_alive() and not self._stop.is_set()

    @property
    def saturated(self) -> bool:
        """True while the scoring queue is full (the shm ring reader then waits, see
        :class:`monitor.transport.shm.ShmReader`, instead of having batches dropped as overload)."""
        with self._lock:
            return self._queue.qsize() + self._reserved >= self.config.queue_batches

    async def reserve(self, timeout: float) -> bool:
        """Reserve a place in the scoring queue, waiting without blocking the event loop at most
        ``timeout`` s while it is full; True when reserved (pass ``reserved=True`` to
        :meth:`submit`, or :meth:`release` it). Called before a request's body is read, so a
        burst waits on its socket instead of being read, refused with 429 and sent again; the
        reservation keeps concurrent waiters from all taking the one place that frees up."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._queue.qsize() + self._reserved < self.config.queue_batches:
                    self._reserved += 1
                    return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.002)

    def release(self) -> None:
        """Give back a reservation that will not be submitted (a request that failed)."""
        with self._lock:
            self._reserved -= 1

    def reject(self, reason: str) -> None:
        """Count a request refused before its rows were parsed."""
        with self._lock:
            self._rejected[reason] = self._rejected.get(reason, 0) + 1

    def _admit_locked(self, run: str, stream: str) -> None:
        streams = self._dims.get(run)
        if streams is None:
            if len(self._dims) >= self.config.max_runs:
                raise Rejected(409, "too_many_runs",
                               f"too many runs: this service takes at most {self.config.max_runs} "
                               f"runs (has {sorted(self._dims)[:10]}...); got new run {run!r}")
        elif stream not in streams and len(streams) >= self.config.max_streams_per_run:
            raise Rejected(409, "too_many_streams",
                           f"too many streams for run {run!r}: at most "
                           f"{self.config.max_streams_per_run} per run (metric cardinality); "
                           f"got new stream {stream!r}")

    def admit(self, run: str, stream: str) -> None:
        """Raise :class:`Rejected` (409) when ``run``/``stream`` would pass a cardinality limit."""
        with self._lock:
            self._admit_locked(run, stream)

    def submit(self, run: str, stream: str, rows: np.ndarray, labels: np.ndarray | None,
               step: int | None, *, reserved: bool = False) -> None:
        """Queue a parsed batch for scoring, or raise :class:`Rejected` (409, 429). With
        ``reserved`` it uses (and always consumes) a place taken by :meth:`reserve`."""
        batch = _Batch(run, stream, rows, labels, step)
        b, d = batch.b, int(rows.shape[1])
        with self._lock:
            if reserved:
                self._reserved -= 1
            self._admit_locked(run, stream)
            streams = self._dims.setdefault(run, {})
            first = streams.setdefault(stream, d)
            if first != d:
                self._account_locked(run, stream, b, dropped={"dimension": b})
                raise Rejected(409, "dimension",
                               f"stream {run!r}/{stream!r} has dimension {first} (from its first "
                               f"batch); got rows of dimension {d}. Use another stream name for "
                               "another layer")
            try:
                if not reserved and self._queue.qsize() + self._reserved >= self.config.queue_batches:
                    raise queue.Full                      # the free places are reserved
                self._queue.put_nowait(batch)
            except queue.Full:
                self._account_locked(run, stream, b, dropped={"overload": b})
                raise Rejected(429, "overload",
                               f"scoring queue full ({self.config.queue_batches} batches); "
                               f"batch dropped, retry after {self.config.retry_after_seconds} s",
                               {"Retry-After": str(self.config.retry_after_seconds)}) from None
            self._queued[run] = self._queued.get(run, 0) + b

    def _account_locked(self, run: str, stream: str, b: int, scored: int = 0,
                        dropped: dict[str, int] | None = None) -> None:
        key = (run, stream)
        self._received[key] = self._received.get(key, 0) + b
        self._scored[key] = self._scored.get(key, 0) + scored
        for reason, n in (dropped or {}).items():
            if n:
                self._dropped[(run, reason)] = self._dropped.get((run, reason), 0) + n
        assert scored + sum((dropped or {}).values()) == b

    # ------------------------------------------------------------------ worker

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                batch = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            try:
                self._score(batch)
            except BaseException as exc:  # noqa: BLE001 - never let the worker die
                self._errors.record("sidecar", exc, key="worker")
            finally:
                self._queue.task_done()

    def _score(self, batch: _Batch) -> None:
        b = batch.b
        try:
            finite = int(np.isfinite(batch.rows).all(axis=1).sum())   # host rows: no GPU sync
            self.backend.ingest(batch.run, batch.stream, batch.rows, batch.labels, batch.step)
        except Exception as exc:  # noqa: BLE001 - counted as dropped{reason="error"}
            self._errors.record("ingest", exc, key=f"ingest[{batch.run}/{batch.stream}]")
            outcome: dict[str, Any] = {"dropped": {"error": b}}
        else:
            outcome = {"scored": finite, "dropped": {"nonfinite": b - finite}}
        with self._lock:
            self._queued[batch.run] -= b
            self._account_locked(batch.run, batch.stream, b, **outcome)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until every queued batch has been scored (True) or ``timeout`` passed (False)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    # ------------------------------------------------------------------ reading

    @property
    def rules(self) -> Sequence[AlertRule]:
        """The alert rules of every run."""
        return self.config.rules

    def snapshots(self) -> list[Snapshot]:
        """The latest Snapshot of every run that has published, sorted by run."""
        return self.backend.snapshots()

    def history(self, run: str) -> list[Snapshot] | None:
        """Recent snapshots of ``run``, oldest first (None: no such run)."""
        return self.backend.history(run)

    def accounting(self) -> dict[str, Any]:
        """A consistent copy of the counters (taken under the lock)."""
        with self._lock:
            return {"received": dict(self._received), "scored": dict(self._scored),
                    "dropped": dict(self._dropped), "queued": dict(self._queued),
                    "rejected": dict(self._rejected), "queue_batches": self._queue.qsize(),
                    "errors": {**self._errors.counts()}}

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker (after the batch in hand), count what is left as dropped, close the
        backend. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._worker.join(timeout)
        while True:
            try:
                batch = self._queue.get_nowait()
            except queue.Empty:
                break
            with self._lock:
                self._queued[batch.run] -= batch.b
                self._account_locked(batch.run, batch.stream, batch.b,
                                     dropped={"shutdown": batch.b})
            self._queue.task_done()
        self.backend.close()


# ---------------------------------------------------------------------- exposition

def _family(name: str) -> CounterMetricFamily | GaugeMetricFamily:
    """An empty family for catalogue metric ``repwatch_<name>`` (name, help, labels from there)."""
    spec = BY_NAME[PREFIX + name]
    cls = CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily
    return cls(spec.name, spec.help, labels=list(spec.labels))


class _AccountingCollector(Collector):
    """received/scored/dropped samples, queue depth and refused requests of the service."""

    def __init__(self, sidecar: Sidecar) -> None:
        self._sidecar = sidecar

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        acc = self._sidecar.accounting()
        received, scored = _family("received_samples_total"), _family("scored_samples_total")
        for (run, stream), n in sorted(acc["received"].items()):
            received.add_metric([run, stream], float(n))
            scored.add_metric([run, stream], float(acc["scored"].get((run, stream), 0)))
        dropped = _family("dropped_samples_total")
        for (run, reason), n in sorted(acc["dropped"].items()):
            dropped.add_metric([run, reason], float(n))
        queued = _family("sidecar_queued_samples")
        for run, n in sorted(acc["queued"].items()):
            queued.add_metric([run], float(n))
        rejected = _family("sidecar_rejected_requests_total")
        for reason, n in sorted(acc["rejected"].items()):
            rejected.add_metric([reason], float(n))
        errors = _family("sidecar_errors_total")
        for component, n in sorted(acc["errors"].items()):
            errors.add_metric([component], float(n))
        up = _family("sidecar_ready")
        up.add_metric([], 1.0 if self._sidecar.ready else 0.0)
        yield from (received, scored, dropped, queued, rejected, errors, up)


# ---------------------------------------------------------------------- HTTP

class BatchAccepted(BaseModel):
    """202 answer: the batch is queued for scoring."""

    run: str
    stream: str
    rows: int
    step: int | None


def _err(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"model": ErrorBody, "description": description}
    if headers:
        out["headers"] = headers
    return out


_BATCH_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _err("Malformed headers or body, or a shape over the limits"),
    401: _err("Missing or wrong bearer token",
              {"WWW-Authenticate": {"schema": {"type": "string"}}}),
    409: _err("Stream dimension changed, or too many runs/streams"),
    413: _err("Body over the size limit"),
    415: _err("Unsupported Content-Type or dtype"),
    422: _err("Run or stream name is not a valid name"),
    429: _err("Scoring queue full; batch dropped",
              {"Retry-After": {"schema": {"type": "integer"}}}),
}


def _header(name: str, description: str, **schema: Any) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "description": description,
            "schema": {"type": "string", **schema}}


_BATCH_BODY: dict[str, Any] = {
    # Declared for the document; BatchHandler reads them and answers bad values with 400/415.
    "parameters": [
        _header(wire.H_DTYPE, "Row dtype (raw form; required there)",
                enum=list(wire.DTYPES)),
        _header(wire.H_SHAPE, "'<rows>,<dim>' (raw form; required there)",
                pattern=r"^[0-9]{1,10},[0-9]{1,10}$"),
        _header(wire.H_LABELS, "'int64': one little-endian int64 label per row follows "
                                   "the rows (raw form only)", enum=["int64"]),
        _header(wire.H_STEP, "Training step of the batch (steps the trainer had completed "
                                 "when it captured it)", pattern=r"^[0-9]{1,18}$"),
    ],
    "requestBody": {
        "required": True,
        "description": (
            "`application/octet-stream`: raw little-endian rows (C order), then with "
            "`X-Repwatch-Labels: int64` one little-endian int64 label per row. "
            "`application/x-npy`: a .npy file of a 2-D float16/float32 array (no labels)."),
        "content": {
            wire.CONTENT_TYPE_RAW: {"schema": {"type": "string", "format": "binary"}},
            wire.CONTENT_TYPE_NPY: {"schema": {"type": "string", "format": "binary"}},
        },
    },
}

_INLINE_DECODE_BYTES = 1 << 20
"""Bodies up to this size are decoded on the event loop; larger ones in a worker thread."""

BATCH_PATH = "/v1/runs/{run}/streams/{stream}/batches"


class BatchHandler:
    """``POST /v1/runs/{run}/streams/{stream}/batches`` as a plain ASGI app, served without
    FastAPI's per-request parameter, dependency and response-model handling (about a third of
    the sidecar's CPU per 128 KiB request; docs/performance.md). Checks the token, the names,
    the headers and the body, then queues the batch: 202, or the status of :class:`Rejected`
    (counted by reason)."""

    def __init__(self, sidecar: Sidecar, config: SidecarConfig) -> None:
        self.sidecar = sidecar
        self.config = config
        self._token = config.token.strip().encode() if config.token else None

    def authorized(self, headers: Mapping[str, str]) -> bool:
        """Whether ``headers`` carry the bearer token (always true without a token)."""
        if self._token is None:
            return True
        scheme, _, given = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                                  self._token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        run, stream = scope["path_params"]["run"], scope["path_params"]["stream"]
        try:
            rows, step = await self.ingest(run, stream, Headers(scope=scope),
                                           _body_chunks(receive))
        except Rejected as exc:
            if exc.reason in REJECT_REASONS:
                self.sidecar.reject(exc.reason)
            answer = JSONResponse({"detail": exc.message}, exc.status, headers=exc.headers)
        except ClientDisconnect:
            return
        else:
            answer = JSONResponse({"run": run, "stream": stream, "rows": rows, "step": step},
                                  202)
        await answer(scope, receive, send)

    async def ingest(self, run: str, stream: str, headers: Mapping[str, str],
                     chunks: AsyncIterator[bytes]) -> tuple[int, int | None]:
        """Check, read, decode and queue one batch; (rows, step), or raise :class:`Rejected`."""
        config, sc = self.config, self.sidecar
        if not self.authorized(headers):
            raise Rejected(401, "unauthorized", "missing or wrong bearer token (expected "
                           "'Authorization: Bearer <token>')", {"WWW-Authenticate": "Bearer"})
        try:
            check_name("run", run)
            check_name("stream", stream)
        except ValueError as exc:
            raise Rejected(422, "invalid", str(exc)) from None
        headers = wire.lowered(headers)               # once, for every parser below
        kind = wire.media_type(headers)
        if kind not in wire.CONTENT_TYPES:
            raise Rejected(415, "unsupported",
                           f"Content-Type must be {' or '.join(wire.CONTENT_TYPES)}, "
                           f"got {kind[:60]!r}")
        length = headers.get("content-length")
        if length is not None:
            if not (length.strip().isascii() and length.strip().isdigit()):
                raise Rejected(400, "bad_request",
                               f"Content-Length must be an integer, got {length[:40]!r}")
            if int(length) > config.max_body_bytes:
                raise Rejected(413, "too_large", f"body of {int(length)} bytes is over the "
                               f"limit of {config.max_body_bytes} bytes")
        try:
            step = wire.parse_step(headers.get(wire.H_STEP))
            if kind == wire.CONTENT_TYPE_RAW:
                dtype, b, d, has_labels = wire.parse_raw_headers(
                    headers, max_rows=config.max_rows_per_batch, max_dim=config.max_dim)
                size = wire.raw_body_size(dtype, b, d, has_labels)
                if size > config.max_body_bytes:
                    raise Rejected(413, "too_large",
                                   f"shape ({b}, {d}) {dtype} needs {size} bytes, over the "
                                   f"limit of {config.max_body_bytes} bytes")
        except ProtocolError as exc:
            raise Rejected(exc.status, "unsupported" if exc.status == 415 else "bad_request",
                           exc.message) from None
        sc.admit(run, stream)
        reserved = await sc.reserve(config.admit_wait_seconds)
        try:
            rows, labels, step = await self._read_batch(chunks, headers)
            held, reserved = reserved, False          # submit consumes it, even on raise
            sc.submit(run, stream, rows, labels, step, reserved=held)
        finally:
            if reserved:
                sc.release()
        return int(rows.shape[0]), step

    async def _read_batch(self, chunks: AsyncIterator[bytes], headers: Mapping[str, str]
                          ) -> tuple[np.ndarray, np.ndarray | None, int | None]:
        """Read the body (its size checked while it streams in) into a buffer of its own and
        decode it (float32 rows: a view on that buffer, no second copy)."""
        config = self.config
        body = bytearray()
        async for chunk in chunks:
            body += chunk
            if len(body) > config.max_body_bytes:
                raise Rejected(413, "too_large", f"body over the limit of "
                               f"{config.max_body_bytes} bytes")
        try:
            if len(body) <= _INLINE_DECODE_BYTES:          # ≤ 1 MiB: not worth a thread
                return wire.decode_batch(headers, body, max_rows=config.max_rows_per_batch,
                                             max_dim=config.max_dim, owned=True)
            return await run_in_threadpool(wire.decode_batch, headers, body,
                                           max_rows=config.max_rows_per_batch,
                                           max_dim=config.max_dim, owned=True)
        except ProtocolError as exc:
            raise Rejected(exc.status, "unsupported" if exc.status == 415 else "bad_request",
                           exc.message) from None


async def _body_chunks(receive: Receive) -> AsyncIterator[bytes]:
    """The request body as ``Request.stream()`` yields it."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


class AsgiRoute(APIRoute):
    """A route served by ``asgi``, a plain ASGI app, and documented in OpenAPI from the rest of
    its arguments as an :class:`APIRoute` is (``endpoint``'s parameters, ``dependencies``,
    ``responses``, ``openapi_extra``); neither ``endpoint`` nor the dependencies run."""

    def __init__(self, path: str, asgi: ASGIApp, **declaration: Any) -> None:
        super().__init__(path, **declaration)
        self.app = asgi


def _batch_parameters(
        run: RunName,
        stream: Annotated[str, Path(pattern=NAME_PATTERN, description="Stream name")]) -> None:
    """Declares the path parameters of the batch route (:class:`BatchHandler` serves it)."""


_bearer = HTTPBearer(auto_error=False, description="Required when the service has a token")


def create_sidecar_app(config: SidecarConfig, sidecar: Sidecar | None = None) -> FastAPI:
    """The read app over every run plus the batch route; ``app.state.sidecar`` owns the state
    (close it when done)."""
    sc = sidecar if sidecar is not None else Sidecar(config)
    app = create_read_app(sc, title="repwatch sidecar",
                          description="Ingest of sampled embedding batches; live "
                                      "representation-health metrics of every run.",
                          collectors=[_AccountingCollector(sc)])
    app.state.sidecar = sc
    responses = dict(_BATCH_RESPONSES)
    if config.token is None:
        responses.pop(401)
    # First in the router (matched before the read routes). With a token the document
    # declares bearer security on the route; without one, none.
    app.router.routes.insert(0, AsgiRoute(
        BATCH_PATH, BatchHandler(sc, config), endpoint=_batch_parameters, name="post_batch",
        methods=["POST"], status_code=202, response_model=BatchAccepted, responses=responses,
        dependencies=[Depends(_bearer)] if config.token is not None else [],
        summary="Post one batch of embedding rows for scoring",
        description="202 once the batch is queued for scoring.", openapi_extra=_BATCH_BODY))
    return app
