"""Loss of plasticity on a sequence of random-label tasks over scikit-learn's digits.

Lyle, Zheng, Nikishin, Avila Pires, Pascanu & Dabney (ICML 2023, "Understanding plasticity in
neural networks") and Dohare et al. (Nature 2024, "Loss of plasticity in deep continual
learning") show that a network trained on a long sequence of tasks gradually loses the ability to
fit new ones; a hallmark is the growing share of dormant (τ-dormant, Sokar et al. 2023) units.
The classic small-scale recipe is memorisation of random labels, task after task.

Here: an MLP ``64 → 256 → 256 → 10`` with ReLU, trained with Adam (lr 3e-3, no weight decay) on a
fixed subset of 512 digits images. Each task draws fresh uniformly random labels (10 classes) for
those images and trains ``steps_per_task`` steps of batch 64; the training accuracy at the end of
the task measures how much the network could still fit. With the defaults, 30 tasks × 100 steps
(≈ 6 s on one CPU core), end-of-task accuracy falls from ≈ 0.6 to ≈ 0.15 (near chance 0.1) while
the τ=0.1 dormant fraction of the hidden layers rises from ≈ 0.15 to ≈ 0.8 (seed 0; seeds 1 and 2
alike). ReDo (:func:`monitor.remedies.recycle_dormant`, τ = 0.1) at every task end keeps the
network trainable: last five tasks ≈ 0.68 instead of 0.14, dormant fraction ≈ 0.45.

Usage with a monitor::

    setup = build_plasticity(seed=0)
    mon.watch(setup.model[1], name="hidden1")           # post-ReLU outputs of the hidden layers
    mon.watch(setup.model[3], name="hidden2")
    accs = run_tasks(setup, tasks=30, steps_per_task=100, on_step=lambda step: mon.step(),
                     on_task_end=lambda task, acc: recycle_dormant(
                         setup.model, setup.optimizer, tau=0.1, inputs=setup.x))

Randomness of data, labels and batches comes from ``setup.generator``; weights are initialised
from ``torch.manual_seed(seed)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from monitor.tools.demo_model import load_digits_tensor

__all__ = ["PlasticitySetup", "build_plasticity", "hidden_activations", "run_tasks", "task_accuracy"]


@dataclass
class PlasticitySetup:
    """Model, optimizer, the task images and the current task's labels."""

    model: nn.Sequential
    optimizer: torch.optim.Optimizer
    x: Tensor                  # (n_images, 64) the fixed images of every task
    y: Tensor                  # (n_images,) labels of the current task
    generator: torch.Generator
    batch_size: int
    num_classes: int
    step: int = 0              # optimizer steps so far
    task: int = 0              # tasks started so far

    @property
    def hidden_layers(self) -> list[int]:
        """Indices in ``model`` of the hidden activations (the ReLU modules)."""
        return [i for i, m in enumerate(self.model) if isinstance(m, nn.ReLU)]


def build_plasticity(seed: int = 0, device: torch.device | str = "cpu", n_images: int = 512,
                     width: int = 256, depth: int = 2, num_classes: int = 10, lr: float = 3e-3,
                     betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
                     batch_size: int = 64) -> PlasticitySetup:
    """An MLP ``64 → width (×depth, ReLU) → num_classes`` with Adam, on ``n_images`` digits."""
    if not 1 <= n_images <= 1797:
        raise ValueError(f"n_images must be in [1, 1797] (the digits data set), got {n_images}")
    if width < 1 or depth < 1 or num_classes < 2 or batch_size < 1:
        raise ValueError(f"expected width, depth, batch_size >= 1 and num_classes >= 2, got "
                         f"width={width}, depth={depth}, num_classes={num_classes}, "
                         f"batch_size={batch_size}")
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = 64
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, num_classes))
    model = nn.Sequential(*layers).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    data = load_digits_tensor(device)
    idx = torch.randperm(data.shape[0], generator=generator, device=device)[:n_images]
    x = data[idx]
    y = torch.zeros(n_images, dtype=torch.long, device=device)
    return PlasticitySetup(model, optimizer, x, y, generator, batch_size, num_classes)


def hidden_activations(setup: PlasticitySetup, x: Tensor | None = None) -> list[Tensor]:
    """Post-ReLU activations ``(n, width)`` of every hidden layer on ``x`` (default: the images)."""
    h = setup.x if x is None else x
    out: list[Tensor] = []
    with torch.no_grad():
        for module in setup.model:
            h = module(h)
            if isinstance(module, nn.ReLU):
                out.append(h)
    return out


def task_accuracy(setup: PlasticitySetup) -> float:
    """Training accuracy on the current task's labels (host float: a sync, outside the loop)."""
    with torch.no_grad():
        pred = setup.model(setup.x).argmax(1)
    return float((pred == setup.y).to(torch.float64).mean())


def run_tasks(setup: PlasticitySetup, tasks: int, steps_per_task: int,
              on_step: Callable[[int], None] | None = None,
              on_task_end: Callable[[int, float], None] | None = None) -> list[float]:
    """Train on ``tasks`` successive random-label tasks; return each task's final accuracy.

    ``on_step(step)`` runs after every optimizer step (``step`` counts from 1 over the whole
    sequence: put ``mon.step()`` there); ``on_task_end(task, accuracy)`` after each task's last
    step and accuracy measurement (apply ReDo there). The model's hidden activations are plain
    ``nn.ReLU`` modules (``setup.hidden_layers``) to hook.
    """
    if tasks < 0 or steps_per_task < 1:
        raise ValueError(f"expected tasks >= 0 and steps_per_task >= 1, got {tasks}, {steps_per_task}")
    model, opt, gen = setup.model, setup.optimizer, setup.generator
    n = setup.x.shape[0]
    accs: list[float] = []
    for _ in range(tasks):
        setup.y = torch.randint(0, setup.num_classes, (n,), generator=gen, device=setup.x.device)
        setup.task += 1
        model.train()
        for _ in range(steps_per_task):
            idx = torch.randint(0, n, (setup.batch_size,), generator=gen, device=setup.x.device)
            loss = F.cross_entropy(model(setup.x[idx]), setup.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            setup.step += 1
            if on_step is not None:
                on_step(setup.step)
        acc = task_accuracy(setup)
        accs.append(acc)
        if on_task_end is not None:
            on_task_end(setup.task - 1, acc)
    return accs
