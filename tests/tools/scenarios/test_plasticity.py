"""Scenario (Lyle et al. 2023; Sokar et al. 2023; Dohare et al. 2024): loss of plasticity is real
in ``monitor.tools.scenarios.plasticity``, repwatch sees it while it happens, and ReDo wired to its
alert restores it.

The MLP trains on 30 random-label tasks over digits with the Monitor watching its ReLU layers
(``watch_activations``), once without and once with ReDo at task ends while the alert fires
(the shared runs of ``tests/trained.py``).

* The phenomenon, checked independently of the Monitor's numbers (the monitor does not change
  training): end-of-task training accuracy falls towards chance, and the τ = 0.1 dormant
  fraction of the hidden layers (functional ``dormant_fraction`` on the post-ReLU activations
  over the task's images, taken at every task end) rises.
* repwatch's reading: the dormant fraction it publishes rises and ``RepwatchPlasticityLoss``
  fires *before* the accuracy has collapsed; with ReDo on that alert the last tasks' accuracy
  is higher than without.

Margins, measured on a 2-core AMD EPYC VM with one torch thread, seeds 0–2: first five tasks'
accuracy 0.58–0.60 (asserted > 0.45), last five 0.12–0.22 (< 0.3), drop 0.38–0.45 (> 0.25);
independent dormant fraction 0.25–0.31 → 0.80–0.85 (rise > 0.3, last > 0.6); repwatch's
layer-1 dormant fraction rises by 0.46–0.54 (> 0.2); the alert first fires at step 700–900
while the accuracy first halves at task 17–23; ReDo on alert: last five tasks 0.53–0.62 against
0.12–0.22 without (> 0.25), first recycling at task 6–8 (0-based). (Alert steps and ReDo
numbers re-measured with the rule set on the detection benchmark, docs/detection.md.)
"""

from __future__ import annotations

import pytest

from monitor.tools.demo_plasticity import PLASTICITY_ALERT
from monitor.tools.scenarios.plasticity import build_plasticity, run_tasks
from tests.trained import PLASTICITY_STEPS as STEPS
from tests.trained import PLASTICITY_TASKS as TASKS
from tests.trained import PlasticityRun

K = 5


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


# ---- the phenomenon, measured without repwatch ------------------------------------------------

@pytest.mark.slow
def test_accuracy_falls_and_dormant_units_accumulate(
        plasticity_runs: dict[bool, PlasticityRun]) -> None:
    run = plasticity_runs[False]
    accs, dormant = run.result.accuracies, run.dormant
    assert len(accs) == len(dormant) == TASKS
    assert _mean(accs[:K]) > 0.45                       # the fresh network fits random labels
    assert _mean(accs[:K]) - _mean(accs[-K:]) > 0.25    # ...and later ones it cannot
    assert _mean(accs[-K:]) < 0.3                       # chance is 0.1
    assert _mean(dormant[-K:]) - _mean(dormant[:K]) > 0.3
    assert _mean(dormant[-K:]) > 0.6


def test_run_tasks_rejects_bad_arguments() -> None:
    setup = build_plasticity(seed=0, n_images=32, width=8)
    with pytest.raises(ValueError, match="steps_per_task >= 1, got 1, 0"):
        run_tasks(setup, 1, 0)
    with pytest.raises(ValueError, match=r"n_images must be in \[1, 1797\].*got 5000"):
        build_plasticity(n_images=5000)


# ---- what repwatch reads ---------------------------------------------------------------------

@pytest.mark.slow
def test_dormant_fraction_rises_and_alert_fires_before_accuracy_collapses(
        plasticity_runs: dict[bool, PlasticityRun]) -> None:
    res = plasticity_runs[False].result
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


@pytest.mark.slow
def test_redo_on_alert_keeps_the_network_trainable(
        plasticity_runs: dict[bool, PlasticityRun]) -> None:
    without, with_redo = plasticity_runs[False].result, plasticity_runs[True].result
    assert with_redo.recycled, "ReDo never ran: the alert did not fire in the ReDo run"
    first_task_recycled = with_redo.recycled[0][0]
    assert first_task_recycled * STEPS >= with_redo.first_fired(PLASTICITY_ALERT) - STEPS
    assert _mean(with_redo.accuracies[-K:]) - _mean(without.accuracies[-K:]) > 0.25
    late = [s.get("dormant_units_ratio", layer="1", tau=0.1) for s in with_redo.snapshots[-K:]]
    late_without = [s.get("dormant_units_ratio", layer="1", tau=0.1) for s in without.snapshots[-K:]]
    assert _mean(late) < _mean(late_without)
