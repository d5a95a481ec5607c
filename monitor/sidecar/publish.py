"""The publish step of the ONNX Runtime backend, in numpy (no torch).

The per-batch kernels run on ONNX Runtime; the d×d publish step (an eigendecomposition, not an
ONNX op) runs here. Each function mirrors its torch counterpart in
:mod:`monitor.functional.spectral` formula for formula (same conventions, ε, fit window, NaN
rules); ``tests/sidecar/test_publish.py`` checks them against the torch code to 1e-10 on random
and degenerate windows, so the two cannot drift apart silently.
"""

from __future__ import annotations

import math

import numpy as np

RANKME_EPS = 1e-7


def eigenvalues_desc(s: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix, descending, clamped at 0."""
    return np.clip(np.linalg.eigvalsh(s.astype(np.float64))[::-1], 0.0, None)


def rankme(sigma: np.ndarray, k: float, eps: float = RANKME_EPS) -> float:
    """RankMe over the ``k`` largest singular values (Garrido et al. 2023)."""
    s = np.clip(sigma, 0.0, None)
    s = np.where(np.arange(s.shape[0]) < k, s, 0.0)
    total = s.sum()
    if not total > 0:
        return math.nan
    p = s / total + eps
    mask = np.arange(s.shape[0]) < k
    return float(np.exp(-(np.where(mask, p * np.log(p), 0.0)).sum()))


def srank(sigma: np.ndarray, delta: float = 0.01) -> float:
    """srank_δ (Kumar et al. 2021): cumulative sums below 1 − δ, plus one."""
    s = np.clip(sigma, 0.0, None)
    total = s.sum()
    if not total > 0:
        return math.nan
    return float((np.cumsum(s) / total < 1.0 - delta).sum() + 1.0)


def top_eigenvalue_share(lam: np.ndarray) -> float:
    """``λ₁ / Σλ``."""
    total = lam.sum()
    return float(lam.max() / total) if total > 0 else math.nan


def participation_ratio(s: np.ndarray, zsum: np.ndarray, n: float) -> float:
    """Wishart-corrected participation ratio of the centred covariance (docs/metrics.md §3)."""
    w = s - np.outer(zsum, zsum) / max(n, 1.0)
    w = 0.5 * (w + w.T)
    tr = float(np.trace(w))
    tr2 = float((w * w).sum())
    m = n - 1.0
    a_hat = (tr2 - tr * tr / max(m, 1.0)) / max((m + 2.0) * (m - 1.0), 1.0)
    b_hat = (tr * tr - 2.0 * m * a_hat) / max(m * m, 1.0)
    if not (n >= 3 and a_hat > 0 and b_hat > 0):
        return math.nan
    return float(min(max(b_hat / a_hat, 1.0), float(s.shape[0])))


def spectrum_alpha(lam: np.ndarray, k: float, fit_start: int = 10, fit_stop: int = 100,
                   min_points: int = 5, rel_floor: float = 1e-12) -> float:
    """α-ReQ WLS power-law slope over ranks ``fit_start+1 … fit_stop`` (weights 1/rank)."""
    stop = min(fit_stop, lam.shape[0])
    if stop <= fit_start:
        return math.nan
    y_all = lam[fit_start:stop]
    rank = np.arange(fit_start + 1, stop + 1, dtype=np.float64)
    valid = (y_all > rel_floor * max(lam.max(), 0.0)) & (np.arange(fit_start, stop) < k)
    w = np.where(valid, 1.0 / rank, 0.0)
    y = np.log(np.where(valid, y_all, 1.0))
    x = -np.log(rank)
    sw, swx, swy = w.sum(), (w * x).sum(), (w * y).sum()
    swxx, swxy = (w * x * x).sum(), (w * x * y).sum()
    det = sw * swxx - swx * swx
    if valid.sum() < min_points or det == 0:
        return math.nan
    return float((sw * swxy - swx * swy) / det)


def l2_normalized_std(nsum: np.ndarray, nsq: np.ndarray, n: float) -> float:
    """SimSiam's std of L2-normalised rows (ddof 1), from per-dimension sums."""
    if n < 2:
        return math.nan
    var = (nsq - nsum * nsum / max(n, 1.0)) / max(n - 1.0, 1.0)
    return float(np.sqrt(np.clip(var, 0.0, None)).mean())


def mean_cosine_similarity(nsum: np.ndarray, nsq: np.ndarray, n: float) -> float:
    """Mean cosine over distinct rows from ``Σẑ`` and ``Σẑ²``."""
    if n < 2:
        return math.nan
    return float(((nsum * nsum).sum() - nsq.sum()) / max(n * (n - 1.0), 1.0))


def mean_variance(s: np.ndarray, zsum: np.ndarray, n: float) -> float:
    """Mean per-dimension variance of the raw rows, ``tr C / d`` (ddof 1)."""
    if n < 2:
        return math.nan
    tr = float(np.trace(s)) - float(zsum @ zsum) / max(n, 1.0)
    return max(tr, 0.0) / (max(n - 1.0, 1.0) * s.shape[0])


def spectral_signals(s: np.ndarray, zsum: np.ndarray, nsum: np.ndarray, nsq: np.ndarray,
                     n: float) -> tuple[dict[str, float], np.ndarray]:
    """Every spectral and collapse signal of a window (the torch ``SpectrumScorer`` +
    ``CollapseScorer`` set, default options) and the spectrum ``λ/n``."""
    d = float(s.shape[0])
    k = min(n, d)
    lam = eigenvalues_desc(s)
    sigma = np.sqrt(lam)
    rank = rankme(sigma, k)
    out = {
        "effective_rank": rank,
        "effective_rank_ratio": rank / max(k, 1.0),
        "participation_ratio": participation_ratio(s, zsum, n),
        "spectrum_alpha": spectrum_alpha(lam, k),
        "srank": srank(sigma),
        "top_eigenvalue_share": top_eigenvalue_share(lam),
    }
    if n < 2:
        out = {key: math.nan for key in out}
    out["window_samples"] = float(n)
    out["embedding_dim"] = d
    std = l2_normalized_std(nsum, nsq, n)
    out["embedding_std_ratio"] = std * math.sqrt(d)
    out["mean_cosine_similarity"] = mean_cosine_similarity(nsum, nsq, n)
    out["embedding_variance"] = mean_variance(s, zsum, n)
    return out, lam / max(n, 1.0)
