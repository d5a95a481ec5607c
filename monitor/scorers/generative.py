"""Mode-collapse signals of a generator from reservoirs of generated and real rows.

Two ring buffers of ``reservoir`` rows each keep the most recent generated (``update_fake``)
and real (``update_real``) rows in a fixed feature space (the generator's outputs themselves
for low-dimensional data, or a frozen embedding). A ring, not a uniform reservoir over the
whole run: the generator changes as it trains, so only recent samples describe it. When one
batch holds more rows than the ring, a uniform subset is kept, drawn with the scorer's own
``torch.Generator`` (never the global RNG). At publish, on the first
``m = min(fake rows, real rows)`` slots of each ring (equal sample sizes: nearest-neighbour
distances shrink as n grows), ``compute()`` returns:

* ``generator_diversity_ratio`` — mean pairwise Euclidean distance of the generated rows ÷
  that of the real rows (docs/metrics.md §9, common practice; cf. the MS-SSIM check of Odena et
  al. 2017). ≈ 1 healthy, → 0 on complete collapse. Collapse onto a few *distant* modes can
  keep it high; the duplicate rate catches that case.
* ``generator_duplicate_rate`` — birthday-paradox test (Arora & Zhang 2017; Arora, Risteski &
  Zhang, ICLR 2018): fraction of generated rows whose nearest other generated row is closer
  than ε, where ε is the ``dup_quantile`` quantile of the real rows' nearest-neighbour
  distances at the same sample size (threshold calibration is a design of docs/metrics.md §9, not
  the paper's protocol, which inspects the closest pairs by eye).
* ``real_duplicate_rate`` — the same rate on the real rows: ≈ ``dup_quantile`` by
  construction (slightly above for a finite sample, ties excluded); the baseline to read
  ``generator_duplicate_rate`` against.
* ``generator_samples`` — m, the rows per side the values were computed on.

Rows with a NaN/Inf are counted (``nonfinite``, values) and stored with a zero validity
weight, so they never enter a distance. ``update_*`` do device work only: ring positions are
host integers derived from shapes, counts stay tensors. ``compute()`` costs
``O(m²·d)``; publish it at a low cadence for large reservoirs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from monitor.functional.generative import (
    duplicate_rate,
    duplicate_threshold,
    mean_pairwise_distance,
)
from monitor.scorers.state import Scorer
from monitor.validation import check_int


class PairScorer(Scorer):
    """Diversity ratio and birthday-paradox duplicate rates of generated vs real rows."""

    signals: tuple[str, ...] = ("generator_diversity_ratio", "generator_duplicate_rate",
                                "real_duplicate_rate", "generator_samples")

    def __init__(self, dim: int, reservoir: int = 512, dup_quantile: float = 0.01,
                 device: torch.device | str = "cpu", seed: int = 0) -> None:
        super().__init__(device)
        check_int("dim", dim, 1)
        check_int("reservoir", reservoir, 2, unit="rows")
        if not 0.0 < dup_quantile < 1.0:
            raise ValueError(f"dup_quantile must be in (0, 1), got {dup_quantile!r}")
        self.dim = dim
        self.reservoir = reservoir
        self.dup_quantile = dup_quantile
        self.seed = seed
        self._rng = torch.Generator(device=self.device)
        self._rng.manual_seed(seed)
        f32 = {"dtype": torch.float32, "device": self.device}
        f64 = {"dtype": torch.float64, "device": self.device}
        for side in ("fake", "real"):
            self.add_state(f"{side}_rows", torch.zeros(reservoir, dim, **f32), reduce="none", fill=0.0)
            self.add_state(f"{side}_valid", torch.zeros(reservoir, **f64), reduce="none", fill=0.0)
        self.add_state("nonfinite", torch.zeros((), **f64), reduce="sum", fill=0.0)
        self._pos = {"fake": 0, "real": 0}
        self._fill = {"fake": 0, "real": 0}   # host ints: slots written (from shapes, no sync)

    def reset(self) -> None:
        super().reset()
        self._pos = {"fake": 0, "real": 0}
        self._fill = {"fake": 0, "real": 0}
        self._rng.manual_seed(self.seed)

    def update_fake(self, rows: Tensor) -> None:
        """Add a ``(b, dim)`` batch of generated rows (device work only)."""
        self._update("fake", rows)

    def update_real(self, rows: Tensor) -> None:
        """Add a ``(b, dim)`` batch of real rows (device work only)."""
        self._update("real", rows)

    def _update(self, side: str, rows: Tensor) -> None:
        if not isinstance(rows, Tensor) or rows.dim() != 2 or rows.shape[1] != self.dim:
            got = tuple(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__
            raise ValueError(f"{side} rows: expected shape (b, {self.dim}), got {got}")
        if not rows.is_floating_point():
            raise TypeError(f"{side} rows: expected a floating-point tensor, got {rows.dtype}")
        x = rows.detach().to(device=self.device, dtype=torch.float32)       # (b, d)
        b = x.shape[0]
        if b == 0:
            return
        if b > self.reservoir:                                              # uniform subset, own RNG
            keys = torch.rand(b, generator=self._rng, device=self.device)   # (b,)
            x = x.index_select(0, keys.topk(self.reservoir).indices)
            b = self.reservoir
        finite_vals = torch.isfinite(x)                                     # (b, d)
        finite = finite_vals.all(dim=1)                                     # (b,)
        self.nonfinite += (~finite_vals).sum().to(torch.float64)
        x = torch.where(finite[:, None], x, torch.zeros_like(x))
        idx = (torch.arange(b, device=self.device) + self._pos[side]) % self.reservoir
        getattr(self, f"{side}_rows").index_copy_(0, idx, x)
        getattr(self, f"{side}_valid").index_copy_(0, idx, finite.to(torch.float64))
        self._pos[side] = (self._pos[side] + b) % self.reservoir
        self._fill[side] = min(self.reservoir, self._fill[side] + b)

    def compute(self) -> dict[str, Tensor]:
        """The four signals as 0-d float64 device tensors (no host sync); NaN with < 2 rows."""
        m = min(self._fill["fake"], self._fill["real"])
        nan = torch.full((), math.nan, dtype=torch.float64, device=self.device)
        if m < 2:
            return {"generator_diversity_ratio": nan, "generator_duplicate_rate": nan,
                    "real_duplicate_rate": nan,
                    "generator_samples": torch.full((), float(m), dtype=torch.float64,
                                                    device=self.device)}
        fake, fv = self.fake_rows[:m], self.fake_valid[:m]                  # (m, d), (m,)
        real, rv = self.real_rows[:m], self.real_valid[:m]
        ratio = mean_pairwise_distance(fake, fv) / mean_pairwise_distance(real, rv)
        eps = duplicate_threshold(real, self.dup_quantile, rv)
        return {
            "generator_diversity_ratio": ratio,
            "generator_duplicate_rate": duplicate_rate(fake, eps, fv),
            "real_duplicate_rate": duplicate_rate(real, eps, rv),
            "generator_samples": fv.sum(),
        }

    def state_dict(self) -> dict[str, Tensor]:
        state = super().state_dict()
        for side in ("fake", "real"):
            state[f"_pos_{side}"] = torch.tensor(self._pos[side])
            state[f"_fill_{side}"] = torch.tensor(self._fill[side])
        state["_rng"] = self._rng.get_state()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        super().load_state_dict(state)
        for side in ("fake", "real"):
            self._pos[side] = int(state.get(f"_pos_{side}", torch.tensor(0)))
            self._fill[side] = int(state.get(f"_fill_{side}", torch.tensor(0)))
        if "_rng" in state:
            self._rng.set_state(state["_rng"])
