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

import threading
from typing import Any

import torch
from torch import Tensor

from monitor.capture import Batch
from monitor.engine.engine import Engine
from monitor.engine.side_streams import SideStreams
from monitor.errors import ErrorLog
from monitor.snapshot import Readings


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
        with self.errors.guard("labels"), torch.no_grad():
            for name, batch in pending:
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
    layers and weights still scored here by ``engine``."""

    def __init__(self, sink: Any, engine: Engine, errors: ErrorLog) -> None:
        self.sink, self.engine, self.errors = sink, engine, errors
        self.pending: list[tuple[str, Batch]] = []
        self.order: list[str] = []

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

    def compute(self, step: int) -> Readings:
        return self.engine.compute(step=step)

    def snapshot_fields(self) -> dict[str, Any]:
        return {"dropped": {k: float(v) for k, v in self.sink.counts().items()}}

    def close(self) -> None:
        self.sink.close()
