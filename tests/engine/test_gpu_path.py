"""The GPU path's pieces that a CPU can check: half-precision capture accumulates in float64
against a numpy float64 reference, CUDA-graph staging scores what each replay leaves in the
static buffer, and the side-stream machinery is inert on the CPU. tests/test_cuda.py runs the
same paths on a GPU (side stream, real CUDA graphs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import monitor.capture.hooks as hooks_mod
from monitor import Monitor

pytestmark = pytest.mark.usefixtures("single_thread")


def _rankme_np(z: np.ndarray) -> float:
    """RankMe (Garrido et al. 2023) of the rows ``z``, numpy float64, paper convention."""
    s = np.linalg.svd(z.astype(np.float64), compute_uv=False)
    p = s / s.sum() + 1e-7
    return float(np.exp(-(p * np.log(p)).sum()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tokens_are_pooled_and_scored_in_higher_precision(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    scale = torch.arange(1, 65, dtype=torch.float32) ** -0.7
    # (b, T, d) tokens with a large common offset: a half-precision running sum over 196
    # tokens loses most of the per-sample signal, a float32 one does not.
    tokens = (torch.randn(96, 196, 64, generator=gen) * scale + 4.0).to(dtype)
    mon = Monitor(run="half", port=None, every=1, max_rows=96, window=96, qscore=False)
    try:
        mon.observe("tok", tokens)
        snap = mon.step()
    finally:
        mon.close()
    assert snap is not None and snap.errors == {}
    ref_rows = tokens.double().numpy().mean(axis=1)                  # (b, d) float64
    ref = _rankme_np(ref_rows)
    got = snap.get("effective_rank", "tok")
    assert got == pytest.approx(ref, rel=1e-4)
    # The reduction in the tensor's own dtype is measurably further from the reference.
    naive = _rankme_np(tokens.mean(dim=1).double().numpy())
    assert abs(naive - ref) > 10 * abs(got - ref)


def test_bf16_autocast_conv_capture_matches_float64_reference() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 48, 3))
    x = torch.randn(64, 3, 16, 16)
    mon = Monitor(run="amp", port=None, every=1, max_rows=64, window=64, qscore=False)
    seen: list[torch.Tensor] = []
    net[2].register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    mon.watch(net[2], name="conv")
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            net(x)
        snap = mon.step()
    finally:
        mon.close()
    (out,) = seen
    assert out.dtype == torch.bfloat16                                # autocast really ran
    ref = _rankme_np(out.double().mean(dim=(2, 3)).numpy())
    assert snap is not None and snap.errors == {}
    assert snap.get("effective_rank", "conv") == pytest.approx(ref, rel=1e-5)


def test_graph_captured_hook_scores_each_replays_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated capture (a CPU cannot capture CUDA graphs): while "capturing", the hook only
    stages a copy; each step() then scores whatever the buffer holds, as after a replay."""
    enc = nn.Linear(16, 32)
    mon = Monitor(run="graph", port=None, every=3, max_rows=64, window=256, qscore=False)
    mon.watch(enc, name="enc")
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(64, 16, generator=gen) for _ in range(3)]
    try:
        monkeypatch.setattr(hooks_mod, "graph_capturing", lambda t: True)
        with torch.no_grad():
            enc(batches[0])                                          # "capture": staged only
        monkeypatch.setattr(hooks_mod, "graph_capturing", lambda t: False)
        buf = mon._staged["enc"]
        assert mon._engine.streams == {}                             # nothing scored yet
        rows = []
        mon._captures[0].enabled = False          # a replay runs no Python hooks
        for x in batches:                                            # "replays" refill buf
            with torch.no_grad():
                out = enc(x)
            buf.copy_(out)                                           # what the graph's copy does
            rows.append(out.clone())
            snap = mon.step()
    finally:
        mon.close()
    assert snap is not None and snap.errors == {}
    ref = _rankme_np(torch.cat(rows).numpy())
    assert snap.get("window_samples", "enc") == 3 * 64
    assert snap.get("effective_rank", "enc") == pytest.approx(ref, rel=1e-6)


def test_activation_layers_refuse_graph_capture_with_a_counted_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    mon = Monitor(run="graph-act", port=None, every=1, qscore=False)
    mon.watch_activations(net)
    monkeypatch.setattr(hooks_mod, "graph_capturing", lambda t: True)
    try:
        with torch.no_grad():
            out = net(torch.randn(4, 8))                            # training goes on
        assert out.shape == (4, 8)
        snap = mon.step()
    finally:
        mon.close()
    assert snap is not None and sum(snap.errors.values()) == 1


def test_side_stream_is_inert_on_the_cpu() -> None:
    mon = Monitor(run="side", port=None, every=1, qscore=False, cuda_stream=True)
    try:
        mon.observe("z", torch.randn(32, 8))
        snap = mon.step()
    finally:
        mon.close()
    assert snap is not None and mon._side.streams == {}
    assert snap.get("window_samples", "z") == 32
