"""Spectral health of a stream on the sketched path (APPROXIMATE; synthetic-validated only).

:class:`SketchedSpectrumScorer` is :class:`~monitor.scorers.spectrum.SpectrumScorer` read on a
:class:`~monitor.scorers.sketch.SketchedMoments` state (``S_y = ΩᵀSΩ``, k×k), with three
changes:

* ``participation_ratio`` — corrected for the Gaussian sketch's bias on top of the Wishart
  small-sample correction: ``Â = k(k·T₂ − T₁²)/((k+2)(k−1))``, ``B̂ = T₁² − 2Â/k``, PR = B̂/Â
  (:func:`monitor.functional.sketch.sketched_participation_ratio`), clamped to [1, d].
* ``embedding_dim`` — the true d of the rows (not k).
* ``spectral_sketch_dim`` — k (the exact path exports 0).

Everything else — RankMe over ``min(n, k)`` sketched singular values (Garrido et al. 2023),
``effective_rank_ratio`` = RankMe ÷ min(n, k), srank_0.01 (Kumar et al. 2021), α-ReQ (Agrawal
et al. 2022) and the top eigenvalue share — is the exact formula on the sketched spectrum: close
to the exact path for low-rank (collapsing) windows, capped by k for spectra spread over more
than k directions. Measured errors: ``docs/performance.md`` "Large d".
"""

from __future__ import annotations

import torch
from torch import Tensor

from monitor.functional.sketch import sketched_participation_ratio
from monitor.scorers.moments import WindowMoments
from monitor.scorers.sketch import SketchedMoments
from monitor.scorers.spectrum import SpectrumScorer


class SketchedSpectrumScorer(SpectrumScorer):
    """RankMe, srank, α, top share (sketched spectrum) and a bias-corrected PR."""

    signals: tuple[str, ...] = (*SpectrumScorer.signals, "spectral_sketch_dim")

    def compute(self, m: WindowMoments) -> dict[str, Tensor]:
        """All spectral signals of the sketched window as device tensors (no host sync)."""
        if not isinstance(m, SketchedMoments):
            raise TypeError(f"SketchedSpectrumScorer reads a SketchedMoments state, "
                            f"got {type(m).__name__}")
        out = super().compute(m)
        pr = sketched_participation_ratio(m.s, m.zsum, m.n, self.options["pr_corrected"],
                                          m.input_dim)
        out["participation_ratio"] = pr
        f64 = {"dtype": torch.float64, "device": m.device}
        out["embedding_dim"] = torch.tensor(float(m.input_dim), **f64)
        out["spectral_sketch_dim"] = torch.tensor(float(m.sketch_dim), **f64)
        return out


def spectrum_scorer_for(m: WindowMoments, **options: object) -> SpectrumScorer:
    """The spectrum scorer that reads state ``m`` (sketched or exact)."""
    cls = SketchedSpectrumScorer if isinstance(m, SketchedMoments) else SpectrumScorer
    return cls(**options)  # type: ignore[arg-type]
