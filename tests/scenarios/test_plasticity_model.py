"""Scenario (Lyle et al. 2023; Dohare et al. 2024; Sokar et al. 2023): loss of plasticity is real
in ``monitor.scenarios.plasticity`` and ReDo restores it.

Checked independently of the Monitor: end-of-task training accuracy on random labels falls over a
sequence of 30 tasks, the τ = 0.1 dormant fraction of the hidden layers (functional
``dormant_fraction`` on the post-ReLU activations over the task's images) rises, and recycling
the dormant units at every task end keeps the last tasks' accuracy high.
"""

from __future__ import annotations

import pytest

from monitor.functional.plasticity import dormant_fraction
from monitor.remedies import recycle_dormant
from monitor.scenarios.plasticity import build_plasticity, hidden_activations, run_tasks

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]

TASKS, STEPS, K = 30, 100, 5


def _run(redo: bool) -> tuple[list[float], list[float]]:
    setup = build_plasticity(seed=0)
    dormant: list[float] = []

    def on_task_end(task: int, acc: float) -> None:
        hs = hidden_activations(setup)
        dormant.append(sum(float(dormant_fraction(h, 0.1)) for h in hs) / len(hs))
        if redo:
            recycle_dormant(setup.model, setup.optimizer, tau=0.1, inputs=setup.x,
                            generator=setup.generator)

    steps: list[int] = []
    accs = run_tasks(setup, TASKS, STEPS, on_step=steps.append, on_task_end=on_task_end)
    assert steps == list(range(1, TASKS * STEPS + 1))
    return accs, dormant


@pytest.fixture(scope="module")
def runs(single_thread: None) -> dict[bool, tuple[list[float], list[float]]]:
    return {False: _run(False), True: _run(True)}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def test_accuracy_falls_and_dormant_units_accumulate(runs) -> None:  # type: ignore[no-untyped-def]
    accs, dormant = runs[False]
    assert len(accs) == len(dormant) == TASKS
    assert _mean(accs[:K]) > 0.45                       # the fresh network fits random labels
    assert _mean(accs[:K]) - _mean(accs[-K:]) > 0.25    # ...and later ones it cannot
    assert _mean(accs[-K:]) < 0.3                       # chance is 0.1
    assert _mean(dormant[-K:]) - _mean(dormant[:K]) > 0.3
    assert _mean(dormant[-K:]) > 0.6


def test_redo_keeps_the_network_trainable(runs) -> None:  # type: ignore[no-untyped-def]
    base_accs, base_dormant = runs[False]
    redo_accs, redo_dormant = runs[True]
    assert _mean(redo_accs[-K:]) - _mean(base_accs[-K:]) > 0.25
    assert _mean(redo_dormant[-K:]) < _mean(base_dormant[-K:]) - 0.2


def test_run_tasks_rejects_bad_arguments() -> None:
    setup = build_plasticity(seed=0, n_images=32, width=8)
    with pytest.raises(ValueError, match="steps_per_task >= 1, got 1, 0"):
        run_tasks(setup, 1, 0)
    with pytest.raises(ValueError, match=r"n_images must be in \[1, 1797\].*got 5000"):
        build_plasticity(n_images=5000)
