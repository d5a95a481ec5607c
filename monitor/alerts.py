"""The one alert spec, and its in-process evaluation with hysteresis (no torch needed).

Rules are data: :data:`DEFAULT_RULES` is read by the in-process :class:`AlertEngine` after every
publish and rendered into Prometheus rules (:mod:`exporters.rules`), so a threshold lives in
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

from monitor.snapshot import SCOPES, Alert, SignalKey

log = logging.getLogger("repwatch.alerts")

RUNBOOK_BASE: str = os.environ.get("REPWATCH_RUNBOOK_BASE", "docs/runbooks.md")
"""Where runbook links point (a URL of the rendered docs in production; override by env)."""


@dataclass(frozen=True)
class Condition:
    """``signal op threshold`` fires; resolving needs the value past ``clear`` (hysteresis).

    ``also`` adds conditions that must hold at the same time (all-of), e.g. "dormant fraction
    high *and* rising"; such a compound condition clears when any of its parts clears.
    ``signal`` may be given in its string form (``"dormant_units_ratio{tau=0.1}"``); it is kept
    as a :class:`~monitor.snapshot.SignalKey`.
    """

    signal: SignalKey
    op: Literal["<", ">"]
    threshold: float
    clear: float
    also: tuple[Condition, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "signal", SignalKey.parse(self.signal))
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
        own = f"{self.signal} {self.op} {self.threshold:g}"
        return " and ".join([own, *(c.expr() for c in self.also)])

    @property
    def signals(self) -> tuple[SignalKey, ...]:
        """This condition's signal and those of its ``also`` parts."""
        return (self.signal, *(s for c in self.also for s in c.signals))

    def breached_in(self, values: Mapping[str, float]) -> bool:
        """Whether this condition (and every ``also`` part) holds on ``values``."""
        return (self.breached(values.get(self.signal, math.nan))
                and all(c.breached_in(values) for c in self.also))

    def cleared_in(self, values: Mapping[str, float]) -> bool | None:
        """Whether it is past its clear level on ``values`` (None: nothing defined yet)."""
        parts = [self._own_cleared(values), *(c.cleared_in(values) for c in self.also)]
        known = [p for p in parts if p is not None]
        if not known:
            return None
        return any(known) if self.also else known[0]

    def _own_cleared(self, values: Mapping[str, float]) -> bool | None:
        v = values.get(self.signal, math.nan)
        return None if math.isnan(v) else self.cleared(v)


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
    scope: Literal["stream", "layer", "param", "run"] = "stream"

    def __post_init__(self) -> None:
        if not self.name.startswith("Repwatch") or not self.name.isalnum():
            raise ValueError(f"alert names are 'Repwatch…' CamelCase, got {self.name!r}")
        if self.severity not in ("info", "warning", "critical"):
            raise ValueError(f"severity must be info, warning or critical, got {self.severity!r}")
        if not self.conditions:
            raise ValueError(f"{self.name}: needs at least one condition")
        if self.hold < 1:
            raise ValueError(f"{self.name}: hold must be >= 1 publish, got {self.hold}")
        if self.scope not in SCOPES:
            raise ValueError(f"{self.name}: scope must be one of {SCOPES}, got {self.scope!r}")

    @property
    def runbook_url(self) -> str:
        """Link to this alert's section of the runbooks."""
        return f"{RUNBOOK_BASE}#{self.runbook or self.name.lower()}"

    @property
    def signals(self) -> tuple[SignalKey, ...]:
        """Signals this rule reads."""
        return tuple(s for c in self.conditions for s in c.signals)


