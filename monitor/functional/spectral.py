"""Spectral representation-health statistics as pure functions, for numpy and torch alike.

Every function is written once against the array API that numpy and torch share
(``array_api_compat``): a torch tensor in gives a torch tensor out, on its device, and a numpy
array in gives a numpy array out. The in-process monitor (torch, on the GPU) and the torch-free
sidecar (numpy) run this same code at publish.

Two layers:

* ``*_from_*`` functions work on sufficient statistics (the uncentred second moment
  ``S = ZᵀZ``, the column sum ``Σz`` and the row count ``n``, or the eigenvalues of ``S``).
  They are what the streaming scorers call at publish time; they contain no host
  synchronisation (counts stay arrays, data-dependent ranges are masks, not slices).
  :func:`window_spectral_signals` and :func:`window_collapse_signals` are a window's whole set.
* One-shot functions on an ``(n, d)`` array (``rankme``, ``effective_rank``, ...) build those
  statistics and call the same code, so streaming and one-shot share one implementation.

All statistics are computed in float64 (docs/metrics.md §1 "Streaming": eigenvalues of ``S`` are
σ², so float32 loses the small singular values).
"""

from __future__ import annotations

import math
from typing import Any

from array_api_compat import array_namespace, device

from monitor.functional._xp import Array, as_rows, f64, quiet, scalar

RANKME_EPS: float = 1e-7
"""ε of RankMe (Garrido et al. 2023, Eq. 1; float32 default of the paper and stable-SSL)."""


@quiet
def second_moment(z: Array) -> tuple[Array, Array, Array]:
    """Sufficient statistics of rows ``z`` (n, d): ``(S = zᵀz, Σz, n)`` in float64."""
    x = as_rows(z)
    xp = array_namespace(x)
    return x.T @ x, xp.sum(x, axis=0), scalar(xp, float(x.shape[0]), x)


@quiet
def eigenvalues_desc(s: Array) -> Array:
    """Eigenvalues of a symmetric PSD matrix, descending, clamped at 0 (round-off)."""
    xp = array_namespace(s)
    lam = xp.linalg.eigvalsh(f64(xp, s))
    return xp.clip(xp.flip(lam, axis=0), min=0.0)


def _rank_mask(xp: Any, length: int, k: Array | float, like: Array) -> Array:
    """Boolean mask of the first ``k`` positions (``k`` may be a device array: no sync)."""
    idx = xp.arange(length, dtype=xp.float64, device=device(like))
    return idx < scalar(xp, k, like)


@quiet
def rankme_from_singular_values(s: Array, k: Array | float | None = None,
                                eps: float = RANKME_EPS) -> Array:
    """RankMe (Garrido, Balestriero, Najman & LeCun, ICML 2023, Eq. 1–2).

    ``RankMe = exp(−Σ_{k≤K} p_k log p_k)``, ``p_k = σ_k/‖σ‖₁ + ε`` over the ``K = min(n, d)``
    largest singular values ``σ`` (descending) of the *uncentred* embedding matrix. ε is added
    after normalisation, as in the paper and stable-SSL, so a complete collapse reads slightly
    above 1 (1.0033 for K = 2048).
    """
    xp = array_namespace(s)
    s = xp.clip(f64(xp, s), min=0.0)
    mask = _rank_mask(xp, s.shape[0], s.shape[0] if k is None else k, s)
    s = xp.where(mask, s, 0.0)
    total = xp.sum(s)
    p = s / total + eps
    h = -xp.sum(xp.where(mask, p * xp.log(p), 0.0))
    return xp.where(total > 0, xp.exp(h), math.nan)


