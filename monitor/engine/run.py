"""A run's clock and its publish step, shared by the in-process monitor and both sidecar
backends (torch-free).

* :func:`publish_due` — the cadence: a publish whenever the step count crosses a multiple of the
  period (``every``, stretched by the overhead budget in-process).
* :class:`BatchClock` — how a sidecar run's step advances from the batches it receives.
* :class:`RunPublisher` — turns readings into a :class:`~monitor.snapshot.Snapshot`: the
  run-relative signals (:class:`~monitor.engine.tracking.RunTracker`), the NC1 effective depth, the
  alerts (:class:`~monitor.alerts.AlertEngine`, logged and handed to callbacks), the latest
  snapshot, the history and an optional JSONL log.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from monitor.alerts import AlertEngine, AlertRule
from monitor.engine.tracking import RunTracker
from monitor.errors import ErrorLog
from monitor.functional.neural_collapse import effective_depth
from monitor.snapshot import Alert, Readings, Snapshot

log = logging.getLogger("repwatch")


def publish_due(before: int, after: int, period: int) -> bool:
    """True when the step count went from ``before`` to ``after`` across a multiple of
    ``period`` (one publish however many multiples a jump crosses)."""
    return after // period > before // period


DEFAULT_MAX_STEP_JUMP = 10_000_000
"""The largest forward jump of a run's step between two batches that a sidecar accepts."""


class StepJump(ValueError):
    """A batch's step is further ahead of its run than the clock accepts (counted, not applied)."""


class BatchClock:
    """How a sidecar run's step moves, the same for every backend.

    A batch carrying ``step`` greater than the run's step first advances the run to it, then is
    scored: ``step`` is the number of steps the trainer had completed when it captured the batch
    (``Monitor.step_count``), so a publish at step s covers the batches captured before step s,
    as in-process. Batches without a step advance the run by one at each batch of the run's
    first stream (except its very first batch).

    A step going back is one of two things. Below the run's last published step it is a
    *resume* (the trainer restarted from an earlier checkpoint): the run's clock follows it, so
    publishing resumes at the next multiple of the cadence, and the history drops what came
    after it (:meth:`RunPublisher.rewind`). At or after the last publish it is a late batch
    (scored; the clock stays). A forward jump of more than ``max_jump`` steps after the run's
    first batch raises :class:`StepJump`: the batch is scored and its step is not applied.
    A run's batches come from one trainer process (one run name per rank).
    """

    def __init__(self, max_jump: int = DEFAULT_MAX_STEP_JUMP) -> None:
        self.max_jump = int(max_jump)
        self.first_stream: str | None = None
        self.batches = 0

    def target(self, stream: str, step: int | None, current: int, published: int | None
               ) -> int:
        """The run's step once this batch of ``stream`` is taken (the run is at ``current``;
        ``published``: the step of its last publish, None before the first)."""
        if step is None:
            return current + (1 if stream == self.first_stream and self.batches > 0 else 0)
        if step >= current:
            if self.batches and step - current > self.max_jump:
                raise StepJump(f"step {step} jumps {step - current} steps ahead of the run "
                               f"(at {current}); at most {self.max_jump} are accepted")
            return step
        if published is not None and step < published:
            return step                           # a resume from an earlier checkpoint
        return current                            # a late batch

    def scored(self, stream: str) -> None:
        """Count a batch of ``stream`` (the run's first stream is the first one seen)."""
        if self.first_stream is None:
            self.first_stream = stream
        self.batches += 1


