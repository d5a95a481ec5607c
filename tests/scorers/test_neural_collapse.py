"""NeuralCollapseScorer: window values (NC1–NC4, with a classifier) equal slow numpy two-pass
references; streaming equals one batch; state, input errors, no host sync. The sliding window,
absent classes, bad labels and non-finite rows (NC1/NC2 and the counters against a reference,
through wraparound) are tests/test_streaming_parity.py's."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from monitor.scorers.neural_collapse import NeuralCollapseScorer


# Slow numpy references, two-pass, from the Papyan et al. definitions (explicit loops).


def ref_signals(h: np.ndarray, y: np.ndarray, num_classes: int,
                w: np.ndarray | None = None, b: np.ndarray | None = None) -> dict[str, float]:
    h = h.astype(np.float64)
    present = [c for c in range(num_classes) if np.any(y == c)]
    mus = {c: h[y == c].mean(axis=0) for c in present}
    mu_g = h.mean(axis=0)
    n, d = h.shape
    sw = sum(np.outer(h[i] - mus[int(y[i])], h[i] - mus[int(y[i])]) for i in range(n)) / n
    c = len(present)
    mt = np.stack([mus[k] - mu_g for k in present])
    sb = mt.T @ mt / c
    lam, vec = np.linalg.eigh(sb)
    top = np.argsort(lam)[::-1][: c - 1]
    out = {"neural_collapse_nc1": float(np.trace(sw @ (vec[:, top] / lam[top]) @ vec[:, top].T) / c)}
    norms = np.linalg.norm(mt, axis=1)
    out["neural_collapse_nc2_equinorm"] = float(np.std(norms, ddof=1) / np.mean(norms))
    cos = [mt[i] @ mt[j] / (norms[i] * norms[j]) for i in range(c) for j in range(i + 1, c)]
    out["neural_collapse_nc2_equiangularity"] = float(np.std(cos, ddof=1))
    out["neural_collapse_nc2_max_angle"] = float(np.mean([abs(x + 1 / (c - 1)) for x in cos]))
    out["neural_collapse_classes"] = float(c)
    out["neural_collapse_window_samples"] = float(n)
    if w is not None:
        wp = w[present]
        out["neural_collapse_nc3"] = float(np.sum((wp / np.linalg.norm(wp) - mt / np.linalg.norm(mt)) ** 2))
        bad = 0
        for x in h:
            pred = int(np.argmax(w @ x + b))
            ncc = min(present, key=lambda k: (float(np.sum((x - mus[k]) ** 2)), k))
            bad += pred != ncc
        out["neural_collapse_nc4"] = bad / n
    return out


def make_stream(n: int, d: int, num_classes: int, seed: int, within: float = 1.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, d)) * 2.0
    y = rng.integers(0, num_classes, size=n)
    h = (centres[y] + within * rng.normal(size=(n, d))).astype(np.float32)
    return h, y


def signals(scorer: NeuralCollapseScorer, **kw) -> dict[str, float]:  # type: ignore[no-untyped-def]
    return {k: float(v) for k, v in scorer.compute(**kw).items()}


def test_window_matches_reference_and_streaming_equals_one_batch() -> None:
    h, y = make_stream(300, 10, 5, seed=0)
    rng = np.random.default_rng(1)
    w, b = rng.normal(size=(5, 10)).astype(np.float32), rng.normal(size=5).astype(np.float32)
    one = NeuralCollapseScorer(10, max_classes=5, window=400)
    one.update(torch.from_numpy(h), torch.from_numpy(y))
    many = NeuralCollapseScorer(10, max_classes=5, window=400)
    for hc, yc in zip(torch.from_numpy(h).split(23), torch.from_numpy(y).split(23)):
        many.update(hc, yc)
    kw = {"weight": torch.from_numpy(w), "bias": torch.from_numpy(b)}
    a, m = signals(one, **kw), signals(many, **kw)
    ref = ref_signals(h, y, 5, w.astype(np.float64), b.astype(np.float64))
    for key, value in ref.items():
        assert a[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
        assert m[key] == pytest.approx(a[key], rel=1e-12, abs=1e-14), key
    assert 0.0 < ref["neural_collapse_nc4"] < 1.0      # a non-trivial NC4 is being compared
    assert a["labels_out_of_range"] == 0.0


def test_update_does_not_sync_and_compute_returns_device_tensors() -> None:
    s = NeuralCollapseScorer(4, max_classes=3, window=16)
    out = s.compute()
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in out.values())
    assert math.isnan(float(out["neural_collapse_nc1"]))          # empty window
    assert float(out["neural_collapse_window_samples"]) == 0.0
    s.update(torch.randn(5, 4), torch.zeros(5, dtype=torch.long))
    assert math.isnan(float(s.compute()["neural_collapse_nc1"]))  # one class only
    assert s.reductions["out_of_range"] == "sum" and s.reductions["ring"] == "none"


def test_reset_and_state_dict_roundtrip() -> None:
    h, y = make_stream(50, 4, 3, seed=4)
    s = NeuralCollapseScorer(4, max_classes=3, window=32)
    s.update(torch.from_numpy(h[:20]), torch.from_numpy(y[:20]))
    state = s.state_dict()
    t = NeuralCollapseScorer(4, max_classes=3, window=32)
    t.load_state_dict(state)
    s.update(torch.from_numpy(h[20:]), torch.from_numpy(y[20:]))
    t.update(torch.from_numpy(h[20:]), torch.from_numpy(y[20:]))
    assert signals(s)["neural_collapse_nc1"] == signals(t)["neural_collapse_nc1"]
    ref = ref_signals(h[-32:], y[-32:], 3)
    assert signals(t)["neural_collapse_nc1"] == pytest.approx(ref["neural_collapse_nc1"], rel=1e-9)
    s.reset()
    assert signals(s)["neural_collapse_window_samples"] == 0.0


def test_bad_input_raises_clear_errors() -> None:
    with pytest.raises(ValueError, match="max_classes must be an int >= 2, got 1"):
        NeuralCollapseScorer(4, max_classes=1, window=8)
    with pytest.raises(ValueError, match="window must be an int >= 2"):
        NeuralCollapseScorer(4, max_classes=3, window=1)
    s = NeuralCollapseScorer(4, max_classes=3, window=8)
    with pytest.raises(ValueError, match=r"rows of shape \(b, 4\), got \(2, 5\)"):
        s.update(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels of shape \(2,\), got \(3,\)"):
        s.update(torch.zeros(2, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="integer labels"):
        s.update(torch.zeros(2, 4), torch.zeros(2))
    with pytest.raises(ValueError, match=r"classifier weight of shape \(3, 4\), got \(2, 4\)"):
        s.compute(weight=torch.zeros(2, 4))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_update_has_no_host_sync_and_matches_cpu() -> None:
    h, y = make_stream(700, 16, 6, seed=6)
    y[::50] = 17                                             # out of range: counted on device
    h[3, 1] = np.nan
    cpu = NeuralCollapseScorer(16, max_classes=6, window=512)
    gpu = NeuralCollapseScorer(16, max_classes=6, window=512, device="cuda")
    hd, yd = torch.from_numpy(h).cuda(), torch.from_numpy(y).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for hc, yc in zip(hd.split(64), yd.split(64)):
            gpu.update(hc, yc)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for hc, yc in zip(torch.from_numpy(h).split(64), torch.from_numpy(y).split(64)):
        cpu.update(hc, yc)
    a, b = signals(cpu), signals(gpu)
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key
