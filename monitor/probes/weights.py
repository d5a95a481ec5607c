"""Weights and gradients of a watched model, computed at publish (``Monitor.watch_weights``).

Per weight tensor (≥ 2-D: linear matrices and conv kernels; biases and norm scales are left
out to keep label cardinality bounded):

* ``weight_norm`` ‖W‖₂ and ``weight_abs_mean`` mean |w| (Lyle et al. 2023; Dohare et al. 2024:
  growing weight magnitude accompanies loss of plasticity);
* ``grad_norm`` ‖∇W‖₂ of the gradient present at publish (NaN when there is none);
* ``update_to_weight_ratio`` ‖W_t − W_prev‖ / ‖W_prev‖ between consecutive publishes (one
  copy of the weights is kept for it; ``update_ratio=False`` saves that memory);
* every ``rank_every`` publishes: ``weight_rank`` (#σ(W/‖W‖_F) > 1e-3) and
  ``weight_stable_rank`` (Galanti et al. 2022), one SVD per matrix;
* with ``earlybird`` sparsities, every ``rank_every`` publishes: the early-bird mask distance
  (You et al., ICLR 2020) as run signals ``earlybird_mask_distance{sparsity=s}``.

Everything stays on the device; the engine moves the values to the host with the publish's one
transfer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from monitor.functional.weights import stable_rank, weight_rank
from monitor.scorers.weights import EarlyBirdTracker


class WeightWatch:
    """Publish-time statistics of one model's weight tensors."""

    def __init__(self, model: nn.Module, *, rank_every: int = 10, update_ratio: bool = True,
                 earlybird: Sequence[float] | None = (0.5, 0.8, 0.9)) -> None:
        self.params: list[tuple[str, nn.Parameter]] = [
            (n, p) for n, p in model.named_parameters() if p.dim() >= 2 and p.is_floating_point()]
        if not self.params:
            raise ValueError(f"{type(model).__name__} has no weight tensors with 2 or more dims")
        self.rank_every = rank_every
        self.update_ratio = update_ratio
        self._prev: dict[str, Tensor] = {}
        self._publishes = 0
        self._ranks: dict[str, dict[str, Tensor]] = {}
        self.earlybird = EarlyBirdTracker(sparsities=tuple(earlybird)) if earlybird else None
        self._earlybird_values: dict[str, Tensor | float] = {}

    @torch.no_grad()
    def param_signals(self) -> dict[str, dict[str, Tensor]]:
        """Signals per parameter name (device tensors); called once per publish."""
        low_cadence = self._publishes % self.rank_every == 0
        self._publishes += 1
        out: dict[str, dict[str, Tensor]] = {}
        for name, p in self.params:
            w = p.detach()
            norm = torch.linalg.vector_norm(w.to(torch.float64))
            vals: dict[str, Tensor] = {"weight_norm": norm,
                                       "weight_abs_mean": w.abs().to(torch.float64).mean()}
            if p.grad is not None:
                vals["grad_norm"] = torch.linalg.vector_norm(p.grad.detach().to(torch.float64))
            if self.update_ratio:
                prev = self._prev.get(name)
                if prev is not None:
                    delta = torch.linalg.vector_norm((w - prev).to(torch.float64))
                    prev_norm = torch.linalg.vector_norm(prev.to(torch.float64))
                    vals["update_to_weight_ratio"] = delta / torch.where(
                        prev_norm > 0, prev_norm, torch.full_like(prev_norm, math.nan))
                    prev.copy_(w)
                else:
                    self._prev[name] = w.clone()
            if low_cadence:
                self._ranks[name] = {"weight_rank": weight_rank(w), "weight_stable_rank": stable_rank(w)}
            vals.update(self._ranks.get(name, {}))
            out[name] = vals
        if low_cadence and self.earlybird is not None:
            eb = self.earlybird
            # ticket_found() reads the previous checks' distances on the host: a second sync
            # at this low cadence only (the SVDs above dominate it anyway).
            found = any(eb.ticket_found(sp) for sp in eb.sparsities)
            values: dict[str, Tensor | float] = dict(eb.check([p.detach() for _, p in self.params]))
            values["earlybird_ticket_found"] = 1.0 if found else 0.0
            self._earlybird_values = values
        return out

    def run_signals(self) -> dict[str, Tensor | float]:
        """Model-level signals of the latest low-cadence check (early-bird distances)."""
        return dict(self._earlybird_values)
