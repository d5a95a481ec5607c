"""torch.distributed: exact global metrics across two gloo ranks on the CPU.

Each test spawns two processes (``torch.multiprocessing``, free loopback port, bounded joins,
always torn down) running a worker from :mod:`tests.dist_workers`; the reference is one plain
Monitor fed every rank's rows in this process.
"""

from __future__ import annotations

import math
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
import torch
import torch.multiprocessing as mp
from torch import nn

from monitor.engine.distributed import named_modules, unwrap, world
from tests import dist_workers as dw

WORLD = 2
JOIN_S = 150.0
REL = 1e-6


def spawn(worker: Callable[..., None], tmp_path: Path) -> list[dict[str, Any]]:
    """Run ``worker`` on two ranks; fail (and kill them) after ``JOIN_S`` seconds."""
    ctx = mp.spawn(worker, args=(WORLD, dw.free_port(), str(tmp_path)), nprocs=WORLD,
                   join=False)
    deadline = time.monotonic() + JOIN_S
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"ranks still running after {JOIN_S:.0f} s (a hang)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def close(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=REL, abs_tol=1e-12)


def assert_same(got: dict[str, float], want: dict[str, float], keys: list[str]) -> None:
    for key in keys:
        assert key in got and key in want, (key, sorted(got), sorted(want))
        assert close(got[key], want[key]), (key, got[key], want[key])


def reference(ranks: list[int]) -> Any:
    """One process, every given rank's rows."""
    mon = dw.make_monitor()
    net = dw.model()
    mon.watch_activations(net)
    try:
        dw.feed(mon, net, ranks)
        return mon.step()
    finally:
        mon.close()


STREAM_KEYS = ["effective_rank", "embedding_std_ratio", "participation_ratio",
               "mean_cosine_similarity", "srank", "window_samples", "low_quality_samples_ratio",
               "qscore_threshold", "qscore_p10", "qscore_p50", "negative_values_ratio",
               "neural_collapse_nc1", "neural_collapse_nc2_equinorm",
               "neural_collapse_window_samples"]
LAYER_KEYS = ["dormant_units_ratio{tau=0}", "dormant_units_ratio{tau=0.1}",
              "low_activity_units_ratio", "never_active_units_ratio", "effective_rank",
              "window_samples"]


def test_not_distributed_by_default() -> None:
    assert world() is None


def test_unwrapped_names() -> None:
    class Wrapper(nn.Module):          # shaped like DDP: the wrapped model in .module
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.module = inner

    Wrapper.__name__ = "DistributedDataParallel"
    inner = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    inner.add_module("module", nn.Linear(3, 3))   # a user submodule really named "module"
    names = dict(named_modules(Wrapper(inner)))
    assert names["1"] is inner[1] and names["module"] is inner.module
    assert not any(n.startswith("module.") for n in names)
    assert unwrap(Wrapper(inner)) is inner
    mon = dw.make_monitor()
    try:
        wrapped = Wrapper(inner)
        assert mon.watch(wrapped).stream == "sequential"
        caps = mon.watch_activations(wrapped, names=["module.1"])     # a wrapped path works too
        assert [c.stream for c in caps] == ["1"]
        assert [c.stream for c in mon.watch_activations(wrapped)] == ["1"]
    finally:
        mon.close()


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_global_values_equal_one_process_on_all_rows(tmp_path: Path) -> None:
    ranks = spawn(dw.worker_exact, tmp_path)
    ref = reference([0, 1])
    ref0 = reference([0])                     # only0 has rows on rank 0 only
    for rank, res in enumerate(ranks):
        snap = res["first"]
        assert not snap["errors"], snap["errors"]
        assert_same(snap["streams"]["emb"], ref.streams["emb"], STREAM_KEYS)
        assert snap["counters"]["emb"]["samples"] == ref.counters["emb"]["samples"] == 330
        assert_same(snap["streams"]["only0"], ref0.streams["only0"],
                    ["effective_rank", "embedding_std_ratio", "window_samples"])
        for layer in ("1", "3"):
            assert_same(snap["layers"][layer], ref.layers[layer], LAYER_KEYS)
        # the local state stayed local: a second publish with no new rows is unchanged
        second = res["second"]
        assert_same(second["streams"]["emb"], snap["streams"]["emb"], STREAM_KEYS)
        assert second["counters"]["emb"]["samples"] == 330
        # manifest, one all_reduce, one all_gather per publish
        assert res["collectives"] == 6
    # the global value is not what either rank sees alone
    alone = reference([1])
    assert not close(ranks[1]["first"]["streams"]["emb"]["effective_rank"],
                     alone.streams["emb"]["effective_rank"])
    dormant = ref.layers["1"]
    assert dormant["dormant_units_ratio{tau=0}"] == 3 / 12                 # the dead units
    assert dormant["dormant_units_ratio{tau=0.1}"] > dormant["dormant_units_ratio{tau=0}"]


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_failing_rank_does_not_hang_and_is_counted(tmp_path: Path) -> None:
    r0, r1 = spawn(dw.worker_faults, tmp_path)
    ref = reference([0, 1])
    for snap in (r0["first"], r0["second"]):
        # rank 1's rows still count (only its compute failed)
        assert_same(snap["streams"]["emb"], ref.streams["emb"],
                    ["effective_rank", "window_samples", "neural_collapse_nc1"])
        # rank 1 failed to pack only0: the global window holds rank 0's copy only
        assert snap["streams"]["only0"]["window_samples"] == dw.ONLY0_ROWS
    assert "effective_rank" not in r1["first"]["streams"].get("emb", {})
    assert r1["first"]["errors"].get("scorer", 0) >= 1
    assert r1["first"]["errors"].get("distributed", 0) >= 1
    assert r1["second"]["streams"]["only0"]["window_samples"] == dw.ONLY0_ROWS
    assert not r0["first"]["errors"]


