"""Run-level memory of published values: peaks and lows (torch-free; the in-process engine
and the sidecar backends share it)."""

from __future__ import annotations

import math
from typing import Any


class RunTracker:
    """Peak effective rank and the lowest dormant fractions seen in a run, after a warm-up."""

    def __init__(self, window: int, warmup: int = 0) -> None:
        self.window = window
        self.warmup = warmup
        self.peaks: dict[str, float] = {}
        self.lows: dict[str, float] = {}

    def _warm(self, step: int | None) -> bool:
        return step is None or step >= self.warmup

    def track_peak(self, name: str, values: dict[str, float], step: int | None) -> None:
        """Peak effective rank once the window holds ≥ min(window, 2d) rows (docs/metrics.md §1) and
        training is past the warm-up (a random init's rank is not a peak to keep); adds
        ``effective_rank_peak`` and ``effective_rank_peak_ratio`` to ``values``."""
        rank = values.get("effective_rank", math.nan)
        n = values.get("window_samples", 0.0)
        d = values.get("embedding_dim", values.get("activation_units", 1.0))
        if self._warm(step) and math.isfinite(rank) and n >= min(self.window, 2 * d):
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
        return {"peaks": dict(self.peaks), "lows": dict(self.lows)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.peaks = {str(k): float(v) for k, v in state.get("peaks", {}).items()}
        self.lows = {str(k): float(v) for k, v in state.get("lows", {}).items()}
