"""Spectral representation-health statistics as pure functions.

Two layers:

* ``*_from_*`` functions work on sufficient statistics (the uncentred second moment
  ``S = ZᵀZ``, the column sum ``Σz`` and the row count ``n``, or the eigenvalues of ``S``).
  They are what the streaming scorers call at publish time; they contain no host
  synchronisation (counts stay tensors, data-dependent ranges are masks, not slices).
* One-shot functions on an ``(n, d)`` tensor (``rankme``, ``effective_rank``, ...) build those
  statistics and call the same code, so streaming and one-shot share one implementation.

All statistics are computed in float64 (docs/metrics.md §1 "Streaming": eigenvalues of ``S`` are
σ², so float32 loses the small singular values).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

RANKME_EPS: float = 1e-7
"""ε of RankMe (Garrido et al. 2023, Eq. 1; float32 default of the paper and stable-SSL)."""


def _as_rows(z: Tensor) -> Tensor:
    if z.dim() != 2:
        raise ValueError(f"expected a 2-D (n, d) tensor of rows, got shape {tuple(z.shape)}")
    if not z.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got {z.dtype}")
    return z.to(torch.float64)


def second_moment(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sufficient statistics of rows ``z`` (n, d): ``(S = zᵀz, Σz, n)`` in float64."""
    x = _as_rows(z)
    n = torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device)
    return x.T @ x, x.sum(0), n


def eigenvalues_desc(s: Tensor) -> Tensor:
    """Eigenvalues of a symmetric PSD matrix, descending, clamped at 0 (round-off)."""
    lam = torch.linalg.eigvalsh(s.to(torch.float64))
    return lam.flip(0).clamp_min(0.0)


def _rank_mask(length: int, k: Tensor | int | float, device: torch.device) -> Tensor:
    """Boolean mask of the first ``k`` positions (``k`` may be a device tensor: no sync)."""
    idx = torch.arange(length, device=device, dtype=torch.float64)
    return idx < torch.as_tensor(k, dtype=torch.float64, device=device)


def rankme_from_singular_values(s: Tensor, k: Tensor | int | float | None = None,
                                eps: float = RANKME_EPS) -> Tensor:
    """RankMe (Garrido, Balestriero, Najman & LeCun, ICML 2023, Eq. 1–2).

    ``RankMe = exp(−Σ_{k≤K} p_k log p_k)``, ``p_k = σ_k/‖σ‖₁ + ε`` over the ``K = min(n, d)``
    largest singular values ``σ`` (descending) of the *uncentred* embedding matrix. ε is added
    after normalisation, as in the paper and stable-SSL, so a complete collapse reads slightly
    above 1 (1.0033 for K = 2048).
    """
    s = s.to(torch.float64).clamp_min(0.0)
    mask = _rank_mask(s.shape[0], s.shape[0] if k is None else k, s.device)
    s = torch.where(mask, s, torch.zeros_like(s))
    total = s.sum()
    p = s / total + eps
    h = -(torch.where(mask, p * torch.log(p), torch.zeros_like(p))).sum()
    return torch.where(total > 0, torch.exp(h), torch.full_like(h, math.nan))


def effective_rank_from_singular_values(s: Tensor) -> Tensor:
    """Roy & Vetterli (2007) effective rank ``exp(H(σ/‖σ‖₁))`` with ``0·log 0 = 0``, no ε.

    This is the erank used by Dohare et al. (2024) for plasticity; ``1 ≤ erank ≤ rank``.
    """
    s = s.to(torch.float64).clamp_min(0.0)
    total = s.sum()
    p = s / total
    plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))),
                        torch.zeros_like(p))
    h = -plogp.sum()
    return torch.where(total > 0, torch.exp(h), torch.full_like(h, math.nan))


