"""The sidecar's scoring queue: bounded, fair between runs, one batch of a run at a time
(torch-free).

Batches wait in one queue per run; workers take runs in round-robin order, one batch each, and
a run is never in two workers at once, so its batches are scored in the order they came (its
clock and publishes depend on it). A slow step of one run (a publish at large d) holds one
worker and that run's own batches; the other workers go on with the other runs. No run may hold
more than ``per_run`` places of the ``capacity``, so a stalled run cannot fill the queue and
have every other run's batches answered 429.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class FairQueue(Generic[T]):
    """``capacity`` places in all, at most ``per_run`` of them per run (see module doc)."""

    def __init__(self, capacity: int, per_run: int) -> None:
        if not 1 <= per_run <= capacity:
            raise ValueError(f"need 1 <= per_run <= capacity, got {per_run}, {capacity}")
        self.capacity = capacity
        self.per_run = per_run
        self._waiting: dict[str, deque[T]] = {}
        self._ready: deque[str] = deque()          # runs with waiting batches, none in a worker
        self._busy: set[str] = set()               # runs in a worker
        self._size = 0
        self._cond = threading.Condition()

    def qsize(self) -> int:
        """Batches waiting (not those in a worker)."""
        return self._size

    def waiting(self, run: str) -> int:
        """Batches of ``run`` waiting."""
        q = self._waiting.get(run)
        return len(q) if q else 0

    def room(self, run: str, reserved: int = 0, run_reserved: int = 0) -> str:
        """'' when a batch of ``run`` fits (with ``reserved`` places held elsewhere,
        ``run_reserved`` of them for ``run``), else why not: ``"full"`` or ``"run"`` (the run
        holds its share)."""
        if self._size + reserved >= self.capacity:
            return "full"
        if self.waiting(run) + run_reserved >= self.per_run:
            return "run"
        return ""

    def put(self, run: str, item: T) -> None:
        """Queue ``item`` of ``run`` (the caller checked :meth:`room` under its own lock)."""
        with self._cond:
            self._waiting.setdefault(run, deque()).append(item)
            self._size += 1
            if run not in self._busy and len(self._waiting[run]) == 1:
                self._ready.append(run)
            self._cond.notify()

    def take(self, timeout: float) -> tuple[str, T] | None:
        """The next run's oldest batch, the run marked busy until :meth:`done`; None after
        ``timeout`` s without one."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._ready:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            run = self._ready.popleft()
            item = self._waiting[run].popleft()
            self._size -= 1
            self._busy.add(run)
            return run, item

    def done(self, run: str) -> None:
        """The worker finished ``run``'s batch: the run is ready again if it has more."""
        with self._cond:
            self._busy.discard(run)
            if self._waiting.get(run):
                self._ready.append(run)
                self._cond.notify()
            elif run in self._waiting:
                del self._waiting[run]

    def idle(self) -> bool:
        """Nothing waiting and nothing in a worker."""
        with self._cond:
            return self._size == 0 and not self._busy

    def drain(self) -> list[T]:
        """Remove and return every waiting batch (at shutdown)."""
        with self._cond:
            items = [item for q in self._waiting.values() for item in q]
            self._waiting.clear()
            self._ready.clear()
            self._size = 0
            return items


__all__ = ["FairQueue"]
