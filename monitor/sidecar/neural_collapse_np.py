"""Neural collapse NC1 and NC2 in numpy, for the ONNX Runtime backend (no torch).

Each function mirrors its torch counterpart in :mod:`monitor.functional.neural_collapse`
(Papyan, Han & Donoho, PNAS 2020; docs/metrics.md §8) formula for formula: float64 throughout, the
global mean ``μ_G`` of the samples (not of the class means), NC1 by the thin SVD of the centred
class means with the same relative cut :data:`NC1_RTOL` on ``s_k²/s_1²`` and only the ``C − 1``
largest singular values, C = the classes present (``n_c > 0``), NaN below 2 classes (NC1, NC2
equinorm, max-angle) or 3 classes (equiangularity). One difference of form, not of value:
torch masks absent classes (to avoid a host sync) where numpy slices them out, so the SVD is
of a ``d × C_present`` matrix instead of ``d × max_classes`` (the zero columns of absent classes
change neither the non-zero singular values nor their vectors).
``tests/sidecar/test_neural_collapse_np.py`` checks every function against the torch code.

NC3 and NC4 need the classifier's weights, which the sidecar does not receive: not here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

NC1_RTOL: float = 1e-12
"""Relative cut on ``s_k²/s_1²`` below which a singular value of ``M̃`` counts as zero (as
``monitor.functional.neural_collapse.NC1_RTOL``; a test checks they are equal)."""

_TINY: float = float(np.finfo(np.float64).tiny)


def class_statistics(x: np.ndarray, labels: np.ndarray, num_classes: int,
                     weights: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(S (d,d), class_sums (C,d), counts (C,))`` in float64 of rows ``x`` (n,d) with labels
    (n,) in ``[0, num_classes)``; ``weights`` (n,) multiplies each row (0 excludes it)."""
    x = np.asarray(x, dtype=np.float64)                                  # (n, d)
    y = np.asarray(labels, dtype=np.int64)                               # (n,)
    w = np.ones(x.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64)
    xw = x * w[:, None]                                                  # (n, d)
    s = xw.T @ x                                                         # (d, d)
    sums = np.zeros((num_classes, x.shape[1]))
    np.add.at(sums, y, xw)                                               # (C, d)
    counts = np.bincount(y, weights=w, minlength=num_classes).astype(np.float64)  # (C,)
    return s, sums, counts


