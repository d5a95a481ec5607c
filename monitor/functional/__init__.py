"""The math of repwatch as pure functions (tested against slow numpy references).

The array-API modules (``spectral``, ``neural_collapse``, ``qscore_window``) take numpy arrays
or torch tensors alike and import no torch: the torch-free sidecar runs them. The others
(``plasticity``, ``qscore``, ``weights``, ``curvature``, ``generative``, ``selection``,
``sketch``, ``moments``) are torch code. The key functions are re-exported here, each loaded on
first use (so ``import monitor.functional.spectral`` never pulls in torch). The function
``qscore`` shadows its submodule's name on this package: import from the submodule with
``from monitor.functional.qscore import ...``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, tuple[str, ...]] = {
    "spectral": (
        "RANKME_EPS", "effective_rank", "effective_rank_from_singular_values",
        "eigenvalues_desc", "l2_normalized_std", "l2_normalized_std_from_sums",
        "mean_cosine_similarity", "mean_cosine_similarity_from_sums", "mean_variance",
        "mean_variance_from_moments", "normalize_rows", "participation_ratio",
        "participation_ratio_from_moments", "rankme", "rankme_from_singular_values",
        "second_moment", "spectrum_alpha", "spectrum_alpha_from_eigenvalues", "srank",
        "srank_from_singular_values", "top_eigenvalue_share_from_eigenvalues",
    ),
    "curvature": ("hvp", "lyapunov_exponent", "top_hessian_eigenvalue"),
    "generative": ("diversity_ratio", "duplicate_rate", "mode_coverage"),
    "neural_collapse": ("nc1",),
    "plasticity": ("dormant_fraction", "dormant_scores", "low_activity_fraction"),
    "qscore": ("auprc", "qscore", "qscore_regularizer"),
    "selection": ("centrality_ranking", "linear_cka"),
    "weights": ("global_magnitude_masks", "stable_rank", "weight_rank"),
}
_WHERE: dict[str, str] = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
