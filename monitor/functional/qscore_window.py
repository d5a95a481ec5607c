"""A Q-Score window's publish step, for numpy and torch alike: ``le`` histogram counts, finite
quantiles, the calibrated threshold and the low-quality rate.

Written once against the array API numpy and torch share (as :mod:`monitor.functional.spectral`),
so the in-process ``QScoreScorer`` and the torch-free sidecar compute the same values. Nothing
here synchronises a device: counts stay arrays, data-dependent ranges are masks.

Q-Score itself (per row, Kalibhat et al., 2022) is here too, array-API as the rest
(:func:`qscore_rows`; :func:`monitor.functional.qscore.qscore` is its public, documented entry
point): the torch scorers and the exported ONNX kernel run it on tensors, the sidecar on numpy
rows it does not give the kernel (its sketched streams, whose kernel sees projected rows).
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


# ----------------------------------------------------------------------------- per-row Q-Score

QSCORE_FORMS: tuple[str, ...] = ("linf_over_l1", "scale_free", "max_z", "l1")
"""Implemented forms: the paper's most likely form, the scale-robust companion, two ablations
(:func:`monitor.functional.qscore.qscore` documents them)."""


def check_qscore_rows(z: Array, what: str = "z") -> Array:
    """``z`` unchanged when it is a 2-D floating-point ``(n, d)`` array with ``d >= 2``; else a
    clear ``TypeError``/``ValueError`` (within-sample z-scores need two features)."""
    try:
        xp = array_namespace(z)
    except TypeError:
        raise TypeError(f"{what}: expected a torch.Tensor or a numpy array, got "
                        f"{type(z).__name__}") from None
    if z.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D (n, d) tensor of representations, "
                         f"got shape {tuple(z.shape)}")
    if not xp.isdtype(z.dtype, "real floating"):
        raise TypeError(f"{what}: expected a floating-point tensor, got {z.dtype}")
    if z.shape[1] < 2:
        raise ValueError(f"{what}: expected at least 2 features per row (within-sample z-scores), "
                         f"got d = {z.shape[1]}")
    return z


@quiet
def row_zscores(z: Array, eps2: float = 1e-8) -> Array:
    """Within-sample z-scores ``(z − mean_j z) / (std_j z + eps2)`` (ddof 0) of ``(n, d)`` rows,
    in ``z``'s dtype, unchecked (:func:`monitor.functional.qscore.feature_zscores`)."""
    xp = array_namespace(z)
    mean = xp.mean(z, axis=1, keepdims=True)                             # (n, 1)
    centred = z - mean                                                   # (n, d)
    std = xp.sqrt(xp.mean(centred * centred, axis=1, keepdims=True))     # (n, 1), ddof 0
    return centred / (std + eps2)                                        # (n, d)


@quiet
def qscore_parts(z: Array, eps2: float = 1e-8) -> tuple[Array, Array, Array, Array]:
    """``(x, finite rows, max_j ζ, ‖x‖₁)`` of ``(n, d)`` rows in float64, non-finite rows
    zeroed in ``x`` (unchecked)."""
    xp = array_namespace(z)
    x = xp.astype(z, xp.float64)                                         # (n, d)
    finite = xp.all(xp.isfinite(x), axis=1)                              # (n,)
    x = xp.where(finite[:, None], x, xp.zeros_like(x))
    zmax = xp.max(row_zscores(x, eps2), axis=1)                          # (n,)
    l1 = xp.sum(xp.abs(x), axis=1)                                       # (n,)
    return x, finite, zmax, l1


@quiet
def qscore_rows(z: Array, form: str = "linf_over_l1", eps1: float = 1e-8,
                eps2: float = 1e-8) -> Array:
    """Per-row Q-Score of ``(n, d)`` rows → ``(n,)`` float64, NaN for rows with NaN/Inf
    (the definition and its forms: :func:`monitor.functional.qscore.qscore`)."""
    if form not in QSCORE_FORMS:
        raise ValueError(f"form must be one of {list(QSCORE_FORMS)}, got {form!r}")
    xp = array_namespace(check_qscore_rows(z))
    x, finite, zmax, l1 = qscore_parts(z, eps2)
    if form == "linf_over_l1":
        q = zmax / (l1 + eps1)
    elif form == "scale_free":
        q = zmax * math.sqrt(x.shape[1]) * xp.linalg.vector_norm(x, axis=1) / (l1 + eps1)
    elif form == "max_z":
        q = zmax
    else:  # "l1"
        q = 1.0 / (l1 + eps1)
    return xp.where(finite, q, xp.full_like(q, math.nan))
