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


def test_side_stream_values_match_the_training_stream_and_the_cpu() -> None:
    """Scoring on repwatch's side stream gives the values of scoring on the training stream
    (and of the CPU), while the training stream keeps overwriting the captured tensors in
    place right after the hook (which only a missing copy/wait would let the side stream see)."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2000, 96, generator=gen) @ torch.randn(96, 96, generator=gen)
    snaps = {}
    for dev, side in (("cpu", False), ("cuda", False), ("cuda", True)):
        enc = nn.Identity()
        mon = Monitor(port=None, every=1000, max_rows=500, window=2048, cuda_stream=side)
        mon.watch(enc, name="z")
        for chunk in z.to(dev).split(500):
            out = enc(chunk.clone())
            out.mul_(0.0).add_(1e6)                  # in place, after the hook: not scored
        snaps[(dev, side)] = mon.publish()
        assert (mon._side.streams != {}) == side
        mon.close()
    ref = snaps[("cpu", False)].streams["z"]
    for key in ("effective_rank", "srank", "participation_ratio", "embedding_std_ratio"):
        for k in (("cuda", False), ("cuda", True)):
            assert snaps[k].streams["z"][key] == pytest.approx(ref[key], rel=1e-6), (k, key)


def test_cuda_graph_replays_are_scored() -> None:
    """A forward captured in a CUDA graph: the hook runs once at capture (staging a copy into
    the graph); each replay refreshes the buffer and step() scores it, without a host sync."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48)).to(dev)
    static_x = torch.zeros(128, 32, device=dev)
    mon = Monitor(run="graph", port=None, every=1000, max_rows=128, window=1024)
    mon.watch(enc[2], name="enc")
    warm = torch.cuda.Stream()
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm), torch.no_grad():
        for _ in range(3):                                        # eager warm-up (captured too)
            enc(static_x)
    torch.cuda.current_stream().wait_stream(warm)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out = enc(static_x)
    assert "enc" in mon._staged
    mon.publish()                                                 # past the warm-up rows
    mon._engine.streams["enc"].moments.reset()
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(128, 32, generator=gen).to(dev) for _ in range(6)]
    outs = []
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x in xs:
            static_x.copy_(x)
            graph.replay()
            outs.append(static_out.clone())
            mon.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    snap = mon.publish()
    mon.close()
    assert snap.errors == {}, snap.errors
    z = torch.cat(outs).double()
    s = torch.linalg.svdvals(z)
    p = s / s.sum() + 1e-7
    ref = float(torch.exp(-(p * p.log()).sum()))
    assert snap.get("window_samples", "enc") == 6 * 128
    assert snap.get("effective_rank", "enc") == pytest.approx(ref, rel=1e-6)
