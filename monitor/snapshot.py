"""What a publish produces: plain floats, labels, step and time. Reading it needs no torch.

:meth:`Snapshot.to_dict` is the JSON form (the API's, and one line per publish of
``Monitor(log_path=...)``); :meth:`Snapshot.from_dict` reads it back (:mod:`monitor.history`
reads a whole log).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

SCOPES: tuple[str, ...] = ("stream", "layer", "param", "run")
"""What a keyed signal belongs to: a stream of rows, an activation layer, a parameter tensor,
or the whole model (``run``: one key, ``"model"``, holding ``run_signals``)."""


class SignalKey(str):
    """A signal's key in a snapshot: its name plus optional labels, e.g.
    ``SignalKey.of("dormant_units_ratio", tau=0.1)``, whose string form (what JSON, dict lookups
    and equality see) is ``dormant_units_ratio{tau=0.1}``.

    ``signal`` is the name, ``labels`` the ``(name, value)`` pairs sorted by name; label values
    are strings (floats in their shortest form: ``0``, ``0.025``, ``0.1``).
    """

    signal: str
    labels: tuple[tuple[str, str], ...]

    def __new__(cls, signal: str, labels: Iterable[tuple[str, str]] = ()) -> SignalKey:
        items = tuple(sorted((str(k), str(v)) for k, v in labels))
        if len({k for k, _ in items}) != len(items):
            raise ValueError(f"{signal}: a label appears twice in {items}")
        text = f"{signal}{{{','.join(f'{k}={v}' for k, v in items)}}}" if items else signal
        self = super().__new__(cls, text)
        self.signal = str(signal)
        self.labels = items
        return self

    @classmethod
    def of(cls, signal: str, **labels: object) -> SignalKey:
        """The key of ``signal`` with ``labels`` (values formatted by :func:`_label_value`)."""
        return cls(signal, ((k, _label_value(v)) for k, v in labels.items()))

    @staticmethod
    def parse(text: str) -> SignalKey:
        """The key written as ``text`` (``name`` or ``name{k=v,...}``); a SignalKey is returned
        as is. Keys that arrive as plain strings (JSON, rule specs) come through here."""
        return text if isinstance(text, SignalKey) else _parse(text)

    def with_labels(self, **labels: object) -> SignalKey:
        """This key with ``labels`` added (values formatted as by :meth:`of`)."""
        if not labels:
            return self
        return SignalKey(self.signal, (*self.labels, *SignalKey.of(self.signal, **labels).labels))

    @property
    def label_dict(self) -> dict[str, str]:
        """``labels`` as a dict."""
        return dict(self.labels)

    def renamed(self, signal: str) -> SignalKey:
        """The key of ``signal`` with the same labels."""
        return SignalKey(signal, self.labels)

    def __reduce__(self) -> tuple[Any, ...]:
        return (SignalKey, (self.signal, self.labels))


@functools.lru_cache(maxsize=4096)
def _parse(text: str) -> SignalKey:
    """:meth:`SignalKey.parse` of a plain string (cached: exporters parse every key per scrape)."""
    if not text.endswith("}") or "{" not in text:
        return SignalKey(text)
    signal, _, rest = text.partition("{")
    items = [item.split("=", 1) for item in rest[:-1].split(",") if item]
    if any(len(item) != 2 for item in items):
        raise ValueError(f"not a signal key: {text!r}; write it like name{{label=value,...}}")
    return SignalKey(signal, ((k, v) for k, v in items))


def _label_value(v: object) -> str:
    if isinstance(v, float):
        return format(v, "g")
    return str(v)


@dataclass(frozen=True)
class Histogram:
    """A cumulative histogram since start: upper bounds, cumulative counts (last is +Inf)."""

    bounds: list[float]
    cumulative: list[float]
    sum: float
    count: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Histogram:
        """The histogram of :meth:`to_dict`'s output (null read as NaN)."""
        _require(d, ("bounds", "cumulative", "sum", "count"), "histogram")
        return cls(bounds=[_num(v) for v in d["bounds"]],
                   cumulative=[_num(v) for v in d["cumulative"]],
                   sum=_num(d["sum"]), count=_num(d["count"]))


@dataclass(frozen=True)
class Alert:
    """A firing alert for one stream (or layer, or parameter; see ``scope``) of one run."""

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
    scope: str = "stream"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Alert:
        """The alert of :meth:`to_dict`'s output (a null ``value`` read as NaN; keys this
        version does not know are ignored, missing optional ones take their defaults)."""
        _require(d, _ALERT_REQUIRED, "alert")
        known = {k: d[k] for k in _ALERT_FIELDS if k in d}
        known["value"] = _num(known["value"])
        return cls(**known)