def class_means(class_sums: np.ndarray, counts: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(μ (C,d), μ_G (d,), present (C,) bool)``: absent classes get ``μ_c = 0``; ``μ_G`` is
    the mean of the samples."""
    present = counts > 0                                                 # (C,)
    mu = class_sums / np.where(present, counts, 1.0)[:, None]            # (C, d)
    mu_g = class_sums.sum(0) / max(float(counts.sum()), _TINY)           # (d,)
    return mu, mu_g, present


def centered_class_means(class_sums: np.ndarray, counts: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray]:
    """``(M̃ (C,d), present (C,))``: rows ``μ_c − μ_G`` for present classes, 0 for absent."""
    mu, mu_g, present = class_means(class_sums, counts)
    return (mu - mu_g) * present[:, None], present


def within_class_covariance(s: np.ndarray, class_sums: np.ndarray,
                            counts: np.ndarray) -> np.ndarray:
    """``Σ_W = (S − Σ_c s_c s_cᵀ/n_c)/N`` (d,d), float64."""
    present = counts > 0
    scaled = class_sums / np.sqrt(np.where(present, counts, 1.0))[:, None]  # (C, d)
    return (s - scaled.T @ scaled) / max(float(counts.sum()), _TINY)


def nc1_from_stats(s: np.ndarray, class_sums: np.ndarray, counts: np.ndarray,
                   rtol: float = NC1_RTOL) -> float:
    """NC1 ``= tr(Σ_W Σ_B^†)/C = Σ_{k<C−1, s_k² > rtol·s_1²} u_kᵀ Σ_W u_k / s_k²`` with the
    thin SVD ``M̃ᵀ = U diag(s) Vᵀ`` of the present classes' centred means; NaN if C < 2."""
    m_tilde, present = centered_class_means(class_sums, counts)
    c_present = int(present.sum())
    if c_present < 2:
        return math.nan
    sigma_w = within_class_covariance(s, class_sums, counts)             # (d, d)
    u, sv, _ = np.linalg.svd(m_tilde[present].T, full_matrices=False)    # (d, k), (k,)
    keep = ((np.arange(sv.shape[0]) < c_present - 1) & (sv * sv > rtol * sv[0] * sv[0])
            & (sv > 0))                                                  # (k,)
    quad = (u * (sigma_w @ u)).sum(0)                                    # (k,) u_kᵀ Σ_W u_k
    return float((quad[keep] / (sv[keep] * sv[keep])).sum())


def _rows(vectors: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    v = np.asarray(vectors, dtype=np.float64)
    return v if mask is None else v[np.asarray(mask, dtype=bool)]


def _pair_cosines(v: np.ndarray) -> np.ndarray:
    """Cosines of the unordered pairs ``c < c'`` of rows of ``v`` (a zero row has cosine 0)."""
    norms = np.linalg.norm(v, axis=1)
    unit = v / np.where(norms > 0, norms, 1.0)[:, None]
    return (unit @ unit.T)[np.triu_indices(v.shape[0], 1)]


def nc2_equinorm(vectors: np.ndarray, mask: np.ndarray | None = None) -> float:
    """``Std_c ‖v_c‖ / Avg_c ‖v_c‖`` (ddof 1) over the rows in ``mask``; NaN with < 2 rows or
    a zero mean norm."""
    norms = np.linalg.norm(_rows(vectors, mask), axis=1)
    if norms.shape[0] < 2 or not norms.mean() > 0:
        return math.nan
    return float(norms.std(ddof=1) / norms.mean())


def nc2_equiangularity(vectors: np.ndarray, mask: np.ndarray | None = None) -> float:
    """``Std_{c<c'} cos∠(v_c, v_c')`` (ddof 1); NaN with fewer than 3 rows."""
    cos = _pair_cosines(_rows(vectors, mask))
    return float(cos.std(ddof=1)) if cos.shape[0] >= 2 else math.nan


def nc2_max_angle(vectors: np.ndarray, mask: np.ndarray | None = None) -> float:
    """``Avg_{c≠c'} |cos∠(v_c, v_c') + 1/(C−1)|``; NaN with fewer than 2 rows."""
    v = _rows(vectors, mask)
    c = v.shape[0]
    if c < 2:
        return math.nan
    return float(np.abs(_pair_cosines(v) + 1.0 / (c - 1)).mean())


def neural_collapse_signals(s: np.ndarray, class_sums: np.ndarray,
                            counts: np.ndarray) -> dict[str, float]:
    """The classifier-free signals of ``NeuralCollapseScorer.compute`` from the window's
    statistics: NC1, the three NC2 measures, the classes present and the window's rows."""
    m_tilde, present = centered_class_means(class_sums, counts)
    return {
        "neural_collapse_nc1": nc1_from_stats(s, class_sums, counts),
        "neural_collapse_nc2_equinorm": nc2_equinorm(m_tilde, present),
        "neural_collapse_nc2_equiangularity": nc2_equiangularity(m_tilde, present),
        "neural_collapse_nc2_max_angle": nc2_max_angle(m_tilde, present),
        "neural_collapse_classes": float(present.sum()),
        "neural_collapse_window_samples": float(counts.sum()),
    }


def effective_depth(nc1_in_order: Iterable[float], threshold: float) -> float | None:
    """NC1 "effective depth" (Galanti et al. 2022), as ``Monitor._effective_depth``: among the
    streams with a finite NC1, in watch order, the 1-based index of the first one below
    ``threshold`` (NaN if none); None when no stream has a finite NC1 (signal absent)."""
    finite = [v for v in nc1_in_order if math.isfinite(v)]
    if not finite:
        return None
    return float(next((i for i, v in enumerate(finite, 1) if v < threshold), math.nan))
