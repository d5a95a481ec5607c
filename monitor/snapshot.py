"""What a publish produces: plain floats, labels, step and time. Reading it needs no torch."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Alert:
    """A firing alert for one stream of one run."""

    name: str
    stream: str
    severity: str
    value: float
    signal: str
    summary: str
    description: str
    runbook_url: str
    run: str = ""
    since_step: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


@dataclass
class Snapshot:
    """The result of one publish.

    ``streams`` maps stream → signal → value (plain floats; NaN where a value is not defined,
    e.g. before the window holds two rows); ``counters`` holds per-stream monotonic counts
    (``samples``, ``nonfinite_values``); ``errors`` counts exceptions caught inside repwatch by
    component; ``spectra`` maps stream → eigenvalues of the window's second moment ``S/n``.
    """

    run: str
    step: int
    time: float
    streams: dict[str, dict[str, float]] = field(default_factory=dict)
    counters: dict[str, dict[str, float]] = field(default_factory=dict)
    spectra: dict[str, list[float]] = field(default_factory=dict)
    alerts: list[Alert] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    publish_duration_seconds: float = 0.0

    def get(self, name: str, stream: str | None = None) -> float:
        """Value of signal ``name`` for ``stream`` (optional when exactly one stream has it)."""
        if stream is not None:
            if stream not in self.streams:
                raise KeyError(f"no stream {stream!r} in this snapshot; streams: {sorted(self.streams)}")
            values = {**self.streams[stream], **self.counters.get(stream, {})}
            if name not in values:
                raise KeyError(f"no signal {name!r} for stream {stream!r}; signals: {sorted(values)}")
            return values[name]
        having = [s for s, v in self.streams.items() if name in v or name in self.counters.get(s, {})]
        if len(having) == 1:
            return self.get(name, having[0])
        if not having:
            raise KeyError(f"no signal {name!r} in this snapshot")
        raise KeyError(f"signal {name!r} exists for several streams {sorted(having)}: pass stream=")

    @property
    def stream_names(self) -> list[str]:
        """Names of the streams in this snapshot, sorted."""
        return sorted(self.streams)

    def to_dict(self, spectra: bool = False) -> dict[str, Any]:
        """JSON-ready dict (NaN becomes None); spectra only when asked (they can be long)."""

        def clean(v: float) -> float | None:
            return None if isinstance(v, float) and not math.isfinite(v) else v

        out: dict[str, Any] = {
            "run": self.run, "step": self.step, "time": self.time,
            "streams": {s: {k: clean(v) for k, v in vals.items()} for s, vals in self.streams.items()},
            "counters": self.counters,
            "alerts": [a.to_dict() for a in self.alerts],
            "errors": self.errors,
            "publish_duration_seconds": self.publish_duration_seconds,
        }
        if spectra:
            out["spectra"] = self.spectra
        return out
