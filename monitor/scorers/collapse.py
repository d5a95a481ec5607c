"""Complete-collapse indicators of a stream, exact over the window from the shared sums.

* ``embedding_std_ratio`` — SimSiam's collapse measure (Chen & He, CVPR 2021) scaled to 1:
  ``√d · (1/d) Σ_j std_i(ẑ_ij)`` with ``ẑ_i = z_i/‖z_i‖₂`` (unbiased std, as lightly's
  ``std_of_l2_normalized``). ≈ 1 for healthy isotropic embeddings, → 0 when every row is the
  same vector. Blind to dimensional collapse (docs/metrics.md §5a): pair it with RankMe.
* ``mean_cosine_similarity`` — mean cosine over distinct pairs of rows, from ``‖Σẑ‖²``:
  → 1 when all rows point the same way.
* ``embedding_variance`` — mean per-dimension variance of the *raw* rows, ``tr C / d``
  (VICReg's variance term watches this scale, Bardes et al., ICLR 2022). The two signals above
  are scale-invariant and stay healthy-looking when every row shrinks to one point near 0
  (rows of noise around it normalise to random directions); this one falls. It has no absolute
  scale: alerts read it relative to the run's own first window (``embedding_variance_ratio``,
  :class:`monitor.engine.tracking.RunTracker`).
"""

from __future__ import annotations

from torch import Tensor

from monitor.functional.spectral import COLLAPSE_SIGNALS, window_collapse_signals
from monitor.scorers.moments import WindowMoments


class CollapseScorer:
    """Std of L2-normalised rows (× √d), mean pairwise cosine similarity, raw variance."""

    signals: tuple[str, ...] = COLLAPSE_SIGNALS

    def compute(self, m: WindowMoments) -> dict[str, Tensor]:
        """Collapse signals of the window as device tensors (no host sync)."""
        m.settle()
        return window_collapse_signals(m.s, m.zsum, m.nsum, m.nsq, m.n,
                                       getattr(m, "input_dim", m.dim))