@dataclass
class Readings:
    """Host values of one compute: stream → signal → float, counters, spectra, histograms
    (what a publish turns into a :class:`Snapshot`)."""

    streams: dict[str, dict[str, float]] = field(default_factory=dict)
    counters: dict[str, dict[str, float]] = field(default_factory=dict)
    spectra: dict[str, list[float]] = field(default_factory=dict)
    layers: dict[str, dict[str, float]] = field(default_factory=dict)
    params: dict[str, dict[str, float]] = field(default_factory=dict)
    run_signals: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, dict[str, Histogram]] = field(default_factory=dict)


@dataclass(kw_only=True)
class Snapshot(Readings):
    """The result of one publish: its :class:`Readings` and what the publish adds.

    ``streams`` maps stream → signal → value (plain floats; NaN where a value is not defined,
    e.g. before the window holds two rows); ``layers`` does the same for watched activation
    layers (plasticity) and ``params`` for parameter tensors (weights, gradients); signals with
    extra labels are keyed by :class:`SignalKey` (``dormant_units_ratio{tau=0.1}``).
    ``run_signals`` holds model-level values (early-bird distance, curvature). ``counters``
    holds per-stream monotonic counts (``samples``, ``nonfinite_values``); ``histograms`` maps
    signal → stream → :class:`Histogram`; ``errors`` counts exceptions caught inside repwatch by
    component; ``spectra`` maps stream → eigenvalues of the window's second moment ``S/n``;
    ``dropped`` (sidecar mode) counts rows the sink could not deliver, by reason.
    """

    run: str
    step: int
    time: float
    dropped: dict[str, float] = field(default_factory=dict)
    alerts: list[Alert] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    publish_duration_seconds: float = 0.0
    overhead_ratio: float = math.nan
    """repwatch's host time per second of training time (EMA; NaN: not measured)."""
    effective_cadence_steps: float = math.nan
    """Steps per captured step under the overhead budget (1: every step; NaN: not a Monitor)."""
    rank: int | None = None
    """The global rank of a per-rank publish (``Monitor(per_rank=True)``); None otherwise."""
    resumed_from: int | None = None
    """On the first publish after the run's step went back (a resume from an earlier
    checkpoint): the step the run was at before; None otherwise."""

    def get(self, name: str, stream: str | None = None, *, layer: str | None = None,
            param: str | None = None, **labels: object) -> float:
        """Value of signal ``name``.

        Pass ``stream=`` (optional when exactly one stream has the signal), or ``layer=`` for
        activation-layer signals, or ``param=`` for parameter signals; extra labels select a
        variant, e.g. ``snap.get("dormant_units_ratio", layer="fc1", tau=0.1)``. Model-level
        signals (``run_signals``) need none of them.
        """
        key = SignalKey.parse(name).with_labels(**labels)
        if layer is not None or param is not None:
            scope, group, which = (("layer", self.layers, layer) if layer is not None
                                   else ("param", self.params, param))
            if which not in group:
                raise KeyError(f"no {scope} {which!r} in this snapshot; {scope}s: {sorted(group)}")
            if key not in group[which]:
                raise KeyError(f"no signal {key!r} for {scope} {which!r}; signals: {sorted(group[which])}")
            return group[which][key]
        if stream is None and key in self.run_signals:
            return self.run_signals[key]
        if stream is not None:
            if stream not in self.streams:
                raise KeyError(f"no stream {stream!r} in this snapshot; streams: {sorted(self.streams)}")
            values = {**self.streams[stream], **self.counters.get(stream, {})}
            if key not in values:
                raise KeyError(f"no signal {key!r} for stream {stream!r}; signals: {sorted(values)}")
            return values[key]
        having = [s for s, v in self.streams.items() if key in v or key in self.counters.get(s, {})]
        if len(having) == 1:
            return self.get(name, having[0], **labels)
        if not having:
            raise KeyError(f"no signal {key!r} in this snapshot")
        raise KeyError(f"signal {key!r} exists for several streams {sorted(having)}: pass stream=")

    def group(self, scope: str) -> dict[str, dict[str, float]]:
        """The keyed values of ``scope`` (``"stream"``, ``"layer"``, ``"param"``, ``"run"``)."""
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        if scope == "run":
            return {"model": self.run_signals} if self.run_signals else {}
        return {"stream": self.streams, "layer": self.layers, "param": self.params}[scope]

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
            "layers": {s: {k: clean(v) for k, v in vals.items()} for s, vals in self.layers.items()},
            "params": {s: {k: clean(v) for k, v in vals.items()} for s, vals in self.params.items()},
            "run_signals": {k: clean(v) for k, v in self.run_signals.items()},
            "histograms": {sig: {s: h.to_dict() for s, h in per.items()}
                           for sig, per in self.histograms.items()},
            "counters": self.counters,
            "dropped": self.dropped,
            "alerts": [a.to_dict() for a in self.alerts],
            "errors": self.errors,
            "publish_duration_seconds": self.publish_duration_seconds,
            "overhead_ratio": clean(self.overhead_ratio),
            "effective_cadence_steps": clean(self.effective_cadence_steps),
        }
        if spectra:
            out["spectra"] = self.spectra
        if self.rank is not None:
            out["rank"] = self.rank
        if self.resumed_from is not None:
            out["resumed_from"] = self.resumed_from
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Snapshot:
        """The snapshot whose :meth:`to_dict` is ``d`` (e.g. one line of a ``log_path`` log,
        parsed with :func:`json.loads`); ``from_dict(d).to_dict()`` gives ``d`` back, JSON for
        JSON, every field included (spectra when ``d`` has them: ``to_dict(spectra=True)``).

        * Signal keys come back typed: every key of ``streams``, ``layers``, ``params``,
          ``run_signals``, ``counters`` and ``histograms`` is a :class:`SignalKey`
          (``dormant_units_ratio{tau=0.1}`` has ``.signal`` and ``.labels``; it equals and
          hashes like the plain string, so lookups by string work as before).
          ``Alert.signal`` stays a plain string, as the alert engine makes it.
        * ``null`` values (how :meth:`to_dict` writes NaN and ±Inf) are read as NaN: an Inf
          comes back as NaN, which :meth:`to_dict` writes the same way.
        * ``run``, ``step`` and ``time`` are required; a missing optional field takes its
          default (logs of older versions), keys this version does not know are ignored.

        Raises ValueError (naming the field) when ``d`` is not such a dict.
        """
        if not isinstance(d, dict):
            raise ValueError(f"a snapshot is a JSON object, got {type(d).__name__}")
        _require(d, ("run", "step", "time"), "snapshot")
        try:
            step = d["step"]
            if isinstance(step, bool) or not isinstance(step, int):
                raise ValueError(f"step must be an integer, got {step!r}")
            spectra = d.get("spectra")
            return cls(
                run=str(d["run"]), step=step, time=_num(d["time"]),
                streams=_keyed_groups(d.get("streams"), "streams"),
                layers=_keyed_groups(d.get("layers"), "layers"),
                params=_keyed_groups(d.get("params"), "params"),
                run_signals=_keyed(d.get("run_signals"), "run_signals"),
                counters=_keyed_groups(d.get("counters"), "counters"),
                histograms={SignalKey.parse(sig): {
                    str(s): Histogram.from_dict(_obj(h, f"histograms.{sig}.{s}"))
                    for s, h in _obj(per, f"histograms.{sig}").items()}
                    for sig, per in _obj(d.get("histograms"), "histograms").items()},
                spectra=({str(s): [_num(v) for v in _list(vals, f"spectra.{s}")]
                          for s, vals in _obj(spectra, "spectra").items()}),
                dropped={str(k): _num(v) for k, v in _obj(d.get("dropped"), "dropped").items()},
                alerts=[Alert.from_dict(_obj(a, "alerts[]"))
                        for a in _list(d.get("alerts"), "alerts")],
                errors={str(k): v for k, v in _obj(d.get("errors"), "errors").items()},
                publish_duration_seconds=_num(d.get("publish_duration_seconds", 0.0)),
                overhead_ratio=_num(d.get("overhead_ratio")),
                effective_cadence_steps=_num(d.get("effective_cadence_steps")),
                rank=d.get("rank"),
                resumed_from=d.get("resumed_from"),
            )
        except (TypeError, AttributeError) as exc:
            raise ValueError(f"not a snapshot: {exc}") from exc


