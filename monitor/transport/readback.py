"""Sidecar → trainer: a run's published snapshots read back from its sidecar (torch-free).

In sidecar mode the sidecar scores the streams and publishes their snapshots, alerts included,
in its own process. So that ``mon.latest``, ``Snapshot.alerts`` and ``on_alert`` work as with
in-process scoring, the sink reads them back through the read API every sidecar serves,
``GET /v1/runs/{run}/history?since_step=S`` (no new endpoint), from a daemon thread of its own
(``repwatch-readback``): one request every ``every`` seconds (1 s by default; after a failure
the pause doubles, up to 30 s), with the sink's token, on a kept-alive connection of its own
(:class:`~monitor.transport.http.HttpTransport`). The training thread never waits on it.

:class:`SnapshotReader` keeps

* ``latest``: the newest snapshot of the run read so far, also handed to a listener (the
  Monitor's :class:`~monitor.engine.paths.SinkScoring`, which merges it with what the trainer
  publishes itself: activation layers, weights, dropped rows, errors);
* the alerts to deliver: every alert of every snapshot read, once per identity (name, scope,
  stream, ``since_step``: an alert that resolves and fires again is a new one), in the order
  the sidecar published them. :meth:`SnapshotReader.take_alerts` hands them to the training
  thread, where the Monitor calls the ``on_alert`` callbacks (in ``step()``).

Which snapshots are this trainer's: only those at a step it has already shipped (``horizon``:
the last step given to the sink). A history the sidecar still holds from an earlier trainer
process under the same run name, ahead of a trainer that restarted from an earlier checkpoint,
is neither merged nor alerted on. When the trainer resumes from an earlier step
(:meth:`SnapshotReader.rewind`, called by the Monitor when its step goes back; or when the
horizon falls below what was read) the reads start again from there and the alerts seen after
it may be delivered again, as the resumed run fires them.

A shared-memory ring has no way back: a ``shm://`` sink reads from the sidecar's HTTP address
given in its spec, ``shm://NAME?read=http://127.0.0.1:9400`` (:func:`split_read`).

Failures never reach training. Each failed read is counted by reason (:meth:`counts`):
``sidecar_down`` (connection error or timeout), ``sidecar_error`` (5xx), ``rejected`` (another
4xx), ``invalid`` (an answer that is not a list of this run's snapshots) and ``error`` (a bug),
and logged once per reason; ``invalid``, ``error`` and a listener's exceptions are also recorded
in the Monitor's :class:`~monitor.errors.ErrorLog` under ``readback``
(``repwatch_errors_total{component="readback"}``). A 404 (the run has not published on the
sidecar yet) is counted in ``not_found``, not as a failure.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import re
import threading
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, unquote, urlencode

from monitor.snapshot import Alert, Snapshot
from monitor.transport.http import HttpTransport
from monitor.validation import check_int, check_name

log = logging.getLogger("repwatch")

READ_FAILURES: tuple[str, ...] = ("sidecar_down", "sidecar_error", "rejected", "invalid", "error")
"""Why a read of the sidecar's snapshots failed (:meth:`SnapshotReader.counts`)."""

MAX_PAUSE = 30.0
"""Longest pause between reads after failures (seconds)."""

AlertKey = tuple[str, str, str, int]


def alert_key(alert: Alert) -> AlertKey:
    """An alert's identity: (name, scope, stream, since_step)."""
    return (alert.name, alert.scope, alert.stream, alert.since_step)


def check_every(every: float | None) -> float | None:
    """``every`` (seconds between reads) checked: a positive finite number, or None (off)."""
    if every is None:
        return None
    if isinstance(every, bool) or not isinstance(every, (int, float)) or not (
            0 < every < math.inf):
        raise ValueError(f"read_every must be a positive number of seconds or None (no "
                         f"read-back), got {every!r}")
    return float(every)


def split_read(spec: str) -> tuple[str, str | None]:
    """``shm://NAME?...&read=URL`` → (``shm://NAME?...`` without ``read``, URL or None).

    ``read`` is the HTTP base URL of the sidecar that serves the ring (``repwatch serve --shm
    NAME --port P``: ``http://127.0.0.1:P``), where the sink reads the run's snapshots back.
    The other options (``slots``, ``slot_mb``) are left as they are for the ring's parser."""
    ring, sep, query = spec.partition("?")
    kept, reads = [], []
    for item in query.split("&") if sep else []:
        if item.startswith("read="):
            reads.append(unquote(item[5:]))
        else:
            kept.append(item)
    if len(reads) > 1:
        raise ValueError(f"shm sink: read= given {len(reads)} times in {spec!r}")
    if reads and not re.match(r"^https?://[^/?#\s]+", reads[0]):
        raise ValueError(f"shm sink: read= must be the http:// base URL of the sidecar serving "
                         f"the ring, e.g. shm://NAME?read=http://127.0.0.1:9400, got "
                         f"{reads[0]!r}")
    return (ring + ("?" + "&".join(kept) if kept else "")), (reads[0] if reads else None)


