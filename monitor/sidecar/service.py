"""``repwatch serve``: the sidecar ingest service (FastAPI) and its scoring backend.

A trainer (``Monitor(sink=...)``) posts sampled embedding batches; the handler authenticates,
checks limits and parses the body (:mod:`monitor.transport.wire`), then hands the batch to the
scoring workers (``workers`` threads) through a bounded queue that is fair between runs
(:mod:`monitor.sidecar.scheduler`: a run's batches are scored in order, by one worker at a time,
and a run holds at most its share of the queue). A full queue answers 429 with ``Retry-After``
and drops the batch (counted). A memory budget (``memory_budget_mb``) bounds the streams'
scoring state (a new stream that would pass it: 409) and the queued batches (429). A body is read (within ``body_timeout_seconds``, else 408) before a queue place
is taken, so a client that withholds its body holds no place; bodies being read take at most
``max_connections × max_body_bytes``, and only as much as their clients have actually sent.
The worker feeds a backend; the torch backend runs one :class:`monitor.Monitor` per run, so
metric names, alerts and the Snapshot are exactly those of in-process mode.

Accounting (on ``/metrics``): a batch's rows enter ``repwatch_received_samples_total`` at the
moment its fate is decided — scored by the worker, or dropped (``overload``: queue full,
``dimension``: 409 dimension change, ``nonfinite``: rows with NaN/Inf, ``error``: the backend
raised, ``shutdown``: still queued at close) — and always together with that outcome, under one
lock, so ``received = scored + dropped`` holds at every scrape. Rows waiting in the queue are
shown by ``repwatch_sidecar_queued_samples``. Requests refused before their rows are parsed
(401, 409 cardinality limits, 413, 415, 400 on headers or body length, 408 body not sent in
time, 422) are not "received"; they count in ``repwatch_sidecar_rejected_requests_total{reason}``
(no run label: refused names must not create series; a 408 counts as ``timeout``).

Limits (all in :class:`SidecarConfig`): body bytes (413, from ``Content-Length`` before the body
is read and again while it streams in; the raw form's body must be exactly the size its shape
gives: 400 for a ``Content-Length`` that disagrees, before reading, and as soon as a streamed body
passes it), rows per batch and dimension (400), runs per service and streams per run (409 "too
many runs/streams"), stream dimension fixed by its first batch (409), time to send the body
(408). Connection limits (request head timeout, keep-alive, connection cap) are uvicorn's, set by
:func:`monitor.server.app.server_config`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
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
from monitor.engine.run import BatchClock, StepJump
from monitor.errors import ErrorLog
from monitor.server.app import ErrorBody, RunName, create_read_app
from monitor.sidecar.config import SidecarConfig
from monitor.sidecar.scheduler import FairQueue
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

    def __init__(self, monitor: Any, max_step_jump: int) -> None:
        self.monitor = monitor
        self.clock = BatchClock(max_step_jump)


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
            r = _Run(mon, self.config.max_step_jump)
            with self._lock:
                self._runs[run] = r
        return r

    def ingest(self, run: str, stream: str, rows: np.ndarray, labels: np.ndarray | None,
               step: int | None) -> None:
        r = self._run(run)
        mon = r.monitor
        try:                                   # a failing publish is not this batch's fault
            latest = mon.latest
            target = r.clock.target(stream, step, mon.step_count,
                                    None if latest is None else latest.step)
            if target > mon.step_count:
                mon.step(target - mon.step_count)
            elif target < mon.step_count:      # a resume: the run's clock follows it
                state = mon.state_dict()
                state["step"] = target
                mon.load_state_dict(state)
        except StepJump as exc:                # counted in the run's own errors
            mon.errors.record("step", exc)
        except Exception as exc:  # noqa: BLE001 - counted and logged once; scoring goes on
            self._errors.record("publish", exc, key=f"publish[{run}]")
        torch = self._torch
        x = torch.from_numpy(rows).to(self.device, non_blocking=True)        # (b, d) float32
        y = torch.from_numpy(labels).to(self.device) if labels is not None else None  # (b,)
        mon.observe(stream, x, labels=y)       # strict Monitor: raises, the service counts it
        r.clock.scored(stream)

    def stream_bytes(self, dim: int, stream: str | None = None) -> int:
        """Estimated bytes a new stream of dimension ``dim`` holds: its state on the path the
        Monitor picks (:mod:`monitor.engine.memory`) plus the d×d (or k×k) float64
        temporaries of an update and a publish."""
        from monitor.config import MonitorConfig
        from monitor.engine.memory import stream_state_bytes
        from monitor.functional.sketch import sketch_dim_for

        cfg = MonitorConfig(run="budget", window=self.config.window, max_rows=self.config.window,
                            port=None, **self.config.monitor_options)
        paths = cfg.spectral_path if not isinstance(cfg.spectral_path, str) else {
            "*": cfg.spectral_path}
        mode = dict(paths).get(stream or "*", dict(paths).get("*", "auto"))
        k = sketch_dim_for(mode, dim, cfg.window, cfg.sketch_above, cfg.sketch_dim,
                           cfg.memory_limit_bytes)
        width = k or dim
        return stream_state_bytes(dim, cfg.window, sketch_dim=k or None) + 16 * width * width

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

    @property
    def nbytes(self) -> int:
        return int(self.rows.nbytes) + (0 if self.labels is None else int(self.labels.nbytes))


class Sidecar:
    """Per-run state of the service: admission, accounting, the bounded queue and its worker;
    the read app's source (:class:`monitor.server.ReadSource`) of every run."""

    def __init__(self, config: SidecarConfig, backend: Backend | None = None) -> None:
        self.config = config
        self.backend: Backend = backend if backend is not None else BACKENDS[config.backend](config)
        self._queue: FairQueue[_Batch] = FairQueue(config.queue_batches, config.run_share)
        self._lock = threading.Lock()
        self._dims: dict[str, dict[str, int]] = {}                # run → stream → dimension
        self._received: dict[tuple[str, str], int] = {}
        self._scored: dict[tuple[str, str], int] = {}
        self._dropped: dict[tuple[str, str], int] = {}            # (run, reason)
        self._queued: dict[str, int] = {}                         # run → rows waiting
        self._state_bytes: dict[tuple[str, str], int] = {}        # a stream's scoring state
        self._queued_bytes = 0
        self._reserved = 0                                        # places held by readers
        self._reserved_runs: dict[str, int] = {}                  # of them, per run
        self._rejected: dict[str, int] = {}
        self._runs_logged_at = float("-inf")                      # last "too many runs" log
        self._errors = ErrorLog()
        self._stop = threading.Event()
        self._workers = [threading.Thread(target=self._work, name=f"repwatch-sidecar-scorer-{i}",
                                          daemon=True) for i in range(config.workers)]
        for worker in self._workers:
            worker.start()

    # ------------------------------------------------------------------ admission

    @property
    def ready(self) -> bool:
        """True while the scoring worker runs."""
        return all(w.is_alive() for w in self._workers) and not self._stop.is_set()

    @property
    def saturated(self) -> bool:
        """True while the scoring queue is full (the shm ring reader then waits, see
        :class:`monitor.transport.shm.ShmReader`, instead of having batches dropped as overload)."""
        with self._lock:
            return self._queue.qsize() + self._reserved >= self.config.queue_batches

    def has_room(self, run: str) -> bool:
        """Whether a batch of ``run`` would be queued now (the queue and the run's share of it
        have room): the shm reader waits on it, leaving batches in the ring."""
        with self._lock:
            return not self._queue.room(run, self._reserved, self._reserved_runs.get(run, 0))

    async def reserve(self, run: str, timeout: float) -> bool:
        """Reserve a place in the scoring queue, waiting without blocking the event loop at most
        ``timeout`` s while it is full; True when reserved (pass ``reserved=True`` to
        :meth:`submit`, or :meth:`release` it). Called once a request's body is read and
        decoded (never before: a client that withholds its body must hold no place), so a
        short stall of the scorer costs no batch; the reservation keeps concurrent waiters from
        all taking the one place that frees up."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if not self._queue.room(run, self._reserved, self._reserved_runs.get(run, 0)):
                    self._reserved += 1
                    self._reserved_runs[run] = self._reserved_runs.get(run, 0) + 1
                    return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.002)

    def release(self, run: str) -> None:
        """Give back a reservation of ``run`` that will not be submitted (a request that
        failed)."""
        with self._lock:
            self._unreserve_locked(run)

    def _unreserve_locked(self, run: str) -> None:
        self._reserved -= 1
        left = self._reserved_runs.get(run, 0) - 1
        if left > 0:
            self._reserved_runs[run] = left
        else:
            self._reserved_runs.pop(run, None)

    def reject(self, reason: str) -> None:
        """Count a request refused before its rows were parsed."""
        with self._lock:
            self._rejected[reason] = self._rejected.get(reason, 0) + 1

    def _admit_locked(self, run: str, stream: str) -> None:
        streams = self._dims.get(run)
        if streams is None:
            if len(self._dims) >= self.config.max_runs:
                now = time.monotonic()          # the runs' names: logged (once a minute),
                if now >= self._runs_logged_at + 60:          # not told to the client
                    self._runs_logged_at = now
                    log.info("refused new run %r: at most %d runs, has %s", run,
                             self.config.max_runs, sorted(self._dims)[:20])
                raise Rejected(409, "too_many_runs",
                               f"too many runs: this service takes at most {self.config.max_runs} "
                               f"runs and has {len(self._dims)}; got new run {run!r}")
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
                self._unreserve_locked(run)
            self._admit_locked(run, stream)
            self._budget_locked(run, stream, b, d, batch.nbytes)
            streams = self._dims.setdefault(run, {})
            first = streams.setdefault(stream, d)
            if first != d:
                self._account_locked(run, stream, b, dropped={"dimension": b})
                raise Rejected(409, "dimension",
                               f"stream {run!r}/{stream!r} has dimension {first} (from its first "
                               f"batch); got rows of dimension {d}. Use another stream name for "
                               "another layer")
            full = self._queue.room(run, self._reserved, self._reserved_runs.get(run, 0))
            if full:
                self._account_locked(run, stream, b, dropped={"overload": b})
                what = (f"scoring queue full ({self.config.queue_batches} batches)" if full == "full"
                        else f"run {run!r} holds its share of the scoring queue "
                             f"({self.config.run_share} batches)")
                raise Rejected(429, "overload",
                               f"{what}; batch dropped, retry after "
                               f"{self.config.retry_after_seconds} s",
                               {"Retry-After": str(self.config.retry_after_seconds)})
            self._queue.put(run, batch)
            self._queued_bytes += batch.nbytes
            self._queued[run] = self._queued.get(run, 0) + b

    def _budget_locked(self, run: str, stream: str, b: int, d: int, nbytes: int) -> None:
        """Raise :class:`Rejected` when a batch would take the service past its memory budget:
        409 for a new stream whose scoring state does not fit (counted under ``rejected``), 429
        for a batch that does not fit the queue now (dropped as ``overload``)."""
        budget = self.config.memory_budget_bytes
        used = sum(self._state_bytes.values()) + self._queued_bytes
        key = (run, stream)
        if key not in self._state_bytes and stream not in self._dims.get(run, {}):
            sizer = getattr(self.backend, "stream_bytes", None)
            need = int(sizer(d, stream)) if sizer is not None else 0
            if used + need + nbytes > budget:
                mib = 1 << 20
                raise Rejected(409, "memory",
                               f"a new stream of dimension {d} needs about {need / mib:.0f} MiB "
                               f"of scoring state; the service's memory budget is "
                               f"{budget / mib:.0f} MiB and {used / mib:.0f} MiB are in use "
                               "(raise --memory-budget-mb, sketch wide streams with "
                               "--spectral-path sketch or a lower --sketch-above, or send "
                               "fewer dimensions)")
            self._state_bytes[key] = need
            return
        if used + nbytes > budget:
            self._account_locked(run, stream, b, dropped={"overload": b})
            raise Rejected(429, "overload",
                           f"the service's memory budget ({budget >> 20} MiB) is taken by "
                           f"scoring state and queued batches; batch dropped, retry after "
                           f"{self.config.retry_after_seconds} s",
                           {"Retry-After": str(self.config.retry_after_seconds)})

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
            got = self._queue.take(timeout=0.05)
            if got is None:
                continue
            run, batch = got
            try:
                self._score(batch)
            except BaseException as exc:  # noqa: BLE001 - never let the worker die
                self._errors.record("sidecar", exc, key="worker")
            finally:
                self._queue.done(run)

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
            self._queued_bytes -= batch.nbytes
            self._account_locked(batch.run, batch.stream, b, **outcome)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until every queued batch has been scored (True) or ``timeout`` passed (False)."""
        deadline = time.monotonic() + timeout
        while not self._queue.idle():
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
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        for batch in self._queue.drain():
            with self._lock:
                self._queued[batch.run] -= batch.b
                self._queued_bytes -= batch.nbytes
                self._account_locked(batch.run, batch.stream, batch.b,
                                     dropped={"shutdown": batch.b})
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
    408: _err("Body not received within the body timeout"),
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
        exact: tuple[int, str] | None = None          # the raw form's size, and what it holds
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
                exact = (size, f"{b}×{d} {dtype} rows" + (f" + {b} int64 labels"
                                                          if has_labels else ""))
                if length is not None and int(length) != size:
                    raise Rejected(400, "bad_request",
                                   f"Content-Length {int(length)} does not match {wire.H_SHAPE} "
                                   f"{b},{d}: the body must be {size} bytes ({exact[1]})")
        except ProtocolError as exc:
            raise Rejected(exc.status, "unsupported" if exc.status == 415 else "bad_request",
                           exc.message) from None
        sc.admit(run, stream)
        # The body first, within the deadline, and only then a queue place: a client that
        # withholds its body holds nothing but its own connection (capped by uvicorn).
        body = await self._receive(chunks, exact)
        rows, labels, step = await self._decode(body, headers)
        reserved = await sc.reserve(run, config.admit_wait_seconds)
        sc.submit(run, stream, rows, labels, step, reserved=reserved)   # consumes it, even on raise
        return int(rows.shape[0]), step

    async def _receive(self, chunks: AsyncIterator[bytes],
                       exact: tuple[int, str] | None) -> bytearray:
        """The body, in a buffer of its own, read within ``body_timeout_seconds`` (408 beyond)
        and refused as soon as it passes ``exact``'s size (400: the raw form's size is known
        from its shape) or else ``max_body_bytes`` (413)."""
        config = self.config
        limit = config.max_body_bytes if exact is None else exact[0]
        close = {"Connection": "close"}              # the rest of the body is not read
        body = bytearray()
        try:
            async with asyncio.timeout(config.body_timeout_seconds):
                async for chunk in chunks:
                    if len(body) + len(chunk) > limit:
                        if exact is not None:
                            raise Rejected(400, "bad_request",
                                           f"body must be {limit} bytes ({exact[1]}), got more",
                                           close)
                        raise Rejected(413, "too_large", f"body over the limit of {limit} bytes",
                                       close)
                    body += chunk
        except TimeoutError:
            raise Rejected(408, "timeout",
                           f"request body not received within {config.body_timeout_seconds:g} s "
                           f"({len(body)} bytes came); send the body right after the headers",
                           close) from None
        return body

    async def _decode(self, body: bytearray, headers: Mapping[str, str]
                      ) -> tuple[np.ndarray, np.ndarray | None, int | None]:
        """Decode a body read by :meth:`_receive` (float32 rows: a view on its buffer, no
        second copy)."""
        config = self.config
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