def srank_from_singular_values(s: Tensor, delta: float = 0.01) -> Tensor:
    """srank_δ (Kumar, Agarwal, Ghosh & Levine, ICLR 2021).

    ``min{k : Σ_{i≤k} σ_i / Σ_i σ_i ≥ 1 − δ}`` over descending singular values of the uncentred
    feature matrix; δ = 0.01 as in the paper. Computed like Dohare et al.'s
    ``compute_stable_rank``: the number of normalised cumulative sums below 1 − δ, plus one.
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    s = s.to(torch.float64).clamp_min(0.0)
    total = s.sum()
    c = torch.cumsum(s, 0) / total
    k = (c < 1.0 - delta).sum().to(torch.float64) + 1.0
    return torch.where(total > 0, k, torch.full_like(k, math.nan))


def top_eigenvalue_share_from_eigenvalues(lam: Tensor) -> Tensor:
    """Share of the largest eigenvalue of the second moment in its trace, ``λ₁ / Σλ`` (0–1)."""
    lam = lam.to(torch.float64).clamp_min(0.0)
    total = lam.sum()
    return torch.where(total > 0, lam.max() / total, torch.full_like(total, math.nan))


def participation_ratio_from_moments(s: Tensor, zsum: Tensor, n: Tensor | float,
                                     corrected: bool = True) -> Tensor:
    """Participation ratio ``PR = (tr C)² / tr(C²)`` of the centred covariance, no eigensolve.

    Gao et al. 2017; Recanatesi et al. 2019; used for rank collapse by Kumar et al. 2021.
    With ``corrected=True`` (default) the small-sample bias is removed with Wishart moments
    (docs/metrics.md §3, a design of that note, not from a paper): with scatter ``W = S − Σz Σzᵀ/n``
    and ``m = n − 1``, ``â = (tr W² − (tr W)²/m) / ((m+2)(m−1))`` estimates ``tr Σ²`` and
    ``b̂ = ((tr W)² − 2m·â)/m²`` estimates ``(tr Σ)²``; ``PR = b̂/â``. Exact in expectation for
    Gaussian features, approximate otherwise. The corrected value is clamped to ``[1, d]``.
    Needs ``n ≥ 3`` (corrected) or ``n ≥ 2``; otherwise NaN.
    """
    s = s.to(torch.float64)
    zsum = zsum.to(torch.float64)
    n = torch.as_tensor(n, dtype=torch.float64, device=s.device)
    safe_n = n.clamp_min(1.0)
    w = s - torch.outer(zsum, zsum) / safe_n
    w = 0.5 * (w + w.T)
    tr = torch.diagonal(w).sum()
    tr2 = (w * w).sum()
    nan = torch.full_like(tr, math.nan)
    if not corrected:
        pr = tr * tr / tr2
        return torch.where((n >= 2) & (tr2 > 0), pr, nan)
    m = n - 1.0
    a_hat = (tr2 - tr * tr / m.clamp_min(1.0)) / ((m + 2.0) * (m - 1.0)).clamp_min(1.0)
    b_hat = (tr * tr - 2.0 * m * a_hat) / (m * m).clamp_min(1.0)
    d = float(s.shape[0])
    pr = (b_hat / a_hat).clamp(1.0, d)
    return torch.where((n >= 3) & (a_hat > 0) & (b_hat > 0), pr, nan)


def spectrum_alpha_from_eigenvalues(lam: Tensor, k: Tensor | int | float | None = None,
                                    fit_start: int = 10, fit_stop: int = 100,
                                    min_points: int = 5, rel_floor: float = 1e-12) -> Tensor:
    """α-ReQ power-law decay coefficient (Agrawal, Mondal, Ghosh & Richards, NeurIPS 2022).

    Fits ``log λ_i ≈ c − α log i`` by weighted least squares with weights ``1/i`` (Stringer &
    Pachitariu 2018, as in reptrix ``get_powerlaw``) over 1-based ranks
    ``fit_start+1 … fit_stop`` (reptrix default ``np.arange(10, 100)``: ranks 11–100) of the
    descending eigenvalues ``lam``. Ranks beyond ``k`` (the number of meaningful eigenvalues,
    e.g. ``min(n−1, d)``) and eigenvalues below ``rel_floor·λ₁`` (numerical zeros of a
    rank-deficient window) are left out of the fit; with fewer than
    ``min_points`` ranks left the result is NaN. Normalising ``lam`` does not change α.
    """
    if not 0 <= fit_start < fit_stop:
        raise ValueError(f"need 0 <= fit_start < fit_stop, got {fit_start}, {fit_stop}")
    lam = lam.to(torch.float64)
    length = lam.shape[0]
    stop = min(fit_stop, length)
    if stop <= fit_start:
        return torch.full((), math.nan, dtype=torch.float64, device=lam.device)
    y_all = lam[fit_start:stop]
    rank = torch.arange(fit_start + 1, stop + 1, dtype=torch.float64, device=lam.device)
    # Eigenvalues below rel_floor·λ₁ are numerical zeros (a rank-deficient window), not spectrum.
    valid = y_all > rel_floor * lam.max().clamp_min(0.0)
    if k is not None:
        valid = valid & _rank_mask(length, k, lam.device)[fit_start:stop]
    w = torch.where(valid, 1.0 / rank, torch.zeros_like(rank))
    y = torch.log(torch.where(valid, y_all, torch.ones_like(y_all)))
    x = -torch.log(rank)
    # Weighted least squares for y = α·x + c, closed form (2×2 normal equations).
    sw, swx, swy = w.sum(), (w * x).sum(), (w * y).sum()
    swxx, swxy = (w * x * x).sum(), (w * x * y).sum()
    det = sw * swxx - swx * swx
    alpha = (sw * swxy - swx * swy) / det
    ok = (valid.sum() >= min_points) & (det.abs() > 0)
    return torch.where(ok, alpha, torch.full_like(alpha, math.nan))


def l2_normalized_std_from_sums(nsum: Tensor, nsq: Tensor, n: Tensor | float) -> Tensor:
    """SimSiam collapse measure (Chen & He, CVPR 2021) from per-dimension sums.

    ``std_l2 = (1/d) Σ_j std_i(ẑ_ij)``, ``ẑ_i = z_i/‖z_i‖₂``, unbiased std (ddof = 1) as in
    lightly's ``std_of_l2_normalized``; inputs are ``Σ_i ẑ_i`` and ``Σ_i ẑ_i²`` (each (d,)).
    ≈ 1/√d for healthy isotropic embeddings, → 0 on complete collapse. Blind to dimensional
    collapse (docs/metrics.md §5a): pair it with RankMe.
    """
    nsum = nsum.to(torch.float64)
    nsq = nsq.to(torch.float64)
    n = torch.as_tensor(n, dtype=torch.float64, device=nsum.device)
    var = (nsq - nsum * nsum / n.clamp_min(1.0)) / (n - 1.0).clamp_min(1.0)
    std = var.clamp_min(0.0).sqrt().mean()
    return torch.where(n >= 2, std, torch.full_like(std, math.nan))


def mean_cosine_similarity_from_sums(nsum: Tensor, nsq: Tensor, n: Tensor | float) -> Tensor:
    """Mean pairwise cosine similarity over distinct rows, exact from ``Σẑ`` and ``Σẑ²``.

    ``(‖Σ_i ẑ_i‖² − Σ_i ‖ẑ_i‖²) / (n(n−1))``; 1 on complete collapse, ≈ 0 for centred isotropic
    embeddings (a high value means every row points the same way).
    """
    nsum = nsum.to(torch.float64)
    n = torch.as_tensor(n, dtype=torch.float64, device=nsum.device)
    num = (nsum * nsum).sum() - nsq.to(torch.float64).sum()
    val = num / (n * (n - 1.0)).clamp_min(1.0)
    return torch.where(n >= 2, val, torch.full_like(val, math.nan))


def mean_variance_from_moments(s: Tensor, zsum: Tensor, n: Tensor | float, dim: int | None = None
                               ) -> Tensor:
    """Mean per-dimension variance of the raw (not normalised) rows, from ``S = ZᵀZ`` and ``Σz``.

    ``tr C / d`` with ``C = (S − Σz Σzᵀ/n)/(n − 1)`` (ddof = 1); VICReg's variance term
    (Bardes et al., ICLR 2022) watches the same scale. Unlike every normalised signal it falls
    when all rows shrink to one point, wherever that point is (to 0 included). ``dim`` divides
    the trace (default: ``s``'s size; a sketch passes the true d). NaN below two rows.
    """
    s = s.to(torch.float64)
    zsum = zsum.to(torch.float64)
    n = torch.as_tensor(n, dtype=torch.float64, device=s.device)
    d = float(dim if dim is not None else s.shape[0])
    tr = torch.diagonal(s).sum() - (zsum * zsum).sum() / n.clamp_min(1.0)
    var = tr.clamp_min(0.0) / ((n - 1.0).clamp_min(1.0) * d)
    return torch.where(n >= 2, var, torch.full_like(var, math.nan))


def normalize_rows(z: Tensor, eps: float = 1e-12) -> Tensor:
    """Row L2 normalisation; an all-zero row stays zero."""
    return z / z.norm(dim=1, keepdim=True).clamp_min(eps)


# ---------------------------------------------------------------- one-shot on (n, d) rows


def _singular_values(z: Tensor) -> tuple[Tensor, int]:
    x = _as_rows(z)
    return torch.linalg.svdvals(x), min(x.shape)


def rankme(z: Tensor, eps: float = RANKME_EPS) -> Tensor:
    """RankMe of rows ``z`` (n, d): paper convention (uncentred σ, ε = 1e-7). See
    :func:`rankme_from_singular_values`."""
    s, k = _singular_values(z)
    return rankme_from_singular_values(s, k, eps)


def effective_rank(z: Tensor) -> Tensor:
    """Roy–Vetterli effective rank of rows ``z`` (n, d) (no ε)."""
    s, _ = _singular_values(z)
    return effective_rank_from_singular_values(s)


def srank(z: Tensor, delta: float = 0.01) -> Tensor:
    """srank_δ of rows ``z`` (n, d) (Kumar et al. 2021), δ = 0.01."""
    s, _ = _singular_values(z)
    return srank_from_singular_values(s, delta)


def participation_ratio(z: Tensor, corrected: bool = True) -> Tensor:
    """Participation ratio of the centred covariance of rows ``z`` (n, d); see
    :func:`participation_ratio_from_moments`."""
    s, zsum, n = second_moment(z)
    return participation_ratio_from_moments(s, zsum, n, corrected)


def spectrum_alpha(z: Tensor, fit_start: int = 10, fit_stop: int = 100,
                   centered: bool = True) -> Tensor:
    """α-ReQ of rows ``z`` (n, d) from the eigenvalues of the centred covariance (reference
    convention) or, with ``centered=False``, of the uncentred second moment."""
    s, zsum, n = second_moment(z)
    if centered:
        s = s - torch.outer(zsum, zsum) / n.clamp_min(1.0)  # n = 0: zero matrix, not 0/0 = NaN
        k = min(z.shape[0] - 1, z.shape[1])
    else:
        k = min(z.shape)
    return spectrum_alpha_from_eigenvalues(eigenvalues_desc(s), k, fit_start, fit_stop)


def l2_normalized_std(z: Tensor) -> Tensor:
    """SimSiam std of L2-normalised rows (not multiplied by √d); see
    :func:`l2_normalized_std_from_sums`."""
    x = normalize_rows(_as_rows(z))
    return l2_normalized_std_from_sums(x.sum(0), (x * x).sum(0), float(x.shape[0]))


def mean_cosine_similarity(z: Tensor) -> Tensor:
    """Mean pairwise cosine similarity of distinct rows of ``z`` (n, d)."""
    x = normalize_rows(_as_rows(z))
    return mean_cosine_similarity_from_sums(x.sum(0), (x * x).sum(0), float(x.shape[0]))


def mean_variance(z: Tensor) -> Tensor:
    """Mean per-dimension variance (ddof 1) of rows ``z`` ``(n, d)``; see
    :func:`mean_variance_from_moments`."""
    s, zsum, n = second_moment(z)
    return mean_variance_from_moments(s, zsum, n)
