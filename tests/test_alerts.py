"""The alert spec and its in-process evaluation (hold, hysteresis, NaN, window gate)."""

from __future__ import annotations

import math

import pytest

from exporters.catalogue import SIGNALS_BY_SCOPE
from monitor.alerts import DEFAULT_RULES, AlertEngine, AlertRule, Condition, validate_rules

RULE = AlertRule(name="RepwatchTest", severity="warning", summary="s",
                 description="{stream} {signal}={value} {expr}",
                 conditions=(Condition("x", "<", 0.1, clear=0.2),), hold=2, min_window_samples=10)


def _run(engine: AlertEngine, values: list[float], n: float = 100.0) -> list[bool]:
    out = []
    for step, v in enumerate(values):
        firing, _, _ = engine.evaluate({"s": {"x": v, "window_samples": n}}, step)
        out.append(bool(firing))
    return out


def test_hold_then_fire_then_hysteresis_then_resolve() -> None:
    engine = AlertEngine([RULE], run="r")
    seq = [0.5, 0.05, 0.5, 0.05, 0.05, 0.15, 0.15, 0.15, 0.25, 0.25, 0.25]
    # one breach is not enough (hold=2); 0.15 is above the threshold but below clear: keeps firing
    assert _run(engine, seq) == [False, False, False, False, True, True, True, True, True, False,
                                 False]


def test_fired_and_resolved_are_reported_once() -> None:
    engine = AlertEngine([RULE], run="r")
    events = []
    for step, v in enumerate([0.0, 0.0, 0.0, 0.3, 0.3, 0.3]):
        _, fired, resolved = engine.evaluate({"s": {"x": v, "window_samples": 100}}, step)
        events += [("fired", a.stream, step) for a in fired]
        events += [("resolved", a.stream, step) for a in resolved]
    assert events == [("fired", "s", 1), ("resolved", "s", 4)]


def test_nan_and_small_window_leave_state_alone() -> None:
    engine = AlertEngine([RULE])
    assert _run(engine, [0.0, math.nan, 0.0]) == [False, False, True]
    engine = AlertEngine([RULE])
    assert _run(engine, [0.0, 0.0, 0.0], n=5) == [False, False, False]


def test_description_is_filled() -> None:
    engine = AlertEngine([RULE], run="r")
    _run(engine, [0.0, 0.0])
    (alert,) = engine.firing()
    assert alert.description == "s x=0.0 x < 0.1"
    assert alert.runbook_url.endswith("#repwatchtest")


def test_bad_rules_are_rejected() -> None:
    with pytest.raises(ValueError, match="CamelCase"):
        AlertRule("collapse", "warning", "s", "d", (Condition("x", "<", 1, 2),))
    with pytest.raises(ValueError, match="healthy side"):
        Condition("x", "<", 0.5, clear=0.1)
    with pytest.raises(ValueError, match="duplicate"):
        validate_rules([RULE, RULE])


def test_default_rules_use_exported_signals() -> None:
    validate_rules(DEFAULT_RULES, SIGNALS_BY_SCOPE)
    names = {r.name for r in DEFAULT_RULES}
    assert {"RepwatchRepresentationCollapse", "RepwatchDimensionalCollapse"} <= names


def test_state_roundtrip() -> None:
    a = AlertEngine([RULE], run="r")
    _run(a, [0.0, 0.0])
    b = AlertEngine([RULE], run="r")
    b.load_state_dict(a.state_dict())
    assert [x.name for x in b.firing()] == ["RepwatchTest"]
    assert _run(b, [0.3, 0.3]) == [True, False]


def test_compound_condition_and_layer_scope() -> None:
    """``also``: fires only while both parts hold; clears when either part clears; a
    layer-scoped rule reads the layer group only."""
    rule = AlertRule("RepwatchHighAndRising", "warning", "s", "{layer}: {expr}",
                     (Condition("d", ">", 0.3, clear=0.2,
                                also=(Condition("rise", ">", 0.1, clear=0.05),)),),
                     hold=1, min_window_samples=0, scope="layer")
    engine = AlertEngine([rule], run="r")

    def feed(d: float, rise: float) -> list[str]:
        groups = {"stream": {"fc1": {"d": 0.9, "rise": 0.9}},      # ignored: wrong scope
                  "layer": {"fc1": {"d": d, "rise": rise}}}
        firing, _, _ = engine.evaluate(groups, 0)
        return [f"{a.scope}:{a.stream}" for a in firing]

    assert feed(0.5, 0.0) == []            # high but not rising
    assert feed(0.1, 0.5) == []            # rising from a low level
    assert feed(0.5, 0.2) == ["layer:fc1"]
    assert feed(0.5, 0.08) == ["layer:fc1"]  # rise between clear and threshold: still firing
    assert feed(0.5, 0.01) == []           # rise cleared → resolves
    with pytest.raises(ValueError, match="scope"):
        AlertRule("RepwatchX", "warning", "s", "d", (Condition("x", "<", 1, 2),), scope="nope")  # type: ignore[arg-type]
