"""Remote sinks for sidecar mode: ship captured batches to a ``repwatch serve`` sidecar.

The training thread only snapshots a batch and enqueues it: a CUDA batch is copied into pinned
host memory with ``non_blocking=True`` and a ``torch.cuda.Event`` is recorded behind the copy;
a CPU batch is cloned. Nothing on the training thread waits on the device or the network. A
daemon thread waits on the event (blocking only itself), encodes the batch in the wire format of
``POST /v1/runs/{run}/streams/{stream}/batches`` (see ``monitor/sidecar``) and sends it over one
keep-alive ``http.client`` connection (the standard library's: about 0.2 CPU ms per 128 KiB
request against 0.65 for ``httpx``, time the sender thread would otherwise hold the trainer's
GIL; docs/performance.md). Environment proxies are not consulted: a cluster's ``HTTP_PROXY``
must not route a pod-local sidecar's traffic.

Nothing is retried: a batch that cannot be delivered is dropped and counted by reason (rows),
exported as ``repwatch_dropped_samples_total{run,reason}``:

``queue_full``     the bounded queue was full when ``submit()`` ran (sidecar slower than training)
``backoff``        dropped without a request while the sink waits after a failure / a 429
``sidecar_down``   connection error or timeout (the sidecar is not there or does not answer)
``sidecar_error``  the sidecar answered 5xx
``overload``       the sidecar answered 429 (its Retry-After is honoured: a pause follows)
``rejected``       the sidecar answered another 4xx (bad names, dimension change, auth...)
``closed``         submitted after ``close()`` or still queued when its flush deadline passed
``error``          the batch could not be encoded (a bug; logged once)

After ``sidecar_down`` / ``sidecar_error`` the sink pauses with exponential backoff and jitter
(``backoff=(first, max)`` seconds, doubling, each pause drawn uniformly in [d/2, d] from the
sink's own ``random.Random``); the first batch after the pause is sent again, so delivery resumes
by itself once the sidecar is back. A success resets the delay.

:class:`ShmSink` (``sink="shm://NAME"``) shares all of this (one base class, ``_QueueSink``) but
writes the encoded batch into the shared-memory ring of ``repwatch serve --shm NAME``
(:mod:`monitor.shm`) instead of posting it: ``queue_full`` then also covers a full ring,
``sidecar_down`` an absent, closed or stale ring, ``rejected`` a batch larger than a slot.
"""

from __future__ import annotations

import http.client
import logging
import math
import queue
import random
import re
import select
import threading
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

import torch
from torch import Tensor

from monitor.sidecar.protocol import (
    encode_batch,  # the one definition of the wire format
)
from monitor.validation import check_int, check_name, is_name

log = logging.getLogger("repwatch")


DROP_REASONS: tuple[str, ...] = ("queue_full", "backoff", "sidecar_down", "sidecar_error",
                                 "overload", "rejected", "closed", "error")
"""Reasons a sink drops a batch (see the module docstring)."""

WIRE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16,
                                       "bfloat16": torch.bfloat16}
"""Row dtypes of the wire format (``X-Repwatch-Dtype``)."""


class Sink(Protocol):
    """What a Monitor needs from a sink."""

    def submit(self, stream: str, rows: Tensor, labels: Tensor | None, step: int) -> None: ...
    def counts(self) -> dict[str, int]: ...
    def close(self, timeout: float = 5.0) -> None: ...


@dataclass
class _Batch:
    stream: str
    rows: Tensor            # (b, d) CPU, wire dtype; filled asynchronously until ``event``
    labels: Tensor | None   # (b,) CPU int64
    step: int
    event: Any              # torch.cuda.Event behind the device → host copies, or None


def _host_copy(t: Tensor, dtype: torch.dtype) -> tuple[Tensor, bool]:
    """A private CPU copy of ``t`` in ``dtype``; True when it is an async copy from CUDA."""
    if t.device.type == "cuda":
        src = t.to(dtype)                                                  # async on device
        host = torch.empty(src.shape, dtype=dtype, pin_memory=True)
        host.copy_(src, non_blocking=True)                                 # async D2H
        return host, True
    return t.to(device="cpu", dtype=dtype, copy=True).contiguous(), False


