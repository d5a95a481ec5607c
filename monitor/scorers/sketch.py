"""The large-d window state: a Gaussian sketch of the rows, and the rule that picks it.

:class:`SketchedMoments` is a :class:`~monitor.scorers.moments.WindowMoments` over sketched
rows ``y = zΩ`` (k dims; ``Ω`` d×k iid N(0, 1/k), seeded, drawn once on the CPU by its own
``torch.Generator``, :func:`monitor.functional.sketch.gaussian_projection`). Every reader sees
the same attributes (``s`` (k, k) = ``ΩᵀSΩ``, ``zsum``, ``nsum``, ``nsq``, ``n``, ``seen``,
``nonfinite``, ``ring``, ``dim`` = k) plus ``input_dim`` (the true d) and ``sketch_dim``.

**APPROXIMATE — validated on synthetic spectra only** (docs/metrics.md: "validate before use";
errors measured in ``docs/performance.md`` "Large d", ``benchmarks/sketch_error.py``):

* exact: ``window_samples``, ``samples``, ``nonfinite_values``, ``negative_values_ratio`` (a
  per-row count of negative entries of the *original* rows is kept beside the ring);
* nearly unbiased: ``participation_ratio`` (a closed-form correction of the Gaussian sketch's
  bias, :func:`~monitor.functional.sketch.sketched_participation_ratio`);
* approximate, ≈ exact for a window of rank r ≪ k (collapse: rank-32 reads ≈ 32), capped by
  k for spectra spread over more than k directions: ``effective_rank`` (RankMe over ``min(n,
  k)`` sketched σ), ``srank``, ``spectrum_alpha``, ``top_eigenvalue_share``;
  ``effective_rank_ratio`` is RankMe ÷ ``min(n, k)`` (not ÷ ``min(n, d)``);
* over sketched coordinates: ``embedding_std_ratio`` (√k · mean std of the L2-normalised
  *sketched* rows; 0 on complete collapse, ≈ 1 isotropic) and ``mean_cosine_similarity``
  (cosines of sketched rows, which a Gaussian sketch preserves up to ``O(1/√k)``).

Memory ``4dk + 8k² + 4·window·k`` bytes instead of ``8d² + 4·window·d``; an update costs
``2bdk + 2bk²`` FLOP instead of ``2bd²``; a publish one k×k ``eigvalsh`` instead of d×d.
Under ``torch.distributed`` every rank draws the same ``Ω`` from the same seed, so the
all-reduced sketched sums are exactly the global sketch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from monitor.functional.moments import clean_rows
from monitor.functional.sketch import (
    gaussian_projection,
    project_rows,
    sketch_dim_for,
)
from monitor.scorers.moments import WindowMoments
from monitor.validation import check_int

PathMode = Literal["auto", "exact", "sketch"]
PATH_MODES: tuple[str, ...] = ("auto", "exact", "sketch")


class SketchedMoments(WindowMoments):
    """Exact sliding-window sums of the sketched rows ``zΩ`` (approximate spectrum of z)."""

    def __init__(self, dim: int, window: int, sketch_dim: int,
                 device: torch.device | str = "cpu", seed: int = 0,
                 rebuild_every_wraps: int = 64) -> None:
        if not 2 <= sketch_dim < dim:
            raise ValueError(f"sketch_dim must be in [2, dim) = [2, {dim}), got {sketch_dim}")
        super().__init__(sketch_dim, window, device, rebuild_every_wraps)
        self.input_dim = dim
        self.sketch_dim = sketch_dim
        self.seed = seed
        # negative entries per original row (the ring holds projected rows)
        self.add_state("ring_neg", torch.zeros(window, dtype=torch.float64, device=self.device),
                       reduce="none", fill=0.0)
        self._omega: Tensor | None = None

    @property
    def omega(self) -> Tensor:
        """``Ω`` (d, k) float32 on this state's device (drawn on first use)."""
        if self._omega is None:
            omega = gaussian_projection(self.input_dim, self.sketch_dim, self.seed)
            if self.device.type == "cuda":      # pinned + non_blocking: no host sync
                omega = omega.pin_memory().to(self.device, non_blocking=True)
            self._omega = omega.to(self.device)
        return self._omega

    def update(self, rows: Tensor) -> None:
        """Add a ``(b, d)`` batch of original rows: sketched, then the exact window update."""
        if rows.dim() != 2 or rows.shape[1] != self.input_dim:
            raise ValueError(f"expected rows of shape (b, {self.input_dim}), "
                             f"got {tuple(rows.shape)}")
        if rows.shape[0] > self.window:
            rows = rows[-self.window:]
        b = rows.shape[0]
        if b == 0:
            return
        x, valid, nonfinite = clean_rows(rows.detach().to(self.device))    # (b, d), (b,), ()
        self.ring_neg.index_copy_(0, self._ring.slots(b, self.ring_neg),
                                  (x < 0).sum(1).to(torch.float64))          # (b,) original
        self._add_clean(project_rows(x, self.omega), valid, nonfinite)     # (b, k)

    def negative_count(self) -> Tensor:
        """Negative entries of the window's valid original rows, () float64 (exact)."""
        return self._block_negatives((self.ring_neg * (self.ring_valid > 0)).sum())

    def state_dict(self, compact: bool = False) -> dict[str, Tensor]:
        """As :meth:`WindowMoments.state_dict` (k-dimensional sums; ``compact`` leaves out the
        sketched rows and their negative counts), plus the sketch's (k, seed, d): ``Ω`` is
        drawn again from them, never saved."""
        state = super().state_dict(compact)
        state["_sketch_dim"] = torch.tensor(self.sketch_dim)
        state["_sketch_seed"] = torch.tensor(self.seed)
        state["_input_dim"] = torch.tensor(self.input_dim)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        saved = (int(state.get("_sketch_dim", torch.tensor(-1))),
                 int(state.get("_sketch_seed", torch.tensor(-1))),
                 int(state.get("_input_dim", torch.tensor(-1))))
        if saved != (self.sketch_dim, self.seed, self.input_dim):
            raise ValueError(f"checkpoint sketch (sketch_dim, seed, dim) = {saved}, this state's "
                             f"is {(self.sketch_dim, self.seed, self.input_dim)}")
        super().load_state_dict(state)


