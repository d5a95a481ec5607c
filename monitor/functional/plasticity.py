"""Plasticity-loss statistics of a layer's activations and weights, as pure functions.

A *unit* is one output feature of a layer: the last dimension of ``(b, units)`` rows and of
``(b, T, units)`` token activations, the channel dimension of ``(b, C, *spatial)`` conv maps
(docs/metrics.md §7b pitfall: "for conv layers a neuron = a channel"). Every statistic here averages
a unit over all its (sample, position) entries:

* τ-dormant score (Sokar, Evci, Lee, Castro & Mnih, ICML 2023, "The Dormant Neuron Phenomenon
  in Deep Reinforcement Learning", Def. 3.1):
  ``s_i = E|h_i| / (mean_k E|h_k| + 1e-9)``; unit i is τ-dormant iff ``s_i ≤ τ``.
  As google/dopamine ``labs/redo/weight_recyclers.py::estimate_neuron_score`` (commit 1dd1661d).
* Active rate (Dohare, Hernandez-Garcia, Lan, Rahman, Mahmood & Sutton, Nature 2024, "Loss of
  plasticity in deep continual learning"): the fraction of entries with ``h ≠ 0``; a unit is
  dormant there when its rate is below 0.01 (``compute_dormant_units_proportion``).
* Weight magnitude / update size (Dohare et al. 2024; Lyle et al., ICML 2023).

One-shot functions take the raw activation tensor; the ``*_from_*`` forms take the per-unit sums
that :class:`monitor.scorers.activations.ActivationScorer` accumulates, so streaming and one-shot
share one implementation. Everything is float64 and free of host synchronisation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

DORMANT_EPS: float = 1e-9
"""ε in the denominator of the τ-dormant score (dopamine ``estimate_neuron_score``)."""


def _check_activations(h: Tensor) -> None:
    if not isinstance(h, Tensor):
        raise TypeError(f"expected activations as a torch.Tensor, got {type(h).__name__}")
    if not h.is_floating_point():
        raise TypeError(f"expected floating-point activations, got {h.dtype}")
    if h.dim() not in (2, 3, 4, 5):
        raise ValueError("expected activations of shape (b, units), (b, T, units) or "
                         f"(b, C, *spatial) with 1-3 spatial dims, got shape {tuple(h.shape)}")


def unit_dim(h: Tensor) -> int:
    """Index of the unit axis of ``h``: last for 2-D/3-D, the channel axis (1) for 4-D/5-D."""
    _check_activations(h)
    return 1 if h.dim() >= 4 else h.dim() - 1


def num_units(h: Tensor) -> int:
    """Number of units of an activation tensor (see :func:`unit_axis_pool`)."""
    return h.shape[unit_dim(h)]


def unit_axis_pool(h: Tensor) -> Tensor:
    """Per-(sample, position) per-unit values: ``(N, units)`` with every entry of every unit.

    * ``(b, units)`` → as is (N = b);
    * ``(b, T, units)`` tokens → ``(b·T, units)``;
    * ``(b, C, *spatial)`` conv maps → ``(b·∏spatial, C)`` (unit = channel).
    """
    _check_activations(h)
    if h.dim() >= 4:
        h = h.movedim(1, -1)                            # (b, *spatial, C)
    return h.reshape(-1, h.shape[-1])                   # (N, units)


def pooled_unit_rows(h: Tensor) -> Tensor:
    """The ``(n, units)`` feature matrix whose rank is measured (Kumar et al. 2021; Dohare 2024).

    ``(b, units)`` as is; tokens ``(b, T, units)`` → ``(b·T, units)``; conv maps
    ``(b, C, *spatial)`` → the spatial mean per channel ``(b, C)``. Feed it to
    :class:`~monitor.scorers.moments.WindowMoments` for the layer's effective rank and srank.
    """
    _check_activations(h)
    if h.dim() >= 4:
        return h.mean(dim=tuple(range(2, h.dim())))     # (b, C)
    return h.reshape(-1, h.shape[-1])                   # (n, units)


def unit_sums(h: Tensor) -> tuple[Tensor, Tensor, int]:
    """Per-unit ``(Σ|h|, Σ 1[h ≠ 0])`` in float64 over all entries, and the entry count N."""
    x = unit_axis_pool(h)                                # (N, units)
    abs_sum = x.abs().sum(0, dtype=torch.float64)        # (units,)
    nonzero = (x != 0).sum(0).to(torch.float64)          # (units,)
    return abs_sum, nonzero, x.shape[0]


def _require_entries(n: int) -> None:
    if n == 0:
        raise ValueError("expected activations with at least one (sample, position) entry, got 0")


def abs_mean_per_unit(h: Tensor) -> Tensor:
    """``E|h_i|`` per unit (mean over batch and positions), float64 ``(units,)``."""
    abs_sum, _, n = unit_sums(h)
    _require_entries(n)
    return abs_sum / n


def active_rate(h: Tensor) -> Tensor:
    """Per unit, the fraction of (sample, position) entries with ``h ≠ 0`` (Dohare et al. 2024)."""
    _, nonzero, n = unit_sums(h)
    _require_entries(n)
    return nonzero / n


def dormant_scores_from_means(abs_mean: Tensor, eps: float = DORMANT_EPS) -> Tensor:
    """τ-dormant scores ``s_i = a_i / (mean_k a_k + ε)`` from per-unit ``a_i = E|h_i|``.

    Sokar et al. 2023, Def. 3.1; dopamine ``estimate_neuron_score`` (ε = 1e-9, no mean
    subtraction). A layer whose units are all uniformly small is *not* flagged (the score is
    relative to the layer mean; docs/metrics.md §7b pitfall).
    """
    a = abs_mean.to(torch.float64)
    return a / (a.mean() + eps)


def dormant_scores(h: Tensor, eps: float = DORMANT_EPS) -> Tensor:
    """τ-dormant score of every unit of one activation tensor (see :func:`dormant_scores_from_means`)."""
    return dormant_scores_from_means(abs_mean_per_unit(h), eps)


def _check_tau(tau: float) -> None:
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau >= 0):
        raise ValueError(f"tau must be a finite number >= 0, got {tau!r}")


def dormant_fraction_from_scores(scores: Tensor, tau: float) -> Tensor:
    """Fraction of units with ``s_i ≤ τ`` (0-d float64)."""
    _check_tau(tau)
    return (scores <= tau).to(torch.float64).mean()


def dormant_fraction(h: Tensor, tau: float = 0.1) -> Tensor:
    """Fraction of τ-dormant units of a layer (Sokar et al. 2023): ``mean_i 1[s_i ≤ τ]``.

    τ = 0 counts dead units; dopamine's default threshold is 0, a reimplementation documents
    0.025 (default) / 0.1 (high replay ratio) (docs/metrics.md §7b: the paper's τ table is not yet
    verified, so τ is a parameter).
    """
    _check_tau(tau)
    return dormant_fraction_from_scores(dormant_scores(h), tau)


def low_activity_fraction_from_rates(rates: Tensor, rate: float = 0.01) -> Tensor:
    """Fraction of units whose active rate is below ``rate`` (0-d float64)."""
    if not (isinstance(rate, (int, float)) and 0.0 < rate <= 1.0):
        raise ValueError(f"rate must be in (0, 1], got {rate!r}")
    return (rates < rate).to(torch.float64).mean()


def low_activity_fraction(h: Tensor, rate: float = 0.01) -> Tensor:
    """Fraction of units active (``h ≠ 0``) on fewer than ``rate`` of their entries.

    Dohare et al. 2024, ``lop/incremental_cifar/post_run_analysis.py::
    compute_dormant_units_proportion`` (rate 0.01; conv units averaged over batch and space).
    """
    return low_activity_fraction_from_rates(active_rate(h), rate)


def _flat(w: Tensor | Iterable[Tensor]) -> Tensor:
    if isinstance(w, Tensor):
        return w.detach().reshape(-1).to(torch.float64)
    parts = [t.detach().reshape(-1).to(torch.float64) for t in w]
    if not parts:
        raise ValueError("expected a tensor or a non-empty iterable of tensors, got an empty iterable")
    return torch.cat(parts)


def weight_stats(w: Tensor | Iterable[Tensor]) -> dict[str, Tensor]:
    """``{"weight_norm": ‖w‖₂, "weight_abs_mean": mean|w|}`` of a tensor or of several (concatenated).

    Mean |w| over all parameters is Dohare et al.'s ``compute_average_weight_magnitude``; the L2
    norm is Lyle et al.'s parameter norm. 0-d float64 device tensors.
    """
    x = _flat(w)
    if x.numel() == 0:
        raise ValueError("expected at least one weight, got an empty tensor")
    return {"weight_norm": torch.linalg.vector_norm(x), "weight_abs_mean": x.abs().mean()}


def update_to_weight_ratio(w_now: Tensor | Iterable[Tensor],
                           w_before: Tensor | Iterable[Tensor]) -> Tensor:
    """Relative update size ``‖w_now − w_before‖₂ / ‖w_before‖₂`` (0-d float64; NaN if ‖w_before‖ = 0)."""
    a, b = _flat(w_now), _flat(w_before)
    if a.shape != b.shape:
        raise ValueError(f"expected w_now and w_before with the same number of elements, "
                         f"got {a.numel()} and {b.numel()}")
    den = torch.linalg.vector_norm(b)
    ratio = torch.linalg.vector_norm(a - b) / den
    return torch.where(den > 0, ratio, torch.full_like(ratio, math.nan))