def _retry_after(value: str | None) -> float | None:
    """Seconds of a ``Retry-After`` header (delta-seconds or HTTP-date), or None."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


class _QueueSink:
    """What every remote sink shares: argument checks, the no-sync ``submit`` (pinned async
    copy + CUDA event), the bounded queue and its daemon thread, drop accounting, backoff with
    jitter, ``flush`` and ``close``. Subclasses implement ``_send(batch)`` (and may override
    ``_shutdown`` and ``_drained``); ``_where`` names the target in log lines."""

    _where = "?"

    def __init__(self, *, run: str, queue_batches: int, backoff: tuple[float, float],
                 dtype: str, seed: int) -> None:
        check_name("run", run)
        check_int("queue_batches", queue_batches, 1)
        if (not isinstance(backoff, tuple) or len(backoff) != 2
                or not all(isinstance(b, (int, float)) and 0 < b < math.inf for b in backoff)
                or backoff[0] > backoff[1]):
            raise ValueError(f"backoff must be (first, max) seconds with 0 < first <= max, "
                             f"got {backoff!r}")
        if dtype not in WIRE_DTYPES:
            raise ValueError(f"dtype must be one of {tuple(WIRE_DTYPES)}, got {dtype!r}")
        self.run = run
        self.dtype = dtype
        self.backoff = (float(backoff[0]), float(backoff[1]))
        self.dropped: dict[str, int] = {}          # rows by reason
        self.dropped_batches: dict[str, int] = {}  # batches by reason
        self.sent_rows = 0
        self.sent_batches = 0
        self._wire = WIRE_DTYPES[dtype]
        self._rng = random.Random(seed)
        self._delay = self.backoff[0]              # next pause after a failure
        self._paused_until = 0.0                   # monotonic time; submit() drops before it
        self._down = False
        self._logged_status: set[int] = set()
        self._names: set[str] = set()
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Batch] = queue.Queue(maxsize=queue_batches)
        self._closed = False
        self._stopping = False
        self._deadline = math.inf
        self._thread = threading.Thread(target=self._loop, name="repwatch-sink", daemon=True)

    # ------------------------------------------------------------------ training thread

    def submit(self, stream: str, rows: Tensor, labels: Tensor | None = None,
               step: int = 0) -> None:
        """Enqueue a batch: ``rows`` (b, d) floats, ``labels`` (b,) class ids, training ``step``.

        Never waits on the device or the network; a batch that cannot be queued is dropped and
        counted. Bad input raises ValueError / TypeError at once.
        """
        if stream not in self._names:
            if not is_name(stream):
                raise ValueError(f"stream must be 1–128 characters of letters, digits and _.:/-, "
                                 f"got {stream!r}")
            self._names.add(stream)
        if not isinstance(rows, Tensor) or rows.dim() != 2 or not rows.is_floating_point():
            got = (f"shape {tuple(rows.shape)} dtype {rows.dtype}" if isinstance(rows, Tensor)
                   else type(rows).__name__)
            raise ValueError(f"rows must be a 2-D floating-point tensor (rows, dim), got {got}")
        b = rows.shape[0]                                                  # host int (shape)
        if labels is not None and (not isinstance(labels, Tensor) or labels.shape != (b,)
                                   or labels.is_floating_point() or labels.is_complex()):
            got = (f"shape {tuple(labels.shape)} dtype {labels.dtype}"
                   if isinstance(labels, Tensor) else type(labels).__name__)
            raise ValueError(f"labels must be integer class ids of shape ({b},), got {got}")
        check_int("step", step, 0)
        if b == 0 or rows.shape[1] == 0:
            return
        if self._closed:
            self._drop("closed", b)
            return
        if time.monotonic() < self._paused_until:
            self._drop("backoff", b)
            return
        if self._queue.full():                  # skip the copy of a batch that cannot wait
            self._drop("queue_full", b)
            return
        with torch.no_grad():
            host_rows, pending = _host_copy(rows.detach(), self._wire)     # (b, d)
            host_labels = None
            if labels is not None:
                host_labels, lab_pending = _host_copy(labels.detach(), torch.int64)  # (b,)
                pending = pending or lab_pending
        event = None
        if pending:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(rows.device))           # behind the copies
        try:
            self._queue.put_nowait(_Batch(stream, host_rows, host_labels, step, event))
        except queue.Full:
            self._drop("queue_full", b)

    # ------------------------------------------------------------------ accounting

    def counts(self) -> dict[str, int]:
        """Dropped rows by reason (a copy)."""
        with self._lock:
            return dict(self.dropped)

    @property
    def queued(self) -> int:
        """Batches waiting or being sent."""
        return self._queue.unfinished_tasks

    def _drop(self, reason: str, rows: int) -> None:
        with self._lock:
            self.dropped[reason] = self.dropped.get(reason, 0) + rows
            self.dropped_batches[reason] = self.dropped_batches.get(reason, 0) + 1

    def _sent(self, rows: int) -> None:
        with self._lock:
            self.sent_rows += rows
            self.sent_batches += 1
        self._delay = self.backoff[0]
        if self._down:
            self._down = False
            log.warning("repwatch sink: sidecar %s reachable again; delivery resumed",
                        self._where)

    # ------------------------------------------------------------------ sender thread

    def _loop(self) -> None:
        try:
            while True:
                try:
                    batch = self._queue.get(timeout=0.05)
                except queue.Empty:
                    if self._stopping:
                        return
                    continue
                try:
                    self._send(batch)
                except Exception as exc:  # never let the sender die
                    self._drop("error", batch.rows.shape[0])
                    self._log_once(-1, f"repwatch sink failed on a batch (counted as dropped "
                                       f"'error'): {type(exc).__name__}: {exc}")
                finally:
                    self._queue.task_done()
        finally:
            self._shutdown()

    def _send(self, batch: _Batch) -> None:
        raise NotImplementedError

    def _shutdown(self) -> None:
        """Release the transport (on the sender thread, when it ends)."""

    def _ready(self, batch: _Batch) -> bool:
        """Wait for the batch's device copy; False (counted) when closing or pausing."""
        b = batch.rows.shape[0]
        if batch.event is not None and not batch.event.query():
            batch.event.synchronize()               # blocks this thread only
        now = time.monotonic()
        if self._stopping and now >= self._deadline:
            self._drop("closed", b)
            return False
        if now < self._paused_until:
            self._drop("backoff", b)
            return False
        return True

    def _encode(self, batch: _Batch) -> tuple[dict[str, str], bytes]:
        """The batch in the wire format of ``monitor.sidecar.protocol``."""
        rows = batch.rows.float() if batch.rows.dtype == torch.bfloat16 else batch.rows
        labels = batch.labels.numpy() if batch.labels is not None else None
        return encode_batch(rows.numpy(), labels=labels, step=batch.step, dtype=self.dtype)

    def next_pause(self) -> float:
        """Draw the pause after a failure (jittered in [d/2, d]) and double the delay."""
        pause = self._delay * (0.5 + 0.5 * self._rng.random())
        self._delay = min(self._delay * 2.0, self.backoff[1])
        return pause

    def _fail(self, why: str) -> None:
        pause = self.next_pause()
        self._paused_until = time.monotonic() + pause
        if not self._down:
            self._down = True
            log.warning("repwatch sink: sidecar %s unavailable (%s); dropping batches and "
                        "retrying with backoff (training continues)", self._where, why)

    def _log_once(self, key: int, message: str) -> None:
        if key not in self._logged_status:
            self._logged_status.add(key)
            log.warning("%s", message)

    # ------------------------------------------------------------------ lifecycle

    def _drained(self) -> bool:
        """True when what was handed over has also left the transport (HTTP: at once)."""
        return True

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait (at most ``timeout`` s) until every queued batch was sent or dropped."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks or not self._drained():
            if time.monotonic() >= deadline or not self._thread.is_alive():
                return False
            time.sleep(0.005)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued for at most ``timeout`` s, count the rest as ``closed``, stop
        the thread. Idempotent; later ``submit()`` calls are counted as ``closed``."""
        if self._closed:
            return
        self._closed = True
        self._deadline = time.monotonic() + max(0.0, timeout)
        self._stopping = True
        self._thread.join(max(0.0, timeout) + 0.2)
        while True:                                 # what the thread did not reach in time
            try:
                batch = self._queue.get_nowait()
            except queue.Empty:
                break
            self._drop("closed", batch.rows.shape[0])
            self._queue.task_done()


class HttpSink(_QueueSink):
    """Ships batches to a sidecar over HTTP from a daemon thread through a bounded queue.

    Args:
        url: base URL of the sidecar, e.g. ``http://127.0.0.1:9400``.
        token: bearer token (``Authorization: Bearer <token>``), or None.
        run: run name in the request path.
        queue_batches: batches that may wait for the sender; more are dropped (``queue_full``).
        timeout: seconds per request (connect, write, read).
        backoff: (first, max) pause in seconds after a failed request (doubling, jittered).
        dtype: row dtype on the wire: ``float32``, ``float16`` or ``bfloat16`` (cast on the
            device before the copy, so narrower dtypes also halve the device → host traffic).
        seed: seed of the jitter's ``random.Random``.
    """

    def __init__(self, url: str, token: str | None = None, *, run: str,
                 queue_batches: int = 256, timeout: float = 5.0,
                 backoff: tuple[float, float] = (0.5, 30.0), dtype: str = "float32",
                 seed: int = 0) -> None:
        if not isinstance(url, str) or not re.match(r"^https?://[^/?#\s]+", url):
            raise ValueError(f"url must be an http:// or https:// base URL like "
                             f"'http://127.0.0.1:9400', got {url!r}")
        if token is not None and (not isinstance(token, str) or not token
                                  or any(c.isspace() for c in token)):
            got = ("a string that is empty or holds whitespace" if isinstance(token, str)
                   else type(token).__name__)
            raise ValueError(f"token must be a non-empty string without whitespace, got {got}")
        if not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        super().__init__(run=run, queue_batches=queue_batches, backoff=backoff, dtype=dtype,
                         seed=seed)
        self.url = url.rstrip("/")
        self._where = self.url
        self.timeout = float(timeout)
        parts = urlsplit(self.url)
        self._connection_class = (http.client.HTTPSConnection if parts.scheme == "https"
                                  else http.client.HTTPConnection)
        self._host, self._port, self._prefix = parts.hostname or "", parts.port, parts.path
        self._headers = {"User-Agent": "repwatch-sink"}
        if token is not None:
            self._headers["Authorization"] = f"Bearer {token}"
        self._conn: http.client.HTTPConnection | None = None     # the sender thread's only
        self._thread.start()

    def _shutdown(self) -> None:
        self._disconnect()

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        """The keep-alive connection, opened anew when the sidecar has closed it while idle
        (uvicorn does after 5 s), so a POST is never sent on a connection already gone."""
        conn = self._conn
        if conn is not None and conn.sock is not None:
            readable, _, _ = select.select([conn.sock], [], [], 0)
            if readable:                              # EOF (or stray bytes): not reusable
                self._disconnect()
                conn = None
        if conn is None:
            conn = self._connection_class(self._host, self._port, timeout=timeout)
            self._conn = conn
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def _post(self, path: str, headers: dict[str, str], body: bytes, timeout: float
              ) -> tuple[int, str | None, bytes]:
        """(status, Retry-After, body) of one POST; raises OSError or HTTPException."""
        conn = self._connection(timeout)
        try:
            conn.request("POST", path, body=body, headers={**self._headers, **headers})
            response = conn.getresponse()
            data = response.read()
        except BaseException:
            self._disconnect()
            raise
        if response.will_close:
            self._disconnect()
        return response.status, response.getheader("Retry-After"), data

    def _send(self, batch: _Batch) -> None:
        b = batch.rows.shape[0]
        if not self._ready(batch):
            return
        headers, body = self._encode(batch)
        path = (f"{self._prefix}/v1/runs/{quote(self.run, safe='')}/streams/"
                f"{quote(batch.stream, safe='')}/batches")
        timeout = self.timeout
        if self._stopping:                          # close(): stay within its deadline
            timeout = max(0.05, min(timeout, self._deadline - time.monotonic()))
        try:
            status, retry_after, data = self._post(path, headers, body, timeout)
        except (OSError, http.client.HTTPException) as exc:  # connect/read/write, timeouts
            self._drop("sidecar_down", b)
            self._fail(f"{type(exc).__name__}: {exc}")
            return
        text = data[:300].decode("utf-8", "replace")
        if 200 <= status < 300:
            self._sent(b)
        elif status == 429:
            self._drop("overload", b)
            pause = _retry_after(retry_after)
            if pause is None:
                pause = self._delay
            self._paused_until = time.monotonic() + min(pause, self.backoff[1])
            self._log_once(429, f"repwatch sink: sidecar {self.url} is overloaded (429); "
                                f"dropping batches for its Retry-After "
                                f"({retry_after!r} s)")
        elif status >= 500:
            self._drop("sidecar_error", b)
            self._fail(f"HTTP {status}: {text}")
        else:
            self._drop("rejected", b)
            self._log_once(status, f"repwatch sink: sidecar {self.url} rejected a batch of "
                                   f"stream {batch.stream!r} with HTTP {status}: "
                                   f"{text} (further ones are only counted)")

    def __repr__(self) -> str:
        return (f"HttpSink(url={self.url!r}, run={self.run!r}, dtype={self.dtype!r}, "
                f"sent_batches={self.sent_batches}, dropped={self.counts()})")


class ShmSink(_QueueSink):
    """Ships batches to a sidecar on the same host through a shared-memory ring
    (:mod:`monitor.shm`), from a daemon thread through a bounded queue.

    ``repwatch serve --shm NAME`` creates the ring; this sink attaches to it lazily. Drops
    (rows, by reason): ``queue_full`` when the local queue or the ring is full (the sidecar is
    slower than training), ``sidecar_down`` when the ring is absent, closed, not a repwatch
    ring, or its heartbeat is older than ``stale_after`` seconds (then the sink pauses with
    jittered backoff, detaches, and re-attaches when the sidecar is back), ``backoff`` during
    that pause, ``rejected`` for a batch larger than a slot (logged once), ``closed``, ``error``.
    ``flush()`` also waits until the sidecar has read everything out of the ring.

    Args:
        spec: ``shm://NAME`` (optionally ``?slots=N&slot_mb=M``: the geometry expected; the
            sidecar decides it, a mismatch is logged once).
        run: run name of the batches.
        queue_batches, backoff, dtype, seed: as in :class:`HttpSink`.
        stale_after: heartbeat age (seconds) after which the sidecar counts as gone.
    """

    def __init__(self, spec: str, *, run: str, queue_batches: int = 256,
                 backoff: tuple[float, float] = (0.5, 30.0), dtype: str = "float32",
                 seed: int = 0, stale_after: float = 5.0) -> None:
        from monitor.shm import parse_spec

        self.spec = parse_spec(spec)
        if not isinstance(stale_after, (int, float)) or not 0 < stale_after < math.inf:
            raise ValueError(f"stale_after must be a positive number of seconds, "
                             f"got {stale_after!r}")
        super().__init__(run=run, queue_batches=queue_batches, backoff=backoff, dtype=dtype,
                         seed=seed)
        self.stale_after = float(stale_after)
        self._where = f"shm://{self.spec.name}"
        self._ring: Any = None
        self._thread.start()

    def _attach(self) -> Any:
        from monitor.shm import ShmRing

        ring = ShmRing.attach(self.spec.name, stale_after=self.stale_after)
        try:
            ring.claim_producer()                 # one trainer per ring
        except BaseException:
            ring.close()
            raise
        want = (self.spec.slots, None if self.spec.slot_mb is None else self.spec.slot_size)
        if (want[0] not in (None, ring.slots)) or (want[1] not in (None, ring.slot_size)):
            self._log_once(-2, f"repwatch sink: ring {self._where} has {ring.slots} slots of "
                               f"{ring.slot_size} bytes, not the slots={self.spec.slots} "
                               f"slot_mb={self.spec.slot_mb} asked for; the sidecar's "
                               "geometry is used")
        return ring

    def _detach(self) -> None:
        ring, self._ring = self._ring, None
        if ring is not None:
            ring.close()

    def _send(self, batch: _Batch) -> None:
        from monitor.shm import RingError

        b = batch.rows.shape[0]
        if not self._ready(batch):
            return
        ring = self._ring
        why = ""
        if ring is not None:
            why = ring.down(self.stale_after)
            if why:
                self._detach()
                ring = None
                why = f"ring {why}"
        else:
            try:
                ring = self._ring = self._attach()
            except FileNotFoundError:
                why = "no shared-memory ring of that name (is `repwatch serve --shm` running?)"
            except PermissionError as exc:
                why = f"{exc} (trainer and sidecar must run as the same user)"
            except (RingError, OSError, ValueError) as exc:
                why = str(exc)
        if ring is None:
            self._drop("sidecar_down", b)
            self._fail(why)
            return
        if ring.full():                             # before encoding a batch that cannot go
            self._drop("queue_full", b)
            return
        headers, body = self._encode(batch)
        if len(body) > ring.max_payload:
            self._drop("rejected", b)
            self._log_once(413, f"repwatch sink: a batch of stream {batch.stream!r} needs "
                                f"{len(body)} bytes, more than a slot of ring {self._where} "
                                f"holds ({ring.max_payload}); such batches are dropped "
                                "(subsample more, or serve with a larger slot_mb)")
            return
        if ring.write(self.run, batch.stream, headers, body):
            self._sent(b)
        else:
            self._drop("queue_full", b)

    def _drained(self) -> bool:
        ring = self._ring
        try:
            return ring is None or ring.closed or ring.pending() == 0 or bool(
                ring.down(self.stale_after))
        except Exception:  # noqa: BLE001 - detached meanwhile
            return True

    def _shutdown(self) -> None:
        self._detach()

    def __repr__(self) -> str:
        return (f"ShmSink({self._where!r}, run={self.run!r}, dtype={self.dtype!r}, "
                f"sent_batches={self.sent_batches}, dropped={self.counts()})")


def make_sink(sink: str | Sink, *, token: str | None, run: str) -> Sink:
    """A sink from ``Monitor(sink=...)``: an ``http(s)://`` URL, a ``shm://NAME`` ring, or an
    object with ``submit`` / ``counts`` / ``close``."""
    if isinstance(sink, str):
        if sink.startswith(("http://", "https://")):
            return HttpSink(sink, token, run=run)
        if sink.startswith("shm://"):
            if token is not None:
                raise ValueError("token= applies to http(s):// sinks; a shm:// ring is guarded "
                                 "by the permissions of its shared-memory segment")
            return ShmSink(sink, run=run)
        raise ValueError(f"sink must be an http:// or https:// URL of a repwatch sidecar, or "
                         f"shm://NAME for one on this host, got {sink!r}")
    if token is not None:
        raise ValueError("token= applies to URL sinks; configure a sink object directly")
    if not all(callable(getattr(sink, m, None)) for m in ("submit", "counts", "close")):
        raise TypeError(f"sink must be a URL or an object with submit/counts/close, "
                        f"got {type(sink).__name__}")
    return sink


__all__ = ["DROP_REASONS", "WIRE_DTYPES", "HttpSink", "ShmSink", "Sink", "make_sink"]
