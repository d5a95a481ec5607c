"""The large-d spectral path as pure functions: a seeded Gaussian sketch, its PR correction,
the exact Gram route and the memory of each path.

Two ways to get a spectrum without a d×d state (docs/metrics.md §1 "Streaming", cost take-away 2):

* **Sketch (approximate).** Project every row ``z`` (d) to ``y = zΩ`` (k) with a fixed
  Gaussian ``Ω`` (d×k, iid N(0, 1/k), so ``E[ΩΩᵀ] = I_d``) and keep the exact window state of
  ``y``: its second moment is ``ΩᵀSΩ`` (k×k). Its eigenvalues approximate the top of ``S``'s
  spectrum (a subspace embedding: a rank-r window with r ≪ k keeps its spectrum up to
  ``O(√(r/k))``), but a spectrum spread over more than k directions is squeezed into k, so
  RankMe and srank are capped by k. The participation ratio is the exception: for a Gaussian
  ``Ω`` its bias has a closed form and :func:`sketched_participation_ratio` removes it.
* **Gram route (exact).** The nonzero eigenvalues of ``ZᵀZ`` (d×d) equal those of ``ZZᵀ``
  (n×n): :func:`second_moment_eigenvalues` decomposes the smaller one. Exact, and cheaper than
  the d×d state when the window holds fewer rows than dimensions (n < d); no help at n ≥ d.

``Ω`` comes from its own CPU ``torch.Generator`` seeded explicitly: the global RNG (training's
randomness) is never touched, and the same seed gives the same ``Ω`` on every rank and machine.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from monitor.functional._xp import Array, f64, quiet, scalar


def gaussian_projection(dim: int, sketch_dim: int, seed: int, dtype: Any = None, *,
                        xp: Any = None) -> Array:
    """``Ω`` (dim, sketch_dim) on the CPU, iid ``N(0, 1/sketch_dim)``, so ``E[ΩΩᵀ] = I``.

    ``xp``: the array namespace of the result, torch by default (drawn from a fresh
    ``torch.Generator`` seeded with ``seed``; ``dtype`` default float32) or numpy (a fresh
    ``numpy.random.Generator``, PCG64, seeded with ``seed``: the torch-free sidecar). Never the
    global RNG. The two generators give different ``Ω`` of the same distribution, so the
    sketch's error (docs/performance.md "Large d") is the same on both paths.
    """
    if dim < 1 or sketch_dim < 1:
        raise ValueError(f"need dim >= 1 and sketch_dim >= 1, got {dim}, {sketch_dim}")
    if xp is not None and xp.__name__.endswith("numpy"):
        # Drawn in blocks of rows: the same values as one (dim, sketch_dim) float64 draw (the
        # generator's stream is sequential), without its two float64 temporaries (8·d·k bytes
        # each: 256 MiB at d = 8192, k = 2048) beside the result.
        gen = np.random.default_rng(seed)
        omega = np.empty((dim, sketch_dim), dtype or np.float32)
        step = max(1, (1 << 20) // sketch_dim)
        for lo in range(0, dim, step):
            block = gen.standard_normal((min(step, dim - lo), sketch_dim))
            block /= math.sqrt(sketch_dim)
            omega[lo:lo + block.shape[0]] = block
        return omega
    import torch

    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    omega = torch.randn(dim, sketch_dim, generator=gen, dtype=torch.float64)
    return (omega / math.sqrt(sketch_dim)).to(dtype or torch.float32)


def project_rows(rows: Array, omega: Array) -> Array:
    """Sketched rows ``rows @ Ω`` (b, k) in ``Ω``'s dtype (one GEMM, 2·b·d·k FLOP)."""
    if rows.ndim != 2 or rows.shape[1] != omega.shape[0]:
        raise ValueError(f"expected rows of shape (b, {omega.shape[0]}), got {tuple(rows.shape)}")
    xp = array_namespace(rows, omega)
    return xp.astype(rows, omega.dtype) @ omega


