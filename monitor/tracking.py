"""Run-level memory of published values: peaks, lows and early baselines (torch-free; the
in-process engine, the sidecar backends and the detection benchmark's replay share it through
:meth:`RunTracker.derive`)."""

from __future__ import annotations

import math
from typing import Any


BASELINE_SIGNALS: dict[str, str] = {"embedding_variance": "embedding_variance_ratio",
                                    "effective_rank": "effective_rank_baseline_ratio"}
"""Signals whose first full-window value is kept as the run's baseline (no warm-up), and the
name of their ratio to it."""


class RunTracker:
    """Peak effective rank and the lowest dormant fractions seen in a run after a warm-up, and
    each stream's early baseline (its first full window, before any warm-up)."""

    def __init__(self, window: int, warmup: int = 0) -> None:
        self.window = window
        self.warmup = warmup
        self.peaks: dict[str, float] = {}
        self.lows: dict[str, float] = {}
        self.baselines: dict[str, float] = {}

    def derive(self, streams: dict[str, dict[str, float]],
               layers: dict[str, dict[str, float]] | None, step: int | None) -> None:
        """Add every run-relative signal to one publish's values, in place: peaks and early
        baselines of streams, peaks and rises of activation layers."""
        for name, values in streams.items():
            self.track_peak(name, values, step)
            self.track_baseline(name, values)
        for name, values in (layers or {}).items():
            self.track_peak("layer:" + name, values, step)
            self.track_baseline("layer:" + name, values)
            self.track_rise("layer:" + name, values, step)

    def _full(self, values: dict[str, float]) -> bool:
        """The window holds ≥ min(window, 2d) rows: spectral values are settled enough."""
        n = values.get("window_samples", 0.0)
        d = values.get("embedding_dim", values.get("activation_units", 1.0))
        return n >= min(self.window, 2 * d)

    def track_baseline(self, name: str, values: dict[str, float]) -> None:
        """``embedding_variance_ratio`` and ``effective_rank_baseline_ratio`` (for the signals
        ``values`` has): the value over the first full-window value of ``name`` (no warm-up: a
        collapse in the first steps is measured against where the run started). A baseline of
        0 or NaN is not kept."""
        full = self._full(values)
        for signal, derived in BASELINE_SIGNALS.items():
            if signal not in values:
                continue
            value = values[signal]
            slot = f"{name}|{signal}"
            if slot not in self.baselines and full and math.isfinite(value) and value > 0:
                self.baselines[slot] = value
            base = self.baselines.get(slot, math.nan)
            values[derived] = value / base if base > 0 else math.nan

    def _warm(self, step: int | None) -> bool:
        return step is None or step >= self.warmup

    def track_peak(self, name: str, values: dict[str, float], step: int | None) -> None:
        """Peak effective rank once the window holds ≥ min(window, 2d) rows (docs/metrics.md §1) and
        training is past the warm-up (a random init's rank is not a peak to keep); adds
        ``effective_rank_peak`` and ``effective_rank_peak_ratio`` to ``values``."""
        rank = values.get("effective_rank", math.nan)
        if self._warm(step) and math.isfinite(rank) and self._full(values):
            self.peaks[name] = max(self.peaks.get(name, rank), rank)
        peak = self.peaks.get(name, math.nan)
        values["effective_rank_peak"] = peak
        values["effective_rank_peak_ratio"] = rank / peak if peak > 0 else math.nan

    def track_rise(self, name: str, values: dict[str, float], step: int | None) -> None:
        """``dormant_units_ratio_rise{tau}``: the dormant fraction minus its lowest value in
        this run after the warm-up ("high and rising", Sokar et al. 2023 Fig. 1)."""
        for key in [k for k in values if k.startswith("dormant_units_ratio{")]:
            value = values[key]
            slot = f"{name}|{key}"
            if self._warm(step) and math.isfinite(value):
                self.lows[slot] = min(self.lows.get(slot, value), value)
            low = self.lows.get(slot, math.nan)
            values[key.replace("dormant_units_ratio{", "dormant_units_ratio_rise{")] = value - low

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state."""
        return {"peaks": dict(self.peaks), "lows": dict(self.lows),
                "baselines": dict(self.baselines)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.peaks = {str(k): float(v) for k, v in state.get("peaks", {}).items()}
        self.lows = {str(k): float(v) for k, v in state.get("lows", {}).items()}
        self.baselines = {str(k): float(v) for k, v in state.get("baselines", {}).items()}
