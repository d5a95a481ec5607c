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
