"""Neural collapse NC1–NC4 (Papyan, Han & Donoho, PNAS 2020) as pure functions.

Two layers, as in :mod:`monitor.functional.spectral`:

* ``*_from_stats`` / vector functions work on sufficient statistics — the uncentred second
  moment ``S = Σ_i h_i h_iᵀ`` (float64), the per-class sums ``s_c = Σ_{i∈c} h_i`` and counts
  ``n_c`` — or on class means and classifier rows. They contain no host synchronisation: the
  number of classes present is a device tensor and absent classes (``n_c = 0``) are masked out,
  never sliced out.
* One-shot functions on an ``(n, d)`` tensor with integer labels (``nc1``, ``neural_collapse``)
  build those statistics and call the same code. They validate their input (which may sync).

Notation (docs/metrics.md §8): C classes *present*, N samples, ``μ_c = s_c/n_c``, ``μ_G`` the global
mean of the samples (not the mean of class means: pitfall 2), ``M̃ = [μ_c − μ_G]``,
``Σ_W = (1/N) Σ_c Σ_{i∈c} (h_i − μ_c)(h_i − μ_c)ᵀ = (S − Σ_c n_c μ_c μ_cᵀ)/N`` and
``Σ_B = (1/C) Σ_c (μ_c − μ_G)(μ_c − μ_G)ᵀ = M̃ M̃ᵀ / C``.

Everything is computed in float64: the one-pass ``Σ_W`` cancels catastrophically in float32 in
exactly the collapsed regime (docs/metrics.md §8 "Streaming", pitfall 4).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

NC1_RTOL: float = 1e-12
"""Relative cut on ``s_k²/s_1²`` below which a singular value of ``M̃`` counts as zero."""


# ----------------------------------------------------------------------------- statistics


def _check_rows(h: Tensor) -> Tensor:
    if h.dim() != 2:
        raise ValueError(f"expected features of shape (n, d), got shape {tuple(h.shape)}")
    if not h.is_floating_point():
        raise TypeError(f"expected floating-point features, got {h.dtype}")
    return h.to(torch.float64)


def _check_labels(labels: Tensor, n: int, num_classes: int) -> Tensor:
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"expected labels of shape ({n},), got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"expected integer labels, got {labels.dtype}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):  # one-shot: may sync
        raise ValueError(f"labels must lie in [0, {num_classes}), got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return labels.to(torch.long)


def class_statistics(h: Tensor, labels: Tensor, num_classes: int | None = None,
                     weights: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Sufficient statistics ``(S (d,d), class_sums (C,d), counts (C,))`` in float64.

    ``weights`` (n,) multiplies each row's contribution (0/1 validity masks from scorers; a
    zero-weight row must hold finite values). ``num_classes`` defaults to ``max(labels) + 1``
    (a host sync). Labels out of ``[0, num_classes)`` raise ``ValueError``.
    """
    x = _check_rows(h)                                                   # (n, d)
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.numel() else 1
    y = _check_labels(labels, x.shape[0], num_classes)
    return _class_statistics(x, y, num_classes, weights)


