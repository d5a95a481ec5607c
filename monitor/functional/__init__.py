"""The math of repwatch as pure functions (tested against slow numpy references).

The spectral functions are re-exported here; the key functions of the other families too
(``qscore``, ``qscore_regularizer``, ``dormant_fraction``, ``nc1``, ...); every function lives
in its submodule (``plasticity``, ``qscore``, ``neural_collapse``, ``weights``, ``curvature``,
``generative``, ``selection``). The function ``qscore`` shadows its submodule's name on this
package: import from the submodule with ``from monitor.functional.qscore import ...``.
"""

from monitor.functional.spectral import (
    RANKME_EPS,
    effective_rank,
    effective_rank_from_singular_values,
    eigenvalues_desc,
    l2_normalized_std,
    l2_normalized_std_from_sums,
    mean_cosine_similarity,
    mean_cosine_similarity_from_sums,
    mean_variance,
    mean_variance_from_moments,
    normalize_rows,
    participation_ratio,
    participation_ratio_from_moments,
    rankme,
    rankme_from_singular_values,
    second_moment,
    spectrum_alpha,
    spectrum_alpha_from_eigenvalues,
    srank,
    srank_from_singular_values,
    top_eigenvalue_share_from_eigenvalues,
)

from monitor.functional.curvature import hvp, lyapunov_exponent, top_hessian_eigenvalue
from monitor.functional.generative import diversity_ratio, duplicate_rate, mode_coverage
from monitor.functional.neural_collapse import nc1
from monitor.functional.plasticity import dormant_fraction, dormant_scores, low_activity_fraction
from monitor.functional.qscore import auprc, qscore, qscore_regularizer
from monitor.functional.selection import centrality_ranking, linear_cka
from monitor.functional.weights import global_magnitude_masks, stable_rank, weight_rank

__all__ = [
    "auprc",
    "centrality_ranking",
    "diversity_ratio",
    "dormant_fraction",
    "dormant_scores",
    "duplicate_rate",
    "global_magnitude_masks",
    "hvp",
    "linear_cka",
    "low_activity_fraction",
    "lyapunov_exponent",
    "mode_coverage",
    "nc1",
    "qscore",
    "qscore_regularizer",
    "stable_rank",
    "top_hessian_eigenvalue",
    "weight_rank",
    "RANKME_EPS",
    "effective_rank",
    "effective_rank_from_singular_values",
    "eigenvalues_desc",
    "l2_normalized_std",
    "l2_normalized_std_from_sums",
    "mean_cosine_similarity",
    "mean_cosine_similarity_from_sums",
    "mean_variance",
    "mean_variance_from_moments",
    "normalize_rows",
    "participation_ratio",
    "participation_ratio_from_moments",
    "rankme",
    "rankme_from_singular_values",
    "second_moment",
    "spectrum_alpha",
    "spectrum_alpha_from_eigenvalues",
    "srank",
    "srank_from_singular_values",
    "top_eigenvalue_share_from_eigenvalues",
]
