"""Per-batch kernels of the sliding-window second-moment state, as pure functions.

These are the only per-batch computations of :class:`monitor.scorers.moments.WindowMoments`;
the sidecar's ONNX Runtime backend runs the same functions exported to ONNX
(:mod:`monitor.sidecar.kernels`), so the kernels exist once.

* :func:`clean_rows` — non-finite rows (any NaN/Inf value) are zeroed and get validity 0; the
  count of non-finite *values* is returned for ``repwatch_nonfinite_values_total``.
* :func:`window_delta` — the float64 change of the window sums when rows ``new`` enter and
  rows ``old`` leave: ``ΔS = newᵀnew − oldᵀold``, ``Δ Σz``, and the sums of L2-normalised rows
  ``Δ Σẑ``, ``Δ Σẑ²`` (SimSiam's std needs them). One matrix product of ``[new; old]`` with
  signs ±1. Products of float32 values are exact in float64.
* :func:`add_window_delta_` — the same change added in place when as many rows leave as
  enter (a sliding window: each new row overwrites one old row), with one product of ``b``
  rows instead of ``2b``: ``newᵀnew − oldᵀold = sym((new + old)ᵀ(new − old))``, where
  ``sym(A) = (A + Aᵀ)/2`` (the cross terms ``oldᵀnew − newᵀold`` are antisymmetric and cancel),
  accumulated by the GEMM into the unsymmetrised sum and symmetrised once per read. Half the
  flops of :func:`window_delta`; not exact product by product (``new ± old`` rounds in float64
  when the two exponents are far apart), so it carries float64 round-off like any sum.
"""

from __future__ import annotations

import torch
from torch import Tensor

from monitor.functional.spectral import normalize_rows


def clean_rows(rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(rows as float32 with non-finite rows zeroed (b, d), validity (b,) float64, number of
    non-finite values () float64)``."""
    x = rows.to(torch.float32)                                           # (b, d)
    finite_vals = torch.isfinite(x)                                      # (b, d)
    finite = finite_vals.all(dim=1)                                      # (b,)
    nonfinite = (~finite_vals).sum().to(torch.float64)                   # ()
    x = torch.where(finite[:, None], x, torch.zeros_like(x))
    return x, finite.to(torch.float64), nonfinite


def window_delta(new: Tensor, old: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Float64 ``(ΔS (d, d), ΔΣz (d,), ΔΣẑ (d,), ΔΣẑ² (d,))`` of adding the (clean) rows ``new``
    (b, d) and removing the (clean) rows ``old`` (b', d) from the window sums."""
    both = torch.cat([new, old]).to(torch.float64)                       # (b+b', d)
    sign = torch.cat([torch.ones_like(new[:, 0], dtype=torch.float64),
                      -torch.ones_like(old[:, 0], dtype=torch.float64)])  # (b+b',)
    signed = both * sign[:, None]
    normed = normalize_rows(both)
    return (signed.T @ both, signed.sum(0), (normed * sign[:, None]).sum(0),
            (normed * normed * sign[:, None]).sum(0))



def add_window_delta_(s: Tensor, zsum: Tensor, nsum: Tensor, nsq: Tensor, new: Tensor,
                      old: Tensor) -> None:
    """Add :func:`window_delta` of ``new`` and ``old`` (same shape (b, d), clean) into the
    float64 sums in place, with one ``b``-row product accumulated into ``s`` by the GEMM
    itself (``s += (new + old)ᵀ(new − old)``, no d×d temporary).

    ``s`` is left **unsymmetrised**: its symmetric part ``(s + sᵀ)/2`` is the window's
    ``Σ z zᵀ`` (the cross terms ``oldᵀnew − newᵀold`` are antisymmetric); symmetrise it once
    before reading (:func:`symmetrize_`). The normalised-row sums are matrix–vector products
    with the rows' inverse norms: ``Σẑ = wᵀZ``, ``Σẑ² = (w²)ᵀ(Z∘Z)``, ``w = 1/‖z‖``.
    """
    if new.shape != old.shape:
        raise ValueError(f"paired rows must have one shape, got {tuple(new.shape)} and "
                         f"{tuple(old.shape)}")
    x = new.to(torch.float64)                                            # (b, d)
    o = old.to(torch.float64)                                            # (b, d)
    diff = x - o
    s.addmm_((x + o).T, diff)                                            # (d, d), in place
    zsum.add_(diff.sum(0))
    for rows, sign in ((x, 1.0), (o, -1.0)):
        sq = rows * rows                                                 # (b, d)
        w2 = 1.0 / sq.sum(1).clamp_min(1e-24)                            # (b,) 1/‖z‖²
        nsum.addmv_(rows.T, w2.sqrt(), alpha=sign)
        nsq.addmv_(sq.T, w2, alpha=sign)


def symmetrize_(s: Tensor) -> Tensor:
    """``s ← (s + sᵀ)/2`` in place (the window sum after :func:`add_window_delta_`)."""
    s.copy_((s + s.T) * 0.5)
    return s
