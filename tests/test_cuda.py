"""CUDA: the capture + update path never synchronises the GPU; values match the CPU path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from monitor import Monitor

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_update_path_has_no_host_sync() -> None:
    dev = torch.device("cuda")
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(2)).to(dev)
    enc = nn.Linear(64, 128).to(dev)
    mon = Monitor(run="cuda", port=None, every=1000, max_rows=64, window=1024)
    mon.watch(model[1], name="conv")                       # (b, C, H, W) → pooled rows
    mon.watch(enc, name="enc")
    x = torch.randn(256, 3, 10, 10, device=dev)
    h = torch.randn(256, 64, device=dev)
    h[0, 0] = float("nan")                                 # non-finite row: counted, no sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):                                # wraps the window (20×64 > 1024)
            model(x)
            enc(h)
            mon.observe("tokens", torch.randn(32, 9, 128, device=dev))
            mon.step()                                     # no publish on this cadence
    finally:
        torch.cuda.set_sync_debug_mode("default")
    snap = mon.publish()                                   # the one sync happens here
    assert snap.errors == {}, snap.errors
    # the window is full; sampled copies of the NaN row are counted and left out
    nonfinite = snap.get("nonfinite_values", "enc")
    assert nonfinite > 0
    assert 1024 - 20 <= snap.get("window_samples", "enc") <= 1024
    assert 1.0 < snap.get("effective_rank", "conv") <= 16
    mon.close()


def test_full_signal_set_update_path_has_no_host_sync() -> None:
    """Activations (plasticity), step labels (neural collapse), an evaluation stream with
    predictions (Q-Score AUPRC) and a generator/real pair: still no sync between publishes."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.GELU(),
                        nn.Linear(64, 10)).to(dev)
    mon = Monitor(run="cuda-full", port=None, every=1000, max_rows=128, window=512)
    mon.watch(net[2], name="hidden")
    mon.watch_activations(net)
    mon.pair("fake", "real", reservoir=256)
    x = torch.randn(256, 32, device=dev)
    y = torch.randint(0, 10, (256,), device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(8):
            logits = net(x)
            mon.observe("eval", torch.relu(logits), labels=y, predictions=logits.argmax(1))
            mon.observe("fake", torch.randn(128, 2, device=dev))
            mon.observe("real", torch.randn(128, 2, device=dev))
            mon.step(labels=y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    snap = mon.publish()
    assert snap.errors == {}, snap.errors
    assert set(snap.layers) == {"1", "3"}
    for key in ("neural_collapse_nc1", "low_quality_samples_ratio"):
        assert key in snap.streams["hidden"], key
    assert "qscore_auprc" in snap.streams["eval"]
    assert "generator_diversity_ratio" in snap.streams["fake"]
    mon.close()


def test_gpu_values_match_cpu() -> None:
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2000, 96, generator=gen) @ torch.randn(96, 96, generator=gen)
    snaps = []
    for dev in ("cpu", "cuda"):
        mon = Monitor(port=None, every=1, max_rows=500, window=2048)
        for chunk in z.to(dev).split(500):
            mon.observe("z", chunk)
        snaps.append(mon.publish())
        mon.close()
    for key, value in snaps[0].streams["z"].items():
        other = snaps[1].streams["z"][key]
        assert other == pytest.approx(value, rel=1e-6, nan_ok=True), key
