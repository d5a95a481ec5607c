"""Session-scoped trainings shared by the tests (not a test module; conftest imports the fixtures).

Each demo scenario is trained once per test process (``make test`` runs pytest-xdist with
``--dist loadscope``: a test module runs on one worker, so a training read by one module is
trained once per run), instead of once in every test that reads it:

* :func:`simsiam_healthy` / :func:`simsiam_collapsed` — the SimSiam demo (``run_demo``, seed 0,
  400 steps on the CPU) with and without the stop-gradient, watched in-process;
* :func:`plasticity_runs` — the plasticity demo (30 random-label tasks of 100 steps) without and
  with ReDo on alert, watched, with an independent measure of the phenomenon taken at every
  task end (the τ = 0.1 dormant fraction of the hidden ReLU layers by
  ``monitor.functional.plasticity.dormant_fraction`` on the task's images).

The monitor never changes training (a seeded run gives bit-identical losses with and without
it; tested in tests/test_monitor.py), so what these runs show about the model holds for an
unwatched run too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from monitor.tools.demo import DemoResult, run_demo
from monitor.tools.demo_plasticity import PlasticityResult, run_plasticity_demo

SIMSIAM_STEPS = 400
PLASTICITY_TASKS, PLASTICITY_STEPS = 30, 100



@dataclass
class PlasticityRun:
    """A watched plasticity run and the independent per-task measure of its hidden layers."""

    result: PlasticityResult
    dormant: list[float] = field(default_factory=list)   # mean τ=0.1 dormant fraction per task


@pytest.fixture(scope="session")
def simsiam_healthy() -> DemoResult:
    """The SimSiam demo with its stop-gradient: stays healthy, no alert."""
    return run_demo(steps=SIMSIAM_STEPS, collapse_at=None, seed=0, device="cpu", port=None)


@pytest.fixture(scope="session")
def simsiam_collapsed() -> DemoResult:
    """The SimSiam demo without stop-gradient (Chen & He's ablation): collapses."""
    return run_demo(steps=SIMSIAM_STEPS, collapse_at=0, seed=0, device="cpu", port=None)


def _plasticity(redo: bool) -> PlasticityRun:
    from monitor.functional.plasticity import dormant_fraction
    from monitor.tools.scenarios.plasticity import hidden_activations

    run = PlasticityRun(PlasticityResult())

    def on_task_end(task: int, acc: float, result: PlasticityResult) -> None:
        assert result.setup is not None
        hs = hidden_activations(result.setup)
        run.dormant.append(sum(float(dormant_fraction(h, 0.1)) for h in hs) / len(hs))

    run.result = run_plasticity_demo(tasks=PLASTICITY_TASKS, steps_per_task=PLASTICITY_STEPS,
                                     redo=redo, seed=0, device="cpu",
                                     every=PLASTICITY_STEPS // 2, on_task_end=on_task_end)
    return run


@pytest.fixture(scope="session")
def plasticity_runs() -> dict[bool, PlasticityRun]:
    """``{False: without ReDo, True: ReDo at task ends while RepwatchPlasticityLoss fires}``."""
    return {redo: _plasticity(redo) for redo in (False, True)}
