"""Scenario (Lyle et al. 2023; Sokar et al. 2023; Dohare et al. 2024): repwatch sees plasticity
being lost while it happens, and ReDo wired to its alert restores it.

The MLP of ``monitor.scenarios.plasticity`` trains on 30 random-label tasks over digits with the
Monitor watching its ReLU layers (``watch_activations``). Without a remedy the end-of-task
accuracy falls towards chance; the τ = 0.1 dormant fraction the monitor publishes must rise and
``RepwatchPlasticityLoss`` must fire *before* the accuracy has collapsed. With ReDo applied at
task ends while the alert fires, the last tasks' accuracy must be higher than without.
"""

from __future__ import annotations

import pytest

from monitor.demo_plasticity import PLASTICITY_ALERT, PlasticityResult, run_plasticity_demo

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]

TASKS, STEPS, K = 30, 100, 5


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


@pytest.fixture(scope="module")
def runs(single_thread: None) -> dict[bool, PlasticityResult]:
    return {redo: run_plasticity_demo(tasks=TASKS, steps_per_task=STEPS, redo=redo, seed=0,
                                      device="cpu", every=STEPS // 2)
            for redo in (False, True)}


def test_dormant_fraction_rises_and_alert_fires_before_accuracy_collapses(runs) -> None:  # type: ignore[no-untyped-def]
    res = runs[False]
    accs = res.accuracies
    assert _mean(accs[:K]) - _mean(accs[-K:]) > 0.25          # plasticity really is lost
    dormant = [s.get("dormant_units_ratio", layer="1", tau=0.1) for s in res.snapshots]
    early = _mean(dormant[2:2 + K])                           # after the first task
    late = _mean(dormant[-K:])
    assert late - early > 0.2, (early, late)
    fired = res.first_fired(PLASTICITY_ALERT)
    assert fired is not None
    # the alert fires while accuracy is still above half of its early level (an early warning)
    first_bad_task = next(i for i, a in enumerate(accs) if a < 0.5 * _mean(accs[:K]))
    assert fired < first_bad_task * STEPS, (fired, first_bad_task)
    assert res.snapshots[-1].errors == {}


def test_redo_on_alert_keeps_the_network_trainable(runs) -> None:  # type: ignore[no-untyped-def]
    without, with_redo = runs[False], runs[True]
    assert with_redo.recycled, "ReDo never ran: the alert did not fire in the ReDo run"
    first_task_recycled = with_redo.recycled[0][0]
    assert first_task_recycled * STEPS >= with_redo.first_fired(PLASTICITY_ALERT) - STEPS
    assert _mean(with_redo.accuracies[-K:]) - _mean(without.accuracies[-K:]) > 0.25
    late = [s.get("dormant_units_ratio", layer="1", tau=0.1) for s in with_redo.snapshots[-K:]]
    late_without = [s.get("dormant_units_ratio", layer="1", tau=0.1) for s in without.snapshots[-K:]]
    assert _mean(late) < _mean(late_without)