def _wrapped_model_reference() -> Any:
    """One process watching the bare model fed every rank's inputs (the wrapped runs' truth)."""
    net = dw.model()
    mon = dw.make_monitor()
    try:
        mon.watch(net)
        mon.watch_activations(net)
        for rank in range(WORLD):
            with torch.no_grad():
                for x in dw.data(rank)["inputs"]:
                    net(x)
        return mon.step()
    finally:
        mon.close()


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_ddp_hooks_rank0_server_and_per_rank(tmp_path: Path, promtool: str) -> None:
    r0, r1 = spawn(dw.worker_ddp, tmp_path)
    ref = _wrapped_model_reference()
    for res in (r0, r1):
        assert res["streams"] == ["1", "3", "sequential"]
        assert set(res["snap"]["layers"]) == {"1", "3"}
        assert_same(res["snap"]["streams"]["sequential"], ref.streams["sequential"],
                    ["effective_rank", "window_samples", "embedding_std_ratio"])
        assert_same(res["snap"]["layers"]["1"], ref.layers["1"], LAYER_KEYS)
    assert r0["url"] is not None and r1["url"] is None
    for rank, res in enumerate((r0, r1)):
        assert res["per_rank_rank"] == rank
        rows = sum(dw.STEP_SHARES[rank])
        assert res["per_rank"]["streams"]["emb"]["window_samples"] == rows
        samples = [smp for fam in text_string_to_metric_families(res["exposition"])
                   for smp in fam.samples]
        assert samples and all(smp.labels.get("rank") == str(rank) for smp in samples)
        assert any(smp.name == "repwatch_effective_rank"
                   and smp.labels == {"run": "dist", "stream": "emb", "rank": str(rank)}
                   for smp in samples)
        check = subprocess.run([promtool, "check", "metrics"], input=res["exposition"].encode(),
                               capture_output=True, timeout=60)
        assert check.returncode == 0, check.stderr.decode()


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_fsdp_hooks_names_and_global_values(tmp_path: Path) -> None:
    """FSDP2 (each Linear and the root sharded, gloo on the CPU): the watched streams and layers
    are named as in the bare model, and their values are the global ones."""
    r0, r1 = spawn(dw.worker_fsdp, tmp_path)
    ref = _wrapped_model_reference()
    for res in (r0, r1):
        assert res["sharded"].startswith("FSDP")                           # really sharded
        assert res["streams"] == ["1", "3", "sequential"]
        assert set(res["snap"]["layers"]) == {"1", "3"}
        assert_same(res["snap"]["streams"]["sequential"], ref.streams["sequential"],
                    ["effective_rank", "window_samples", "embedding_std_ratio"])
        assert_same(res["snap"]["layers"]["1"], ref.layers["1"], LAYER_KEYS)
