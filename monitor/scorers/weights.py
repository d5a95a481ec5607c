"""Early-bird tickets from the model's weights, at low cadence.

(Per-layer ε-rank and stable rank are computed by :mod:`monitor.probes.weights` from
:mod:`monitor.functional.weights`.)

* :class:`EarlyBirdTracker` — You, Li, Xu, Fu, Wang, Chen, Baraniuk, Wang & Lin, ICLR 2020,
  "Drawing Early-Bird Tickets: Towards More Efficient Training of Deep Networks": winning
  tickets emerge early; detect them by drawing the pruning mask at each check and measuring the
  normalised Hamming distance to the previous check's mask. The paper keeps the last ``l = 5``
  distances in a FIFO and declares the ticket found when their maximum is below ``ε = 0.1``;
  here: ``patience`` consecutive checks with distance ``< threshold``. The paper's masks prune
  channels by BatchNorm scale factors; these masks are unstructured, by global weight magnitude
  (:func:`monitor.functional.weights.global_magnitude_masks`), at several sparsities at once.

It is not a streaming :class:`~monitor.scorers.state.Scorer`: it reads the model's weights when
called, not a stream of rows. ``EarlyBirdTracker.check`` stays on the device;
``ticket_found`` / ``found_at`` transfer the new distances to the host (a sync, at check cadence).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from monitor.functional.weights import global_magnitude_masks, mask_distance
from monitor.snapshot import SignalKey


def prunable_weights(model: nn.Module) -> list[Tensor]:
    """The ≥ 2-D parameters of ``model`` (linear and conv weights), in ``parameters()`` order."""
    return [p for p in model.parameters() if p.dim() >= 2]


def _label(sparsity: float) -> SignalKey:
    return SignalKey.of("earlybird_mask_distance", sparsity=float(sparsity))


class EarlyBirdTracker:
    """Early-bird ticket detection (You et al., ICLR 2020) from global magnitude masks.

    At each :meth:`check` the masks at every sparsity are drawn from the current weights and
    compared with the previous check's: ``d_t(s) = #{m_t ≠ m_{t−1}} / n`` (normalised Hamming
    distance). The ticket at sparsity s is *found* at the first check ending a run of
    ``patience`` consecutive distances below ``threshold`` (You et al.: FIFO of 5, ε = 0.1).
    Only the latest check's masks are kept (one bool per weight per sparsity, on the weights'
    device): read :meth:`masks` right after the check at which :meth:`ticket_found` turns true.
    """

    def __init__(self, sparsities: Sequence[float] = (0.5, 0.8, 0.9), patience: int = 5,
                 threshold: float = 0.1) -> None:
        levels = [float(s) for s in sparsities]
        if not levels or any(not 0.0 <= s < 1.0 for s in levels):
            raise ValueError(f"sparsities must be a non-empty list of values in [0, 1), got "
                             f"{list(sparsities)!r}")
        if len(set(levels)) != len(levels):
            raise ValueError(f"sparsities must be distinct, got {levels!r}")
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
        self.sparsities = tuple(levels)
        self.patience = patience
        self.threshold = threshold
        self.reset()

    def reset(self) -> None:
        """Forget all checks."""
        self.checks = 0
        self._shapes: list[torch.Size] | None = None
        self._masks: dict[float, list[Tensor]] = {}
        self._pending: list[Tensor] = []               # (len(sparsities),) distances, device
        self._streak = {s: 0 for s in self.sparsities}
        self._found: dict[float, int] = {}
        self._history: list[list[float]] = []          # host distances, one row per check ≥ 2

    def check(self, weights: Sequence[Tensor] | nn.Module) -> dict[str, Tensor]:
        """Draw the masks from ``weights`` (a list of tensors or a module's ≥ 2-D weights).

        Returns ``{"earlybird_mask_distance{sparsity=0.5}": d, ...}``: 0-d float64 device
        tensors, the distance to the previous check's masks (NaN at the first check).
        """
        ws = prunable_weights(weights) if isinstance(weights, nn.Module) else list(weights)
        if not ws:
            raise ValueError("expected at least one weight tensor to prune, got none")
        shapes = [w.shape for w in ws]
        if self._shapes is not None and shapes != self._shapes:
            raise ValueError(f"weights changed shape between checks: expected "
                             f"{[tuple(s) for s in self._shapes]}, got {[tuple(s) for s in shapes]}")
        masks = global_magnitude_masks(ws, self.sparsities)
        out: dict[str, Tensor] = {}
        dists = []
        for s in self.sparsities:
            if self._masks:
                d = mask_distance(self._masks[s], masks[s])
            else:
                d = torch.full((), math.nan, dtype=torch.float64, device=ws[0].device)
            out[_label(s)] = d
            dists.append(d)
        if self._masks:
            self._pending.append(torch.stack(dists))
        self._masks = masks
        self._shapes = shapes
        self.checks += 1
        return out

    def _settle(self) -> None:
        """Move the pending distances to the host (one sync) and advance the streaks."""
        if not self._pending:
            return
        rows = torch.stack(self._pending).cpu().tolist()  # host sync: at check cadence only
        self._pending = []
        first = self.checks - len(rows)                     # check index (1-based) of rows[0] − 1
        for j, row in enumerate(rows):
            self._history.append(row)
            for s, d in zip(self.sparsities, row):
                self._streak[s] = self._streak[s] + 1 if d < self.threshold else 0
                if self._streak[s] >= self.patience and s not in self._found:
                    self._found[s] = first + j + 1

    def _level(self, sparsity: float) -> float:
        for s in self.sparsities:
            if math.isclose(s, float(sparsity)):
                return s
        raise KeyError(f"sparsity {sparsity!r} is not tracked; tracked: {list(self.sparsities)}")

    def ticket_found(self, sparsity: float) -> bool:
        """Whether the distance at ``sparsity`` has stayed below the threshold for ``patience``
        consecutive checks at some point (host bool; syncs the pending distances)."""
        level = self._level(sparsity)
        self._settle()
        return level in self._found

    def found_at(self, sparsity: float) -> int | None:
        """The check number (1-based) at which the ticket at ``sparsity`` was found, else None."""
        level = self._level(sparsity)
        self._settle()
        return self._found.get(level)

    def distances(self, sparsity: float) -> list[float]:
        """Host history of the distances at ``sparsity`` (checks 2, 3, ...)."""
        level = self._level(sparsity)
        self._settle()
        i = self.sparsities.index(level)
        return [row[i] for row in self._history]

    def masks(self, sparsity: float) -> list[Tensor]:
        """The current (latest check's) boolean masks at ``sparsity``."""
        level = self._level(sparsity)
        if not self._masks:
            raise RuntimeError("no check has been made yet")
        return self._masks[level]