def _class_statistics(x: Tensor, y: Tensor, num_classes: int,
                      weights: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Unchecked core of :func:`class_statistics` (no sync): x (n,d) float64, y (n,) long."""
    w = (torch.ones(x.shape[0], dtype=torch.float64, device=x.device) if weights is None
         else weights.to(torch.float64))                                 # (n,)
    xw = x * w[:, None]                                                  # (n, d)
    s = xw.T @ x                                                         # (d, d)
    sums = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, device=x.device)
    sums.index_add_(0, y, xw)                                            # (C, d)
    counts = torch.zeros(num_classes, dtype=torch.float64, device=x.device)
    counts.index_add_(0, y, w)                                           # (C,)
    return s, sums, counts


def _check_stats(s: Tensor, class_sums: Tensor, counts: Tensor) -> None:
    if class_sums.dim() != 2:
        raise ValueError(f"expected class_sums of shape (C, d), got {tuple(class_sums.shape)}")
    c, d = class_sums.shape
    if c < 1 or d < 1:
        raise ValueError(f"expected at least one class and one feature, got class_sums of "
                         f"shape {tuple(class_sums.shape)}")
    if s.shape != (d, d):
        raise ValueError(f"expected S of shape ({d}, {d}) to match class_sums (C, d) = "
                         f"({c}, {d}), got {tuple(s.shape)}")
    if counts.shape != (c,):
        raise ValueError(f"expected counts of shape ({c},), got {tuple(counts.shape)}")


def class_means(class_sums: Tensor, counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(μ (C,d), μ_G (d,), present (C,) bool)`` from class sums and counts.

    ``μ_c = s_c/n_c`` for present classes and 0 for absent ones; ``μ_G = Σ_c s_c / N``, the
    mean of the samples (pitfall 2 of docs/metrics.md §8: not the mean of the class means).
    """
    sums = class_sums.to(torch.float64)
    cnt = counts.to(torch.float64)
    present = cnt > 0                                                    # (C,)
    mu = sums / torch.where(present, cnt, torch.ones_like(cnt))[:, None]  # (C, d)
    n = cnt.sum()
    mu_g = sums.sum(0) / n.clamp_min(torch.finfo(torch.float64).tiny)    # (d,)
    return mu, mu_g, present


def centered_class_means(class_sums: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """``(M̃ (C,d), present (C,))``: rows ``μ_c − μ_G`` for present classes, 0 for absent."""
    mu, mu_g, present = class_means(class_sums, counts)
    return (mu - mu_g) * present[:, None].to(torch.float64), present


# ----------------------------------------------------------------------------- NC1


def within_class_covariance(s: Tensor, class_sums: Tensor, counts: Tensor) -> Tensor:
    """``Σ_W = (S − Σ_c n_c μ_c μ_cᵀ)/N = (S − Σ_c s_c s_cᵀ/n_c)/N`` (d,d), float64.

    The identity ``Σ_c Σ_{i∈c} (h−μ_c)(h−μ_c)ᵀ = Σ_i h hᵀ − Σ_c n_c μ_c μ_cᵀ`` makes it one
    pass; it needs float64 ``S`` (docs/metrics.md §8: float32 goes negative at within-class std 1e-3).
    """
    _check_stats(s, class_sums, counts)
    cnt = counts.to(torch.float64)
    sums = class_sums.to(torch.float64)
    present = cnt > 0
    scaled = sums / torch.where(present, cnt, torch.ones_like(cnt)).sqrt()[:, None]  # (C, d)
    n = cnt.sum().clamp_min(torch.finfo(torch.float64).tiny)
    return (s.to(torch.float64) - scaled.T @ scaled) / n


def nc1_from_stats(s: Tensor, class_sums: Tensor, counts: Tensor,
                   rtol: float = NC1_RTOL) -> Tensor:
    """NC1 ``= tr(Σ_W Σ_B^†)/C`` (Papyan et al. 2020) by the thin-SVD route, 0-d float64.

    With the thin SVD ``M̃ᵀ = U diag(s) Vᵀ`` (``U`` d×C), ``Σ_B = U diag(s²/C) Uᵀ`` so
    ``Σ_B^† = C·U diag(s⁻²) Uᵀ`` on its range and the factor C cancels:
    ``NC1 = Σ_{k<C−1} (u_kᵀ Σ_W u_k)/s_k²`` (docs/metrics.md §8 "Streaming"). Only the ``C − 1``
    largest singular values are kept (the centred means have rank ≤ C − 1, since
    ``Σ_c n_c (μ_c − μ_G) = 0``), and of those only ``s_k² > rtol·s_1²`` (this replaces pinv's
    round-off tolerance: pitfall 1). C counts the classes present (``n_c > 0``); absent classes
    are excluded. Cost O(dC² + d²C), no d×d pseudo-inverse. NaN with fewer than 2 classes.
    """
    sigma_w = within_class_covariance(s, class_sums, counts)             # (d, d)
    m_tilde, present = centered_class_means(class_sums, counts)          # (C, d)
    u, sv, _ = torch.linalg.svd(m_tilde.T, full_matrices=False)          # (d, k), (k,)
    c_present = present.sum().to(torch.float64)
    k_idx = torch.arange(sv.shape[0], device=sv.device, dtype=torch.float64)
    keep = (k_idx < c_present - 1.0) & (sv * sv > rtol * sv[0] * sv[0]) & (sv > 0)  # (k,)
    quad = (u * (sigma_w @ u)).sum(0)                                    # (k,) u_kᵀ Σ_W u_k
    safe = torch.where(keep, sv, torch.ones_like(sv))
    value = torch.where(keep, quad / (safe * safe), torch.zeros_like(quad)).sum()
    return torch.where(c_present >= 2, value, torch.full_like(value, math.nan))


def nc1(h: Tensor, labels: Tensor, num_classes: int | None = None) -> Tensor:
    """One-shot NC1 of features ``h`` (n,d) with integer ``labels`` (n,); see :func:`nc1_from_stats`."""
    return nc1_from_stats(*class_statistics(h, labels, num_classes))


# ----------------------------------------------------------------------------- NC2–NC4


def _vectors_and_mask(vectors: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    if vectors.dim() != 2:
        raise ValueError(f"expected vectors of shape (C, d), got shape {tuple(vectors.shape)}")
    v = vectors.to(torch.float64)
    if mask is None:
        return v, torch.ones(v.shape[0], dtype=torch.bool, device=v.device)
    if mask.shape != (v.shape[0],):
        raise ValueError(f"expected mask of shape ({v.shape[0]},), got {tuple(mask.shape)}")
    return v, mask.to(device=v.device, dtype=torch.bool)


def _pair_cosines(v: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(cos (C,C), pair mask (C,C) of unordered pairs c < c' both present, C present)."""
    norms = v.norm(dim=1)
    unit = v / torch.where(norms > 0, norms, torch.ones_like(norms))[:, None]
    cos = unit @ unit.T                                                  # (C, C)
    c = v.shape[0]
    upper = torch.ones(c, c, dtype=torch.bool, device=v.device).triu(1)
    pairs = upper & mask[:, None] & mask[None, :]
    return cos, pairs, mask.sum().to(torch.float64)


def nc2_equinorm(vectors: Tensor, mask: Tensor | None = None) -> Tensor:
    """NC2 equinorm: ``Std_c ‖v_c‖ / Avg_c ‖v_c‖`` over the rows in ``mask`` (Papyan et al. 2020).

    Pass centred class means ``μ_c − μ_G`` or classifier rows ``w_c``. Std is the unbiased
    (ddof = 1) one, as ``torch.std`` in the reference code. → 0 under collapse; NaN with < 2 rows.
    """
    v, mask = _vectors_and_mask(vectors, mask)
    m = mask.to(torch.float64)
    k = m.sum()
    norms = v.norm(dim=1)                                                # (C,)
    mean = (norms * m).sum() / k.clamp_min(1.0)
    var = (((norms - mean) ** 2) * m).sum() / (k - 1.0).clamp_min(1.0)
    value = var.sqrt() / mean
    return torch.where((k >= 2) & (mean > 0), value, torch.full_like(value, math.nan))


def nc2_equiangularity(vectors: Tensor, mask: Tensor | None = None) -> Tensor:
    """NC2 equiangularity: ``Std_{c<c'} cos∠(v_c, v_c')`` (ddof = 1, unordered pairs).

    → 0 when all pairwise angles are equal (simplex ETF). NaN with fewer than 3 rows.
    """
    v, mask = _vectors_and_mask(vectors, mask)
    cos, pairs, _ = _pair_cosines(v, mask)
    p = pairs.to(torch.float64)
    k = p.sum()
    mean = (cos * p).sum() / k.clamp_min(1.0)
    var = (((cos - mean) ** 2) * p).sum() / (k - 1.0).clamp_min(1.0)
    return torch.where(k >= 2, var.sqrt(), torch.full_like(var, math.nan))


def nc2_max_angle(vectors: Tensor, mask: Tensor | None = None) -> Tensor:
    """NC2 max-angle: ``Avg_{c≠c'} |cos∠(v_c, v_c') + 1/(C−1)|`` (Papyan's ``coherence``).

    → 0 when the rows form a simplex (cos = −1/(C−1), the largest equal angle for C vectors).
    C is the number of rows in ``mask``. NaN with fewer than 2 rows.
    """
    v, mask = _vectors_and_mask(vectors, mask)
    cos, pairs, c = _pair_cosines(v, mask)
    p = pairs.to(torch.float64)
    dev = (cos + 1.0 / (c - 1.0).clamp_min(1.0)).abs()
    value = (dev * p).sum() / p.sum().clamp_min(1.0)
    return torch.where(c >= 2, value, torch.full_like(value, math.nan))


def nc3_self_duality(weight: Tensor, centered_means: Tensor, mask: Tensor | None = None) -> Tensor:
    """NC3 ``‖ W/‖W‖_F − M̃/‖M̃‖_F ‖_F²`` (Papyan et al. 2020), 0-d float64, in [0, 4].

    ``weight`` is the classifier (C, d) (rows ``w_c``, not centred, as in the reference code);
    ``centered_means`` the rows ``μ_c − μ_G`` (C, d). With ``mask`` only the rows of present
    classes enter both matrices (and both norms). → 0 when the classifier aligns with the means.
    """
    if weight.dim() != 2 or weight.shape != centered_means.shape:
        raise ValueError(f"expected weight and centred means of the same shape (C, d), got "
                         f"{tuple(weight.shape)} and {tuple(centered_means.shape)}")
    m, mask = _vectors_and_mask(centered_means, mask)
    keep = mask.to(torch.float64)[:, None]
    w = weight.to(torch.float64) * keep
    m = m * keep
    wn, mn = w.norm(), m.norm()
    diff = w / torch.where(wn > 0, wn, torch.ones_like(wn)) - m / torch.where(mn > 0, mn, torch.ones_like(mn))
    value = (diff * diff).sum()
    return torch.where((wn > 0) & (mn > 0), value, torch.full_like(value, math.nan))


def nc4_ncc_mismatch(h: Tensor, weight: Tensor, bias: Tensor | None, means: Tensor,
                     mask: Tensor | None = None, row_weights: Tensor | None = None) -> Tensor:
    """NC4: fraction of rows with ``argmax_c(⟨w_c,h⟩+b_c) ≠ argmin_c ‖h − μ_c‖₂`` (0-d float64).

    ``h`` (n,d) rows, ``weight`` (C,d), ``bias`` (C,) or None, ``means`` the *uncentred* class
    means μ_c (C,d). The nearest-class-centre rule only considers classes in ``mask`` (present
    ones); the classifier's argmax is over all C. ``row_weights`` (n,) weighs rows (0 excludes
    one). Ties go to the lowest class index in both rules. → 0 in the terminal phase.
    """
    x = _check_rows(h)                                                   # (n, d)
    if weight.dim() != 2 or weight.shape[1] != x.shape[1] or means.shape != weight.shape:
        raise ValueError(f"expected weight and means of shape (C, {x.shape[1]}), got "
                         f"{tuple(weight.shape)} and {tuple(means.shape)}")
    mu, mask = _vectors_and_mask(means, mask)
    w = weight.to(torch.float64)
    logits = x @ w.T                                                     # (n, C)
    if bias is not None:
        if bias.shape != (w.shape[0],):
            raise ValueError(f"expected bias of shape ({w.shape[0]},), got {tuple(bias.shape)}")
        logits = logits + bias.to(torch.float64)
    # ‖h − μ‖² = ‖h‖² − 2⟨h, μ⟩ + ‖μ‖²; ‖h‖² is common to all classes and dropped.
    dist = (mu * mu).sum(1)[None, :] - 2.0 * (x @ mu.T)                  # (n, C)
    dist = torch.where(mask[None, :], dist, torch.full_like(dist, math.inf))
    mismatch = (logits.argmax(1) != dist.argmin(1)).to(torch.float64)    # (n,)
    rw = (torch.ones_like(mismatch) if row_weights is None else row_weights.to(torch.float64))
    total = rw.sum()
    value = (mismatch * rw).sum() / total.clamp_min(torch.finfo(torch.float64).tiny)
    return torch.where(total > 0, value, torch.full_like(value, math.nan))


def neural_collapse(h: Tensor, labels: Tensor, num_classes: int | None = None,
                    weight: Tensor | None = None, bias: Tensor | None = None) -> dict[str, Tensor]:
    """One-shot NC1–NC4 of features ``h`` (n,d) with ``labels`` (n,) and an optional classifier.

    Keys: ``nc1``, ``nc2_equinorm``, ``nc2_equiangularity``, ``nc2_max_angle`` (of the centred
    class means), and with ``weight`` (C,d): ``nc2_equinorm_w``, ``nc2_equiangularity_w``,
    ``nc2_max_angle_w`` (classifier rows), ``nc3``, ``nc4``.
    """
    x = _check_rows(h)
    s, sums, counts = class_statistics(x, labels, num_classes)
    m_tilde, present = centered_class_means(sums, counts)
    out = {
        "nc1": nc1_from_stats(s, sums, counts),
        "nc2_equinorm": nc2_equinorm(m_tilde, present),
        "nc2_equiangularity": nc2_equiangularity(m_tilde, present),
        "nc2_max_angle": nc2_max_angle(m_tilde, present),
    }
    if weight is not None:
        if weight.shape != m_tilde.shape:
            raise ValueError(f"expected classifier weight of shape {tuple(m_tilde.shape)}, "
                             f"got {tuple(weight.shape)}")
        mu, _, _ = class_means(sums, counts)
        out["nc2_equinorm_w"] = nc2_equinorm(weight)
        out["nc2_equiangularity_w"] = nc2_equiangularity(weight)
        out["nc2_max_angle_w"] = nc2_max_angle(weight)
        out["nc3"] = nc3_self_duality(weight, m_tilde, present)
        out["nc4"] = nc4_ncc_mismatch(x, weight, bias, mu, present)
    return out
