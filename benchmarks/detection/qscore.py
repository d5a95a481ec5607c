"""Supervised trainings on digits, clean and with label noise: does the Q-Score alert mean anything?

The CNN backbone of :mod:`benchmarks.detection.ssl` with a linear classifier, trained with
cross-entropy (SGD, lr 0.05, momentum 0.9, batch 128, 400 steps). repwatch watches the backbone
output (post-ReLU average pool: non-negative, where Q-Score is defined) with its defaults, Q-Score
included. Settings: ``clean`` labels; ``noise40`` and ``noise80``: that share of the training
labels replaced by uniform random ones once, before training (a classic way to make many
training samples "low quality").

Ground truth on held-out images every ``probe_every`` steps: the classifier's error rate, and the
AUPRC of "low Q-Score → misclassified" (Q-Score of the held-out backbone features,
:func:`monitor.functional.qscore.qscore`, ranked by ``sklearn.metrics.average_precision_score``)
against the error rate, which is the AUPRC of a random ranking. Kalibhat et al. (AAAI 2024) claim
low Q-Score predicts misclassification; the alert is worth keeping only if it does here.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.detection.ssl import Backbone, augment, load_digits_split
from benchmarks.detection.trace import Label, Trace

__all__ = ["SETTINGS", "run_qscore"]

SETTINGS: dict[str, tuple[Label, float]] = {
    "clean": ("healthy", 0.0),
    "noise40": ("noisy", 0.4),
    "noise80": ("noisy", 0.8),
}
PAPER = "Kalibhat et al., AAAI 2024 (Q-Score)"


@torch.no_grad()
def _held_out(backbone: nn.Module, head: nn.Module, x: torch.Tensor, y: torch.Tensor
              ) -> dict[str, float]:
    from sklearn.metrics import average_precision_score

    from monitor.functional.qscore import qscore

    backbone.eval()
    head.eval()
    f = backbone(x)
    wrong = (head(f).argmax(1) != y).numpy()
    backbone.train()
    head.train()
    q = qscore(f.double()).numpy()
    err = float(wrong.mean())
    ok = np.isfinite(q)
    ap = (float(average_precision_score(wrong[ok], -q[ok]))
          if 0 < wrong[ok].sum() < ok.sum() else float("nan"))
    return {"error_rate": err, "qscore_auprc": ap}


def run_qscore(setting: str, seed: int = 0, steps: int = 400, batch: int = 128,
               probe_every: int = 25, log: Callable[[str], None] | None = None) -> Trace:
    """Train ``setting`` with repwatch attached; return its trace."""
    from monitor import Monitor

    label, noise = SETTINGS[setting]
    torch.manual_seed(seed)
    xtr, ytr, xte, yte = load_digits_split(seed)
    g = torch.Generator().manual_seed(seed)
    flip = torch.rand(ytr.shape[0], generator=g) < noise
    ytr = torch.where(flip, torch.randint(0, 10, ytr.shape, generator=g), ytr)
    backbone, head = Backbone(), nn.Linear(64, 10)
    params = [*backbone.parameters(), *head.parameters()]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    mon = Monitor(run=f"{setting}-{seed}", port=None, seed=seed)
    mon.watch(backbone, name="backbone")
    trace = Trace("qscore", setting, seed, label, PAPER, mon.window, mon.peak_warmup, steps)
    t0 = time.perf_counter()
    trace.truth.append({"step": 0.0, **_held_out(backbone, head, xte, yte)})
    for step in range(1, steps + 1):
        idx = torch.randint(0, xtr.shape[0], (batch,), generator=g)
        loss = F.cross_entropy(head(backbone(augment(xtr[idx], g))), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        trace.record(mon.step())
        if step % probe_every == 0:
            row = {"step": float(step), **_held_out(backbone, head, xte, yte)}
            trace.truth.append(row)
            if log is not None:
                log(f"{setting}/{seed} step {step}: held-out error {row['error_rate']:.3f} "
                    f"Q-Score AUPRC {row['qscore_auprc']:.3f}")
    mon.close()
    trace.wall_seconds = time.perf_counter() - t0
    last = trace.truth[-1]
    aps = [r["qscore_auprc"] for r in trace.truth[1:] if r["qscore_auprc"] == r["qscore_auprc"]]
    errs = [r["error_rate"] for r in trace.truth[1:]]
    trace.outcome = {"error_final": last["error_rate"], "auprc_final": last["qscore_auprc"],
                     "auprc_mean": float(np.mean(aps)) if aps else float("nan"),
                     "error_mean": float(np.mean(errs)),
                     "auprc_lift": (float(np.mean(aps)) - float(np.mean(errs))) if aps else float("nan")}
    return trace