DEFAULT_RULES: tuple[AlertRule, ...] = (
    AlertRule(
        name="RepwatchRepresentationCollapse",
        severity="critical",
        summary="Embeddings collapsed to one vector, one point or one direction",
        description=("Stream {stream} of run {run}: {signal} = {value:.4g} ({expr}). Every input "
                     "maps to almost the same embedding: one vector (std of the L2-normalised "
                     "rows near 0, Chen & He 2021), one point (variance 100x below the run's "
                     "first window, the scale VICReg's variance term guards, Bardes et al. "
                     "2022), or one line (fewer than 2 effective dimensions, RankMe). The "
                     "representation carries almost no information. Check the stop-gradient / "
                     "predictor / target network, the loss terms and the learning rate."),
        conditions=(
            Condition("embedding_std_ratio", "<", 0.1, clear=0.2),
            Condition("embedding_variance_ratio", "<", 0.01, clear=0.05),
            Condition("effective_rank", "<", 2.0, clear=2.5,
                      also=(Condition("embedding_dim", ">", 7.5, clear=7.5),)),
        ),
        hold=2,
        prometheus_for="2m",
    ),
    AlertRule(
        name="RepwatchDimensionalCollapse",
        severity="warning",
        summary="Embedding effective rank collapsed",
        description=("Stream {stream} of run {run}: {signal} = {value:.4g} ({expr}). The "
                     "embedding spans far fewer dimensions than it did (Jing et al. 2022; RankMe, "
                     "Garrido et al. 2023): below 15% of its effective rank in the run's first "
                     "window, below 30% of its peak since the warm-up, or fewer than 4 effective "
                     "dimensions. Check augmentations, projector, loss terms (a covariance / "
                     "redundancy term), weight decay and the learning rate."),
        conditions=(
            Condition("effective_rank_baseline_ratio", "<", 0.15, clear=0.2),
            Condition("effective_rank_peak_ratio", "<", 0.3, clear=0.4),
            Condition("effective_rank", "<", 4.0, clear=5.0,
                      also=(Condition("embedding_dim", ">", 15.5, clear=15.5),)),
        ),
        hold=3,
        prometheus_for="5m",
    ),

    AlertRule(
        name="RepwatchPlasticityLoss",
        severity="warning",
        summary="Activation layer losing plasticity",
        description=("Layer {layer} of run {run}: {signal} = {value:.4g} ({expr}). More and more "
                     "units stop responding (the tau=0.1 dormant fraction has risen 0.25 above "
                     "its lowest level in this run: Sokar et al. 2023) while the layer's features "
                     "collapse onto fewer directions (effective rank below 60% of its peak: Lyle "
                     "et al. 2023; Dohare et al. 2024): the network is losing the ability to fit "
                     "new targets. Consider ReDo (monitor.remedies.recycle_dormant), L2 towards "
                     "the initial weights, shrink-and-perturb, layer normalisation, or a smaller "
                     "learning rate."),
        conditions=(
            Condition("dormant_units_ratio_rise{tau=0.1}", ">", 0.25, clear=0.15,
                      also=(Condition("effective_rank_peak_ratio", "<", 0.6, clear=0.7),)),
        ),
        hold=4,
        min_window_samples=64,
        prometheus_for="10m",
        scope="layer",
    ),
    AlertRule(
        name="RepwatchGeneratorModeCollapse",
        severity="critical",
        summary="Generator collapsed onto few modes",
        description=("Generated stream {stream} of run {run}: {signal} = {value:.4g} ({expr}). "
                     "Generated samples are far less diverse than real ones or repeat each "
                     "other (birthday-paradox test, Arora & Zhang 2017): mode collapse. Check "
                     "the discriminator/generator balance and learning rates."),
        conditions=(
            Condition("generator_diversity_ratio", "<", 0.5, clear=0.7),
            Condition("generator_duplicate_rate", ">", 0.2, clear=0.1),
        ),
        hold=2,
        min_window_samples=0,
        prometheus_for="5m",
    ),
    AlertRule(
        name="RepwatchEarlyBirdTicket",
        severity="info",
        summary="Early-bird ticket found: the pruning mask has stabilised",
        description=("Run {run}: {signal} = {value:.4g} ({expr}). The global magnitude "
                     "pruning mask has changed by less than 10% over several checks (You et "
                     "al. 2020): a winning ticket can be drawn now and the rest of training "
                     "run sparse."),
        conditions=(Condition("earlybird_ticket_found", ">", 0.5, clear=0.5),),
        hold=1,
        min_window_samples=0,
        prometheus_for="0m",
        scope="run",
    ),
)


