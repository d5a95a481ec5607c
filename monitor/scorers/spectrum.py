"""Spectral health of a stream from one eigendecomposition of its second moment.

From the shared :class:`~monitor.scorers.moments.WindowMoments` state, one ``eigvalsh`` of the
uncentred ``S = ZᵀZ`` per publish gives ``σ_k = sqrt(λ_k(S))``, the singular values of the
window's embedding matrix, which feed:

* ``effective_rank`` — RankMe (Garrido et al., ICML 2023): ``exp(−Σ p log p)``,
  ``p_k = σ_k/‖σ‖₁ + 1e-7`` over ``K = min(n, d)`` values (paper convention: uncentred σ).
* ``effective_rank_ratio`` — RankMe ÷ ``min(n, d)`` (0–1].
* ``srank`` — srank_0.01 (Kumar et al., ICLR 2021): values covering 99 % of ``Σσ``.
* ``spectrum_alpha`` — α-ReQ (Agrawal et al., NeurIPS 2022): WLS power-law slope over ranks
  11–100. The reference fits the *centred* covariance spectrum; by default this uses the
  eigenvalues of the uncentred ``S`` so that one decomposition serves every metric. Centring is a
  rank-one downdate, so by interlacing ``λ_{k+1}(S) ≤ λ_k(W) ≤ λ_k(S)``: the fit window (ranks
  11–100) moves by at most one rank. ``alpha_centered=True`` runs a second ``eigvalsh`` on the
  centred scatter for the exact reference convention.
* ``top_eigenvalue_share`` — ``λ₁/Σλ`` of ``S`` (uncentred: a large mean shows up here).
* ``participation_ratio`` — ``(tr C)²/tr C²`` of the centred covariance with the Wishart
  small-sample correction (docs/metrics.md §3; needs no eigensolve).
* ``window_samples`` (n) and ``embedding_dim`` (d), which every spectral value depends on
  (compare values only at equal n and d; docs/metrics.md §1 pitfall 1).
* ``spectrum`` — the eigenvalues of ``S/n`` (descending), for plots, not exported to Prometheus.
"""

from __future__ import annotations

from torch import Tensor

from monitor.functional.spectral import RANKME_EPS, SPECTRAL_SIGNALS, window_spectral_signals
from monitor.scorers.moments import WindowMoments


class SpectrumScorer:
    """RankMe, effective-rank ratio, srank, α, top share and PR from one eigendecomposition."""

    signals: tuple[str, ...] = SPECTRAL_SIGNALS

    def __init__(self, eps: float = RANKME_EPS, srank_delta: float = 0.01,
                 alpha_fit: tuple[int, int] = (10, 100), alpha_centered: bool = False,
                 pr_corrected: bool = True) -> None:
        if not 0.0 < srank_delta < 1.0:
            raise ValueError(f"srank_delta must be in (0, 1), got {srank_delta!r}")
        if not (0 <= alpha_fit[0] < alpha_fit[1]):
            raise ValueError(f"alpha_fit must be (start, stop) with 0 <= start < stop, got {alpha_fit!r}")
        self.options = {"eps": eps, "srank_delta": srank_delta, "alpha_fit": tuple(alpha_fit),
                        "alpha_centered": alpha_centered, "pr_corrected": pr_corrected}

    def compute(self, m: WindowMoments) -> dict[str, Tensor]:
        """All spectral signals of the window as device tensors (no host sync)."""
        m.settle()
        return window_spectral_signals(m.s, m.zsum, m.n, **self.options)