_ALERT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Alert))
_ALERT_REQUIRED: tuple[str, ...] = tuple(
    f.name for f in fields(Alert) if f.default is MISSING and f.default_factory is MISSING)


def _require(d: dict[str, Any], keys: Iterable[str], what: str) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise ValueError(f"{what} without {', '.join(repr(k) for k in missing)}: "
                         f"keys are {sorted(d)}")


def _num(v: Any) -> Any:
    """A JSON number as written by :meth:`Snapshot.to_dict` (null → NaN; ints stay ints)."""
    if v is None:
        return math.nan
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"expected a number or null, got {v!r}")
    return v


def _obj(v: Any, where: str) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ValueError(f"{where} must be an object, got {type(v).__name__}")
    return v


def _list(v: Any, where: str) -> list[Any]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise ValueError(f"{where} must be a list, got {type(v).__name__}")
    return v


def _keyed(values: Any, where: str) -> dict[str, float]:
    """``{key: number|null}`` with typed keys and NaN for null."""
    return {SignalKey.parse(k): _num(v) for k, v in _obj(values, where).items()}


def _keyed_groups(groups: Any, where: str) -> dict[str, dict[str, float]]:
    """``{name: {key: number|null}}`` with typed keys and NaN for null."""
    return {str(name): _keyed(vals, f"{where}.{name}")
            for name, vals in _obj(groups, where).items()}
