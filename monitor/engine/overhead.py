"""Overhead budget: repwatch's own host time per training step, and the cadence stretch that
keeps it within ``Monitor(overhead_budget=...)``.

Host timers only (``time.perf_counter``), never a device synchronisation: on a GPU repwatch's
hot path only *enqueues* work, so the host time is what it costs the training loop's Python
thread. The GPU kernel time of repwatch's own work is not included: it overlaps with training
on the device or queues behind it, and timing it would need the sync that the hot path avoids.
"""

from __future__ import annotations

import logging
import math

from monitor.validation import check_int

log = logging.getLogger("repwatch")

MAX_STRETCH = 64
"""The effective cadence never stretches beyond this many times the base cadence."""


class OverheadBudget:
    """Accounts repwatch's host time against the training step's and stretches the cadence.

    A *window* runs from one publish to a later one, spanning at least ``max(2k, 4)``
    ``step()`` intervals (so that it holds its share of captured steps). Over it, ``own`` sums
    repwatch's host time (capture hooks, ``observe``, ``step()``'s own work, publishes) and
    ``wall`` the wall time between consecutive ``step()`` calls; the window's ratio is
    ``own / (wall - own)`` (repwatch time per second of training). The exported ratio is an
    EMA over windows (weight ``smoothing``; a window after a cadence change starts it afresh).

    With a ``budget``, each publish decides the stretch ``k`` (a power of two in
    ``[1, max_stretch]``): double it while the ratio exceeds the budget; halve it only once the
    ratio is under a quarter of the budget (halving roughly doubles the ratio: hysteresis).
    With ``k > 1`` only every ``k``-th step is captured and publishes come ``k`` times less
    often. ``budget=None`` measures and never adapts.
    """

    def __init__(self, budget: float | None, max_stretch: int = MAX_STRETCH,
                 smoothing: float = 0.5) -> None:
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, (int, float)) \
                    or not math.isfinite(budget) or budget <= 0:
                raise ValueError(f"overhead_budget must be a positive finite ratio (e.g. 0.01 "
                                 f"for 1% of the training step's time) or None, got {budget!r}")
        check_int("max_stretch", max_stretch, 1)
        self.budget: float | None = float(budget) if budget is not None else None
        self.max_stretch = max_stretch
        self.smoothing = smoothing
        self.stretch = 1
        self.ratio = math.nan
        self._own = 0.0
        self._wall = 0.0
        self._last: float | None = None
        self._intervals = 0
        self._restart = True           # the next window starts the EMA afresh
        self._warned = False            # the not-adapted warning, logged once

    def add(self, seconds: float) -> None:
        """Count ``seconds`` of repwatch host time in the current window (none before the
        first ``step()``: that step's training time is not measured either)."""
        if self._last is not None:
            self._own += seconds

    def tick(self, now: float) -> None:
        """A ``step()`` call began at ``now`` (``time.perf_counter()``)."""
        if self._last is not None:
            self._wall += now - self._last
            self._intervals += 1
        self._last = now

    def captures(self, call: int) -> bool:
        """Whether the ``call``-th ``step()`` interval (1-based) is captured under the stretch."""
        return call % self.stretch == 0

    def close_window(self, may_adapt: bool = True) -> tuple[float, int]:
        """End the window (at a publish): update the ratio, maybe change the stretch.

        Returns (smoothed ratio, stretch that applies from now on)."""
        if self._wall <= 0.0 or self._intervals < max(2 * self.stretch, 4):
            return self.ratio, self.stretch   # too short to hold its share of captures: go on
        own, wall = self._own, self._wall
        self._own = self._wall = 0.0
        self._intervals = 0
        ratio = own / max(wall - own, 1e-9)
        self.ratio = ratio if self._restart else self.ratio + self.smoothing * (ratio - self.ratio)
        self._restart = False
        if self.budget is not None and not may_adapt and not self._warned:
            self._warned = True
            log.warning("repwatch: overhead_budget is not adapted under torch.distributed with "
                        "global reduction (ranks publish together); the ratio is still measured")
        if self.budget is not None and may_adapt:
            k = self.stretch
            if self.ratio > self.budget:
                k = min(2 * k, self.max_stretch)
            elif self.ratio < self.budget / 4:
                k = max(k // 2, 1)
            if k != self.stretch:
                self.stretch = k
                self._restart = True     # the old ratio says little about the new cadence
        return self.ratio, self.stretch
