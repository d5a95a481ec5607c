"""The trainer's side of sidecar mode: a bounded queue and one daemon thread feeding a transport.

The training thread only snapshots a batch and enqueues it: a CUDA batch is copied into pinned
host memory with ``non_blocking=True`` and a ``torch.cuda.Event`` is recorded behind the copy;
a CPU batch is cloned. Nothing on the training thread waits on the device or the network. The
sender thread waits on the event (blocking only itself), encodes the batch in the wire format
(:mod:`monitor.transport.wire`) and hands it to its transport (:class:`HttpTransport
<monitor.transport.http.HttpTransport>`, :class:`ShmTransport
<monitor.transport.shm.ShmTransport>`; :class:`~monitor.transport.base.Transport`).

Nothing is retried: a batch that cannot be delivered is dropped and counted by reason (rows),
exported as ``repwatch_dropped_samples_total{run,reason}``:

``queue_full``     the bounded queue (or the shm ring) was full (sidecar slower than training)
``backoff``        dropped without an attempt while the sender waits after a failure / a 429
``sidecar_down``   connection error or timeout; an absent, closed or stale ring
``sidecar_error``  the sidecar answered 5xx
``overload``       the sidecar answered 429 (its Retry-After is honoured: a pause follows)
``rejected``       the sidecar answered another 4xx (bad names, dimension change, auth...);
                   a batch larger than a ring slot
``closed``         submitted after ``close()`` or still queued when its flush deadline passed
``error``          the batch could not be encoded or sent (a bug; logged once)

After ``sidecar_down`` / ``sidecar_error`` the sender pauses with exponential backoff and jitter
(``backoff=(first, max)`` seconds, doubling, each pause drawn uniformly in [d/2, d] from the
sender's own ``random.Random``); the first batch after the pause is sent again, so delivery
resumes by itself once the sidecar is back. A success resets the delay.
"""

from __future__ import annotations

import logging
import math
import queue
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from monitor.transport.base import DROP_REASONS, Drop, Transport
from monitor.transport.wire import encode_batch
from monitor.validation import check_int, check_name, is_name

log = logging.getLogger("repwatch")

WIRE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16,
                                       "bfloat16": torch.bfloat16}
"""Row dtypes of the wire format (``X-Repwatch-Dtype``)."""

_FAILURES = ("sidecar_down", "sidecar_error")


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


class Sender:
    """Ships batches of run ``run`` through ``transport`` from a daemon thread.

    Args:
        transport: where batches go (:class:`~monitor.transport.base.Transport`); the sender
            thread is its only user and closes it when it ends.
        run: run name of the batches.
        queue_batches: batches that may wait for the sender; more are dropped (``queue_full``).
        backoff: (first, max) pause in seconds after a failure (doubling, jittered).
        dtype: row dtype on the wire: ``float32``, ``float16`` or ``bfloat16`` (cast on the
            device before the copy, so narrower dtypes also halve the device → host traffic).
        seed: seed of the jitter's ``random.Random``.
    """

    def __init__(self, transport: Transport, *, run: str, queue_batches: int = 256,
                 backoff: tuple[float, float] = (0.5, 30.0), dtype: str = "float32",
                 seed: int = 0) -> None:
        check_name("run", run)
        check_int("queue_batches", queue_batches, 1)
        if (not isinstance(backoff, tuple) or len(backoff) != 2
                or not all(isinstance(b, (int, float)) and 0 < b < math.inf for b in backoff)
                or backoff[0] > backoff[1]):
            raise ValueError(f"backoff must be (first, max) seconds with 0 < first <= max, "
                             f"got {backoff!r}")
        if dtype not in WIRE_DTYPES:
            raise ValueError(f"dtype must be one of {tuple(WIRE_DTYPES)}, got {dtype!r}")
        self.transport = transport
        self.run = run
        self.dtype = dtype
        self.backoff = (float(backoff[0]), float(backoff[1]))
        self.dropped: dict[str, int] = {}          # rows by reason
        self.dropped_batches: dict[str, int] = {}  # batches by reason
        self.sent_rows = 0
        self.sent_batches = 0
        self.last_step: int | None = None          # of the last submitted batch (read-back)
        self._wire = WIRE_DTYPES[dtype]
        self._rng = random.Random(seed)
        self._delay = self.backoff[0]              # next pause after a failure
        self._paused_until = 0.0                   # monotonic time; submit() drops before it
        self._down = False
        self._logged: set[int | str] = set()
        self._names: set[str] = set()
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Batch] = queue.Queue(maxsize=queue_batches)
        self._closed = False
        self._stopping = False
        self._deadline = math.inf
        self._thread = threading.Thread(target=self._loop, name="repwatch-sink", daemon=True)
        self._thread.start()

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
        self.last_step = step
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
                        self.transport.where)

    def _dropped(self, drop: Drop, rows: int) -> None:
        """Count a batch the transport did not deliver and apply the policy of its reason."""
        self._drop(drop.reason, rows)
        if drop.reason in _FAILURES:
            self._fail(drop.message)
            return
        if drop.reason == "overload":
            pause = self._delay if drop.retry_after is None else drop.retry_after
            self._paused_until = time.monotonic() + min(pause, self.backoff[1])
        if drop.message:
            self._log_once(drop.reason if drop.key is None else drop.key, drop.message)

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
            self.transport.close()

    def _send(self, batch: _Batch) -> None:
        b = batch.rows.shape[0]
        if not self._ready(batch):
            return
        drop = self.transport.ready()
        if drop is None:
            headers, body = self._encode(batch)
            drop = self.transport.send(self.run, batch.stream, headers, body, self._deadline)
        if drop is None:
            self._sent(b)
        else:
            self._dropped(drop, b)

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
        """The batch in the wire format of :mod:`monitor.transport.wire`."""
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
                        "retrying with backoff (training continues)", self.transport.where, why)

    def _log_once(self, key: int | str, message: str) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.warning("%s", message)

    # ------------------------------------------------------------------ lifecycle

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait (at most ``timeout`` s) until every queued batch was sent or dropped."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks or not self.transport.drained():
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

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.transport.where!r}, run={self.run!r}, "
                f"dtype={self.dtype!r}, sent_batches={self.sent_batches}, "
                f"dropped={self.counts()})")


__all__ = ["DROP_REASONS", "WIRE_DTYPES", "Sender"]
