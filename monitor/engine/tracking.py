"""Run-level memory of published values: peaks, lows and early baselines (torch-free; the
in-process engine, the sidecar backends and the detection benchmark's replay share it through
:meth:`RunTracker.derive`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from monitor.snapshot import SignalKey


BASELINE_SIGNALS: dict[str, str] = {"embedding_variance": "embedding_variance_ratio",
                                    "effective_rank": "effective_rank_baseline_ratio"}
"""Signals whose first full-window value is kept as the run's baseline (no warm-up), and the
name of their ratio to it."""


Owner = tuple[str, str]
"""What a tracked value belongs to: ``("stream", name)`` or ``("layer", name)``."""


class RunTracker:
    """Peak effective rank and the lowest dormant fractions seen in a run after a warm-up, and
    each stream's early baseline (its first full window, before any warm-up)."""

    def __init__(self, window: int, warmup: int = 0) -> None:
        self.window = window
        self.warmup = warmup
        self.peaks: dict[Owner, float] = {}
        self.lows: dict[tuple[Owner, str], float] = {}
        self.baselines: dict[tuple[Owner, str], float] = {}

    def derive(self, streams: dict[str, dict[str, float]],
               layers: dict[str, dict[str, float]] | None, step: int | None) -> None:
        """Add every run-relative signal to one publish's values, in place: peaks and early
        baselines of streams, peaks and rises of activation layers."""
        for name, values in streams.items():
            self.track_peak(("stream", name), values, step)
            self.track_baseline(("stream", name), values)
        for name, values in (layers or {}).items():
            self.track_peak(("layer", name), values, step)
            self.track_baseline(("layer", name), values)
            self.track_rise(("layer", name), values, step)

    def _full(self, values: dict[str, float]) -> bool:
        """The window holds ≥ min(window, 2d) rows: spectral values are settled enough."""
        n = values.get("window_samples", 0.0)
        d = values.get("embedding_dim", values.get("activation_units", 1.0))
        return n >= min(self.window, 2 * d)

    def track_baseline(self, owner: Owner, values: dict[str, float]) -> None:
        """``embedding_variance_ratio`` and ``effective_rank_baseline_ratio`` (for the signals
        ``values`` has): the value over the first full-window value of ``owner`` (no warm-up: a
        collapse in the first steps is measured against where the run started). A baseline of
        0 or NaN is not kept."""
        full = self._full(values)
        for signal, derived in BASELINE_SIGNALS.items():
            if signal not in values:
                continue
            value = values[signal]
            slot = (owner, signal)
            if slot not in self.baselines and full and math.isfinite(value) and value > 0:
                self.baselines[slot] = value
            base = self.baselines.get(slot, math.nan)
            values[derived] = value / base if base > 0 else math.nan

    def _warm(self, step: int | None) -> bool:
        return step is None or step >= self.warmup

    def track_peak(self, owner: Owner, values: dict[str, float], step: int | None) -> None:
        """Peak effective rank once the window holds ≥ min(window, 2d) rows (docs/metrics.md §1) and
        training is past the warm-up (a random init's rank is not a peak to keep); adds
        ``effective_rank_peak`` and ``effective_rank_peak_ratio`` to ``values``."""
        rank = values.get("effective_rank", math.nan)
        if self._warm(step) and math.isfinite(rank) and self._full(values):
            self.peaks[owner] = max(self.peaks.get(owner, rank), rank)
        peak = self.peaks.get(owner, math.nan)
        values["effective_rank_peak"] = peak
        values["effective_rank_peak_ratio"] = rank / peak if peak > 0 else math.nan

    def track_rise(self, owner: Owner, values: dict[str, float], step: int | None) -> None:
        """``dormant_units_ratio_rise{tau}``: the dormant fraction minus its lowest value in
        this run after the warm-up ("high and rising", Sokar et al. 2023 Fig. 1)."""
        keys = [SignalKey.parse(k) for k in values]
        for key in [k for k in keys if k.signal == "dormant_units_ratio" and k.labels]:
            value = values[key]
            slot = (owner, str(key))
            if self._warm(step) and math.isfinite(value):
                self.lows[slot] = min(self.lows.get(slot, value), value)
            low = self.lows.get(slot, math.nan)
            values[key.renamed("dormant_units_ratio_rise")] = value - low

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state: ``{"peaks": {kind: {name: v}}, "lows"/"baselines": {kind: {name:
        {signal: v}}}}`` with kind ``stream`` or ``layer``."""
        out: dict[str, Any] = {"peaks": {}, "lows": {}, "baselines": {}}
        for (kind, name), v in self.peaks.items():
            out["peaks"].setdefault(kind, {})[name] = v
        for field, slots in (("lows", self.lows), ("baselines", self.baselines)):
            for ((kind, name), signal), v in slots.items():
                out[field].setdefault(kind, {}).setdefault(name, {})[signal] = v
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; also reads the older flat form (keys ``name`` or
        ``layer:name``, and ``…|signal`` for lows and baselines)."""
        self.peaks = {}
        for key, v in state.get("peaks", {}).items():
            if isinstance(v, Mapping):
                self.peaks.update({(str(key), str(n)): float(x) for n, x in v.items()})
            else:
                self.peaks[_old_owner(str(key))] = float(v)
        self.lows = _load_slots(state.get("lows", {}))
        self.baselines = _load_slots(state.get("baselines", {}))


def _old_owner(key: str) -> Owner:
    """The owner of a flat (old) state key: ``layer:name`` is a layer, anything else a stream."""
    return ("layer", key.removeprefix("layer:")) if key.startswith("layer:") else ("stream", key)


def _load_slots(data: Mapping[str, Any]) -> dict[tuple[Owner, str], float]:
    out: dict[tuple[Owner, str], float] = {}
    for key, v in data.items():
        if isinstance(v, Mapping):
            for name, signals in v.items():
                for signal, x in signals.items():
                    out[((str(key), str(name)), str(signal))] = float(x)
        else:
            owner, _, signal = str(key).partition("|")
            out[(_old_owner(owner), signal)] = float(v)
    return out
