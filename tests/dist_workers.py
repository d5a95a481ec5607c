"""Workers for tests/engine/test_distributed.py: two gloo ranks on the CPU, started with
``torch.multiprocessing.spawn`` (functions here are importable by the spawned children).

Every rank builds the same data from one seed and keeps its own share; the test process feeds
all shares to one plain Monitor (the reference) with :func:`feed`.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from monitor import Monitor

DIM = 16
CLASSES = 5
STEP_SHARES: dict[int, list[int]] = {0: [100, 60], 1: [90, 80]}
"""Rows per batch of stream ``emb`` on each rank (total 330 ≥ the 256 Q-Score calibration)."""
ONLY0_ROWS = 50
"""Rows of stream ``only0``, fed on rank 0 only."""


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def data(rank: int) -> dict[str, Any]:
    """Rank ``rank``'s batches: ``emb`` (rows, labels) batches, ``only0`` rows, model inputs."""
    g = torch.Generator().manual_seed(1234 + rank)
    mix = torch.randn(DIM, DIM, generator=g) * torch.linspace(1.0, 0.05, DIM)  # (d, d) decay
    emb = []
    for b in STEP_SHARES[rank]:
        labels = torch.randint(0, CLASSES, (b,), generator=g)
        centres = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(7)) * 2.0
        rows = (torch.randn(b, DIM, generator=g) @ mix + centres[labels]).relu()
        emb.append((rows, labels))
    only0 = torch.randn(ONLY0_ROWS, 8, generator=g).abs() if rank == 0 else None
    inputs = [torch.randn(b, 6, generator=g) for b in STEP_SHARES[rank]]
    return {"emb": emb, "only0": only0, "inputs": inputs}


def model() -> nn.Sequential:
    """A small ReLU net with a few dead units (fixed seed, the same on every rank)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4), nn.ReLU())
    torch.random.set_rng_state(gen_state)
    with torch.no_grad():
        net[0].bias[:3] = -50.0                       # three dead units in layer "1"
        net[0].weight[3:5] *= 0.01                    # two nearly dormant ones (tau 0.1)
        net[0].bias[3:5] = 0.0
    return net


def make_monitor(port: int | None = None) -> Monitor:
    """The monitor options every rank and the reference share."""
    return Monitor(run="dist", every=1, max_rows=512, window=1024, port=port, peak_warmup=0,
                   max_classes=CLASSES)


def feed(mon: Monitor, net: nn.Module, ranks: list[int]) -> None:
    """Feed the shares of ``ranks`` (in order) to ``mon``: streams ``emb``, ``only0`` and the
    watched activations of ``net``."""
    for rank in ranks:
        d = data(rank)
        for rows, labels in d["emb"]:
            mon.observe("emb", rows, labels=labels)
        if d["only0"] is not None:
            mon.observe("only0", d["only0"])
        with torch.no_grad():
            for x in d["inputs"]:
                net(x)


def snapshot_values(snap: Any) -> dict[str, Any]:
    """The plain values of a Snapshot worth comparing."""
    return {"streams": snap.streams, "layers": snap.layers, "counters": snap.counters,
            "errors": dict(snap.errors)}


def _init(rank: int, world: int, port: int) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))


def _finish(out: Path, rank: int, result: dict[str, Any]) -> None:
    import torch.distributed as dist
    torch.save(result, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def worker_exact(rank: int, world: int, port: int, out: str) -> None:
    """Each rank feeds its share; two publishes (the second with no new rows)."""
    _init(rank, world, port)
    mon = make_monitor()
    net = model()
    mon.watch_activations(net)
    try:
        feed(mon, net, [rank])
        first = mon.step()
        second = mon.publish()
        result = {"first": snapshot_values(first), "second": snapshot_values(second),
                  "collectives": mon._reducer.collectives}
    finally:
        mon.close()
    _finish(Path(out), rank, result)


def worker_faults(rank: int, world: int, port: int, out: str) -> None:
    """Rank 1: the spectrum of stream ``emb`` raises at compute, and packing stream ``only0``
    fails; both ranks must still finish two publishes."""
    _init(rank, world, port)
    if rank == 1:
        import monitor.engine.distributed as md
        from monitor.scorers.spectrum import SpectrumScorer

        original_compute = SpectrumScorer.compute
        original_value = md._local_value

        def failing_compute(self: SpectrumScorer, m: Any) -> dict[str, Tensor]:
            if m.dim == DIM:
                raise RuntimeError("injected scorer failure on rank 1")
            return original_compute(self, m)

        def failing_value(engine: Any, entry: Any, *args: Any) -> Tensor | None:
            if entry.key[1] == "only0":
                raise RuntimeError("injected pack failure on rank 1")
            return original_value(engine, entry, *args)

        SpectrumScorer.compute = failing_compute  # type: ignore[method-assign]
        md._local_value = failing_value
    mon = make_monitor()
    try:
        d = data(rank)
        for rows, labels in d["emb"]:
            mon.observe("emb", rows, labels=labels)
        mon.observe("only0", data(0)["only0"])     # both ranks feed the same only0 rows
        first = mon.step()
        second = mon.step()
        result = {"first": snapshot_values(first), "second": snapshot_values(second)}
    finally:
        mon.close()
    _finish(Path(out), rank, result)


def _train_watched(mon: Monitor, net: nn.Module, rank: int) -> dict[str, Any]:
    """Watch the wrapped ``net`` (its output and activations), train on rank ``rank``'s inputs
    (lr 0: the weights stay the reference's), publish; the snapshot and stream names."""
    mon.watch(net)
    mon.watch_activations(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    for x in data(rank)["inputs"]:
        opt.zero_grad()
        net(x).sum().backward()
        opt.step()
    snap = mon.step()
    return {"snap": snapshot_values(snap), "streams": sorted(c.stream for c in mon._captures)}


def worker_ddp(rank: int, world: int, port: int, out: str) -> None:
    """DDP-wrapped model: hooks on the wrapped submodules, names without ``module.``; only
    (local) rank 0 starts the HTTP server."""
    _init(rank, world, port)
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(model())
    mon = make_monitor(port=0)
    try:
        result = {**_train_watched(mon, ddp, rank), "url": mon.url}
    finally:
        mon.close()
    # per_rank: local values with a rank label, no collectives (rank 1 publishes twice)
    from exporters.prometheus import make_registry, render

    local = Monitor(run="dist", every=1, max_rows=512, window=1024, port=None, per_rank=True)
    try:
        for rows, _ in data(rank)["emb"]:
            local.observe("emb", rows)
        per_rank = [local.step() for _ in range(1 + rank)][-1]
        result["per_rank"] = snapshot_values(per_rank)
        result["per_rank_rank"] = per_rank.rank
        result["exposition"] = render(make_registry(lambda: [per_rank])).decode()
    finally:
        local.close()
    _finish(Path(out), rank, result)


def worker_fsdp(rank: int, world: int, port: int, out: str) -> None:
    """FSDP2 (``fully_shard`` on each Linear and the root, a CPU device mesh, gloo): hooks on the
    sharded submodules fire, names are as in the bare model, values are the global ones. (FSDP1,
    the ``_fsdp_wrapped_module`` wrapper, refuses to run without an accelerator.)"""
    _init(rank, world, port)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    net = model()
    for sub in net:
        if isinstance(sub, nn.Linear):
            fully_shard(sub, mesh=mesh)
    fully_shard(net, mesh=mesh)
    mon = make_monitor()
    try:
        result = {**_train_watched(mon, net, rank), "sharded": type(net).__name__}
    finally:
        mon.close()
    _finish(Path(out), rank, result)
