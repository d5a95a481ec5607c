"""What one benchmark run leaves behind, and the replay of alert rules over it (no torch).

A :class:`Trace` holds every value repwatch published for a run (streams and activation layers,
per publish), the run's ground truth (probe accuracy over steps, the paper's label) and what
happened to it. :func:`replay` feeds the published values through the same
:class:`monitor.engine.run.RunPublisher` (run-relative signals, alerts) as a live monitor,
so a rule set can be judged on recorded trainings without training again.
"""

from __future__ import annotations

import gzip
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from monitor.alerts import DEFAULT_RULES, AlertRule
from monitor.engine.run import RunPublisher
from monitor.engine.tracking import RunTracker
from monitor.errors import ErrorLog
from monitor.snapshot import Readings, Snapshot

Label = Literal["healthy", "complete", "dimensional", "plasticity", "noisy"]
"""What the paper says a setting does: healthy; complete collapse (one vector or a point);
dimensional collapse; loss of plasticity; (Q-Score) label noise that should raise low-quality
samples."""


@dataclass
class Trace:
    """One run: its setting, seed, label, ground truth over steps, and every publish."""

    benchmark: str                     # "ssl", "plasticity" or "qscore"
    setting: str
    seed: int
    label: Label
    paper: str                         # where the label comes from
    window: int
    peak_warmup: int
    steps: int
    publishes: list[dict[str, Any]] = field(default_factory=list)
    """``{"step": s, "stream": {name: {signal: v}}, "layer": {name: {signal: v}}, "alerts":
    ["Name|key", ...]}``: what each publish held, and the alerts the live monitor had firing."""
    truth: list[dict[str, float]] = field(default_factory=list)
    """Ground truth over steps, e.g. ``{"step": s, "linear_probe": a, "knn": b}``."""
    outcome: dict[str, Any] = field(default_factory=dict)
    """What the training did (independent of repwatch): final probe, drop step, notes."""
    wall_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """JSON-ready (NaN → None)."""
        return _clean(asdict(self))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Trace:
        """Inverse of :meth:`to_json` (None → NaN in published values)."""
        data = dict(data)
        data["publishes"] = [
            {"step": p["step"], "alerts": list(p.get("alerts", [])), **{scope: {k: {s: (math.nan if v is None else float(v))
                                               for s, v in vals.items()}
                                           for k, vals in p.get(scope, {}).items()}
                                   for scope in ("stream", "layer")}}
            for p in data.get("publishes", [])]
        return cls(**data)

    def record(self, snap: Snapshot | None) -> None:
        """Keep one publish of the live monitor (``mon.step()``'s Snapshot; None: no publish)."""
        if snap is not None:
            self.publishes.append({"step": snap.step, "stream": snap.streams,
                                   "layer": snap.layers,
                                   "alerts": sorted(f"{a.name}|{a.stream}" for a in snap.alerts)})

    @property
    def key(self) -> str:
        """``setting/seed``."""
        return f"{self.setting}/{self.seed}"


def _clean(x: Any) -> Any:
    if isinstance(x, float):
        return None if not math.isfinite(x) else x
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def save_traces(traces: Iterable[Trace], path: Path) -> None:
    """Write traces as gzipped JSON lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for t in traces:
            fh.write(json.dumps(t.to_json()) + "\n")


def load_traces(path: Path) -> list[Trace]:
    """Read :func:`save_traces`' file."""
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [Trace.from_json(json.loads(line)) for line in fh if line.strip()]


@dataclass(frozen=True)
class Event:
    """An alert that fired during a replay: on which key, at which step (first fire)."""

    name: str
    severity: str
    scope: str
    key: str
    step: int
    signal: str
    value: float


def replay(trace: Trace, rules: Sequence[AlertRule] = DEFAULT_RULES,
           firing: list[list[str]] | None = None) -> list[Event]:
    """Every alert firing (first fire per rule and key, in order) when ``rules`` read the
    trace's publishes through a fresh :class:`RunTracker` — what a live monitor with these rules
    would have raised. ``firing``, when given, receives each publish's firing alerts as sorted
    ``"Name|key"`` (the form the traces record from the live monitor)."""
    publisher = RunPublisher(trace.setting, rules, RunTracker(trace.window, trace.peak_warmup),
                             ErrorLog(strict=True))
    events: list[Event] = []
    seen: set[tuple[str, str]] = set()
    for pub in trace.publishes:
        readings = Readings(streams={k: dict(v) for k, v in pub.get("stream", {}).items()},
                            layers={k: dict(v) for k, v in pub.get("layer", {}).items()})
        snap, fired, _ = publisher.publish(readings, pub["step"], time.perf_counter())
        if firing is not None:
            firing.append(sorted(f"{a.name}|{a.stream}" for a in snap.alerts))
        for a in fired:
            if (a.name, a.stream) not in seen:
                seen.add((a.name, a.stream))
                events.append(Event(a.name, a.severity, a.scope, a.stream, pub["step"],
                                    a.signal, a.value))
    return events


def derived_series(trace: Trace, scope: str, key: str) -> list[dict[str, float]]:
    """The trace's values of one stream/layer per publish, with the tracker's derived
    signals filled in as a live monitor would publish them (for plots)."""
    tracker = RunTracker(trace.window, trace.peak_warmup)
    out = []
    for pub in trace.publishes:
        streams = {k: dict(v) for k, v in pub.get("stream", {}).items()}
        layers = {k: dict(v) for k, v in pub.get("layer", {}).items()}
        tracker.derive(streams, layers, pub["step"])
        values = (streams if scope == "stream" else layers).get(key)
        if values is not None:
            out.append({"step": float(pub["step"]), **values})
    return out
