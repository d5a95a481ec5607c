"""What the Monitor keeps about capture besides the rows: pauses and ``observe()``'s row caps.

* :class:`Pause` — the open ``Monitor.paused()`` blocks (monitor-wide, any thread).
* :class:`ObserveBook` — the row cap of an ``observe()`` call, the rows it subsampled away
  (by stream) and the observe streams that ``step(labels=)`` could not label (said once).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Literal

from monitor.capture.rows import Batch
from monitor.validation import check_int

log = logging.getLogger("repwatch")

RowCap = int | None | Literal["auto"]


class Pause:
    """A nestable, thread-safe count of open ``paused()`` blocks; true while any is open."""

    def __init__(self) -> None:
        self._open = 0
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return self._open > 0

    @contextlib.contextmanager
    def block(self) -> Iterator[None]:
        """Pause capture inside the ``with`` block."""
        with self._lock:
            self._open += 1
        try:
            yield
        finally:
            with self._lock:
                self._open -= 1


class ObserveBook:
    """Row caps and counts of ``observe()`` for a monitor of ``max_rows`` rows per training
    batch and a window of ``window`` rows."""

    def __init__(self, max_rows: int, window: int) -> None:
        self.max_rows = max_rows
        self.window = window
        self._subsampled: dict[str, int] = {}
        self._over_window_said: set[str] = set()
        self._unlabelled: set[str] = set()        # observe streams without labels= this step
        self._unlabelled_said: set[str] = set()

    def cap(self, max_rows: RowCap, evaluation: bool) -> int:
        """Rows of one ``observe()`` batch to score: ``"auto"`` keeps ``max_rows`` of a
        training batch and every row of an evaluation batch (``predictions=``), an int caps,
        None keeps all; never more than the window."""
        if max_rows == "auto":
            return self.window if evaluation else self.max_rows
        if max_rows is None:
            return self.window
        return min(check_int("max_rows", max_rows, 1), self.window)

    def observed(self, name: str, labelled: bool) -> None:
        """An ``observe()`` batch of stream ``name``, with or without its own labels."""
        if not labelled:
            self._unlabelled.add(name)

    def count(self, name: str, batch: Batch, cap: int) -> None:
        """Count the rows of ``batch`` subsampled away (host ints, from shapes); warn once per
        stream when the window, not a row cap, was the limit."""
        lost = batch.size - batch.rows.shape[0]
        if lost <= 0:
            return
        self._subsampled[name] = self._subsampled.get(name, 0) + lost
        if cap == self.window and name not in self._over_window_said:
            self._over_window_said.add(name)
            log.warning("repwatch observe(%r): a batch of %d rows is larger than the window "
                        "(%d rows); %d rows drawn at random were scored (rows left out are "
                        "counted in Monitor.subsampled_rows; a larger window= scores more)",
                        name, batch.size, cap, cap)

    def step(self, labelled: bool) -> None:
        """A ``step()``: with ``labels=``, say once per stream which observe streams they do
        not reach."""
        names = sorted(self._unlabelled - self._unlabelled_said) if labelled else []
        if names:
            self._unlabelled_said.update(names)
            log.warning("repwatch: step(labels=) labels the rows of watch() streams only; "
                        "observe() stream(s) %s got no labels and have no neural-collapse "
                        "signals (pass observe(..., labels=y))", ", ".join(map(repr, names)))
        self._unlabelled.clear()

    @property
    def subsampled(self) -> dict[str, int]:
        """Rows subsampled away, by stream (streams that lost none are absent)."""
        return dict(self._subsampled)


__all__ = ["ObserveBook", "Pause", "RowCap"]