@quiet
def sketched_participation_ratio(s: Array, zsum: Array, n: Array | float,
                                 corrected: bool = True, dim: int | None = None) -> Array:
    """Participation ratio ``(tr Σ)²/tr Σ²`` of the *original* rows' covariance from the
    sketched window sums (``s = ΩᵀSΩ`` (k, k), ``zsum = ΩᵀΣz`` (k,), ``n``).

    For a Gaussian ``Ω`` (iid N(0, 1/k)) and any fixed PSD ``C`` with ``A = tr C²`` and
    ``B = (tr C)²``: ``E‖ΩᵀCΩ‖_F² = (1 + 1/k)A + B/k`` and ``E(tr ΩᵀCΩ)² = B + 2A/k``, so
    ``Â = k(k·T₂ − T₁²)/((k+2)(k−1))`` and ``B̂ = T₁² − 2Â/k`` are unbiased for ``A`` and ``B``
    (the Wishart identity of docs/metrics.md §3, on the sketch side). With ``corrected=True`` the
    ``T``'s are themselves the small-sample (row side) Wishart estimates of the sketched
    covariance's ``tr C_y²`` and ``(tr C_y)²``, so both biases go (linear, hence unbiased
    composed). With ``corrected=False`` only the sketch bias is removed. Clamped to
    ``[1, dim]`` (``dim``: the original dimension, default unbounded); NaN when undefined.
    Gaussian-Ω result: other projections (sign, SRHT) have other fourth moments.
    """
    xp = array_namespace(s)
    s, zsum = f64(xp, s), f64(xp, zsum)
    n = scalar(xp, n, s)
    k = float(s.shape[0])
    w = s - (zsum[:, None] * zsum[None, :]) / xp.clip(n, min=1.0)     # (k, k) scatter
    w = 0.5 * (w + w.T)
    tr = xp.sum(xp.linalg.diagonal(w))
    tr2 = xp.sum(w * w)
    if corrected:                                   # row side: Wishart, m = n − 1 (§3)
        m = n - 1.0
        t2 = (tr2 - tr * tr / xp.clip(m, min=1.0)) / xp.clip((m + 2.0) * (m - 1.0), min=1.0)
        t1sq = (tr * tr - 2.0 * m * t2) / xp.clip(m * m, min=1.0)
        enough = n >= 3
    else:
        t2, t1sq = tr2, tr * tr
        enough = n >= 2
    a_hat = k * (k * t2 - t1sq) / ((k + 2.0) * (k - 1.0)) if k > 1 else t2
    b_hat = t1sq - 2.0 * a_hat / k
    pr = xp.clip(b_hat / a_hat, min=1.0, max=math.inf if dim is None else float(dim))
    return xp.where(enough & (a_hat > 0) & (b_hat > 0), pr, scalar(xp, math.nan, s))


@quiet
def second_moment_eigenvalues(rows: Array) -> Array:
    """Exact eigenvalues of ``ZᵀZ`` for rows ``Z`` (n, d), descending, ``min(n, d)`` of them.

    The Gram route: when n < d it decomposes ``ZZᵀ`` (n×n; same nonzero eigenvalues, 2n²d +
    ~4/3·n³ FLOP) instead of ``ZᵀZ`` (d×d; 2nd² + ~4/3·d³). Float64, clamped at 0.
    """
    if rows.ndim != 2:
        raise ValueError(f"expected (n, d) rows, got shape {tuple(rows.shape)}")
    xp = array_namespace(rows)
    x = f64(xp, rows)
    gram = x @ x.T if x.shape[0] < x.shape[1] else x.T @ x
    return xp.clip(xp.flip(xp.linalg.eigvalsh(gram), axis=0), min=0.0)


def exact_state_bytes(dim: int, window: int) -> int:
    """Resident bytes of the exact window state (:class:`~monitor.scorers.moments.WindowMoments`):
    float64 ``S`` (8d²), float32 ring (4·window·d), float64 sums and validity (a rebuild from
    the ring briefly needs the ring in float64 too)."""
    return 8 * dim * dim + 4 * window * dim + 8 * window + 24 * dim + 24


def sketch_state_bytes(dim: int, window: int, sketch_dim: int) -> int:
    """Resident bytes of the sketched state (:class:`~monitor.scorers.sketch.SketchedMoments`):
    float32 ``Ω`` (4dk) plus the exact state of k dimensions and a per-row negative count of
    the original rows."""
    return 4 * dim * sketch_dim + exact_state_bytes(sketch_dim, window) + 8 * window


def sketch_dim_for(mode: str, dim: int, window: int, sketch_above: int, sketch_dim: int,
                   memory_limit_bytes: int | None = None) -> int:
    """The rule that picks a stream's path: k for the sketch, 0 for the exact state.

    ``mode`` ``"exact"`` never sketches, ``"sketch"`` always (when ``dim > sketch_dim``),
    ``"auto"`` when ``dim > sketch_above`` or the exact state would exceed
    ``memory_limit_bytes`` (:func:`exact_state_bytes`).
    """
    if mode == "exact" or dim <= sketch_dim:
        return 0
    if mode == "sketch":
        return sketch_dim
    over_memory = memory_limit_bytes is not None and exact_state_bytes(dim, window) > memory_limit_bytes
    return sketch_dim if dim > sketch_above or over_memory else 0
