"""A Q-Score window's publish step, for numpy and torch alike: ``le`` histogram counts, finite
quantiles, the calibrated threshold and the low-quality rate.

Written once against the array API numpy and torch share (as :mod:`monitor.functional.spectral`),
so the in-process ``QScoreScorer`` and the torch-free sidecar compute the same values. Nothing
here synchronises a device: counts stay arrays, data-dependent ranges are masks.
Q-Score itself (per row) is :func:`monitor.functional.qscore.qscore` (Kalibhat et al., 2022).
"""

from __future__ import annotations

import math
from array_api_compat import array_namespace, device

from monitor.functional._xp import Array, quiet, scatter_add


BUCKET_EDGES: tuple[float, ...] = tuple(10.0 ** (-6.0 + 0.25 * i) for i in range(41))
"""Default Q-Score ``le`` edges 1e-6 … 1e4, 4 per decade (41 edges). Covers "linf_over_l1"
(≈ sqrt(2 ln d)/‖z‖₁, tiny for large d or large activations) and "scale_free" (between max ζ and
max ζ·sqrt(d) < d)."""

QSCORE_WINDOW_SIGNALS: tuple[str, ...] = ("low_quality_samples_ratio", "qscore_threshold",
                                          "qscore_p10", "qscore_p50")


def bucket_edges(like: Array) -> Array:
    """:data:`BUCKET_EDGES` as a float64 array of ``like``'s namespace and device."""
    xp = array_namespace(like)
    return xp.asarray(BUCKET_EDGES, dtype=xp.float64, device=device(like))


def histogram_counts(values: Array, edges: Array, weights: Array | None = None) -> Array:
    """Per-bucket counts with Prometheus ``le`` buckets → ``(len(edges) + 1,)`` float64.

    Bucket 0 counts ``v ≤ e_0``, bucket k counts ``e_{k−1} < v ≤ e_k``, the last (+Inf) counts
    ``v > e_{-1}``. ``edges`` must be strictly increasing and finite. Non-finite values are not
    counted. A ``searchsorted`` and a scatter-add (no ``bincount``: no host sync).
    """
    if edges.ndim != 1 or edges.shape[0] < 1:
        raise ValueError(f"edges: expected a non-empty 1-D array, got shape {tuple(edges.shape)}")
    xp = array_namespace(values)
    v = xp.astype(xp.reshape(values, (-1,)), xp.float64)
    finite = xp.isfinite(v)
    w = (xp.astype(finite, xp.float64) if weights is None
         else xp.where(finite, xp.astype(xp.reshape(weights, (-1,)), xp.float64), 0.0))
    e = edges if edges.dtype == v.dtype else xp.astype(edges, xp.float64)
    idx = xp.searchsorted(e, xp.where(finite, v, 0.0), side="left")  # e[i-1] < v <= e[i] → i
    return scatter_add(xp, xp.zeros(e.shape[0] + 1, dtype=xp.float64, device=device(v)),
                       idx, w)


