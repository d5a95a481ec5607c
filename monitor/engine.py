"""Engine: per-stream scorer groups, updated on the device, computed at publish with one sync."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from monitor.errors import ErrorLog
from monitor.scorers import CollapseScorer, SpectrumScorer, WindowMoments


class Stream:
    """One stream of rows: the shared window state and the scorers that read it."""

    def __init__(self, name: str, dim: int, window: int, device: torch.device,
                 spectrum: dict[str, Any] | None = None) -> None:
        self.name = name
        self.dim = dim
        self.moments = WindowMoments(dim, window, device)
        self.scorers: list[SpectrumScorer | CollapseScorer] = [
            SpectrumScorer(**(spectrum or {})), CollapseScorer()]
        self.enabled = True

    @property
    def device(self) -> torch.device:
        return self.moments.device

    def update(self, rows: Tensor) -> None:
        """Accumulate a ``(b, d)`` batch (device work only)."""
        self.moments.update(rows)

    def compute(self) -> dict[str, Tensor]:
        """Every scorer's signals as device tensors, plus the stream's counters."""
        out: dict[str, Tensor] = {}
        for scorer in self.scorers:
            out.update(scorer.compute(self.moments))
        out["samples"] = self.moments.seen
        out["nonfinite_values"] = self.moments.nonfinite
        return out


COUNTER_SIGNALS: tuple[str, ...] = ("samples", "nonfinite_values")


@dataclass
class EngineResult:
    """Host values of one compute: stream → signal → float, counters, spectra."""

    streams: dict[str, dict[str, float]] = field(default_factory=dict)
    counters: dict[str, dict[str, float]] = field(default_factory=dict)
    spectra: dict[str, list[float]] = field(default_factory=dict)


class Engine:
    """Owns the streams; creates one lazily on its first batch (d from that batch)."""

    def __init__(self, window: int, errors: ErrorLog, spectrum: dict[str, Any] | None = None,
                 spectrum_points: int = 1024, peak_warmup: int = 0) -> None:
        self.window = window
        self.peak_warmup = peak_warmup
        self.errors = errors
        self.spectrum_kwargs = spectrum or {}
        self.spectrum_points = spectrum_points
        self.streams: dict[str, Stream] = {}
        self.peaks: dict[str, float] = {}

    def update(self, name: str, rows: Tensor) -> None:
        """Feed rows ``(b, d)`` to stream ``name``; a new stream takes d and device from them."""
        stream = self.streams.get(name)
        if stream is None:
            stream = Stream(name, rows.shape[1], self.window, rows.device, self.spectrum_kwargs)
            self.streams[name] = stream
        if not stream.enabled:
            return
        if rows.shape[1] != stream.dim:
            raise ValueError(f"stream {name!r} has dimension {stream.dim}; got rows of "
                             f"dimension {rows.shape[1]} (use another stream name for another layer)")
        stream.update(rows)

    def compute(self, step: int | None = None) -> EngineResult:
        """Compute every stream; one device→host transfer per device (the publish sync)."""
        per_device: dict[torch.device, list[tuple[str, dict[str, Tensor]]]] = {}
        for name, stream in self.streams.items():
            if not stream.enabled:
                continue
            try:
                per_device.setdefault(stream.device, []).append((name, stream.compute()))
            except Exception as exc:
                self.errors.record("scorer", exc, key=f"scorer[{name}]")
                stream.enabled = False
        result = EngineResult()
        for device, outputs in per_device.items():
            flat: list[Tensor] = []
            layout: list[tuple[str, str, int]] = []
            for name, out in outputs:
                for key, value in out.items():
                    if key == "spectrum":
                        value = value[: self.spectrum_points]
                    v = value.reshape(-1).to(torch.float64)
                    flat.append(v)
                    layout.append((name, key, v.numel()))
            host = torch.cat(flat).cpu().tolist()  # sync: the one host transfer of a publish
            i = 0
            for name, key, size in layout:
                chunk = host[i:i + size]
                i += size
                if key == "spectrum":
                    result.spectra[name] = chunk
                elif key in COUNTER_SIGNALS:
                    result.counters.setdefault(name, {})[key] = chunk[0]
                else:
                    result.streams.setdefault(name, {})[key] = chunk[0]
        for name, values in result.streams.items():
            self._track_peak(name, values, step)
        return result

    def _track_peak(self, name: str, values: dict[str, float], step: int | None) -> None:
        """Peak effective rank once the window holds ≥ min(window, 2d) rows (METRICS.md §1) and
        training is past ``peak_warmup`` steps (the random-init rank is not a peak to keep)."""
        rank = values.get("effective_rank", math.nan)
        n = values.get("window_samples", 0.0)
        d = values.get("embedding_dim", 1.0)
        warm = step is None or step >= self.peak_warmup
        if warm and math.isfinite(rank) and n >= min(self.window, 2 * d):
            self.peaks[name] = max(self.peaks.get(name, rank), rank)
        peak = self.peaks.get(name, math.nan)
        values["effective_rank_peak"] = peak
        values["effective_rank_peak_ratio"] = rank / peak if peak > 0 else math.nan

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state of every stream."""
        return {"window": self.window, "peaks": dict(self.peaks),
                "streams": {name: {"dim": s.dim, "enabled": s.enabled,
                                   "moments": s.moments.state_dict(),
                                   "device": str(s.device)}
                            for name, s in self.streams.items()}}

    def load_state_dict(self, state: dict[str, Any],
                        device_map: Callable[[str], torch.device] | None = None) -> None:
        """Restore streams saved by :meth:`state_dict` (same window size)."""
        if int(state["window"]) != self.window:
            raise ValueError(f"checkpoint window is {state['window']} rows, this monitor's is {self.window}")
        self.streams.clear()
        self.peaks = {str(k): float(v) for k, v in state.get("peaks", {}).items()}
        for name, st in state["streams"].items():
            device = device_map(st["device"]) if device_map else torch.device(st["device"])
            stream = Stream(name, int(st["dim"]), self.window, device, self.spectrum_kwargs)
            stream.moments.load_state_dict(st["moments"])
            stream.enabled = bool(st["enabled"])
            self.streams[name] = stream
