"""Neural collapse NC1–NC4 (Papyan, Han & Donoho, PNAS 2020) as pure functions, for numpy and
torch alike (written once against the array API they share, as :mod:`monitor.functional.spectral`).

Two layers, as in :mod:`monitor.functional.spectral`:

* ``*_from_stats`` / vector functions work on sufficient statistics — the uncentred second
  moment ``S = Σ_i h_i h_iᵀ`` (float64), the per-class sums ``s_c = Σ_{i∈c} h_i`` and counts
  ``n_c`` — or on class means and classifier rows. They contain no host synchronisation: the
  number of classes present is a device array and absent classes (``n_c = 0``) are masked out,
  never sliced out.
* One-shot functions on an ``(n, d)`` array with integer labels (``nc1``, ``neural_collapse``)
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
from collections.abc import Iterable
from typing import Any

from array_api_compat import array_namespace, device

from monitor.functional._xp import Array, as_rows, f64, quiet, scatter_add


NC1_RTOL: float = 1e-12
"""Relative cut on ``s_k²/s_1²`` below which a singular value of ``M̃`` counts as zero."""

NC_SIGNALS: tuple[str, ...] = (
    "neural_collapse_nc1", "neural_collapse_nc2_equinorm", "neural_collapse_nc2_equiangularity",
    "neural_collapse_nc2_max_angle", "neural_collapse_classes", "neural_collapse_window_samples",
)
"""The classifier-free signals of a labelled window (:func:`window_neural_collapse_signals`)."""


def _tiny(xp: Any) -> float:
    return float(xp.finfo(xp.float64).smallest_normal)


# ----------------------------------------------------------------------------- statistics


def _check_labels(labels: Array, n: int, num_classes: int) -> Array:
    xp = array_namespace(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"expected labels of shape ({n},), got shape {tuple(labels.shape)}")
    if not xp.isdtype(labels.dtype, "integral"):
        raise TypeError(f"expected integer labels, got {labels.dtype}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if n and (int(xp.min(labels)) < 0 or int(xp.max(labels)) >= num_classes):  # one-shot: syncs
        raise ValueError(f"labels must lie in [0, {num_classes}), got values in "
                         f"[{int(xp.min(labels))}, {int(xp.max(labels))}]")
    return xp.astype(labels, xp.int64)


@quiet
def class_statistics(h: Array, labels: Array, num_classes: int | None = None,
                     weights: Array | None = None) -> tuple[Array, Array, Array]:
    """Sufficient statistics ``(S (d,d), class_sums (C,d), counts (C,))`` in float64.

    ``weights`` (n,) multiplies each row's contribution (0/1 validity masks from scorers; a
    zero-weight row must hold finite values). ``num_classes`` defaults to ``max(labels) + 1``
    (a host sync). Labels out of ``[0, num_classes)`` raise ``ValueError``.
    """
    x = as_rows(h, "features")                                                   # (n, d)
    if num_classes is None:
        num_classes = int(array_namespace(labels).max(labels)) + 1 if labels.shape[0] else 1
    y = _check_labels(labels, x.shape[0], num_classes)
    return class_statistics_unchecked(x, y, num_classes, weights)


def class_statistics_unchecked(x: Array, y: Array, num_classes: int,
                               weights: Array | None) -> tuple[Array, Array, Array]:
    """Unchecked core of :func:`class_statistics` (no sync): x (n,d) float64, y (n,) int64."""
    xp = array_namespace(x)
    dev = device(x)
    w = (xp.ones(x.shape[0], dtype=xp.float64, device=dev) if weights is None
         else f64(xp, weights))                                         # (n,)
    xw = x * w[:, None]                                                  # (n, d)
    s = xw.T @ x                                                         # (d, d)
    sums = scatter_add(xp, xp.zeros((num_classes, x.shape[1]), dtype=xp.float64, device=dev),
                        y, xw)                                           # (C, d)
    counts = scatter_add(xp, xp.zeros(num_classes, dtype=xp.float64, device=dev), y, w)  # (C,)
    return s, sums, counts


def _check_stats(s: Array, class_sums: Array, counts: Array) -> None:
    if class_sums.ndim != 2:
        raise ValueError(f"expected class_sums of shape (C, d), got {tuple(class_sums.shape)}")
    c, d = class_sums.shape
    if c < 1 or d < 1:
        raise ValueError(f"expected at least one class and one feature, got class_sums of "
                         f"shape {tuple(class_sums.shape)}")
    if tuple(s.shape) != (d, d):
        raise ValueError(f"expected S of shape ({d}, {d}) to match class_sums (C, d) = "
                         f"({c}, {d}), got {tuple(s.shape)}")
    if tuple(counts.shape) != (c,):
        raise ValueError(f"expected counts of shape ({c},), got {tuple(counts.shape)}")


@quiet
def class_means(class_sums: Array, counts: Array) -> tuple[Array, Array, Array]:
    """``(μ (C,d), μ_G (d,), present (C,) bool)`` from class sums and counts.

    ``μ_c = s_c/n_c`` for present classes and 0 for absent ones; ``μ_G = Σ_c s_c / N``, the
    mean of the samples (pitfall 2 of docs/metrics.md §8: not the mean of the class means).
    """
    xp = array_namespace(class_sums)
    sums = f64(xp, class_sums)
    cnt = f64(xp, counts)
    present = cnt > 0                                                    # (C,)
    mu = sums / xp.where(present, cnt, 1.0)[:, None]                     # (C, d)
    mu_g = xp.sum(sums, axis=0) / xp.clip(xp.sum(cnt), min=_tiny(xp))    # (d,)
    return mu, mu_g, present


@quiet
def centered_class_means(class_sums: Array, counts: Array) -> tuple[Array, Array]:
    """``(M̃ (C,d), present (C,))``: rows ``μ_c − μ_G`` for present classes, 0 for absent."""
    xp = array_namespace(class_sums)
    mu, mu_g, present = class_means(class_sums, counts)
    return (mu - mu_g) * f64(xp, present)[:, None], present


# ----------------------------------------------------------------------------- NC1


@quiet
def within_class_covariance(s: Array, class_sums: Array, counts: Array) -> Array:
    """``Σ_W = (S − Σ_c n_c μ_c μ_cᵀ)/N = (S − Σ_c s_c s_cᵀ/n_c)/N`` (d,d), float64.

    The identity ``Σ_c Σ_{i∈c} (h−μ_c)(h−μ_c)ᵀ = Σ_i h hᵀ − Σ_c n_c μ_c μ_cᵀ`` makes it one
    pass; it needs float64 ``S`` (docs/metrics.md §8: float32 goes negative at within-class std 1e-3).
    """
    _check_stats(s, class_sums, counts)
    xp = array_namespace(s)
    cnt = f64(xp, counts)
    sums = f64(xp, class_sums)
    scaled = sums / xp.sqrt(xp.where(cnt > 0, cnt, 1.0))[:, None]        # (C, d)
    n = xp.clip(xp.sum(cnt), min=_tiny(xp))
    return (f64(xp, s) - scaled.T @ scaled) / n


@quiet
def nc1_from_stats(s: Array, class_sums: Array, counts: Array,
                   rtol: float = NC1_RTOL) -> Array:
    """NC1 ``= tr(Σ_W Σ_B^†)/C`` (Papyan et al. 2020) by the thin-SVD route, 0-d float64.

    With the thin SVD ``M̃ᵀ = U diag(s) Vᵀ`` (``U`` d×C), ``Σ_B = U diag(s²/C) Uᵀ`` so
    ``Σ_B^† = C·U diag(s⁻²) Uᵀ`` on its range and the factor C cancels:
    ``NC1 = Σ_{k<C−1} (u_kᵀ Σ_W u_k)/s_k²`` (docs/metrics.md §8 "Streaming"). Only the ``C − 1``
    largest singular values are kept (the centred means have rank ≤ C − 1, since
    ``Σ_c n_c (μ_c − μ_G) = 0``), and of those only ``s_k² > rtol·s_1²`` (this replaces pinv's
    round-off tolerance: pitfall 1). C counts the classes present (``n_c > 0``); absent classes
    are masked out (their zero columns change neither the non-zero singular values nor their
    vectors). Cost O(dC² + d²C), no d×d pseudo-inverse. NaN with fewer than 2 classes.
    """
    xp = array_namespace(s)
    sigma_w = within_class_covariance(s, class_sums, counts)             # (d, d)
    m_tilde, present = centered_class_means(class_sums, counts)          # (C, d)
    u, sv, _ = xp.linalg.svd(m_tilde.T, full_matrices=False)             # (d, k), (k,)
    c_present = xp.sum(f64(xp, present))
    k_idx = xp.arange(sv.shape[0], dtype=xp.float64, device=device(sv))
    keep = (k_idx < c_present - 1.0) & (sv * sv > rtol * sv[0] * sv[0]) & (sv > 0)  # (k,)
    quad = xp.sum(u * (sigma_w @ u), axis=0)                             # (k,) u_kᵀ Σ_W u_k
    safe = xp.where(keep, sv, 1.0)
    value = xp.sum(xp.where(keep, quad / (safe * safe), 0.0))
    return xp.where(c_present >= 2, value, math.nan)


@quiet
def nc1(h: Array, labels: Array, num_classes: int | None = None) -> Array:
    """One-shot NC1 of features ``h`` (n,d) with integer ``labels`` (n,); see :func:`nc1_from_stats`."""
    return nc1_from_stats(*class_statistics(h, labels, num_classes))


# ----------------------------------------------------------------------------- NC2–NC4


def _vectors_and_mask(vectors: Array, mask: Array | None) -> tuple[Array, Array]:
    xp = array_namespace(vectors)
    if vectors.ndim != 2:
        raise ValueError(f"expected vectors of shape (C, d), got shape {tuple(vectors.shape)}")
    v = f64(xp, vectors)
    if mask is None:
        return v, xp.ones(v.shape[0], dtype=xp.bool, device=device(v))
    if tuple(mask.shape) != (v.shape[0],):
        raise ValueError(f"expected mask of shape ({v.shape[0]},), got {tuple(mask.shape)}")
    return v, xp.astype(xp.asarray(mask, device=device(v)), xp.bool)


def _pair_cosines(v: Array, mask: Array) -> tuple[Array, Array, Array]:
    """(cos (C,C), pair mask (C,C) of unordered pairs c < c' both present, C present)."""
    xp = array_namespace(v)
    norms = xp.linalg.vector_norm(v, axis=1)
    unit = v / xp.where(norms > 0, norms, 1.0)[:, None]
    cos = unit @ unit.T                                                  # (C, C)
    idx = xp.arange(v.shape[0], device=device(v))
    pairs = (idx[:, None] < idx[None, :]) & mask[:, None] & mask[None, :]
    return cos, pairs, xp.sum(f64(xp, mask))


@quiet
def nc2_equinorm(vectors: Array, mask: Array | None = None) -> Array:
    """NC2 equinorm: ``Std_c ‖v_c‖ / Avg_c ‖v_c‖`` over the rows in ``mask`` (Papyan et al. 2020).

    Pass centred class means ``μ_c − μ_G`` or classifier rows ``w_c``. Std is the unbiased
    (ddof = 1) one, as ``torch.std`` in the reference code. → 0 under collapse; NaN with < 2 rows.
    """
    v, mask = _vectors_and_mask(vectors, mask)
    xp = array_namespace(v)
    m = f64(xp, mask)
    k = xp.sum(m)
    norms = xp.linalg.vector_norm(v, axis=1)                             # (C,)
    mean = xp.sum(norms * m) / xp.clip(k, min=1.0)
    var = xp.sum(((norms - mean) ** 2) * m) / xp.clip(k - 1.0, min=1.0)
    value = xp.sqrt(var) / mean
    return xp.where((k >= 2) & (mean > 0), value, math.nan)


@quiet
def nc2_equiangularity(vectors: Array, mask: Array | None = None) -> Array:
    """NC2 equiangularity: ``Std_{c<c'} cos∠(v_c, v_c')`` (ddof = 1, unordered pairs).

    → 0 when all pairwise angles are equal (simplex ETF). NaN with fewer than 3 rows.
    """
    v, mask = _vectors_and_mask(vectors, mask)
    xp = array_namespace(v)
    cos, pairs, _ = _pair_cosines(v, mask)
    p = f64(xp, pairs)
    k = xp.sum(p)
    mean = xp.sum(cos * p) / xp.clip(k, min=1.0)
    var = xp.sum(((cos - mean) ** 2) * p) / xp.clip(k - 1.0, min=1.0)
    return xp.where(k >= 2, xp.sqrt(var), math.nan)


@quiet
def nc2_max_angle(vectors: Array, mask: Array | None = None) -> Array:
    """NC2 max-angle: ``Avg_{c≠c'} |cos∠(v_c, v_c') + 1/(C−1)|`` (Papyan's ``coherence``).

    → 0 when the rows form a simplex (cos = −1/(C−1), the largest equal angle for C vectors).
    C is the number of rows in ``mask``. NaN with fewer than 2 rows.
    """
    v, mask = _vectors_and_mask(vectors, mask)
    xp = array_namespace(v)
    cos, pairs, c = _pair_cosines(v, mask)
    p = f64(xp, pairs)
    dev = xp.abs(cos + 1.0 / xp.clip(c - 1.0, min=1.0))
    value = xp.sum(dev * p) / xp.clip(xp.sum(p), min=1.0)
    return xp.where(c >= 2, value, math.nan)


@quiet
def nc3_self_duality(weight: Array, centered_means: Array, mask: Array | None = None) -> Array:
    """NC3 ``‖ W/‖W‖_F − M̃/‖M̃‖_F ‖_F²`` (Papyan et al. 2020), 0-d float64, in [0, 4].

    ``weight`` is the classifier (C, d) (rows ``w_c``, not centred, as in the reference code);
    ``centered_means`` the rows ``μ_c − μ_G`` (C, d). With ``mask`` only the rows of present
    classes enter both matrices (and both norms). → 0 when the classifier aligns with the means.
    """
    if weight.ndim != 2 or tuple(weight.shape) != tuple(centered_means.shape):
        raise ValueError(f"expected weight and centred means of the same shape (C, d), got "
                         f"{tuple(weight.shape)} and {tuple(centered_means.shape)}")
    m, mask = _vectors_and_mask(centered_means, mask)
    xp = array_namespace(m)
    keep = f64(xp, mask)[:, None]
    w = f64(xp, weight) * keep
    m = m * keep
    wn, mn = xp.linalg.vector_norm(w), xp.linalg.vector_norm(m)
    diff = w / xp.where(wn > 0, wn, 1.0) - m / xp.where(mn > 0, mn, 1.0)
    value = xp.sum(diff * diff)
    return xp.where((wn > 0) & (mn > 0), value, math.nan)


@quiet
def nc4_ncc_mismatch(h: Array, weight: Array, bias: Array | None, means: Array,
                     mask: Array | None = None, row_weights: Array | None = None) -> Array:
    """NC4: fraction of rows with ``argmax_c(⟨w_c,h⟩+b_c) ≠ argmin_c ‖h − μ_c‖₂`` (0-d float64).

    ``h`` (n,d) rows, ``weight`` (C,d), ``bias`` (C,) or None, ``means`` the *uncentred* class
    means μ_c (C,d). The nearest-class-centre rule only considers classes in ``mask`` (present
    ones); the classifier's argmax is over all C. ``row_weights`` (n,) weighs rows (0 excludes
    one). Ties go to the lowest class index in both rules. → 0 in the terminal phase.
    """
    x = as_rows(h, "features")                                                   # (n, d)
    if (weight.ndim != 2 or weight.shape[1] != x.shape[1]
            or tuple(means.shape) != tuple(weight.shape)):
        raise ValueError(f"expected weight and means of shape (C, {x.shape[1]}), got "
                         f"{tuple(weight.shape)} and {tuple(means.shape)}")
    mu, mask = _vectors_and_mask(means, mask)
    xp = array_namespace(x)
    w = f64(xp, weight)
    logits = x @ w.T                                                     # (n, C)
    if bias is not None:
        if tuple(bias.shape) != (w.shape[0],):
            raise ValueError(f"expected bias of shape ({w.shape[0]},), got {tuple(bias.shape)}")
        logits = logits + f64(xp, bias)
    # ‖h − μ‖² = ‖h‖² − 2⟨h, μ⟩ + ‖μ‖²; ‖h‖² is common to all classes and dropped.
    dist = xp.sum(mu * mu, axis=1)[None, :] - 2.0 * (x @ mu.T)          # (n, C)
    dist = xp.where(mask[None, :], dist, math.inf)
    mismatch = f64(xp, xp.argmax(logits, axis=1) != xp.argmin(dist, axis=1))  # (n,)
    rw = xp.ones_like(mismatch) if row_weights is None else f64(xp, row_weights)
    total = xp.sum(rw)
    value = xp.sum(mismatch * rw) / xp.clip(total, min=_tiny(xp))
    return xp.where(total > 0, value, math.nan)


@quiet
def window_neural_collapse_signals(s: Array, class_sums: Array, counts: Array
                                   ) -> dict[str, Array]:
    """The classifier-free signals of a labelled window (:data:`NC_SIGNALS`, 0-d arrays) from
    its statistics: NC1, the three NC2 measures of the centred class means, the classes present
    and the window's rows. What the in-process scorer and the sidecar both publish."""
    xp = array_namespace(s)
    m_tilde, present = centered_class_means(class_sums, counts)
    return {
        "neural_collapse_nc1": nc1_from_stats(s, class_sums, counts),
        "neural_collapse_nc2_equinorm": nc2_equinorm(m_tilde, present),
        "neural_collapse_nc2_equiangularity": nc2_equiangularity(m_tilde, present),
        "neural_collapse_nc2_max_angle": nc2_max_angle(m_tilde, present),
        "neural_collapse_classes": xp.sum(f64(xp, present)),
        "neural_collapse_window_samples": xp.sum(f64(xp, counts)),
    }


def effective_depth(nc1_in_order: Iterable[float], threshold: float) -> float | None:
    """NC1 "effective depth" (Galanti et al. 2022): among the streams with a finite NC1, in
    watch order, the 1-based index of the first one below ``threshold`` (NaN if none); None
    when no stream has a finite NC1 (signal absent)."""
    finite = [v for v in nc1_in_order if math.isfinite(v)]
    if not finite:
        return None
    return float(next((i for i, v in enumerate(finite, 1) if v < threshold), math.nan))


@quiet
def neural_collapse(h: Array, labels: Array, num_classes: int | None = None,
                    weight: Array | None = None, bias: Array | None = None) -> dict[str, Array]:
    """One-shot NC1–NC4 of features ``h`` (n,d) with ``labels`` (n,) and an optional classifier.

    Keys: ``nc1``, ``nc2_equinorm``, ``nc2_equiangularity``, ``nc2_max_angle`` (of the centred
    class means), and with ``weight`` (C,d): ``nc2_equinorm_w``, ``nc2_equiangularity_w``,
    ``nc2_max_angle_w`` (classifier rows), ``nc3``, ``nc4``.
    """
    x = as_rows(h, "features")
    s, sums, counts = class_statistics(x, labels, num_classes)
    m_tilde, present = centered_class_means(sums, counts)
    out = {
        "nc1": nc1_from_stats(s, sums, counts),
        "nc2_equinorm": nc2_equinorm(m_tilde, present),
        "nc2_equiangularity": nc2_equiangularity(m_tilde, present),
        "nc2_max_angle": nc2_max_angle(m_tilde, present),
    }
    if weight is not None:
        if tuple(weight.shape) != tuple(m_tilde.shape):
            raise ValueError(f"expected classifier weight of shape {tuple(m_tilde.shape)}, "
                             f"got {tuple(weight.shape)}")
        mu, _, _ = class_means(sums, counts)
        out["nc2_equinorm_w"] = nc2_equinorm(weight)
        out["nc2_equiangularity_w"] = nc2_equiangularity(weight)
        out["nc2_max_angle_w"] = nc2_max_angle(weight)
        out["nc3"] = nc3_self_duality(weight, m_tilde, present)
        out["nc4"] = nc4_ncc_mismatch(x, weight, bias, mu, present)
    return out
