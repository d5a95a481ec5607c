"""Weight-matrix statistics: ε-rank, stable rank, and global magnitude masks for early-bird tickets.

* ``weight_rank`` — Galanti, Siegel, Gupte & Poggio (arXiv 2206.05794, "SGD and weight decay
  secretly minimize the rank of your neural network"): ``rank_ε(W) = #{i : σ_i(W/‖W‖_F) > ε}``
  with ε = 1e-3 as in their ``analysis_rank.py`` (docs/metrics.md §11). Conv kernels are reshaped to
  ``(out, in·kh·kw)`` (their ``eval_rank_conv_prime``), not the full convolution operator.
* ``stable_rank`` — ``‖W‖_F² / ‖W‖_2²`` (the classical stable rank, also in their repo).
* ``global_magnitude_masks`` / ``mask_distance`` — You et al., ICLR 2020, "Drawing Early-Bird
  Tickets": the pruning mask of a network stabilises early in training; the normalised Hamming
  distance between masks drawn at consecutive checks falls below ε = 0.1 once the "early-bird"
  ticket has emerged. The paper's masks prune channels by BatchNorm scaling factors; this is the
  unstructured variant on weight magnitudes with one global threshold (a design choice of this
  module, configurable by which weights are passed).

These run at low cadence (an SVD per layer, one sort over all weights); they stay on the device
and do not synchronise, except where a docstring says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

WEIGHT_RANK_EPS: float = 1e-3
"""ε of Galanti et al.'s rank (``conf/global_settings.py: tolerance = 0.001``)."""


def as_matrix(weight: Tensor) -> Tensor:
    """A ≥ 2-D weight as a matrix ``(out, rest)``: conv ``(out, in, kh, kw)`` → ``(out, in·kh·kw)``."""
    if weight.dim() < 2:
        raise ValueError(f"expected a weight with at least 2 dimensions, got shape "
                         f"{tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"expected a floating-point weight, got {weight.dtype}")
    w = weight.detach().reshape(weight.shape[0], -1)
    return w if w.dtype in (torch.float32, torch.float64) else w.to(torch.float32)


def _singular_values(weight: Tensor, dtype: torch.dtype | None) -> Tensor:
    w = as_matrix(weight)
    if dtype is not None:
        w = w.to(dtype)
    return torch.linalg.svdvals(w)                                       # (min(out, rest),)


def weight_rank(weight: Tensor, eps: float = WEIGHT_RANK_EPS,
                dtype: torch.dtype | None = None) -> Tensor:
    """Galanti et al.'s ``rank_ε(W) = #{i : σ_i(W/‖W‖_F) > ε}`` as a 0-d float tensor.

    ``dtype`` of the SVD: the weight's own (float32 or float64) by default; ε = 1e-3 relative to
    ‖W‖_F is far above float32 round-off (~1e-7·σ₁). A zero matrix has rank 0. The threshold is
    on the Frobenius-normalised σ, not σ/σ_max (docs/metrics.md §11 pitfall).
    """
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    s = _singular_values(weight, dtype)
    fro = torch.linalg.vector_norm(s)                                    # ‖W‖_F = ‖σ‖₂
    rel = s / torch.where(fro > 0, fro, torch.ones_like(fro))
    return (rel > eps).sum().to(s.dtype)


def stable_rank(weight: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Stable rank ``‖W‖_F² / ‖W‖_2² = Σσ²/σ₁²`` (0-d, in ``[1, rank]``); NaN for a zero matrix."""
    s = _singular_values(weight, dtype)
    top = s.max() if s.numel() else torch.zeros((), dtype=s.dtype, device=s.device)
    value = (s * s).sum() / torch.where(top > 0, top * top, torch.ones_like(top))
    return torch.where(top > 0, value, torch.full_like(value, math.nan))


def _check_sparsities(sparsities: Sequence[float]) -> list[float]:
    out = [float(s) for s in sparsities]
    if not out:
        raise ValueError("expected at least one sparsity, got none")
    bad = [s for s in out if not 0.0 <= s < 1.0]
    if bad:
        raise ValueError(f"sparsities must lie in [0, 1), got {bad}")
    return out


def global_magnitude_masks(weights: Sequence[Tensor],
                           sparsities: Sequence[float]) -> dict[float, list[Tensor]]:
    """Global magnitude-pruning masks: for each sparsity s, keep the largest ``(1−s)`` of ``|w|``.

    One threshold over all given weights together (You et al. 2020 prune globally). With ``n``
    weights in total, ``round(s·n)`` are pruned and the ``n − round(s·n)`` largest magnitudes are
    kept. Ties are broken deterministically: among equal magnitudes, the earlier position in
    the concatenation of the flattened weights (in the order given) is kept first. Non-finite
    weights rank below every finite one (pruned first). Returns ``{s: [bool mask per weight]}``
    (masks have the weights' shapes and devices; one stable sort serves all sparsities).
    """
    if not weights:
        raise ValueError("expected at least one weight tensor, got none")
    levels = _check_sparsities(sparsities)
    flat = torch.cat([w.detach().reshape(-1).to(torch.float64) for w in weights])  # (n,)
    mag = torch.where(torch.isfinite(flat), flat.abs(), torch.full_like(flat, -1.0))
    order = torch.sort(mag, descending=True, stable=True).indices        # (n,) largest first
    n = flat.numel()
    sizes = [w.numel() for w in weights]
    out: dict[float, list[Tensor]] = {}
    for s in levels:
        keep = n - int(round(s * n))                                     # host int from shapes
        mask = torch.zeros(n, dtype=torch.bool, device=flat.device)
        mask[order[:keep]] = True
        out[s] = [m.reshape(w.shape).to(w.device) for m, w in zip(mask.split(sizes), weights)]
    return out


def mask_distance(masks_a: Sequence[Tensor], masks_b: Sequence[Tensor]) -> Tensor:
    """Normalised Hamming distance ``#{a ≠ b} / n`` between two lists of boolean masks (0-d float64).

    You et al. 2020: the fraction of positions whose keep/prune decision differs.
    """
    if len(masks_a) != len(masks_b) or not masks_a:
        raise ValueError(f"expected two equally long, non-empty lists of masks, got "
                         f"{len(masks_a)} and {len(masks_b)}")
    diff = None
    total = 0
    for i, (a, b) in enumerate(zip(masks_a, masks_b)):
        if a.shape != b.shape:
            raise ValueError(f"mask {i}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
        d = (a.to(torch.bool) ^ b.to(torch.bool)).sum().to(torch.float64)
        diff = d if diff is None else diff + d.to(diff.device)
        total += a.numel()
    assert diff is not None
    return diff / max(total, 1)
