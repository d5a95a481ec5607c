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
from monitor.scorers.state import (
    FrozenBlock,
    Scorer,
    load_full_with_block,
    pack_symmetric,
    unpack_symmetric,
)


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
        self._block: FrozenBlock | None = None   # statistics restored from a compact checkpoint

    def reset(self) -> None:
        super().reset()
        self._ring.reset()
        self._block = None

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
        if self._block is not None:                 # saved rows evicted by these slots
            self._block.first_writes(b)
            if self._block.done:
                self._block = None

    def _row_weights(self) -> Tensor:
        """Validity of the ring's real rows (window,): not the saved rows of a restored block,
        whose slots hold zero rows."""
        if self._block is None:
            return self.ring_valid
        return self.ring_valid * self._block.touched(self.ring_valid)

    def statistics(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(S (d,d), class_sums (C,d), counts (C,))`` of the window, float64, rebuilt from the ring."""
        x = self.ring.to(torch.float64)                                     # (window, d)
        s, sums, counts = class_statistics_unchecked(x, self.ring_labels, self.max_classes,
                                                     self._row_weights())
        if self._block is not None:                  # + the share of the restored statistics left
            w = self._block.weight(self.ring_valid)
            t = self._block.tensors
            s = s + w * t["S"]
            sums = sums + w * t["sums"]
            counts = counts + w * t["counts"]
        return s, sums, counts

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
        rows = self._row_weights()
        nc4 = nc4_ncc_mismatch(self.ring, w, b, mu, present, row_weights=rows)
        if self._block is not None:
            nc4 = self._with_block_nc4(nc4, rows.sum())
        out = {"neural_collapse_nc3": nc3_self_duality(w, m_tilde, present),
               "neural_collapse_nc4": nc4}
        if beyond is not None:
            nan = torch.full((), math.nan, dtype=torch.float64, device=self.device)
            out = {k: torch.where(beyond, nan, v) for k, v in out.items()}
        return out

    def _with_block_nc4(self, nc4: Tensor, rows: Tensor) -> Tensor:
        """NC4 over the real rows (``nc4`` of ``rows`` valid rows) and the restored block's
        rows left, which keep the NC4 saved with them (none when it was not known)."""
        assert self._block is not None
        saved = self._block.tensors["nc4"]
        left = torch.where(torch.isfinite(saved), self._block.left(self.ring_valid),
                           torch.zeros_like(saved))
        num = torch.where(rows > 0, nc4 * rows, torch.zeros_like(nc4)) \
            + torch.where(left > 0, saved * left, torch.zeros_like(saved))
        total = rows + left
        return torch.where(total > 0, num / total.clamp_min(1e-300), torch.full_like(num, math.nan))

    def resize(self, max_classes: int) -> None:
        """Take labels in ``[0, max_classes)`` from now on (e.g. a classifier's class count):
        window rows whose label falls outside are left out and counted as out of range (device
        work only). A restored block holding such labels is left out whole (its rows' second
        moment cannot be split by class)."""
        self.max_classes = check_int("max_classes", max_classes, 2)
        outside = self.ring_labels >= self.max_classes                       # (window,)
        self.out_of_range += (outside & (self.ring_valid > 0)).sum().to(torch.float64)
        self.ring_valid.masked_fill_(outside, 0.0)
        self.ring_labels.masked_fill_(outside, 0)          # in range for the class statistics
        if self._block is not None:
            self._resize_block()

    def _resize_block(self) -> None:
        assert self._block is not None
        t = self._block.tensors
        c, saved = self.max_classes, t["sums"].shape[0]
        if saved < c:
            t["sums"] = torch.cat([t["sums"], t["sums"].new_zeros(c - saved, self.dim)])
            t["counts"] = torch.cat([t["counts"], t["counts"].new_zeros(c - saved)])
        elif saved > c:
            keep = (t["counts"][c:].sum() == 0).to(torch.float64)         # () device, no sync
            touched = self._block.touched(self.ring_valid)
            self.out_of_range += (1.0 - keep) * self._block.left(self.ring_valid)
            self.ring_valid *= touched + ~touched * keep
            for name in ("S", "sums", "counts"):
                t[name] = t[name] * keep
            t["sums"], t["counts"] = t["sums"][:c], t["counts"][:c]

    def state_dict(self, compact: bool = False,
                   classifier: tuple[Tensor, Tensor | None] | None = None) -> dict[str, Tensor]:
        """The ring and counters. ``compact=True``: the window's statistics instead of its
        rows (``S`` as its lower triangle, class sums and counts up to the highest label
        present, C': ``4d(d+1) + 8C'(d+1)`` bytes instead of ``4·window·d + 16·window``), each
        slot's validity (bool), and the window's NC4 against ``classifier`` (``(weight, bias)``, NaN without one), which the saved rows
        keep after a load while they are evicted (:class:`~monitor.scorers.state.FrozenBlock`)."""
        if compact:
            top = self.saved_classes()
            s_full, sums, counts = self.statistics()
            stats = (s_full, sums, counts)
            nc4 = torch.full((), math.nan, dtype=torch.float64)
            if classifier is not None:
                try:
                    nc4 = self.classifier_signals(classifier[0], classifier[1], stats)[
                        "neural_collapse_nc4"]
                except (ValueError, RuntimeError):     # a classifier that does not fit
                    pass
            # sync: state_dict(compact=True) copies to the host at checkpoint time, off the hot path
            return {"_compact": torch.tensor(True), "S_packed": pack_symmetric(stats[0]).cpu(),
                    "sums": sums[:top].to("cpu", copy=True),       # copies: not views
                    "counts": counts[:top].to("cpu", copy=True), "_nc4": nc4.cpu(),
                    "ring_valid": (self.ring_valid > 0).cpu(),
                    "out_of_range": self.out_of_range.to("cpu", copy=True),
                    "nonfinite": self.nonfinite.to("cpu", copy=True),
                    "_pos": torch.tensor(self._ring.pos)}
        state = super().state_dict()
        if self._block is not None:
            state.update(self._block.state(self.ring_valid))
            state["ring_valid"] = state["ring_valid"] * self._block.touched(state["ring_valid"])
        state["_pos"] = torch.tensor(self._ring.pos)
        return state

    def saved_classes(self) -> int:
        """Classes a compact state keeps: up to the highest label in the window (its class
        sums and counts), at least 2. Reads the device (a checkpoint-time call)."""
        rows = self._row_weights() > 0
        top = torch.where(rows, self.ring_labels, torch.full_like(self.ring_labels, -1)).max()
        if self._block is not None:
            present = torch.nonzero(self._block.tensors["counts"] > 0)
            if present.numel():
                top = torch.maximum(top, present.max())
        return max(2, int(top) + 1)  # sync: a checkpoint-time call, off the hot path

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load a full or a compact (``_compact``) :meth:`state_dict`."""
        if "_compact" in state:
            self._load_compact(state)
            return
        load_full_with_block(self, state)

    def _load_compact(self, state: dict[str, Tensor]) -> None:
        d, w = self.dim, self.window
        f64 = {"dtype": torch.float64, "device": self.device}
        s = unpack_symmetric(torch.as_tensor(state["S_packed"]), d).to(**f64)
        sums = torch.as_tensor(state["sums"]).to(**f64)
        counts = torch.as_tensor(state["counts"]).to(**f64)
        if sums.dim() != 2 or sums.shape[1] != d or counts.shape != (sums.shape[0],):
            raise ValueError(f"NeuralCollapseScorer: expected class sums (C, {d}) and counts "
                             f"(C,), got {tuple(sums.shape)} and {tuple(counts.shape)}")
        valid = torch.as_tensor(state["ring_valid"]).to(**f64)
        if valid.shape != (w,):
            raise ValueError(f"NeuralCollapseScorer.ring_valid: expected shape ({w},), got "
                             f"{tuple(valid.shape)}")
        scalars = {k: torch.as_tensor(state[k]).to(**f64).reshape(())
                   for k in ("out_of_range", "nonfinite", "_nc4")}
        count = float(torch.as_tensor(state["ring_valid"]).sum())    # host copy: no device sync
        self.reset()
        self.ring_valid = valid
        self.out_of_range = scalars["out_of_range"]
        self.nonfinite = scalars["nonfinite"]
        self._ring.load(state)
        if count > 0:
            self._block = FrozenBlock({"S": s, "sums": sums, "counts": counts,
                                       "nc4": scalars["_nc4"]}, count, self._ring.pos, w)
            self._resize_block()