LOW_QUALITY_SAMPLES: AlertRule = AlertRule(
    name="RepwatchLowQualitySamples",
    severity="info",
    summary="Many samples have low-quality representations",
    description=("Stream {stream} of run {run}: {signal} = {value:.4g} ({expr}). The "
                 "share of samples whose Q-Score is below the level calibrated on the first "
                 "healthy window (where it was 10%) has grown: low Q predicts "
                 "misclassification (Kalibhat et al. 2024). Inspect them with "
                 "mon.sample_scores(stream). Only for non-negative (post-ReLU) features, "
                 "where the score is meaningful. Unvalidated: on the detection benchmark "
                 "(docs/detection.md) low Q-Score did not predict misclassification."),
    conditions=(Condition("low_quality_samples_ratio", ">", 0.3, clear=0.2,
                          also=(Condition("negative_values_ratio", "<", 0.001, clear=0.001),)),),
    hold=3,
    prometheus_for="10m",
)
"""Opt-in (``info``): the share of low-Q-Score samples. Not in :data:`DEFAULT_RULES`: on the
detection benchmark (docs/detection.md, "Low-quality samples") low Q-Score ranked held-out
misclassifications no better than chance (AUPRC lift ≈ 0 on clean and noisy-label runs) and the
0.1.0 warning fired on healthy runs. Add it with ``Monitor(rules=(*DEFAULT_RULES,
LOW_QUALITY_SAMPLES))`` to watch the signal anyway."""

OPTIONAL_RULES: tuple[AlertRule, ...] = (LOW_QUALITY_SAMPLES,)
"""Rules repwatch ships but does not enable by default (the benchmark does not support them)."""


def validate_rules(rules: Sequence[AlertRule],
                   known_signals: set[str] | Mapping[str, Any] | None = None) -> None:
    """Reject duplicate names and (when ``known_signals`` is given: a set, or a mapping scope →
    set) unknown signals; variant keys (``x{tau=0.1}``) are checked by their signal name."""
    names = [r.name for r in rules]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate alert names: {dupes}")
    if known_signals is not None:
        for rule in rules:
            known = (known_signals.get(rule.scope, set()) if isinstance(known_signals, Mapping)
                     else known_signals)
            unknown = [s for s in rule.signals if s.signal not in known]
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

    def evaluate(self, groups: Mapping[str, Mapping[str, Mapping[str, float]]], step: int
                 ) -> tuple[list[Alert], list[Alert], list[Alert]]:
        """Update states from ``groups`` (scope → key → signal → value; a plain
        stream → signal → value mapping is taken as the ``stream`` scope).

        Returns ``(firing, newly_fired, resolved)``.
        """
        if not set(groups) <= set(SCOPES):
            groups = {"stream": groups}  # type: ignore[dict-item]
        fired: list[Alert] = []
        resolved: list[Alert] = []
        for rule in self.rules:
            for key, values in groups.get(rule.scope, {}).items():
                if not any(s in values for s in rule.signals):
                    continue
                st = self._states.setdefault((rule.name, key), _State())
                n = values.get("window_samples", math.inf)
                if not (n >= rule.min_window_samples):
                    continue
                if all(math.isnan(values.get(s, math.nan)) for s in rule.signals):
                    continue
                breach = [c for c in rule.conditions if c.breached_in(values)]
                if not st.firing:
                    st.breach_count = st.breach_count + 1 if breach else 0
                    if st.breach_count >= rule.hold:
                        st.firing, st.clear_count, st.since_step = True, 0, step
                        st.alert = self._make(rule, key, breach[0], values, step)
                        fired.append(st.alert)
                else:
                    cleared = [c.cleared_in(values) for c in rule.conditions]
                    all_clear = all(c for c in cleared if c is not None)
                    st.clear_count = st.clear_count + 1 if all_clear else 0
                    if breach:
                        st.alert = self._make(rule, key, breach[0], values, st.since_step)
                    if st.clear_count >= rule.hold:
                        st.firing, st.breach_count = False, 0
                        if st.alert is not None:
                            resolved.append(st.alert)
                        st.alert = None
        return self.firing(), fired, resolved

    def firing(self) -> list[Alert]:
        """Alerts firing now."""
        return [st.alert for st in self._states.values() if st.firing and st.alert is not None]

    def _make(self, rule: AlertRule, key: str, cond: Condition, values: Mapping[str, float],
              step: int) -> Alert:
        value = float(values.get(cond.signal, math.nan))
        desc = rule.description.format(stream=key, layer=key, param=key, run=self.run,
                                       signal=cond.signal, value=value, expr=cond.expr())
        return Alert(name=rule.name, stream=key, severity=rule.severity, value=value,
                     signal=str(cond.signal), summary=rule.summary, description=desc,
                     runbook_url=rule.runbook_url, run=self.run, since_step=step,
                     scope=rule.scope)

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
