"""Q-Score (per-sample representation quality), its regulariser, AUPRC and histogram helpers.

Q-Score: Kalibhat, Narang, Firooz, Sanjabi & Feizi, "Measuring Self-Supervised Representation
Quality for Downstream Classification using Discriminative Features" (arXiv 2203.01881, AAAI
2024; v1 "Understanding Failure Modes of Self-Supervised Learning"). The paper reports that low
Q predicts which samples a linear probe misclassifies (AUPRC up to 0.91 on ImageNet-100).

**The exact form is UNVERIFIED** (docs/metrics.md §4): the full text could not be retrieved, so this
module implements the *monitor definition* of docs/metrics.md §4 — the most likely form consistent
with the abstract — and keeps the form and its constants configurable. Verify against §"Q-Score"
of arXiv 2203.01881v6 before treating the numbers as the paper's.

Everything here is device-only (no host synchronisation): masks are multiplied in, counts stay
tensors, and sizes come from shapes. :func:`qscore` and :func:`feature_zscores` are array-API
(numpy arrays or torch tensors; the implementation is torch-free, in
:mod:`monitor.functional.qscore_window`); the regulariser and AUPRC are torch code.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from monitor.functional._xp import Array
from monitor.functional.qscore_window import QSCORE_FORMS as _FORMS
from monitor.functional.qscore_window import (
    check_qscore_rows,
    qscore_parts,
    qscore_rows,
    row_zscores,
)

QScoreForm = Literal["linf_over_l1", "scale_free", "max_z", "l1"]
QSCORE_FORMS: tuple[str, ...] = _FORMS
"""Implemented forms: the paper's most likely form, the scale-robust companion, two ablations."""


def _as_rows(z: Array, what: str = "z") -> Array:
    return check_qscore_rows(z, what)


def _check_form(form: str) -> None:
    if form not in QSCORE_FORMS:
        raise ValueError(f"form must be one of {list(QSCORE_FORMS)}, got {form!r}")


def feature_zscores(z: Array, eps2: float = 1e-8) -> Array:
    """Within-sample z-scores ``ζ_ij = (z_ij − mean_j z_ij) / (std_j z_ij + eps2)`` (ddof 0).

    ``z`` is ``(n, d)`` (a torch tensor or a numpy array); the mean and std run over the d
    features of each row (not over the batch). Returns ``(n, d)`` in ``z``'s dtype and
    namespace. A constant row gives ζ = 0.
    """
    return row_zscores(_as_rows(z), eps2)


def _qscore_parts(z: Array, eps2: float) -> tuple[Array, Array, Array, Array]:
    """(x, finite rows, max_j ζ, ‖x‖₁) in float64 with non-finite rows zeroed."""
    return qscore_parts(_as_rows(z), eps2)


def qscore(z: Array, form: QScoreForm = "linf_over_l1", eps1: float = 1e-8,
           eps2: float = 1e-8) -> Array:
    """Per-sample Q-Score of representations ``z`` (n, d) → ``(n,)`` float64. UNVERIFIED form.

    With ``ζ_ij`` the within-sample z-scores (:func:`feature_zscores`, ddof 0, ``+eps2`` on the
    std), docs/metrics.md §4 "monitor definition":

    * ``"linf_over_l1"`` (default; the paper's most likely form, Kalibhat et al. 2022/2024):
      ``q_i = max_j ζ_ij / (‖z_i‖₁ + eps1)``. High q = a few strongly deviating features on a
      sparse, low-L1 representation; low q predicts misclassification. NOT scale-invariant:
      ``‖z‖₁`` follows the feature norm (docs/metrics.md §4 pitfall 1).
    * ``"scale_free"`` (docs/metrics.md §4 scale-robust companion, a design of that note, not the
      paper): ``q'_i = max_j ζ_ij · sqrt(d) / (‖z_i‖₁/‖z_i‖₂)``, computed as
      ``max ζ · sqrt(d) · ‖z_i‖₂ / (‖z_i‖₁ + eps1)`` so a zero row scores 0.
    * ``"max_z"`` (ablation): ``max_j ζ_ij`` alone.
    * ``"l1"`` (ablation): ``1 / (‖z_i‖₁ + eps1)`` — L1 alone, oriented like Q (low = large L1).

    ``max_j ζ_ij`` is the signed maximum; the paper's ``‖ζ‖_∞`` (max |ζ|) differs only when the
    most deviating feature lies below the row mean, which is rare for the non-negative, post-ReLU
    features Q is meant for (pitfall 2). Rows containing NaN/Inf get a NaN score. Computed in
    float64.

    Array-API: a torch tensor gives a tensor on its device, a numpy array a numpy array (one
    implementation, :func:`monitor.functional.qscore_window.qscore_rows`, torch-free; the
    sidecar scores its sketched streams' original rows with it, and the ONNX kernel is exported
    from it).
    """
    _check_form(form)
    return qscore_rows(z, form, eps1, eps2)


