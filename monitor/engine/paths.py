"""Where a Monitor's captured rows go: scored here, or shipped to a sidecar.

Both paths have one interface, so the Monitor never asks which one it has:

* :meth:`take` — a captured batch of stream rows; hook rows (``defer``) wait for the labels
  that ``step(labels=)`` may bring;
* :meth:`end_step` — at ``step()``: label the waiting rows (or ship them);
* :meth:`compute` — a publish's host values (stream values, plus the activation layers and
  weights, which are always scored here);
* :meth:`snapshot_fields`, :meth:`close`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any

import torch
from torch import Tensor

from monitor.capture import Batch
from monitor.engine.engine import Engine
from monitor.engine.side_streams import SideStreams
from monitor.errors import ErrorLog
from monitor.snapshot import Readings, Snapshot


log = logging.getLogger("repwatch")


def _shares_memory(a: Tensor, b: Any) -> bool:
    """Whether ``a`` is (a view of) ``b``'s storage: host pointers only, no device sync."""
    return isinstance(b, Tensor) and a.untyped_storage().data_ptr() == \
        b.untyped_storage().data_ptr()


class LocalScoring:
    """Rows scored in this process by ``engine`` (on the side CUDA stream where there is one);
    ``reducer`` (a :class:`monitor.engine.distributed.GlobalReducer`, or None per rank) reduces the
    states across ranks at each compute."""

    def __init__(self, engine: Engine, errors: ErrorLog, lock: threading.RLock,
                 side: SideStreams, reducer: Any = None) -> None:
        self.engine, self.errors, self.lock, self.side = engine, errors, lock, side
        self.reducer = reducer
        self.pending: list[tuple[str, Batch]] = []
        self.order: list[str] = []          # streams in the order first seen (watch order)

    def take(self, name: str, batch: Batch, source: Any, defer: bool, step: int) -> None:
        rows = batch.rows
        if self.side.side(rows.device) is not None and _shares_memory(rows, source):
            batch.rows = rows = rows.clone()  # the side stream must not see later in-place ops
        with self.lock, self.side.scoring(rows.device, rows, batch.index, batch.labels,
                                          batch.predictions):
            if name not in self.order:
                self.order.append(name)
            self.engine.update(name, rows, batch.index, batch.labels, batch.predictions)
            if defer:
                self.pending.append((name, batch))    # step(labels=) may label them

    def end_step(self, labels: Tensor | None, step: int) -> None:
        pending, self.pending = self.pending, []
        if labels is None:
            return
        for name, batch in pending:           # a batch that does not fit fails alone
            with self.errors.guard("labels", key=f"labels[{name}]"), torch.no_grad():
                lab = batch.label(labels)
                with self.lock, self.side.scoring(batch.rows.device, lab):
                    self.engine.update_labels(name, batch.rows, lab)

    def compute(self, step: int) -> Readings:
        if self.reducer is None:
            return self.engine.compute(step=step)
        return self.reducer.compute(self.engine, step=step)

    def snapshot_fields(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


class SinkScoring:
    """Stream rows shipped to a sidecar by ``sink`` (:mod:`monitor.transport`); activation
    layers and weights still scored here by ``engine``.

    The sidecar's publishes come back when the sink reads them (``sink.readback``, a
    :class:`~monitor.transport.readback.SnapshotReader`) and ``publisher`` (the Monitor's
    :class:`~monitor.engine.run.RunPublisher`) is given: ``publisher.latest`` (``mon.latest``)
    follows the sidecar's newest snapshot merged with the local publish (:meth:`merged`), each
    local publish is merged the same way (:meth:`merge`, from ``Monitor.publish``), and every
    alert the sidecar fired goes to the ``on_alert`` callbacks once, in the sidecar's order, on
    the training thread at its next ``step()`` or ``publish()`` (:meth:`deliver`).
    """

    def __init__(self, sink: Any, engine: Engine, errors: ErrorLog,
                 publisher: Any = None) -> None:
        self.sink, self.engine, self.errors = sink, engine, errors
        self.pending: list[tuple[str, Batch]] = []
        self.order: list[str] = []
        self.publisher = publisher
        self.readback = getattr(sink, "readback", None) if publisher is not None else None
        self._local: Snapshot | None = None        # the latest local publish
        self._merging = threading.Lock()
        self._warned = False
        self._step = -1                              # the step of the last end_step
        if self.readback is not None:
            self.readback.attach(self._arrived, errors)

    def take(self, name: str, batch: Batch, source: Any, defer: bool, step: int) -> None:
        if defer:                                    # async copy on the device
            self.pending.append((name, Batch(batch.rows.clone(), batch.index, batch.size)))
        else:
            self.sink.submit(name, batch.rows, batch.labels, step + 1)

    def end_step(self, labels: Tensor | None, step: int) -> None:
        """Send the hook rows of this step, labelled when ``labels`` is given."""
        pending, self.pending = self.pending, []
        for name, batch in pending:
            with self.errors.guard("sink", key=f"sink[{name}]"):
                lab = None
                if labels is not None:
                    with self.errors.guard("labels"):
                        lab = batch.label(labels)
                with torch.no_grad():
                    self.sink.submit(name, batch.rows, lab, step + 1)
        if self.readback is not None and step < self._step:    # resumed at an earlier step
            with self.errors.guard("readback"):
                self.readback.rewind(step)
        self._step = step
        self.deliver()

    def compute(self, step: int) -> Readings:
        return self.engine.compute(step=step)

    def snapshot_fields(self) -> dict[str, Any]:
        return {"dropped": {k: float(v) for k, v in self.sink.counts().items()}}

    def merge(self, snap: Snapshot) -> Snapshot:
        """The local publish ``snap`` merged with the sidecar's newest snapshot; it replaces
        ``snap`` as the publisher's latest and in its history. Then :meth:`deliver` (the
        training thread calls this, in ``Monitor.publish``, outside the monitor's lock)."""
        merged = snap
        if self.readback is not None:
            with self.errors.guard("readback"), self._merging:
                self._local = snap
                merged = self.merged(self.readback.latest, snap) or snap
                history = self.publisher.history
                for i in range(len(history) - 1, max(-1, len(history) - 5), -1):
                    if history[i] is snap:
                        history[i] = merged
                        break
                self.publisher.latest = merged
        self.deliver()
        return merged

    def merged(self, remote: Snapshot | None, local: Snapshot | None) -> Snapshot | None:
        """One snapshot of the run: the sidecar's ``remote`` (its streams' values, counters,
        spectra, histograms and alerts) with what only this process has, from ``local``:
        activation layers, weights, model-level signals and their alerts, the sink's dropped
        rows, errors, overhead and rank (before the first local publish: this process's
        errors and dropped rows). Step and time are the later of the two."""
        if remote is None:
            return local
        if local is None:
            return dataclasses.replace(
                remote, dropped={k: float(v) for k, v in self.sink.counts().items()},
                errors=self.errors.counts(), publish_duration_seconds=0.0,
                overhead_ratio=float("nan"), effective_cadence_steps=float("nan"), rank=None)
        ids = {(a.name, a.scope, a.stream) for a in remote.alerts}
        alerts = [*remote.alerts, *(a for a in local.alerts if (a.name, a.scope, a.stream)
                                    not in ids)]
        signals = [*remote.histograms, *(k for k in local.histograms if k not in remote.histograms)]
        return dataclasses.replace(
            remote, run=local.run, step=max(remote.step, local.step),
            time=max(remote.time, local.time),
            streams={**remote.streams, **local.streams},
            counters={**remote.counters, **local.counters},
            spectra={**remote.spectra, **local.spectra},
            layers={**remote.layers, **local.layers}, params={**remote.params, **local.params},
            run_signals={**remote.run_signals, **local.run_signals},
            histograms={k: {**remote.histograms.get(k, {}), **local.histograms.get(k, {})}
                        for k in signals},
            dropped=dict(local.dropped), alerts=alerts, errors=dict(local.errors),
            publish_duration_seconds=local.publish_duration_seconds,
            overhead_ratio=local.overhead_ratio,
            effective_cadence_steps=local.effective_cadence_steps, rank=local.rank,
            resumed_from=(local.resumed_from if local.resumed_from is not None
                          else remote.resumed_from))

    def deliver(self) -> None:
        """Hand the alerts the sidecar fired since the last call to the ``on_alert`` callbacks,
        each once and in order, on the calling (training) thread; a callback's exception is
        counted (``callback``), as in process."""
        publisher = self.publisher
        if publisher is None:
            return
        if self.readback is None:
            if publisher.callbacks and not self._warned:
                self._warned = True
                log.warning("repwatch: on_alert callbacks do not see the alerts of sink %r: it "
                            "does not read the sidecar's snapshots back (a shm:// sink needs "
                            "the sidecar's HTTP address: shm://NAME?read=http://HOST:PORT)",
                            self.sink)
            return
        alerts = []
        with self.errors.guard("readback"):
            alerts = self.readback.take_alerts()
        for alert in alerts:
            log.warning("ALERT %s [%s] firing on %s/%s since step %d (scored by the sidecar): "
                        "%s", alert.name, alert.severity, alert.run or publisher.run,
                        alert.stream, alert.since_step, alert.description)
            for callback in list(publisher.callbacks):
                name = getattr(callback, "__name__", callback)
                with self.errors.guard("callback", key=f"callback[{name}]"):
                    callback(alert)

    def _arrived(self, remote: Snapshot) -> None:
        """A newer snapshot of the sidecar (on the read-back thread): ``mon.latest`` follows."""
        with self._merging:
            self.publisher.latest = self.merged(remote, self._local)

    def close(self) -> None:
        self.sink.close()