@quiet
def effective_rank_from_singular_values(s: Array) -> Array:
    """Roy & Vetterli (2007) effective rank ``exp(H(σ/‖σ‖₁))`` with ``0·log 0 = 0``, no ε.

    This is the erank used by Dohare et al. (2024) for plasticity; ``1 ≤ erank ≤ rank``.
    """
    xp = array_namespace(s)
    s = xp.clip(f64(xp, s), min=0.0)
    total = xp.sum(s)
    p = s / total
    plogp = xp.where(p > 0, p * xp.log(xp.where(p > 0, p, 1.0)), 0.0)
    h = -xp.sum(plogp)
    return xp.where(total > 0, xp.exp(h), math.nan)


@quiet
def srank_from_singular_values(s: Array, delta: float = 0.01) -> Array:
    """srank_δ (Kumar, Agarwal, Ghosh & Levine, ICLR 2021).

    ``min{k : Σ_{i≤k} σ_i / Σ_i σ_i ≥ 1 − δ}`` over descending singular values of the uncentred
    feature matrix; δ = 0.01 as in the paper. Computed like Dohare et al.'s
    ``compute_stable_rank``: the number of normalised cumulative sums below 1 − δ, plus one.
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    xp = array_namespace(s)
    s = xp.clip(f64(xp, s), min=0.0)
    total = xp.sum(s)
    c = xp.cumulative_sum(s) / total
    k = f64(xp, xp.sum(f64(xp, c < 1.0 - delta))) + 1.0
    return xp.where(total > 0, k, math.nan)


@quiet
def top_eigenvalue_share_from_eigenvalues(lam: Array) -> Array:
    """Share of the largest eigenvalue of the second moment in its trace, ``λ₁ / Σλ`` (0–1)."""
    xp = array_namespace(lam)
    lam = xp.clip(f64(xp, lam), min=0.0)
    total = xp.sum(lam)
    return xp.where(total > 0, xp.max(lam) / total, math.nan)


@quiet
def participation_ratio_from_moments(s: Array, zsum: Array, n: Array | float,
                                     corrected: bool = True) -> Array:
    """Participation ratio ``PR = (tr C)² / tr(C²)`` of the centred covariance, no eigensolve.

    Gao et al. 2017; Recanatesi et al. 2019; used for rank collapse by Kumar et al. 2021.
    With ``corrected=True`` (default) the small-sample bias is removed with Wishart moments
    (docs/metrics.md §3, a design of that note, not from a paper): with scatter ``W = S − Σz Σzᵀ/n``
    and ``m = n − 1``, ``â = (tr W² − (tr W)²/m) / ((m+2)(m−1))`` estimates ``tr Σ²`` and
    ``b̂ = ((tr W)² − 2m·â)/m²`` estimates ``(tr Σ)²``; ``PR = b̂/â``. Exact in expectation for
    Gaussian features, approximate otherwise. The corrected value is clamped to ``[1, d]``.
    Needs ``n ≥ 3`` (corrected) or ``n ≥ 2``; otherwise NaN.
    """
    xp = array_namespace(s)
    s = f64(xp, s)
    zsum = f64(xp, zsum)
    n = scalar(xp, n, s)
    w = s - (zsum[:, None] * zsum[None, :]) / xp.clip(n, min=1.0)
    w = 0.5 * (w + w.T)
    tr = xp.linalg.trace(w)
    tr2 = xp.sum(w * w)
    if not corrected:
        return xp.where((n >= 2) & (tr2 > 0), tr * tr / tr2, math.nan)
    m = n - 1.0
    a_hat = (tr2 - tr * tr / xp.clip(m, min=1.0)) / xp.clip((m + 2.0) * (m - 1.0), min=1.0)
    b_hat = (tr * tr - 2.0 * m * a_hat) / xp.clip(m * m, min=1.0)
    pr = xp.clip(b_hat / a_hat, min=1.0, max=float(s.shape[0]))
    return xp.where((n >= 3) & (a_hat > 0) & (b_hat > 0), pr, math.nan)


@quiet
def spectrum_alpha_from_eigenvalues(lam: Array, k: Array | float | None = None,
                                    fit_start: int = 10, fit_stop: int = 100,
                                    min_points: int = 5, rel_floor: float = 1e-12) -> Array:
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
    xp = array_namespace(lam)
    lam = f64(xp, lam)
    length = lam.shape[0]
    stop = min(fit_stop, length)
    if stop <= fit_start:
        return scalar(xp, math.nan, lam)
    y_all = lam[fit_start:stop]
    rank = xp.arange(fit_start + 1, stop + 1, dtype=xp.float64, device=device(lam))
    # Eigenvalues below rel_floor·λ₁ are numerical zeros (a rank-deficient window), not spectrum.
    valid = y_all > rel_floor * xp.clip(xp.max(lam), min=0.0)
    if k is not None:
        valid = valid & _rank_mask(xp, length, k, lam)[fit_start:stop]
    w = xp.where(valid, 1.0 / rank, 0.0)
    y = xp.log(xp.where(valid, y_all, 1.0))
    x = -xp.log(rank)
    # Weighted least squares for y = α·x + c, closed form (2×2 normal equations).
    sw, swx, swy = xp.sum(w), xp.sum(w * x), xp.sum(w * y)
    swxx, swxy = xp.sum(w * x * x), xp.sum(w * x * y)
    det = sw * swxx - swx * swx
    alpha = (sw * swxy - swx * swy) / det
    ok = (xp.sum(f64(xp, valid)) >= min_points) & (xp.abs(det) > 0)
    return xp.where(ok, alpha, math.nan)


@quiet
def l2_normalized_std_from_sums(nsum: Array, nsq: Array, n: Array | float) -> Array:
    """SimSiam collapse measure (Chen & He, CVPR 2021) from per-dimension sums.

    ``std_l2 = (1/d) Σ_j std_i(ẑ_ij)``, ``ẑ_i = z_i/‖z_i‖₂``, unbiased std (ddof = 1) as in
    lightly's ``std_of_l2_normalized``; inputs are ``Σ_i ẑ_i`` and ``Σ_i ẑ_i²`` (each (d,)).
    ≈ 1/√d for healthy isotropic embeddings, → 0 on complete collapse. Blind to dimensional
    collapse (docs/metrics.md §5a): pair it with RankMe.
    """
    xp = array_namespace(nsum)
    nsum = f64(xp, nsum)
    nsq = f64(xp, nsq)
    n = scalar(xp, n, nsum)
    var = (nsq - nsum * nsum / xp.clip(n, min=1.0)) / xp.clip(n - 1.0, min=1.0)
    std = xp.mean(xp.sqrt(xp.clip(var, min=0.0)))
    return xp.where(n >= 2, std, math.nan)


@quiet
def mean_cosine_similarity_from_sums(nsum: Array, nsq: Array, n: Array | float) -> Array:
    """Mean pairwise cosine similarity over distinct rows, exact from ``Σẑ`` and ``Σẑ²``.

    ``(‖Σ_i ẑ_i‖² − Σ_i ‖ẑ_i‖²) / (n(n−1))``; 1 on complete collapse, ≈ 0 for centred isotropic
    embeddings (a high value means every row points the same way).
    """
    xp = array_namespace(nsum)
    nsum = f64(xp, nsum)
    n = scalar(xp, n, nsum)
    num = xp.sum(nsum * nsum) - xp.sum(f64(xp, nsq))
    val = num / xp.clip(n * (n - 1.0), min=1.0)
    return xp.where(n >= 2, val, math.nan)


@quiet
def mean_variance_from_moments(s: Array, zsum: Array, n: Array | float, dim: int | None = None
                               ) -> Array:
    """Mean per-dimension variance of the raw (not normalised) rows, from ``S = ZᵀZ`` and ``Σz``.

    ``tr C / d`` with ``C = (S − Σz Σzᵀ/n)/(n − 1)`` (ddof = 1); VICReg's variance term
    (Bardes et al., ICLR 2022) watches the same scale. Unlike every normalised signal it falls
    when all rows shrink to one point, wherever that point is (to 0 included). ``dim`` divides
    the trace (default: ``s``'s size; a sketch passes the true d). NaN below two rows.
    """
    xp = array_namespace(s)
    s = f64(xp, s)
    zsum = f64(xp, zsum)
    n = scalar(xp, n, s)
    d = float(dim if dim is not None else s.shape[0])
    tr = xp.linalg.trace(s) - xp.sum(zsum * zsum) / xp.clip(n, min=1.0)
    var = xp.clip(tr, min=0.0) / (xp.clip(n - 1.0, min=1.0) * d)
    return xp.where(n >= 2, var, math.nan)


# ---------------------------------------------------------------- a window's whole set


SPECTRAL_SIGNALS: tuple[str, ...] = (
    "effective_rank", "effective_rank_ratio", "participation_ratio", "spectrum_alpha",
    "srank", "top_eigenvalue_share", "window_samples", "embedding_dim",
)
COLLAPSE_SIGNALS: tuple[str, ...] = ("embedding_std_ratio", "mean_cosine_similarity",
                                     "embedding_variance")


@quiet
def window_spectral_signals(s: Array, zsum: Array, n: Array | float, *,
                            eps: float = RANKME_EPS, srank_delta: float = 0.01,
                            alpha_fit: tuple[int, int] = (10, 100),
                            alpha_centered: bool = False, pr_corrected: bool = True
                            ) -> dict[str, Array]:
    """The spectral signals of a window (:data:`SPECTRAL_SIGNALS`, 0-d arrays) and its
    ``spectrum`` (eigenvalues of ``S/n``, descending) from one ``eigvalsh`` of ``S``.

    RankMe and its ratio to ``K = min(n, d)``, srank, α-ReQ (of the uncentred ``S`` unless
    ``alpha_centered``: interlacing moves the fit window by at most one rank), ``λ₁/Σλ`` and
    the corrected participation ratio; NaN below two rows. No host synchronisation.
    """
    xp = array_namespace(s)
    n = scalar(xp, n, s)
    d = scalar(xp, float(s.shape[0]), s)
    k = xp.minimum(n, d)
    lam = eigenvalues_desc(s)                                            # (d,) descending
    sigma = xp.sqrt(lam)
    rank = rankme_from_singular_values(sigma, k, eps)
    if alpha_centered:
        scatter = f64(xp, s) - (zsum[:, None] * zsum[None, :]) / xp.clip(n, min=1.0)
        alpha = spectrum_alpha_from_eigenvalues(eigenvalues_desc(scatter), n - 1.0, *alpha_fit)
    else:
        alpha = spectrum_alpha_from_eigenvalues(lam, k, *alpha_fit)
    out = {
        "effective_rank": rank,
        "effective_rank_ratio": rank / xp.clip(k, min=1.0),
        "participation_ratio": participation_ratio_from_moments(s, zsum, n, pr_corrected),
        "spectrum_alpha": alpha,
        "srank": srank_from_singular_values(sigma, srank_delta),
        "top_eigenvalue_share": top_eigenvalue_share_from_eigenvalues(lam),
    }
    enough = n >= 2
    out = {key: xp.where(enough, value, math.nan) for key, value in out.items()}
    out["window_samples"] = n
    out["embedding_dim"] = d
    out["spectrum"] = lam / xp.clip(n, min=1.0)
    return out


@quiet
def window_collapse_signals(s: Array, zsum: Array, nsum: Array, nsq: Array, n: Array | float,
                            dim: int | None = None) -> dict[str, Array]:
    """The complete-collapse signals of a window (:data:`COLLAPSE_SIGNALS`, 0-d arrays): the
    SimSiam std of L2-normalised rows × √(width of ``nsum``), the mean pairwise cosine and the
    raw ``tr C / d``. ``dim`` is the rows' true d (default: ``s``'s size; a sketch's is k)."""
    std = l2_normalized_std_from_sums(nsum, nsq, n)
    return {
        "embedding_std_ratio": std * math.sqrt(nsum.shape[0]),
        "mean_cosine_similarity": mean_cosine_similarity_from_sums(nsum, nsq, n),
        "embedding_variance": mean_variance_from_moments(s, zsum, n, dim),
    }


@quiet
def normalize_rows(z: Array, eps: float = 1e-12) -> Array:
    """Row L2 normalisation; an all-zero row stays zero."""
    xp = array_namespace(z)
    return z / xp.clip(xp.linalg.vector_norm(z, axis=1, keepdims=True), min=eps)


# ---------------------------------------------------------------- one-shot on (n, d) rows


def _singular_values(z: Array) -> tuple[Array, int]:
    x = as_rows(z)
    return array_namespace(x).linalg.svdvals(x), min(x.shape)


@quiet
def rankme(z: Array, eps: float = RANKME_EPS) -> Array:
    """RankMe of rows ``z`` (n, d): paper convention (uncentred σ, ε = 1e-7). See
    :func:`rankme_from_singular_values`."""
    s, k = _singular_values(z)
    return rankme_from_singular_values(s, k, eps)


@quiet
def effective_rank(z: Array) -> Array:
    """Roy–Vetterli effective rank of rows ``z`` (n, d) (no ε)."""
    s, _ = _singular_values(z)
    return effective_rank_from_singular_values(s)


@quiet
def srank(z: Array, delta: float = 0.01) -> Array:
    """srank_δ of rows ``z`` (n, d) (Kumar et al. 2021), δ = 0.01."""
    s, _ = _singular_values(z)
    return srank_from_singular_values(s, delta)


@quiet
def participation_ratio(z: Array, corrected: bool = True) -> Array:
    """Participation ratio of the centred covariance of rows ``z`` (n, d); see
    :func:`participation_ratio_from_moments`."""
    s, zsum, n = second_moment(z)
    return participation_ratio_from_moments(s, zsum, n, corrected)


@quiet
def spectrum_alpha(z: Array, fit_start: int = 10, fit_stop: int = 100,
                   centered: bool = True) -> Array:
    """α-ReQ of rows ``z`` (n, d) from the eigenvalues of the centred covariance (reference
    convention) or, with ``centered=False``, of the uncentred second moment."""
    s, zsum, n = second_moment(z)
    if centered:
        xp = array_namespace(s)
        # n = 0: a zero matrix, not 0/0 = NaN
        s = s - (zsum[:, None] * zsum[None, :]) / xp.clip(n, min=1.0)
        k = min(z.shape[0] - 1, z.shape[1])
    else:
        k = min(z.shape)
    return spectrum_alpha_from_eigenvalues(eigenvalues_desc(s), k, fit_start, fit_stop)


@quiet
def l2_normalized_std(z: Array) -> Array:
    """SimSiam std of L2-normalised rows (not multiplied by √d); see
    :func:`l2_normalized_std_from_sums`."""
    x = normalize_rows(as_rows(z))
    xp = array_namespace(x)
    return l2_normalized_std_from_sums(xp.sum(x, axis=0), xp.sum(x * x, axis=0), float(x.shape[0]))


@quiet
def mean_cosine_similarity(z: Array) -> Array:
    """Mean pairwise cosine similarity of distinct rows of ``z`` (n, d)."""
    x = normalize_rows(as_rows(z))
    xp = array_namespace(x)
    return mean_cosine_similarity_from_sums(xp.sum(x, axis=0), xp.sum(x * x, axis=0),
                                            float(x.shape[0]))


@quiet
def mean_variance(z: Array) -> Array:
    """Mean per-dimension variance (ddof 1) of rows ``z`` ``(n, d)``; see
    :func:`mean_variance_from_moments`."""
    s, zsum, n = second_moment(z)
    return mean_variance_from_moments(s, zsum, n)