def qscore_regularizer(z: Tensor, lambda1: float = 1e-3, lambda2: float = 1e-2,
                       form: Literal["linf_over_l1", "scale_free"] = "linf_over_l1",
                       threshold: Tensor | float | None = None, eps1: float = 1e-8,
                       eps2: float = 1e-8) -> Tensor:
    """Differentiable Q-Score regulariser (a term to ADD to the loss), mean over the batch.

    UNVERIFIED (docs/metrics.md §4): the paper fine-tunes a pre-trained encoder with a term that
    pushes Q up; its most likely form is ``λ₁‖z_i‖₁ − λ₂ max_j ζ_ij`` per sample. The λ values
    are not known — the defaults here are placeholders of the right sign, to be tuned per model
    (‖z‖₁ grows like d, max ζ like sqrt(2 ln d)).

    * ``form="linf_over_l1"``: ``R = mean_i [λ₁ ‖z_i‖₁ − λ₂ max_j ζ_ij]``.
    * ``form="scale_free"``: ``R = mean_i [λ₁ ‖z_i‖₁/‖z_i‖₂ − λ₂ max_j ζ_ij]`` (sparsity
      without a pull on the norm).
    * ``threshold``: when given, only samples whose current (detached) q of that form is below
      it contribute (the paper possibly regularises only low-Q samples); the mean still divides
      by the batch size. No host sync (the mask is multiplied in).

    ``z`` is ``(n, d)`` with ``requires_grad`` as needed; returns a 0-d tensor in ``z``'s dtype.
    Rows with non-finite values contribute 0.
    """
    if form not in ("linf_over_l1", "scale_free"):
        raise ValueError(f"form must be 'linf_over_l1' or 'scale_free', got {form!r}")
    if lambda1 < 0 or lambda2 < 0:
        raise ValueError(f"lambda1 and lambda2 must be >= 0, got {lambda1!r}, {lambda2!r}")
    if not isinstance(z, Tensor):
        raise TypeError(f"z: expected a torch.Tensor (a differentiable term), got "
                        f"{type(z).__name__}")
    z = _as_rows(z)
    finite = torch.isfinite(z).all(dim=1)                                # (n,)
    x = torch.where(finite[:, None], z, torch.zeros_like(z))             # (n, d)
    zmax = feature_zscores(x, eps2).amax(dim=1)                          # (n,)
    l1 = x.abs().sum(dim=1)                                              # (n,)
    if form == "linf_over_l1":
        sparsity = l1
    else:
        sparsity = l1 / (x.norm(dim=1) + eps1)
    term = lambda1 * sparsity - lambda2 * zmax                           # (n,)
    weight = finite.to(z.dtype)
    if threshold is not None:
        with torch.no_grad():
            q = qscore(x.detach(), form, eps1, eps2)
            thr = threshold.to(q) if isinstance(threshold, Tensor) else float(threshold)
            weight = weight * (q < thr).to(z.dtype)
    return (term * weight).sum() / max(z.shape[0], 1)


def auprc(scores: Tensor, positives: Tensor, weights: Tensor | None = None) -> Tensor:
    """Average precision of ranking by ``scores`` (higher = more likely positive), 0-d float64.

    Step-wise, as scikit-learn's ``average_precision_score``:
    ``AP = Σ_k (R_k − R_{k−1}) P_k`` over the distinct score thresholds in decreasing order;
    tied scores form one threshold. ``weights`` (0/1 or non-negative) weigh samples like
    sklearn's ``sample_weight``; non-finite scores get weight 0 (excluded). NaN when no
    (weighted) positive exists. No host sync.

    The monitor reports ``auprc(-q, wrong)``: how well *low* Q finds misclassified samples.
    """
    if scores.dim() != 1 or positives.shape != scores.shape:
        raise ValueError(f"expected 1-D scores and positives of the same length, got shapes "
                         f"{tuple(scores.shape)} and {tuple(positives.shape)}")
    s = scores.to(torch.float64)
    pos = positives.to(device=s.device, dtype=torch.float64)
    w = torch.ones_like(s) if weights is None else weights.to(device=s.device,
                                                                dtype=torch.float64)
    if w.shape != s.shape:
        raise ValueError(f"weights: expected shape {tuple(s.shape)}, got {tuple(w.shape)}")
    finite = torch.isfinite(s)
    w = torch.where(finite, w, torch.zeros_like(w))
    s = torch.where(finite, s, torch.full_like(s, -math.inf))
    n = s.shape[0]
    if n == 0:
        return torch.full((), math.nan, dtype=torch.float64, device=s.device)
    s_sorted, order = torch.sort(s, descending=True, stable=True)        # (n,)
    w_sorted = w[order]
    tp = torch.cumsum(pos[order] * w_sorted, 0)                          # (n,) weighted TPs
    seen = torch.cumsum(w_sorted, 0)                                     # (n,) weighted count
    # Last element of each group of tied scores: a threshold of the precision-recall curve.
    is_end = torch.ones(n, dtype=torch.bool, device=s.device)
    is_end[:-1] = s_sorted[1:] != s_sorted[:-1]
    tp_end = torch.where(is_end, tp, torch.zeros_like(tp))
    prev = torch.cat([tp.new_zeros(1), torch.cummax(tp_end, 0).values[:-1]])  # TPs at last end
    precision = tp / torch.where(seen > 0, seen, torch.ones_like(seen))
    total = tp[-1]
    ap = (torch.where(is_end, (tp - prev) * precision, torch.zeros_like(tp))).sum() / total
    return torch.where(total > 0, ap, torch.full_like(ap, math.nan))


