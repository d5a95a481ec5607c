"""A seeded toy training loop for the bit-identical-loss tests (not a test module)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from monitor import Monitor


def toy_mlp() -> nn.Sequential:
    """20 → 64 → 32 → 5 with ReLU and dropout (dropout draws from the global RNG)."""
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 32),
                         nn.ReLU(), nn.Linear(32, 5))


def train_toy(seed: int, steps: int, attach: Callable[[nn.Sequential], Monitor] | None = None,
              on_step: Callable[[Monitor, Tensor, Tensor], None] | None = None
              ) -> tuple[list[float], Monitor | None]:
    """Train :func:`toy_mlp` with SGD for ``steps`` seeded steps; ``attach(model)`` builds the
    monitor (None: train without one) and ``on_step(mon, logits, y)`` runs after each optimiser
    step. Returns the losses and the (still open) monitor."""
    torch.manual_seed(seed)
    model = toy_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mon = attach(model) if attach is not None else None
    losses = []
    for _ in range(steps):
        x = torch.randn(64, 20)
        y = torch.randint(0, 5, (64,))
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if mon is not None and on_step is not None:
            on_step(mon, logits, y)
        losses.append(loss.item())
    return losses, mon
