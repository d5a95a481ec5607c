"""Dormant, low-activity and never-active units of one layer, streaming.

Per unit (a feature of ``(b, units)`` rows or ``(b, T, units)`` tokens, a channel of
``(b, C, *spatial)`` conv maps) the scorer accumulates, in float64 on the activations' device:

* ``abs_sum_i = Σ |h_i|`` and ``nonzero_i = Σ 1[h_i ≠ 0]`` over the (sample, position) entries of
  the **current publish interval**, and the entry count ``count``. The engine calls
  :meth:`ActivationScorer.reset_interval` right after each publish, so scores describe recent
  data, like ReDo's score on a recent batch (Sokar et al. 2023) rather than the whole run.
* ``ever_active_i`` (0/1, reduced with ``max`` across ranks): whether unit i was ever non-zero
  since the start (or the last :meth:`reset`).

``compute()`` (device tensors, no host sync) returns:

* ``dormant_units_ratio{tau=τ}`` for each τ — fraction of τ-dormant units, Sokar, Evci, Lee,
  Castro & Mnih (ICML 2023), Def. 3.1: ``s_i = E|h_i| / (mean_k E|h_k| + 1e-9)``, dormant iff
  ``s_i ≤ τ`` (google/dopamine ``weight_recyclers.py::estimate_neuron_score``). Default τ set
  {0, 0.025, 0.1} (docs/metrics.md §7b; the paper's τ table is not verified, so τ is configurable).
* ``low_activity_units_ratio`` — fraction of units non-zero on fewer than ``low_activity_rate``
  (0.01) of their entries: Dohare et al. (Nature 2024) ``compute_dormant_units_proportion``.
* ``never_active_units_ratio`` — fraction of units never non-zero since the start (Dohare et al.'s
  permuted-MNIST "dead" units, ``Σ|h| = 0``, over the whole run instead of 2000 examples).
* ``activation_units`` — the number of units.

Ratios are NaN while their counts are empty (no entry this interval / since start). Rows
(sample, position entries) holding a NaN/Inf are left out and counted in ``nonfinite``. The
feature-rank signals of the layer (effective rank, srank) come from feeding
:func:`monitor.functional.plasticity.pooled_unit_rows` to the stream's ``WindowMoments``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from monitor.functional.plasticity import (
    DORMANT_EPS,
    dormant_scores_from_means,
    low_activity_fraction_from_rates,
    unit_axis_pool,
)
from monitor.scorers.state import Scorer
from monitor.snapshot import SignalKey
from monitor.validation import check_int

_INTERVAL_STATES: tuple[str, ...] = ("abs_sum", "nonzero", "count")


class ActivationScorer(Scorer):
    """τ-dormant / low-activity / never-active unit ratios of one layer's activations."""

    def __init__(self, units: int, taus: Sequence[float] = (0.0, 0.025, 0.1),
                 low_activity_rate: float = 0.01, device: torch.device | str = "cpu") -> None:
        super().__init__(device)
        check_int("units", units, 1)
        taus = tuple(taus)
        if not taus:
            raise ValueError("taus must hold at least one threshold, got an empty sequence")
        for tau in taus:
            if isinstance(tau, bool) or not isinstance(tau, (int, float)) \
                    or not math.isfinite(tau) or tau < 0:
                raise ValueError(f"every tau must be a finite number >= 0, got {tau!r} in {taus!r}")
        keys = [SignalKey.of("dormant_units_ratio", tau=float(t)) for t in taus]
        if len(set(keys)) != len(keys):
            raise ValueError(f"taus must be distinct, got {taus!r}")
        if isinstance(low_activity_rate, bool) or not isinstance(low_activity_rate, (int, float)) \
                or not 0.0 < low_activity_rate <= 1.0:
            raise ValueError(f"low_activity_rate must be in (0, 1], got {low_activity_rate!r}")
        self.units = units
        self.taus = tuple(float(t) for t in taus)
        self.low_activity_rate = float(low_activity_rate)
        self._keys = keys
        f64 = {"dtype": torch.float64, "device": self.device}
        self.add_state("abs_sum", torch.zeros(units, **f64), reduce="sum", fill=0.0)
        self.add_state("nonzero", torch.zeros(units, **f64), reduce="sum", fill=0.0)
        self.add_state("count", torch.zeros((), **f64), reduce="sum", fill=0.0)
        self.add_state("ever_active", torch.zeros(units, **f64), reduce="max", fill=0.0)
        self.add_state("seen", torch.zeros((), **f64), reduce="sum", fill=0.0)
        self.add_state("nonfinite", torch.zeros((), **f64), reduce="sum", fill=0.0)

    @property
    def signals(self) -> tuple[str, ...]:
        """The keys :meth:`compute` returns."""
        return (*self._keys, "low_activity_units_ratio", "never_active_units_ratio",
                "activation_units")

    def reset_interval(self) -> None:
        """Start a new publish interval: clear Σ|h|, Σ1[h≠0] and the count (not ``ever_active``)."""
        for name in _INTERVAL_STATES:
            setattr(self, name, self.default(name))

    def update(self, h: Tensor) -> None:
        """Add a batch of activations: ``(b, units)``, ``(b, T, units)`` or ``(b, C, *spatial)``."""
        x = unit_axis_pool(h)                                              # (N, units); validates
        if x.shape[1] != self.units:
            raise ValueError(f"expected activations with {self.units} units, got shape "
                             f"{tuple(h.shape)} ({x.shape[1]} units)")
        if x.shape[0] == 0:
            return
        x = x.detach().to(self.device)
        finite = torch.isfinite(x).all(dim=1)                              # (N,)
        x = torch.where(finite[:, None], x, torch.zeros_like(x))           # (N, units)
        n_ok = finite.sum().to(torch.float64)                              # () device
        nz = (x != 0).sum(0).to(torch.float64)                             # (units,)
        self.abs_sum += x.abs().sum(0, dtype=torch.float64)                # (units,)
        self.nonzero += nz
        self.count += n_ok
        self.seen += n_ok
        self.nonfinite += float(x.shape[0]) - n_ok
        self.ever_active = torch.maximum(self.ever_active, (nz > 0).to(torch.float64))

    def dormant_scores(self) -> Tensor:
        """τ-dormant scores ``s_i`` of the current interval, float64 ``(units,)`` (NaN if empty)."""
        mean = self.abs_sum / self.count.clamp_min(1.0)                   # (units,) E|h_i|
        s = dormant_scores_from_means(mean, DORMANT_EPS)
        return torch.where(self.count > 0, s, torch.full_like(s, math.nan))

    def dormant_units(self, tau: float) -> Tensor:
        """Bool mask ``(units,)`` of the τ-dormant units of the interval (all False if empty)."""
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) \
                or tau < 0:
            raise ValueError(f"tau must be a finite number >= 0, got {tau!r}")
        return self.dormant_scores() <= tau                               # NaN <= τ is False

    def compute(self) -> dict[str, Tensor]:
        """The signals as 0-d float64 device tensors (no host sync)."""
        has = self.count > 0
        nan = torch.full((), math.nan, dtype=torch.float64, device=self.device)
        scores = self.dormant_scores()
        out: dict[str, Tensor] = {}
        for key, tau in zip(self._keys, self.taus):
            out[key] = torch.where(has, (scores <= tau).to(torch.float64).mean(), nan)
        rates = self.nonzero / self.count.clamp_min(1.0)                  # (units,)
        out["low_activity_units_ratio"] = torch.where(
            has, low_activity_fraction_from_rates(rates, self.low_activity_rate), nan)
        out["never_active_units_ratio"] = torch.where(
            self.seen > 0, (self.ever_active == 0).to(torch.float64).mean(), nan)
        out["activation_units"] = torch.full((), float(self.units), dtype=torch.float64,
                                             device=self.device)
        return out
