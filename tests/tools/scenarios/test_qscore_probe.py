"""Measurement (Kalibhat et al. 2022/2024): does low Q-Score find the samples a linear probe gets
wrong, on a real self-supervised training run?

Setup: the demo SimSiam (``monitor.tools.demo_model``) trained ``STEPS`` steps on scikit-learn's
digits (seeded); representation = the backbone output (post-ReLU, 128-d: the layer a linear probe
reads), eval mode, on all 1797 images. Probe: multinomial logistic regression on standardised
features (torch LBFGS, L2 1e-3), cross-fitted over 5 stratified folds so that every image's
prediction comes from a probe that never saw it (held out). Positives = misclassified images.

At this scale the paper's form need NOT beat chance, so nothing here asserts that it does. The
test asserts what is robustly true — the probe learned something and made some errors, every
AUPRC is a valid number in [0, 1], and ``monitor.functional.auprc``, the scorer's
``qscore_auprc`` and ``sklearn.metrics.average_precision_score`` agree — and prints the measured
numbers (``pytest -s``; also recorded as junit properties). ``REPWATCH_QSCORE_SEEDS=0,1,2,3,4``
runs more seeds and ``REPWATCH_QSCORE_STEPS`` changes the training length (docs/qscore.md gives
the numbers and the command). ``auprc_random_p95`` is the 95th percentile of the AUPRC of 200
random rankings of the same errors: the level a score must clear to beat chance.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.metrics import average_precision_score
from sklearn.model_selection import StratifiedKFold

from monitor.tools.demo_model import build, train_step
from monitor.functional.qscore import auprc, qscore
from monitor.scorers.qscore import QScoreScorer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]

STEPS = int(os.environ.get("REPWATCH_QSCORE_STEPS", "300"))
FORMS = ("linf_over_l1", "scale_free", "max_z", "l1")
SEEDS = [int(s) for s in os.environ.get("REPWATCH_QSCORE_SEEDS", "0").split(",")]


def _probe(x: torch.Tensor, y: torch.Tensor, classes: int = 10, l2: float = 1e-3):  # type: ignore[no-untyped-def]
    """Fit multinomial logistic regression on standardised ``x``; return a predict function."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    w = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy((x - mu) / sd @ w + b, y) + l2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda z: ((z - mu) / sd @ w + b).detach()


def _held_out_logits(feats: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
    logits = torch.empty(len(y), 10, dtype=torch.float64)
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    for train, test in folds.split(np.zeros(len(y)), y.numpy()):
        tr, te = torch.from_numpy(train), torch.from_numpy(test)
        logits[te] = _probe(feats[tr], y[tr])(feats[te])
    return logits


@pytest.mark.parametrize("seed", SEEDS)
def test_qscore_auprc_on_simsiam_digits(seed: int, record_property) -> None:  # type: ignore[no-untyped-def]
    setup = build(seed=seed)
    for _ in range(STEPS):
        train_step(setup)
    setup.model.eval()
    with torch.no_grad():
        feats = setup.model.backbone(setup.data).double()            # (1797, 128), post-ReLU
    y = torch.from_numpy(load_digits().target)
    logits = _held_out_logits(feats, y, seed)
    wrong = (logits.argmax(1) != y).numpy()
    err = float(wrong.mean())
    assert 0.0 < err < 0.5, err                     # the probe learned something, made errors

    x = feats.numpy()
    hoyer = math.sqrt(x.shape[1]) * np.linalg.norm(x, axis=1) / np.abs(x).sum(1)  # L2/L1 alone
    measured = {"error_rate": err, "errors": int(wrong.sum()),
                "auprc_l2_over_l1_only": float(average_precision_score(wrong, -hoyer))}
    for form in FORMS:
        q = qscore(feats, form)
        assert torch.isfinite(q).all()
        ours = auprc(-q, torch.from_numpy(wrong)).item()
        ref = float(average_precision_score(wrong, -q.numpy()))
        assert 0.0 <= ours <= 1.0 and ours == pytest.approx(ref, rel=1e-12)
        # the monitor path: streamed eval pairs give the same number
        sc = QScoreScorer(window=2048, form=form)
        for idx in torch.arange(len(y)).split(256):
            sc.update(feats[idx], y[idx], logits[idx])
        got = sc.compute()
        assert got["qscore_auprc"].item() == pytest.approx(ref, rel=1e-12)
        assert got["qscore_misclassified_ratio"].item() == pytest.approx(err, rel=1e-12)
        measured[f"auprc_{form}"] = ours
    gen = torch.Generator().manual_seed(seed)
    chance = [auprc(torch.rand(len(y), generator=gen, dtype=torch.float64),
                    torch.from_numpy(wrong)).item() for _ in range(200)]
    measured["auprc_random_p95"] = float(np.quantile(chance, 0.95))
    for key, value in measured.items():
        record_property(f"seed{seed}_{key}", value)
    print(f"\n[qscore probe] seed={seed} steps={STEPS} n={len(y)} "
          + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in measured.items())
          + " | AUPRC/base: " + " ".join(f"{f}={measured[f'auprc_{f}'] / err:.2f}" for f in FORMS))