class RunPublisher:
    """One run's publish step after the compute: run-relative signals, NC1 effective depth,
    alerts, snapshot and history. ``tracker`` is the run's :class:`RunTracker` (kept in the
    checkpoint by its owner); exceptions of the alert engine, of ``callbacks`` and of the
    ``log_path`` writes are counted in ``errors``."""

    def __init__(self, run: str, rules: Sequence[AlertRule], tracker: RunTracker,
                 errors: ErrorLog, history: int = 1000, nc1_depth_threshold: float = 0.1,
                 log_path: str | os.PathLike[str] | None = None) -> None:
        self.run = run
        self.tracker = tracker
        self.errors = errors
        self.alerts = AlertEngine(rules, run=run)
        self.nc1_depth_threshold = float(nc1_depth_threshold)
        self.latest: Snapshot | None = None
        self.history: deque[Snapshot] = deque(maxlen=history)
        self.callbacks: list[Callable[[Alert], Any]] = []
        self.publish_callbacks: list[Callable[[Snapshot], Any]] = []
        self.log_path = Path(log_path) if log_path is not None else None
        self._resumed_from: int | None = None

    def rewind(self, step: int, was: int) -> None:
        """The run went back from step ``was`` to ``step`` (a resume from an earlier
        checkpoint): the history drops the snapshots after ``step`` (the abandoned branch; the
        JSONL log keeps them) and the next snapshot carries ``resumed_from=was``."""
        kept = [snap for snap in self.history if snap.step <= step]
        self.history.clear()
        self.history.extend(kept)
        self._resumed_from = was
        log.warning("repwatch run %s resumed at step %d (it was at step %d); its history "
                    "after step %d is dropped", self.run, step, was, step)

    def publish(self, readings: Readings, step: int, started: float,
                order: Iterable[str] | None = None, **extra: Any
                ) -> tuple[Snapshot, list[Alert], list[Alert]]:
        """The snapshot of ``readings`` at ``step`` and the alerts that fired and resolved.

        ``started``: ``time.perf_counter()`` when the publish began (for its duration);
        ``order``: the streams in watch order (effective depth; default: as computed);
        ``extra``: further :class:`Snapshot` fields (``dropped``, ``overhead_ratio``, ...).
        """
        r = readings
        self.tracker.derive(r.streams, r.layers, step)
        names = [n for n in (order if order is not None else r.streams) if n in r.streams]
        depth = effective_depth((r.streams[n].get("neural_collapse_nc1", math.nan)
                                 for n in names), self.nc1_depth_threshold)
        if depth is not None:
            r.run_signals["neural_collapse_effective_depth"] = depth
        groups = {"stream": r.streams, "layer": r.layers, "param": r.params,
                  "run": {"model": r.run_signals}}
        firing, fired, resolved = self.alerts.firing(), [], []
        with self.errors.guard("alerts"):
            firing, fired, resolved = self.alerts.evaluate(groups, step)
        values = {f.name: getattr(r, f.name) for f in fields(Readings)}
        snap = Snapshot(run=self.run, step=step, time=time.time(), **values, alerts=firing,
                        errors=self.errors.counts(), resumed_from=self._resumed_from,
                        publish_duration_seconds=time.perf_counter() - started, **extra)
        self._resumed_from = None
        self.latest = snap
        self.history.append(snap)
        return snap, fired, resolved

    def notify(self, snap: Snapshot, fired: Sequence[Alert], resolved: Sequence[Alert]) -> None:
        """Log the alerts that fired and resolved, call the callbacks with each fired one, the
        publish callbacks with the snapshot, and append the snapshot to the JSONL log (outside any lock: callbacks may be slow)."""
        for alert in fired:
            log.warning("ALERT %s [%s] firing on %s/%s at step %d: %s", alert.name,
                        alert.severity, self.run, alert.stream, snap.step, alert.description)
            for callback in list(self.callbacks):
                name = getattr(callback, "__name__", callback)
                with self.errors.guard("callback", key=f"callback[{name}]"):
                    callback(alert)
        for alert in resolved:
            log.warning("RESOLVED %s on %s/%s at step %d", alert.name, self.run, alert.stream,
                        snap.step)
        for callback in list(self.publish_callbacks):
            name = getattr(callback, "__name__", type(callback).__name__)
            with self.errors.guard("callback", key=f"callback[{name}]"):
                callback(snap)
        if self.log_path is not None:
            try:
                with self.log_path.open("a") as fh:
                    fh.write(json.dumps(snap.to_dict()) + "\n")
            except Exception as exc:  # noqa: BLE001 - a full disk must not stop training
                self.errors.record("log", exc)
