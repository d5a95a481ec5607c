"""Continual random-label tasks on digits: methods that lose plasticity and methods that keep it.

The scenario of :mod:`monitor.tools.scenarios.plasticity` (an MLP ``64 → 256 → 256 → 10``, Adam, a
fresh set of random labels for the same 512 images every task; Lyle et al., ICML 2023; Dohare et
al., Nature 2024), 30 tasks of 100 steps, with repwatch watching the hidden activations as the
plasticity demo does. Methods:

==============  ============================================================================
plain           nothing (loses plasticity: Lyle et al. 2023, Dohare et al. 2024)
l2_init         L2 towards the initial weights, λ = 1e-2 (Kumar et al., 2023, "regenerative
                regularisation")
shrink_perturb  after each task ``w ← 0.8·w + 0.01·ε`` (Ash & Adams, NeurIPS 2020)
redo            ReDo at every task end, τ = 0.1 (Sokar et al., ICML 2023)
reset           a fresh network and optimiser after every task (keeps plasticity by
                construction; its accuracy is that of a new network)
==============  ============================================================================

Ground truth is the accuracy trend, not a label: a run *lost plasticity* when the mean
end-of-task accuracy of the last five tasks is at least 0.1 below that of tasks 2–6 (task 1 is
the network's first fit). The step of the loss is the end of the first task after which the
3-task running mean stays 0.1 below that early level.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.detection.trace import Label, Trace

__all__ = ["SETTINGS", "run_plasticity", "lost_plasticity"]

SETTINGS: dict[str, tuple[Label, str]] = {
    "plain": ("plasticity", "Lyle et al., ICML 2023; Dohare et al., Nature 2024"),
    "l2_init": ("healthy", "Kumar et al. 2023 (L2 Init)"),
    "shrink_perturb": ("healthy", "Ash & Adams, NeurIPS 2020"),
    "redo": ("healthy", "Sokar et al., ICML 2023"),
    "reset": ("healthy", "a fresh network every task"),
}

TASKS = 30
STEPS_PER_TASK = 100
DROP = 0.1


def lost_plasticity(accs: list[float], drop: float = DROP) -> tuple[bool, int | None]:
    """(lost, first task index after which the 3-task running mean stays ``drop`` below the
    early level). Early level: mean of tasks 2–6; final: mean of the last five tasks."""
    early = sum(accs[1:6]) / len(accs[1:6])
    final = sum(accs[-5:]) / 5
    lost = final <= early - drop
    first = None
    if lost:
        run = [sum(accs[max(0, i - 2):i + 1]) / len(accs[max(0, i - 2):i + 1])
               for i in range(len(accs))]
        for i in range(len(accs)):
            if all(r <= early - drop for r in run[i:]):
                first = i
                break
    return lost, first


def run_plasticity(setting: str, seed: int = 0, tasks: int = TASKS,
                   steps_per_task: int = STEPS_PER_TASK,
                   log: Callable[[str], None] | None = None) -> Trace:
    """Train ``setting`` on ``tasks`` random-label tasks with repwatch attached."""
    from monitor import Monitor
    from monitor.remedies import recycle_dormant
    from monitor.tools.scenarios.plasticity import build_plasticity, run_tasks

    label, paper = SETTINGS[setting]
    setup = build_plasticity(seed=seed)
    init = [p.detach().clone() for p in setup.model.parameters()]
    mon = Monitor(run=f"{setting}-{seed}", every=50, max_rows=256, window=2048, port=None,
                  seed=seed, peak_warmup=steps_per_task)
    mon.watch_activations(setup.model)
    trace = Trace("plasticity", setting, seed, label, paper, mon.window, mon.peak_warmup,
                  tasks * steps_per_task)
    t0 = time.perf_counter()

    if setting == "l2_init":
        orig_step = setup.optimizer.step

        def step_with_l2(*a: object, **k: object) -> object:   # grad += λ (w − w0) before Adam
            with torch.no_grad():
                for p, p0 in zip(setup.model.parameters(), init, strict=True):
                    if p.grad is not None:
                        p.grad.add_(p - p0, alpha=1e-2)
            return orig_step(*a, **k)

        setup.optimizer.step = step_with_l2  # type: ignore[method-assign]

    def on_step(step: int) -> None:
        trace.record(mon.step())

    def on_task_end(task: int, acc: float) -> None:
        """After the task's accuracy is measured: the method's between-task intervention."""
        trace.truth.append({"step": float((task + 1) * steps_per_task), "task_accuracy": acc})
        if setting == "redo":
            recycle_dormant(setup.model, setup.optimizer, tau=0.1, inputs=setup.x,
                            generator=setup.generator)
        elif setting in ("shrink_perturb", "reset"):
            with torch.no_grad():
                for m in setup.model:
                    if not isinstance(m, nn.Linear):
                        continue
                    if setting == "reset":
                        m.reset_parameters()
                    else:
                        m.weight.mul_(0.8).add_(0.01 * torch.randn(
                            m.weight.shape, generator=setup.generator))
                        m.bias.mul_(0.8)
            if setting == "reset":
                setup.optimizer.state.clear()
        if log is not None:
            log(f"{setting}/{seed} task {task + 1}: accuracy {acc:.3f}")

    torch.manual_seed(seed)
    accs = run_tasks(setup, tasks, steps_per_task, on_step=on_step, on_task_end=on_task_end)
    mon.close()
    trace.wall_seconds = time.perf_counter() - t0
    lost, first = lost_plasticity(accs)
    trace.outcome = {"early_accuracy": sum(accs[1:6]) / 5, "final_accuracy": sum(accs[-5:]) / 5,
                     "lost_plasticity": lost,
                     "loss_step": None if first is None else (first + 1) * steps_per_task}
    return trace
