"""Unsupervised model selection from representations: linear CKA, ModelCentrality, RankMe.

* Linear CKA (Kornblith, Norouzi, Lee & Hinton, ICML 2019, Eq. 4 / "linear kernel"): for
  column-centred ``X`` (n, d₁) and ``Y`` (n, d₂) of the *same* n inputs,
  ``CKA(X, Y) = ‖YᵀX‖_F² / (‖XᵀX‖_F · ‖YᵀY‖_F)`` ∈ [0, 1]. Invariant to orthogonal
  transforms and isotropic scaling of either side, not to arbitrary invertible maps.
* ModelCentrality (Lin, Thekumparampil, Fanti & Oh, ICML 2020, "InfoGAN-CR and
  ModelCentrality"): the centrality of model i is its average similarity to the other models,
  and the most central model (the medoid) is selected. The paper's similarity is the
  FactorVAE disentanglement score of model i evaluated on model j's latent traversals; here it
  is **replaced by linear CKA** of the models' representations of one shared probe batch,
  symmetric by construction — a ModelCentrality-*style* ranking, not the paper's metric.
* RankMe (Garrido et al., ICML 2023): higher effective rank of the embeddings of the same
  data predicts better downstream accuracy among runs of one method; compare only at equal
  n and d (docs/metrics.md §1 pitfall 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from monitor.functional.generative import as_rows as _as_rows
from monitor.functional.spectral import rankme


def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    """Linear CKA of two representations ``x`` (n, d₁), ``y`` (n, d₂) of the same n inputs.

    Float64, columns centred. Uses the feature-space form ``‖YᵀX‖²/(‖XᵀX‖‖YᵀY‖)`` or, when
    cheaper (n < d), the equal Gram form ``⟨K, L⟩/(‖K‖‖L‖)`` with ``K = XXᵀ``, ``L = YYᵀ``.
    NaN when either side has zero variance.
    """
    a, b = _as_rows(x, "x"), _as_rows(y, "y")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"x and y must hold the same inputs (rows), got {a.shape[0]} and {b.shape[0]} rows")
    if a.shape[0] < 2:
        raise ValueError(f"linear CKA needs at least 2 rows, got {a.shape[0]}")
    a = a.to(b.device)
    a = a - a.mean(0)
    b = b - b.mean(0)
    n, d1, d2 = a.shape[0], a.shape[1], b.shape[1]
    if n * n * (d1 + d2) < n * (d1 * d2 + d1 * d1 + d2 * d2):
        k, l_ = a @ a.T, b @ b.T                                     # (n, n) each
        num, den = (k * l_).sum(), k.norm() * l_.norm()
    else:
        num = (b.T @ a).pow(2).sum()                                 # ‖YᵀX‖_F²
        den = (a.T @ a).norm() * (b.T @ b).norm()
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float64).tiny),
                       torch.full_like(num, math.nan))


def _check_reps(reps: Mapping[str, Tensor], need: int) -> None:
    if not isinstance(reps, Mapping):
        raise TypeError(f"reps must be a mapping name → (n, d) tensor, got {type(reps).__name__}")
    if len(reps) < need:
        raise ValueError(f"need at least {need} representation(s), got {len(reps)}")


def _sort_desc(items: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """Descending by value; NaN last; ties keep input order."""
    return sorted(items, key=lambda kv: (math.isnan(kv[1]), -kv[1] if not math.isnan(kv[1]) else 0.0))


def cka_matrix(reps: Mapping[str, Tensor]) -> tuple[list[str], Tensor]:
    """Names and the symmetric ``(M, M)`` linear-CKA matrix (diagonal 1) of M representations."""
    _check_reps(reps, 1)
    names = list(reps)
    rows = {name: _as_rows(t, f"reps[{name!r}]") for name, t in reps.items()}
    n = {t.shape[0] for t in rows.values()}
    if len(n) != 1:
        raise ValueError("centrality needs every representation over the same probe inputs; "
                         f"got row counts {{{', '.join(f'{k}: {v.shape[0]}' for k, v in rows.items())}}}")
    m = len(names)
    out = torch.eye(m, dtype=torch.float64)
    for i in range(m):
        for j in range(i + 1, m):
            cka = linear_cka(rows[names[i]], rows[names[j]])
            out[i, j] = out[j, i] = cka.cpu()  # sync: offline model selection, not training
    return names, out


def centrality_ranking(reps: Mapping[str, Tensor]) -> list[tuple[str, float]]:
    """ModelCentrality-style ranking: mean linear CKA to the other models, descending.

    ``reps`` maps model name → its ``(n, d_m)`` representation of one shared probe batch (same
    inputs, same order; d may differ). Similarity is linear CKA, not the paper's FactorVAE
    score (see the module docstring).
    """
    _check_reps(reps, 2)
    names, sim = cka_matrix(reps)
    m = len(names)
    off = sim.sum(1) - sim.diagonal()
    return _sort_desc([(name, float(off[i]) / (m - 1)) for i, name in enumerate(names)])


def rankme_ranking(reps: Mapping[str, Tensor]) -> list[tuple[str, float]]:
    """Models ranked by RankMe of their ``(n, d)`` representation, descending.

    RankMe is biased by n and capped by min(n, d): rank models on equal n and d only.
    """
    _check_reps(reps, 1)
    return _sort_desc([(name, float(rankme(_as_rows(t, f"reps[{name!r}]"))))
                       for name, t in reps.items()])
