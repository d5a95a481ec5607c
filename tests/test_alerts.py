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


def _monitor_fired(rules: tuple[AlertRule, ...], batches: list) -> list[tuple[str, int]]:  # type: ignore[type-arg]
    import torch

    from monitor import Monitor

    mon = Monitor(port=None, every=10, max_rows=128, window=2048, rules=rules)  # peak_warmup 100
    fired: list[tuple[str, int]] = []
    mon.on_alert(lambda a: fired.append((a.name, mon.step_count)))
    for rows in batches:
        mon.observe("z", torch.as_tensor(rows, dtype=torch.float32))
        mon.step()
    mon.close()
    return fired


def _early_collapse(seed: int = 0) -> list:  # type: ignore[type-arg]
    """64-d embeddings, healthy for 20 steps, then every row on 3 directions around a common
    mean (mean cosine ≈ 0.9, RankMe ≈ 3, std ratio ≈ 0.3): a collapse long before the
    default ``peak_warmup`` of 100 steps, with no single vector to make the std ratio vanish."""
    import numpy as np

    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((3, 64))
    mean = 3.0 * rng.standard_normal(64)
    out = []
    for step in range(90):
        if step < 20:
            out.append(rng.standard_normal((128, 64)))
        else:
            out.append(mean + rng.standard_normal((128, 3)) @ basis)
    return out


def test_a_collapse_before_the_warm_up_is_caught() -> None:
    """Issue 16: a collapse within the first 100 steps raised nothing under the 0.1.0 rules (the
    relative rule was not armed before ``peak_warmup``; the absolute floors catch only total
    collapse). The rank relative to the first full window catches it before step 100."""
    from benchmarks.detection.report import RULES_0_1

    new = _monitor_fired(DEFAULT_RULES, _early_collapse())
    steps = [s for name, s in new if name == "RepwatchDimensionalCollapse"]
    assert steps and steps[0] < 100, new
    assert not any(name == "RepwatchRepresentationCollapse" for name, _ in new), new  # 3 directions
    assert _monitor_fired(RULES_0_1, _early_collapse()) == []
