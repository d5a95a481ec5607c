"""`repwatch demo --scenario plasticity`: loss of plasticity on random-label tasks, watched live.

An MLP trained on a sequence of random-label tasks over scikit-learn's digits (the scenario of
:mod:`monitor.tools.scenarios.plasticity`; Lyle et al. 2023, Dohare et al. 2024) gradually stops
being able to fit new tasks while its ReLU units go dormant (Sokar et al. 2023). repwatch watches
the hidden activations and the weights; ``RepwatchPlasticityLoss`` fires while the dormant fraction
is high and rising. With ``redo=True``, ReDo (:func:`monitor.remedies.recycle_dormant`) recycles
the dormant units at the end of every task *while that alert fires*: the user's remedy wired to
the monitor's alert, not something the monitor does by itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from monitor.tools.demo import linger_serving, pick_device
from monitor.monitor import Monitor
from monitor.snapshot import Alert, Snapshot

if TYPE_CHECKING:
    from monitor.tools.scenarios.plasticity import PlasticitySetup

PLASTICITY_ALERT = "RepwatchPlasticityLoss"


@dataclass
class PlasticityResult:
    """What a plasticity demo run produced."""

    accuracies: list[float] = field(default_factory=list)
    snapshots: list[Snapshot] = field(default_factory=list)
    fired: list[tuple[int, Alert]] = field(default_factory=list)
    recycled: list[tuple[int, int]] = field(default_factory=list)   # (task, units recycled)
    url: str | None = None
    seconds: float = 0.0
    setup: PlasticitySetup | None = None      # the model, data and optimiser that were trained

    def first_fired(self, name: str = PLASTICITY_ALERT) -> int | None:
        """Step at which alert ``name`` first fired, else None."""
        return next((step for step, a in self.fired if a.name == name), None)


def run_plasticity_demo(tasks: int = 30, steps_per_task: int = 100, redo: bool = False,
                        seed: int = 0, device: str = "auto", every: int = 50,
                        window: int = 2048, port: int | None = None, host: str = "127.0.0.1",
                        run: str | None = None,
                        on_publish: Callable[[Snapshot], None] | None = None,
                        on_task_end: Callable[[int, float, PlasticityResult], None] | None = None,
                        on_start: Callable[[str | None], None] | None = None,
                        linger: float = 0.0) -> PlasticityResult:
    """Train ``tasks`` random-label tasks with repwatch attached (and ReDo on alert if asked)."""
    from monitor.remedies import recycle_dormant
    from monitor.tools.scenarios.plasticity import build_plasticity, run_tasks

    setup = build_plasticity(seed=seed, device=pick_device(device))
    result = PlasticityResult(setup=setup)
    mon = Monitor(run=run or ("plasticity-redo" if redo else "plasticity"), every=every,
                  max_rows=256, window=window, port=port, host=host, seed=seed,
                  peak_warmup=steps_per_task)
    t0 = time.perf_counter()
    try:
        result.url = mon.url
        if on_start is not None:
            on_start(mon.url)
        mon.watch_activations(setup.model)
        mon.watch_weights(setup.model, rank_every=4, earlybird=None)
        mon.on_alert(lambda a: result.fired.append((mon.step_count, a)))

        def on_step(step: int) -> None:
            snap = mon.step()
            if snap is not None:
                result.snapshots.append(snap)
                if on_publish is not None:
                    on_publish(snap)

        def task_end(task: int, acc: float) -> None:
            result.accuracies.append(acc)
            firing = mon.latest is not None and any(
                a.name == PLASTICITY_ALERT for a in mon.latest.alerts)
            if redo and firing:
                counts = recycle_dormant(setup.model, setup.optimizer, tau=0.1, inputs=setup.x,
                                         generator=setup.generator)
                result.recycled.append((task, sum(counts.values())))
            if on_task_end is not None:
                on_task_end(task, acc, result)

        run_tasks(setup, tasks, steps_per_task, on_step=on_step, on_task_end=task_end)
        result.seconds = time.perf_counter() - t0
        linger_serving(mon, linger)
    finally:
        result.seconds = result.seconds or time.perf_counter() - t0
        mon.close()
    return result
