"""The one alert spec, and its in-process evaluation with hysteresis (no torch needed).

Rules are data: :data:`DEFAULT_RULES` is read by the in-process :class:`AlertEngine` after every
publish and (in the operations issue) rendered into Prometheus rules, so a threshold lives in
exactly one place. A rule fires for a stream when any of its conditions holds for ``hold``
consecutive publishes, and resolves only when every condition is past its ``clear`` level
(hysteresis) for ``hold`` consecutive publishes. Values that are NaN (not yet defined) and
windows holding fewer than ``min_window_samples`` rows leave the state unchanged.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from monitor.snapshot import Alert

log = logging.getLogger("repwatch.alerts")

RUNBOOK_BASE: str = os.environ.get("REPWATCH_RUNBOOK_BASE", "docs/runbooks.md")
"""Where runbook links point (a URL of the rendered docs in production; override by env)."""


@dataclass(frozen=True)
class Condition:
    """``signal op threshold`` fires; resolving needs the value past ``clear`` (hysteresis)."""

    signal: str
    op: Literal["<", ">"]
    threshold: float
    clear: float

    def __post_init__(self) -> None:
        if self.op not in ("<", ">"):
            raise ValueError(f"op must be '<' or '>', got {self.op!r}")
        if self.op == "<" and self.clear < self.threshold or self.op == ">" and self.clear > self.threshold:
            raise ValueError(f"{self.signal}: clear level {self.clear} must lie on the healthy "
                             f"side of threshold {self.threshold} for op {self.op!r}")

    def breached(self, value: float) -> bool:
        """True when ``value`` is on the alerting side of the threshold (NaN: False)."""
        if math.isnan(value):
            return False
        return value < self.threshold if self.op == "<" else value > self.threshold

    def cleared(self, value: float) -> bool:
        """True when ``value`` is past the clear level (NaN: False)."""
        if math.isnan(value):
            return False
        return value >= self.clear if self.op == "<" else value <= self.clear

    def expr(self) -> str:
        """The condition as text, e.g. ``embedding_std_ratio < 0.1``."""
        return f"{self.signal} {self.op} {self.threshold:g}"


@dataclass(frozen=True)
class AlertRule:
    """One alert: any-of ``conditions`` held for ``hold`` publishes (``prometheus_for`` in Prometheus)."""

    name: str
    severity: Literal["info", "warning", "critical"]
    summary: str
    description: str
    conditions: tuple[Condition, ...]
    hold: int = 2
    min_window_samples: int = 256
    prometheus_for: str = "2m"
    runbook: str = ""

    def __post_init__(self) -> None:
        if not self.name.startswith("Repwatch") or not self.name.isalnum():
            raise ValueError(f"alert names are 'Repwatch…' CamelCase, got {self.name!r}")
        if self.severity not in ("info", "warning", "critical"):
            raise ValueError(f"severity must be info, warning or critical, got {self.severity!r}")
        if not self.conditions:
            raise ValueError(f"{self.name}: needs at least one condition")
        if self.hold < 1:
            raise ValueError(f"{self.name}: hold must be >= 1 publish, got {self.hold}")

    @property
    def runbook_url(self) -> str:
        """Link to this alert's section of the runbooks."""
        return f"{RUNBOOK_BASE}#{self.runbook or self.name.lower()}"

    @property
    def signals(self) -> tuple[str, ...]:
        """Signals this rule reads."""
        return tuple(c.signal for c in self.conditions)


DEFAULT_RULES: tuple[AlertRule, ...] = (
    AlertRule(
        name="RepwatchRepresentationCollapse",
        severity="critical",
        summary="Embeddings collapsed to (nearly) one vector",
        description=("Stream {stream} of run {run}: {signal} = {value:.4g} ({expr}). Every input "
                     "maps to almost the same embedding (Chen & He 2021): the representation "
                     "carries no information. Check the stop-gradient / predictor, the loss and "
                     "the learning rate."),
        conditions=(
            Condition("embedding_std_ratio", "<", 0.1, clear=0.2),
            Condition("effective_rank_ratio", "<", 0.02, clear=0.04),
        ),
        hold=2,
        prometheus_for="2m",
    ),
    AlertRule(
        name="RepwatchDimensionalCollapse",
        severity="warning",
        summary="Embedding effective rank collapsed",
        description=("Stream {stream} of run {run}: {signal} = {value:.4g} ({expr}). The "
                     "embedding spans far fewer dimensions than it has (Jing et al. 2022; RankMe, "
                     "Garrido et al. 2023): either below the floor or less than half of this "
                     "run's peak effective rank. Check augmentations, projector, weight decay and "
                     "the learning rate."),
        conditions=(
            Condition("effective_rank_peak_ratio", "<", 0.5, clear=0.6),
            Condition("effective_rank_ratio", "<", 0.05, clear=0.07),
        ),
        hold=3,
        prometheus_for="5m",
    ),
)


