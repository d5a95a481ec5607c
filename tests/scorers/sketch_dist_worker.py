"""Worker for tests/scorers/test_sketch.py: two gloo ranks whose streams are on the sketched
path (importable by ``torch.multiprocessing.spawn``'s children)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from monitor import Monitor
from tests import dist_workers as dw

DIM, SKETCH = 40, 12


def make_monitor() -> Monitor:
    """The options every rank and the one-process reference share (both streams sketched)."""
    return Monitor(run="dist-sketch", every=1, max_rows=512, window=1024, port=None,
                   peak_warmup=0, sketch_above=16, sketch_dim=SKETCH)


def rows(rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s rows: ``emb`` on both ranks, ``only0`` on rank 0 only."""
    g = torch.Generator().manual_seed(99 + rank)
    out = {"emb": (torch.randn(150 + 40 * rank, DIM, generator=g)
                   @ torch.randn(DIM, DIM, generator=g)).relu()}
    if rank == 0:
        out["only0"] = torch.randn(60, 24, generator=g)
    return out


def feed(mon: Monitor, net: nn.Module, ranks: list[int]) -> None:
    """Feed the rows of ``ranks`` and run ``net`` (watched activations, 48 units) on them."""
    for rank in ranks:
        for name, value in rows(rank).items():
            mon.observe(name, value)
        with torch.no_grad():
            net(rows(rank)["emb"][:, :8])


def model() -> nn.Sequential:
    """48 ReLU units, the same on every rank."""
    net = nn.Sequential(nn.Linear(8, 48), nn.ReLU())
    with torch.no_grad():
        net[0].weight.copy_(torch.linspace(-1, 1, 48 * 8).reshape(48, 8))
        net[0].bias.zero_()
    return net


def worker(rank: int, world: int, port: int, out: str) -> None:
    """Each rank feeds its share and publishes once (global reduction)."""
    dw._init(rank, world, port)
    mon = make_monitor()
    net = model()
    mon.watch_activations(net)
    try:
        feed(mon, net, [rank])
        snap = mon.step()
        result: dict[str, Any] = dw.snapshot_values(snap)
    finally:
        mon.close()
    dw._finish(Path(out), rank, result)
