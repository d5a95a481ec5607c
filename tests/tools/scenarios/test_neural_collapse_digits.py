"""Scenario (Papyan, Han & Donoho, PNAS 2020): neural collapse in the terminal phase of training.

An MLP with BatchNorm (Papyan's networks have BN) is trained with SGD + momentum + weight decay
and a step learning-rate schedule (÷10 at 1/3 and 2/3, as in the paper) on scikit-learn's 8×8
digits, far past zero training error. The penultimate features of the whole training set are
fed, in batches, through the model in eval mode into ``NeuralCollapseScorer`` (the paper measures
on the training set with a fixed model). Expected: NC1 falls by orders of magnitude from
initialisation and by ≥ 10× from the start of the terminal phase (first zero training error) to
the end; NC4 (classifier vs nearest class centre) → 0; NC3 → small. The final NC1 is also checked
against an independent numpy two-pass computation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from monitor.tools.demo_model import load_digits_tensor
from monitor.scorers.neural_collapse import NeuralCollapseScorer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]

STEPS = 3000
BATCH = 128


def _measure(body: nn.Module, head: nn.Linear, x: torch.Tensor, y: torch.Tensor
             ) -> tuple[dict[str, float], float, np.ndarray]:
    """NC signals from the scorer fed the training set in batches; train error; features."""
    body.eval()
    scorer = NeuralCollapseScorer(64, max_classes=10, window=x.shape[0])
    with torch.no_grad():
        h = body(x)
        for hc, yc in zip(h.split(256), y.split(256)):
            scorer.update(hc, yc)
        out = {k: float(v) for k, v in scorer.compute(head.weight, head.bias).items()}
        err = float((head(h).argmax(1) != y).double().mean())
    body.train()
    return out, err, h.double().numpy()


def _numpy_nc1(h: np.ndarray, y: np.ndarray) -> float:
    """Two-pass Papyan NC1 with Σ_B's pseudo-inverse on its 9 non-zero eigenvalues."""
    mus = np.stack([h[y == c].mean(0) for c in range(10)])
    r = h - mus[y]
    sw = r.T @ r / len(h)
    m = mus - h.mean(0)
    lam, vec = np.linalg.eigh(m.T @ m / 10)
    top = np.argsort(lam)[::-1][:9]
    return float(np.trace(sw @ (vec[:, top] / lam[top]) @ vec[:, top].T) / 10)


def test_nc1_collapses_in_the_terminal_phase_on_digits() -> None:
    torch.manual_seed(0)
    x = load_digits_tensor()
    y = torch.as_tensor(load_digits().target)
    body = nn.Sequential(
        nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(),
        nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(),
        nn.Linear(256, 64), nn.BatchNorm1d(64), nn.ReLU(),          # penultimate features (64)
    )
    head = nn.Linear(64, 10)
    opt = torch.optim.SGD([*body.parameters(), *head.parameters()], lr=0.05, momentum=0.9,
                          weight_decay=5e-3)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [STEPS // 3, 2 * STEPS // 3], 0.1)
    gen = torch.Generator().manual_seed(0)

    init, init_err, _ = _measure(body, head, x, y)
    tpt_start: dict[str, float] | None = None
    tpt_step = -1
    for step in range(1, STEPS + 1):
        idx = torch.randint(0, len(y), (BATCH,), generator=gen)
        loss = nn.functional.cross_entropy(head(body(x[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if tpt_start is None and step % 50 == 0:
            out, err, _ = _measure(body, head, x, y)
            if err == 0.0:
                tpt_start, tpt_step = out, step
    late, late_err, h = _measure(body, head, x, y)

    print(f"\nNC1 init {init['neural_collapse_nc1']:.4g} (train err {init_err:.3f}); "
          f"TPT start step {tpt_step}: {tpt_start and tpt_start['neural_collapse_nc1']:.4g}; "
          f"step {STEPS}: {late['neural_collapse_nc1']:.4g}; NC4 {init['neural_collapse_nc4']:.3g}"
          f" -> {late['neural_collapse_nc4']:.3g}; NC3 {init['neural_collapse_nc3']:.3g} -> "
          f"{late['neural_collapse_nc3']:.3g}; NC2 equinorm {init['neural_collapse_nc2_equinorm']:.3g}"
          f" -> {late['neural_collapse_nc2_equinorm']:.3g}, max-angle "
          f"{init['neural_collapse_nc2_max_angle']:.3g} -> {late['neural_collapse_nc2_max_angle']:.3g}")
    assert tpt_start is not None and 0 < tpt_step < STEPS // 3        # a long terminal phase
    assert late_err == 0.0
    assert late["neural_collapse_classes"] == 10.0
    assert late["neural_collapse_window_samples"] == 1797.0
    # NC1: orders of magnitude from init, ≥ 10× within the terminal phase
    assert late["neural_collapse_nc1"] < init["neural_collapse_nc1"] / 100
    assert late["neural_collapse_nc1"] < tpt_start["neural_collapse_nc1"] / 10
    assert late["neural_collapse_nc1"] == pytest.approx(_numpy_nc1(h, y.numpy()), rel=1e-6)
    # NC4 → 0; NC3 and NC2 max-angle shrink
    assert init["neural_collapse_nc4"] > 0.5 and late["neural_collapse_nc4"] <= 0.005
    assert late["neural_collapse_nc3"] < init["neural_collapse_nc3"] / 10
    assert late["neural_collapse_nc2_max_angle"] < init["neural_collapse_nc2_max_angle"] / 2