# ---------------------------------------------------------------------------------- the reader

class SnapshotReader:
    """Reads run ``run``'s snapshots back from the sidecar at ``url``, from a daemon thread.

    Args:
        url: the sidecar's HTTP base URL (``http://127.0.0.1:9400``).
        run: the run name.
        token: bearer token sent with every read (the sink's), or None.
        every: seconds between reads (the pause doubles after a failure, up to
            :data:`MAX_PAUSE`).
        timeout: seconds per read.
        horizon: the last step the trainer shipped (None: nothing yet, no read); snapshots at
            later steps are left for later reads (default: no limit).
        limit: snapshots per read at most (the newest; the read API's ``limit``).
        max_alerts: alerts kept for :meth:`take_alerts` at most; beyond, the oldest are
            dropped and counted in ``lost_alerts``.
    """

    def __init__(self, url: str, run: str, token: str | None = None, *, every: float = 1.0,
                 timeout: float = 5.0,
                 horizon: Callable[[], int | float | None] | None = None, limit: int = 200,
                 max_alerts: int = 1024) -> None:
        check_name("run", run)
        checked = check_every(every)
        if checked is None:
            raise ValueError("every must be a positive number of seconds")
        self.every: float = checked
        self.client = HttpTransport(url, token, timeout=timeout)   # checks url, token, timeout
        self.url = self.client.url
        self.run = run
        self.limit = check_int("limit", limit, 1)
        if self.limit > 10_000:                    # the read API's largest limit
            raise ValueError(f"limit must be at most 10000, got {limit!r}")
        self.max_alerts = check_int("max_alerts", max_alerts, 1)
        self._horizon: Callable[[], int | float | None] = horizon or (lambda: math.inf)
        self.latest: Snapshot | None = None
        """The newest snapshot of the run read so far (None before the first)."""
        self.reads = 0                  # reads answered (200 or 404)
        self.snapshots = 0              # snapshots taken
        self.not_found = 0              # reads answered 404: the run has not published yet
        self.lost_alerts = 0
        self.failures: dict[str, int] = {}
        self._cursor: int | None = None  # the step of the newest snapshot taken
        self._seen: set[AlertKey] = set()
        self._alerts: deque[Alert] = deque()
        self._listener: Callable[[Snapshot], Any] | None = None
        self._errors: Any = None
        self._logged: set[str] = set()
        self._lock = threading.Lock()
        self._rounds = threading.Condition()
        self._started = self._finished = 0
        self._wake = threading.Event()
        self._stopping = False
        self._delay = self.every
        self._thread = threading.Thread(target=self._loop, name="repwatch-readback",
                                        daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ other threads

    def attach(self, listener: Callable[[Snapshot], Any] | None, errors: Any = None) -> None:
        """Call ``listener(snapshot)`` (on the reader's thread) with each newest snapshot read;
        record invalid answers and the listener's exceptions in ``errors`` (an ErrorLog)."""
        self._listener, self._errors = listener, errors

    def take_alerts(self) -> list[Alert]:
        """The alerts read since the last call, each once, oldest first."""
        with self._lock:
            out = list(self._alerts)
            self._alerts.clear()
        return out

    def rewind(self, step: int) -> None:
        """The trainer went back to ``step`` (a resume from an earlier checkpoint): read again
        from there, forget the alerts seen after it (the resumed run may fire them again) and
        drop those not yet taken."""
        with self._lock:
            if self._cursor is None or self._cursor <= step:
                return
            self._cursor = max(-1, step)
            if self.latest is not None and self.latest.step > step:   # the abandoned branch
                self.latest = None
            self._seen = {k for k in self._seen if k[3] <= step}
            kept = [a for a in self._alerts if a.since_step <= step]
            self._alerts.clear()
            self._alerts.extend(kept)

    def counts(self) -> dict[str, int]:
        """Failed reads by reason (a copy)."""
        with self._lock:
            return dict(self.failures)

    def refresh(self, timeout: float = 5.0) -> bool:
        """Read now (on the reader's thread) and wait at most ``timeout`` s for that read; True
        when it was done. For scripts and tests that want the sidecar's final state at the
        end of a run (after ``sink.flush()``); never needed during training."""
        with self._rounds:
            target = self._started + 1
            self._wake.set()
            return self._rounds.wait_for(lambda: self._finished >= target or self._stopping,
                                         timeout) and self._finished >= target

    def close(self, timeout: float = 1.0) -> None:
        """Stop the thread (a read in flight is not waited for beyond ``timeout``). Idempotent."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(max(0.0, timeout))

    # ------------------------------------------------------------------ reader thread

    def _loop(self) -> None:
        try:
            while True:
                self._wake.wait(self._delay)
                self._wake.clear()
                if self._stopping:
                    return
                with self._rounds:
                    self._started += 1
                ok = self.poll()
                with self._rounds:
                    self._finished = self._started
                    self._rounds.notify_all()
                self._delay = self.every if ok else min(max(2 * self._delay, self.every),
                                                        max(MAX_PAUSE, self.every))
        finally:
            self.client.close()
            with self._rounds:
                self._rounds.notify_all()

    def poll(self) -> bool:
        """One read (the reader's thread calls it); False when it failed (counted). Never
        raises."""
        try:
            return self._poll()
        except Exception as exc:  # noqa: BLE001 - a bug must not stop the reads
            return self._fail("error", f"{type(exc).__name__}: {exc}", exc)

    def _poll(self) -> bool:
        horizon = self._horizon()
        if horizon is None:                        # nothing shipped yet: nothing of ours there
            return True
        if self._cursor is not None and self._cursor > horizon:   # went back, not rewound
            self.rewind(int(horizon) - 1)
        with self._lock:
            cursor = self._cursor
        query: dict[str, Any] = {"limit": self.limit}
        if cursor is not None:
            query["since_step"] = cursor
        path = f"/v1/runs/{quote(self.run, safe='')}/history?{urlencode(query)}"
        try:
            status, data = self.client.get(path)
        except (OSError, http.client.HTTPException) as exc:
            return self._fail("sidecar_down", f"{type(exc).__name__}: {exc}")
        if status == 404:
            with self._lock:
                self.reads += 1
                self.not_found += 1
            return True
        text = data[:300].decode("utf-8", "replace")
        if status >= 500:
            return self._fail("sidecar_error", f"HTTP {status}: {text}")
        if not 200 <= status < 300:
            return self._fail("rejected", f"HTTP {status}: {text}")
        try:
            items = json.loads(data)
            if not isinstance(items, list):
                raise ValueError(f"expected a list of snapshots, got {type(items).__name__}")
            snaps = [Snapshot.from_dict(item) for item in items]
            others = sorted({s.run for s in snaps} - {self.run})
            if others:
                raise ValueError(f"snapshots of other runs {others} in run {self.run!r}'s history")
        except (ValueError, TypeError, KeyError) as exc:
            return self._fail("invalid", f"{type(exc).__name__}: {exc}", exc)
        self._take(snaps, horizon)
        return True

    def _take(self, snaps: list[Snapshot], horizon: int | float) -> None:
        """Keep the snapshots (oldest first) up to ``horizon`` and their new alerts."""
        new: list[Snapshot] = []
        with self._lock:
            self.reads += 1
            for snap in snaps:
                if snap.step > horizon:            # not (yet) this trainer's
                    break
                if self._cursor is not None and snap.step <= self._cursor:
                    continue
                self._cursor = snap.step
                new.append(snap)
                for alert in snap.alerts:
                    key = alert_key(alert)
                    if key in self._seen:
                        continue
                    self._seen.add(key)
                    if len(self._alerts) >= self.max_alerts:
                        self._alerts.popleft()
                        self.lost_alerts += 1
                    self._alerts.append(alert)
            if new:
                self.latest = new[-1]
                self.snapshots += len(new)
        listener = self._listener
        if new and listener is not None:
            try:
                listener(new[-1])
            except Exception as exc:  # noqa: BLE001 - counted, the reads go on
                self._record(exc)

    def _record(self, exc: BaseException) -> None:
        errors = self._errors
        if errors is not None:
            errors.record("readback", exc)
        elif "listener" not in self._logged:
            self._logged.add("listener")
            log.warning("repwatch sink: reading run %s back from %s failed: %s: %s",
                        self.run, self.url, type(exc).__name__, exc)

    def _fail(self, reason: str, message: str, exc: BaseException | None = None) -> bool:
        with self._lock:
            self.failures[reason] = self.failures.get(reason, 0) + 1
        if exc is not None and self._errors is not None:
            self._errors.record("readback", exc)
        elif reason not in self._logged:
            self._logged.add(reason)
            log.warning("repwatch sink: cannot read run %s's snapshots back from the sidecar "
                        "%s (%s: %s); trying again with backoff, training continues (further "
                        "failures are only counted)", self.run, self.url, reason, message)
        return False

    def __repr__(self) -> str:
        return (f"SnapshotReader({self.url!r}, run={self.run!r}, every={self.every}, "
                f"snapshots={self.snapshots}, failures={self.counts()})")


__all__ = ["READ_FAILURES", "SnapshotReader", "alert_key", "check_every", "split_read"]