@dataclass(frozen=True)
class SpectralPath:
    """Which window state a stream gets: exact d×d, or a k-dim Gaussian sketch.

    ``mode``: ``"exact"``, ``"sketch"`` or ``"auto"`` (sketch when ``dim > sketch_above`` or
    when the exact state, :func:`~monitor.functional.sketch.exact_state_bytes`, would exceed
    ``memory_limit_bytes``). A sketch is only used when ``dim > sketch_dim`` (else exact).
    ``streams`` maps stream/layer names to a mode that overrides ``mode`` for them.
    """

    mode: PathMode = "auto"
    sketch_above: int = 4096
    sketch_dim: int = 2048
    memory_limit_bytes: int | None = None
    seed: int = 0
    streams: Mapping[str, PathMode] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in PATH_MODES:
            raise ValueError(f"spectral_path must be one of {PATH_MODES}, got {self.mode!r}")
        for name, mode in self.streams.items():
            if not isinstance(name, str) or mode not in PATH_MODES:
                raise ValueError(f"spectral_path overrides map stream names to one of "
                                 f"{PATH_MODES}, got {name!r}: {mode!r}")
        for kind, value, low in (("sketch_above", self.sketch_above, 1),
                                 ("sketch_dim", self.sketch_dim, 2)):
            check_int(kind, value, low)
        limit = self.memory_limit_bytes
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit < 1):
            raise ValueError(f"memory_limit_bytes must be a positive int or None, got {limit!r}")

    def sketch_dim_for(self, name: str, dim: int, window: int) -> int:
        """k for a stream of dimension ``dim`` (0: the exact path)."""
        return sketch_dim_for(self.streams.get(name, self.mode), dim, window, self.sketch_above,
                              self.sketch_dim, self.memory_limit_bytes)

    def resolved(self, name: str, dim: int, window: int) -> SpectralPath:
        """This policy's choice for one stream, as a fixed ``"exact"``/``"sketch"`` path (so a
        small prototype state of another window size gets the same shapes)."""
        k = self.sketch_dim_for(name, dim, window)
        return (SpectralPath("sketch", sketch_dim=k, seed=self.seed) if k
                else SpectralPath("exact", seed=self.seed))

    def make(self, name: str, dim: int, window: int,
             device: torch.device | str) -> WindowMoments:
        """The window state this policy gives stream ``name``."""
        k = self.sketch_dim_for(name, dim, window)
        if k == 0:
            return WindowMoments(dim, window, device)
        return SketchedMoments(dim, window, k, device, seed=self.seed)

    def for_checkpoint(self, state: Mapping[str, Tensor]) -> SpectralPath:
        """The path a saved window state was on (a checkpoint keeps its own path)."""
        if "_sketch_dim" in state:
            return SpectralPath("sketch", sketch_dim=int(state["_sketch_dim"]),
                                seed=int(state["_sketch_seed"]))
        return SpectralPath("exact")