@quiet
def nan_quantile(values: Array, q: float) -> Array:
    """``q``-quantile of the finite entries of a 1-D array, NaN/Inf ignored → 0-d float64.

    numpy's default ("linear") method: sort, rank ``h = q·(m − 1)`` over the ``m`` finite values,
    interpolate between ``⌊h⌋`` and ``⌊h⌋ + 1``. A sort and gathers (the count ``m`` stays an
    array), so it does not synchronise the device. NaN when nothing is finite.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q!r}")
    if values.ndim != 1:
        raise ValueError(f"expected a 1-D array, got shape {tuple(values.shape)}")
    xp = array_namespace(values)
    v = xp.astype(values, xp.float64)
    if v.shape[0] == 0:
        return xp.asarray(math.nan, dtype=xp.float64, device=device(v))
    finite = xp.isfinite(v)
    srt = xp.sort(xp.where(finite, v, math.inf))                         # (k,)
    m = xp.sum(xp.astype(finite, xp.float64))
    h = q * xp.clip(m - 1.0, min=0.0)
    lo = xp.floor(h)
    lo_i = xp.reshape(xp.astype(lo, xp.int64), (1,))
    hi_i = xp.minimum(lo_i + 1, xp.clip(xp.astype(m, xp.int64), min=1) - 1)
    a = xp.reshape(xp.take(srt, lo_i, axis=0), ())
    b = xp.reshape(xp.take(srt, hi_i, axis=0), ())
    val = a + (b - a) * (h - lo)
    return xp.where(m > 0, val, math.nan)


@quiet
def low_quality_ratio(ring_q: Array, threshold: Array | float) -> Array:
    """``LQR = (1/n) Σ_i 1[q_i < τ_q]`` over the finite scores of the window; NaN while ``τ_q``
    is not finite (not calibrated yet) or the window holds no finite score."""
    xp = array_namespace(ring_q)
    thr = xp.asarray(threshold, dtype=xp.float64, device=device(ring_q))
    valid = xp.isfinite(ring_q)
    n_valid = xp.sum(xp.astype(valid, xp.float64))
    below = xp.sum(xp.astype((ring_q < thr) & valid, xp.float64))
    return xp.where(xp.isfinite(thr) & (n_valid > 0), below / xp.clip(n_valid, min=1.0),
                    math.nan)


@quiet
def window_qscore_signals(ring_q: Array, threshold: Array | float) -> dict[str, Array]:
    """The Q-Score signals of a window (:data:`QSCORE_WINDOW_SIGNALS`) from its ring of per-row
    scores (NaN: empty slot or non-finite row) and the fixed threshold ``τ_q``."""
    xp = array_namespace(ring_q)
    return {
        "low_quality_samples_ratio": low_quality_ratio(ring_q, threshold),
        "qscore_threshold": xp.asarray(threshold, dtype=xp.float64, device=device(ring_q),
                                       copy=True),
        "qscore_p10": nan_quantile(ring_q, 0.1),
        "qscore_p50": nan_quantile(ring_q, 0.5),
    }


@quiet
def quantile_from_histogram(counts: Array, edges: Array, q: float) -> Array:
    """Approximate quantile from ``le``-bucket counts (as PromQL ``histogram_quantile``).

    Linear interpolation inside the bucket holding rank ``q·N``; the first bucket's lower bound
    is 0 (Q ≥ 0), a rank in the +Inf bucket returns the last edge. NaN when empty. 0-d float64.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q!r}")
    xp = array_namespace(counts)
    c = xp.astype(counts, xp.float64)
    e = xp.astype(xp.asarray(edges, device=device(c)), xp.float64)
    if c.shape[0] != e.shape[0] + 1:
        raise ValueError(f"counts: expected {e.shape[0] + 1} buckets for {e.shape[0]} edges, "
                         f"got {c.shape[0]}")
    zero = xp.zeros(1, dtype=xp.float64, device=device(c))
    cum = xp.cumulative_sum(c)                                           # (k+1,)
    total = cum[-1]
    rank = q * total
    b = xp.minimum(xp.searchsorted(cum, xp.reshape(rank, (1,)), side="left"),
                   c.shape[0] - 1)                                       # (1,)
    upper_all = xp.concat([e, e[-1:]])                                   # +Inf → last edge
    lower_all = xp.concat([zero, e])
    below = xp.concat([zero, cum[:-1]])
    lo, hi = xp.take(lower_all, b, axis=0), xp.take(upper_all, b, axis=0)
    inside = xp.take(c, b, axis=0)
    frac = (rank - xp.take(below, b, axis=0)) / xp.where(inside > 0, inside, 1.0)
    val = xp.reshape(lo + (hi - lo) * xp.clip(frac, min=0.0, max=1.0), ())
    val = xp.where(xp.reshape(b, ()) == c.shape[0] - 1, e[-1], val)
    return xp.where(total > 0, val, math.nan)
