"""Neural collapse NC1–NC4 of a labelled stream of penultimate features, over a sliding window.

Papyan, Han & Donoho (PNAS 2020), "Prevalence of neural collapse during the terminal phase of
deep learning training": once training error reaches zero, (NC1) within-class variability
vanishes relative to between-class variability, (NC2) the centred class means become equinorm
and equiangular (a simplex ETF), (NC3) the classifier rows align with them and (NC4) the
classifier acts as a nearest-class-centre rule. Formulas (docs/metrics.md §8), with ``μ_c`` the class
means, ``μ_G`` the global mean of the samples and ``M̃ = [μ_c − μ_G]``:

* ``neural_collapse_nc1`` — ``tr(Σ_W Σ_B^†)/C`` with ``Σ_W = (S − Σ_c n_c μ_c μ_cᵀ)/N`` and
  ``Σ_B = Ave_c (μ_c − μ_G)(μ_c − μ_G)ᵀ``, by the thin SVD of ``M̃`` (the ``C − 1`` non-zero
  singular values; no d×d pseudo-inverse). Unstructured features give ≈ ``(C−1)·n_c/d``.
* ``neural_collapse_nc2_equinorm`` — ``Std_c ‖μ_c − μ_G‖ / Avg_c ‖μ_c − μ_G‖``.
* ``neural_collapse_nc2_equiangularity`` — ``Std_{c<c'} cos∠(μ_c − μ_G, μ_c' − μ_G)``.
* ``neural_collapse_nc2_max_angle`` — ``Avg_{c≠c'} |cos∠ + 1/(C−1)|``.
* ``neural_collapse_nc3`` — ``‖W/‖W‖_F − M̃/‖M̃‖_F‖_F²`` (needs the classifier at compute; a
  classifier of any number of classes: see :meth:`NeuralCollapseScorer.classifier_signals`).
* ``neural_collapse_nc4`` — fraction of window rows where the classifier's argmax differs from
  the nearest class mean (current window means; needs the classifier at compute).
* ``neural_collapse_classes`` — classes present in the window (C above),
  ``neural_collapse_window_samples`` — valid rows in the window (N),
  ``labels_out_of_range`` — rows ever seen with a label outside ``[0, max_classes)`` (and window
  rows left out when :meth:`NeuralCollapseScorer.resize` lowers ``max_classes``)
  (counted on the device and excluded, never checked on the host), ``nonfinite_rows`` — rows
  ever seen with a NaN/Inf (excluded likewise).

State: a ring of the last ``window`` rows (float32), their labels and a validity weight. At
``compute`` the float64 sufficient statistics ``S = Σ h hᵀ``, class sums and counts are rebuilt
exactly from the ring (O(window·d²)); float64 matters because the one-pass ``Σ_W`` cancels in
float32 in exactly the collapsed regime (docs/metrics.md §8 pitfall 4). ``update`` does no host sync;
``compute`` makes no explicit transfer (one thin SVD of the d×C centred means; on CUDA, as for
``eigvalsh`` in the spectrum scorer, the LAPACK-style error check may wait on the device).
The ring is rank-local (``reduce="none"``): across ranks, NC is per rank unless the caller
all-reduces the statistics (:func:`statistics` gives them).

Pitfall (docs/metrics.md §8, pitfall 3): Papyan et al. measure on the training set with one fixed model; a
window filled during training mixes parameter versions. For the paper's numbers, feed the
training set through the current model (eval mode) at a checkpoint and read the window then.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from monitor.functional.neural_collapse import (
    NC_SIGNALS,
    class_means,
    class_statistics_unchecked,
    centered_class_means,
    nc3_self_duality,
    nc4_ncc_mismatch,
    window_neural_collapse_signals,
)
from monitor.engine.window import RingCursor
from monitor.validation import check_int
from monitor.scorers.state import Scorer


class NeuralCollapseScorer(Scorer):
    """Sliding-window NC1–NC4 of ``(b, dim)`` features with integer labels in ``[0, max_classes)``."""

    signals: tuple[str, ...] = (*NC_SIGNALS, "neural_collapse_nc3", "neural_collapse_nc4",
                                "labels_out_of_range", "nonfinite_rows")

    def __init__(self, dim: int, max_classes: int, window: int,
                 device: torch.device | str = "cpu") -> None:
        super().__init__(device)
        self.dim = check_int("dim", dim, 1)
        self.max_classes = check_int("max_classes", max_classes, 2)
        self.window = check_int("window", window, 2, "rows")
        f64 = {"dtype": torch.float64, "device": self.device}
        self.add_state("ring", torch.zeros(window, dim, dtype=torch.float32, device=self.device),
                       reduce="none", fill=0.0)
        self.add_state("ring_labels", torch.zeros(window, dtype=torch.long, device=self.device),
                       reduce="none", fill=0.0)
        self.add_state("ring_valid", torch.zeros(window, **f64), reduce="none", fill=0.0)
        self.add_state("out_of_range", torch.zeros((), **f64), reduce="sum", fill=0.0)
        self.add_state("nonfinite", torch.zeros((), **f64), reduce="sum", fill=0.0)
        self._ring = RingCursor(window)     # next ring slot (host int, from shapes only)

    def reset(self) -> None:
        super().reset()
        self._ring.reset()

    def update(self, rows: Tensor, labels: Tensor) -> None:
        """Add a batch of rows (b, dim) with labels (b,), both on this scorer's device."""
        if rows.dim() != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"expected rows of shape (b, {self.dim}), got {tuple(rows.shape)}")
        if labels.dim() != 1 or labels.shape[0] != rows.shape[0]:
            raise ValueError(f"expected labels of shape ({rows.shape[0]},), got "
                             f"{tuple(labels.shape)}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"expected integer labels, got {labels.dtype}")
        if rows.shape[0] > self.window:
            rows, labels = rows[-self.window:], labels[-self.window:]
        b = rows.shape[0]
        if b == 0:
            return
        x = rows.detach().to(device=self.device, dtype=torch.float32)       # (b, d)
        y = labels.detach().to(device=self.device, dtype=torch.long)        # (b,)
        in_range = (y >= 0) & (y < self.max_classes)                        # (b,)
        finite = torch.isfinite(x).all(dim=1)                               # (b,)
        self.out_of_range += (~in_range).sum().to(torch.float64)
        self.nonfinite += (in_range & ~finite).sum().to(torch.float64)
        valid = in_range & finite                                           # (b,)
        x = torch.where(valid[:, None], x, torch.zeros_like(x))
        y = torch.where(valid, y, torch.zeros_like(y))
        idx = self._ring.slots(b, self.ring)
        self.ring.index_copy_(0, idx, x)
        self.ring_labels.index_copy_(0, idx, y)
        self.ring_valid.index_copy_(0, idx, valid.to(torch.float64))
        self._ring.advance(b)

    def statistics(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(S (d,d), class_sums (C,d), counts (C,))`` of the window, float64, rebuilt from the ring."""
        x = self.ring.to(torch.float64)                                     # (window, d)
        return class_statistics_unchecked(x, self.ring_labels, self.max_classes, self.ring_valid)

    def compute(self, weight: Tensor | None = None,
                bias: Tensor | None = None) -> dict[str, Tensor]:
        """NC signals of the window as 0-d device tensors (no host sync).

        ``weight`` (max_classes, dim) and ``bias`` (max_classes,) of the linear classifier on
        these features add ``neural_collapse_nc3`` and ``neural_collapse_nc4``
        (:meth:`classifier_signals` takes a classifier of any number of classes).
        """
        if weight is not None and tuple(weight.shape) != (self.max_classes, self.dim):
            raise ValueError(f"expected classifier weight of shape ({self.max_classes}, "
                             f"{self.dim}), got {tuple(weight.shape)} (classifier_signals() "
                             "takes any number of classes)")
        stats = self.statistics()
        out = self.window_signals(stats)
        if weight is not None:
            out.update(self.classifier_signals(weight, bias, stats))
        return out

    def window_signals(self, stats: tuple[Tensor, Tensor, Tensor] | None = None
                       ) -> dict[str, Tensor]:
        """NC1/NC2, classes, window rows and the counters, from ``stats`` (:meth:`statistics`)."""
        s, sums, counts = stats if stats is not None else self.statistics()
        out = window_neural_collapse_signals(s, sums, counts)
        out["labels_out_of_range"] = self.out_of_range.clone()
        out["nonfinite_rows"] = self.nonfinite.clone()
        return out

    def classifier_signals(self, weight: Tensor, bias: Tensor | None = None,
                           stats: tuple[Tensor, Tensor, Tensor] | None = None
                           ) -> dict[str, Tensor]:
        """NC3 and NC4 against the linear classifier ``weight`` (C', dim), ``bias`` (C',).

        Class c is the classifier's row c. A classifier of fewer rows than ``max_classes``
        (C' < C) is compared on the first C' classes, and both values are NaN while the window
        holds a label ≥ C' (a class the classifier does not have; decided on the device); a
        classifier of more rows (C' > C) has its extra classes absent from the window.
        """
        if weight.dim() != 2 or weight.shape[1] != self.dim:
            raise ValueError(f"expected classifier weight of shape (C, {self.dim}), got "
                             f"{tuple(weight.shape)}")
        c_w = weight.shape[0]
        if bias is not None and tuple(bias.shape) != (c_w,):
            raise ValueError(f"expected classifier bias of shape ({c_w},), got {tuple(bias.shape)}")
        _, sums, counts = stats if stats is not None else self.statistics()  # (C, d), (C,)
        beyond: Tensor | None = None
        if c_w < sums.shape[0]:
            beyond = counts[c_w:].sum() > 0                                 # () bool, device
            sums, counts = sums[:c_w], counts[:c_w]
        elif c_w > sums.shape[0]:
            extra = c_w - sums.shape[0]
            sums = torch.cat([sums, sums.new_zeros(extra, sums.shape[1])])
            counts = torch.cat([counts, counts.new_zeros(extra)])
        w = weight.detach().to(self.device)
        b = None if bias is None else bias.detach().to(self.device)
        mu, _, _ = class_means(sums, counts)
        m_tilde, present = centered_class_means(sums, counts)               # (C', d), (C',)
        out = {"neural_collapse_nc3": nc3_self_duality(w, m_tilde, present),
               "neural_collapse_nc4": nc4_ncc_mismatch(self.ring, w, b, mu, present,
                                                       row_weights=self.ring_valid)}
        if beyond is not None:
            nan = torch.full((), math.nan, dtype=torch.float64, device=self.device)
            out = {k: torch.where(beyond, nan, v) for k, v in out.items()}
        return out

    def resize(self, max_classes: int) -> None:
        """Take labels in ``[0, max_classes)`` from now on (e.g. a classifier's class count):
        window rows whose label falls outside are left out and counted as out of range (device
        work only)."""
        self.max_classes = check_int("max_classes", max_classes, 2)
        outside = self.ring_labels >= self.max_classes                       # (window,)
        self.out_of_range += (outside & (self.ring_valid > 0)).sum().to(torch.float64)
        self.ring_valid.masked_fill_(outside, 0.0)
        self.ring_labels.masked_fill_(outside, 0)          # in range for the class statistics

    def state_dict(self) -> dict[str, Tensor]:
        state = super().state_dict()
        state["_pos"] = torch.tensor(self._ring.pos)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        super().load_state_dict(state)
        self._ring.load(state)