def validate_rules(rules: Sequence[AlertRule], known_signals: set[str] | None = None) -> None:
    """Reject duplicate names and (when ``known_signals`` is given) unknown signals."""
    names = [r.name for r in rules]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate alert names: {dupes}")
    if known_signals is not None:
        for rule in rules:
            unknown = [s for s in rule.signals if s not in known_signals]
            if unknown:
                raise ValueError(f"{rule.name}: unknown signals {unknown}; known: {sorted(known_signals)}")


@dataclass
class _State:
    firing: bool = False
    breach_count: int = 0
    clear_count: int = 0
    since_step: int = 0
    alert: Alert | None = None


@dataclass
class AlertEngine:
    """Evaluates rules on each publish's values with hold times and hysteresis."""

    rules: Sequence[AlertRule] = DEFAULT_RULES
    run: str = ""
    _states: dict[tuple[str, str], _State] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_rules(self.rules)

    def evaluate(self, streams: Mapping[str, Mapping[str, float]], step: int
                 ) -> tuple[list[Alert], list[Alert], list[Alert]]:
        """Update states from ``streams`` (stream → signal → value).

        Returns ``(firing, newly_fired, resolved)``.
        """
        fired: list[Alert] = []
        resolved: list[Alert] = []
        for rule in self.rules:
            for stream, values in streams.items():
                if not any(s in values for s in rule.signals):
                    continue
                st = self._states.setdefault((rule.name, stream), _State())
                n = values.get("window_samples", math.inf)
                if not (n >= rule.min_window_samples):
                    continue
                vals = [(c, values.get(c.signal, math.nan)) for c in rule.conditions]
                if all(math.isnan(v) for _, v in vals):
                    continue
                breach = [(c, v) for c, v in vals if c.breached(v)]
                if not st.firing:
                    st.breach_count = st.breach_count + 1 if breach else 0
                    if st.breach_count >= rule.hold:
                        cond, value = breach[0]
                        st.firing, st.clear_count, st.since_step = True, 0, step
                        st.alert = self._make(rule, stream, cond, value, step)
                        fired.append(st.alert)
                else:
                    all_clear = all(c.cleared(v) for c, v in vals if not math.isnan(v))
                    st.clear_count = st.clear_count + 1 if all_clear else 0
                    if breach:
                        cond, value = breach[0]
                        st.alert = self._make(rule, stream, cond, value, st.since_step)
                    if st.clear_count >= rule.hold:
                        st.firing, st.breach_count = False, 0
                        if st.alert is not None:
                            resolved.append(st.alert)
                        st.alert = None
        return self.firing(), fired, resolved

    def firing(self) -> list[Alert]:
        """Alerts firing now."""
        return [st.alert for st in self._states.values() if st.firing and st.alert is not None]

    def _make(self, rule: AlertRule, stream: str, cond: Condition, value: float, step: int) -> Alert:
        desc = rule.description.format(stream=stream, run=self.run, signal=cond.signal,
                                       value=value, expr=cond.expr())
        return Alert(name=rule.name, stream=stream, severity=rule.severity, value=float(value),
                     signal=cond.signal, summary=rule.summary, description=desc,
                     runbook_url=rule.runbook_url, run=self.run, since_step=step)

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state (picklable, no torch)."""
        return {f"{r}\x1f{s}": {"firing": st.firing, "breach_count": st.breach_count,
                                "clear_count": st.clear_count, "since_step": st.since_step,
                                "alert": st.alert.to_dict() if st.alert else None}
                for (r, s), st in self._states.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict`."""
        self._states.clear()
        for key, v in state.items():
            rule, stream = key.split("\x1f", 1)
            self._states[(rule, stream)] = _State(
                firing=bool(v["firing"]), breach_count=int(v["breach_count"]),
                clear_count=int(v["clear_count"]), since_step=int(v["since_step"]),
                alert=Alert(**v["alert"]) if v.get("alert") else None)
