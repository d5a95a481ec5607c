"""Low-quality samples of a stream by Q-Score, with a threshold calibrated once and then fixed.

Q-Score (Kalibhat, Narang, Firooz, Sanjabi & Feizi, arXiv 2203.01881, AAAI 2024) scores each
sample's representation ``z_i ∈ R^d`` from its within-sample feature z-scores
``ζ_ij = (z_ij − mean_j z_ij)/(std_j z_ij + ε₂)`` (ddof 0). Default form (docs/metrics.md §4
monitor definition; **the paper's exact form is UNVERIFIED**, see
:mod:`monitor.functional.qscore`)::

    q_i = max_j ζ_ij / (‖z_i‖₁ + ε₁)          ("linf_over_l1")

or the scale-robust companion ``q'_i = max_j ζ_ij · sqrt(d) · ‖z_i‖₂/‖z_i‖₁`` ("scale_free"),
or the ablations "max_z" / "l1". Low q predicts that a linear probe misclassifies the sample.
Use the layer a linear probe reads (non-negative, post-ReLU backbone output; pitfall 2).

Low-quality rate ``LQR = (1/n) Σ_i 1[q_i < τ_q]`` over the last ``window`` samples, where τ_q is
the ``calibration_quantile`` (default 0.10) of the window at the first compute that sees at
least ``min_calibration_samples`` samples (capped at ``window``; so LQR ≈ 0.10 at the reference), then fixed; or a
user-given threshold. Every per-sample value also goes into a cumulative fixed-bucket histogram
(Prometheus ``le`` buckets, sum and count since start). With labels and predictions (an eval
stream), pairs ``(q, wrong)`` go into a second ring and ``qscore_auprc`` is the average
precision of "low q → misclassified", the paper's number, next to the base rate
``qscore_misclassified_ratio`` (the AUPRC of a random ranking).

Signals (``compute()``): ``low_quality_samples_ratio``, ``qscore_threshold``, ``qscore_p10``,
``qscore_p50``, ``qscore_auprc``, ``qscore_misclassified_ratio``; all 0-d float64 device tensors,
NaN while undefined. Rows with a NaN/Inf get q = NaN: counted (state ``nonfinite``, in rows),
never scored (left out of the window quantiles, the ratio, the histogram and the AUPRC).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from monitor.functional.qscore import QSCORE_FORMS, QScoreForm, auprc, qscore
from monitor.functional.qscore_window import (
    QSCORE_WINDOW_SIGNALS,
    bucket_edges,
    histogram_counts,
    nan_quantile,
    window_qscore_signals,
)
from monitor.engine.window import RingCursor
from monitor.scorers.state import Scorer


def default_bucket_edges(device: torch.device | str = "cpu") -> Tensor:
    """The default ``le`` edges (:data:`monitor.functional.qscore_window.BUCKET_EDGES`) on
    ``device``, float64."""
    return bucket_edges(torch.zeros((), dtype=torch.float64, device=device))


class QScoreScorer(Scorer):
    """Q-Score ring window, fixed-after-calibration low-quality rate, histogram and AUPRC.

    ``update(rows, labels=None, predictions=None, row_index=None)`` scores a ``(b, d)`` batch on
    the device (no host sync). ``compute()`` returns the signals listed in the module docstring;
    ``histogram()`` the cumulative bucket counts; ``sample_scores()`` the last batch's
    ``(q, row_index)``. See :mod:`monitor.scorers.qscore` for the definitions.
    """

    signals: tuple[str, ...] = (*QSCORE_WINDOW_SIGNALS, "qscore_auprc",
                                "qscore_misclassified_ratio")

    def __init__(self, window: int = 8192, form: QScoreForm = "linf_over_l1",
                 threshold: float | None = None, calibration_quantile: float = 0.1,
                 min_calibration_samples: int = 256, bucket_edges: Tensor | None = None,
                 eval_window: int | None = None, eps1: float = 1e-8, eps2: float = 1e-8,
                 device: torch.device | str = "cpu") -> None:
        super().__init__(device)
        if form not in QSCORE_FORMS:
            raise ValueError(f"form must be one of {list(QSCORE_FORMS)}, got {form!r}")
        if window < 2:
            raise ValueError(f"window must be >= 2 samples, got {window}")
        if not 0.0 < calibration_quantile < 1.0:
            raise ValueError(f"calibration_quantile must be in (0, 1), got {calibration_quantile!r}")
        if min_calibration_samples < 1:
            raise ValueError(f"min_calibration_samples must be >= 1, got {min_calibration_samples}")
        if threshold is not None and not (isinstance(threshold, (int, float))
                                          and math.isfinite(threshold)):
            raise ValueError(f"threshold must be a finite number or None, got {threshold!r}")
        eval_window = window if eval_window is None else eval_window
        if eval_window < 2:
            raise ValueError(f"eval_window must be >= 2 samples, got {eval_window}")
        if bucket_edges is None:
            edges = default_bucket_edges(self.device)
        else:
            edges = torch.as_tensor(bucket_edges, dtype=torch.float64).to(self.device)
            # Constructor only (not the hot path): host checks of user input are fine here.
            if edges.dim() != 1 or edges.numel() < 1 or not bool(torch.isfinite(edges).all()) \
                    or not bool((edges[1:] > edges[:-1]).all()):
                raise ValueError("bucket_edges must be a non-empty, finite, strictly increasing "
                                 f"1-D sequence, got {edges.tolist()}")  # sync: constructor error
        self.form: QScoreForm = form
        self.window = window
        self.eval_window = eval_window
        self.user_threshold = threshold
        self.calibration_quantile = calibration_quantile
        self.min_calibration_samples = min(min_calibration_samples, window)  # a full ring suffices
        self.eps1 = eps1
        self.eps2 = eps2
        self.bucket_edges = edges
        f64 = {"dtype": torch.float64, "device": self.device}
        nan = math.nan
        self.add_state("ring_q", torch.full((window,), nan, **f64), reduce="none", fill=nan)
        self.add_state("eval_q", torch.full((eval_window,), nan, **f64), reduce="none", fill=nan)
        self.add_state("eval_wrong", torch.zeros(eval_window, **f64), reduce="none", fill=0.0)
        self.add_state("hist_counts", torch.zeros(edges.shape[0] + 1, **f64), reduce="sum", fill=0.0)
        self.add_state("hist_sum", torch.zeros((), **f64), reduce="sum", fill=0.0)
        self.add_state("hist_count", torch.zeros((), **f64), reduce="sum", fill=0.0)
        self.add_state("nonfinite", torch.zeros((), **f64), reduce="sum", fill=0.0)
        thr = nan if threshold is None else float(threshold)
        self.add_state("threshold_q", torch.full((), thr, **f64), reduce="none")
        self._init_host()

    def _init_host(self) -> None:
        self._ring = RingCursor(self.window)          # host ints from shapes: no sync
        self._eval_ring = RingCursor(self.eval_window)
        self.calibrated: bool = self.user_threshold is not None
        self._last_q = torch.empty(0, dtype=torch.float64, device=self.device)
        self._last_index = torch.empty(0, dtype=torch.long, device=self.device)

    def reset(self) -> None:
        super().reset()
        self._init_host()

    # ------------------------------------------------------------------ hot path

    def update(self, rows: Tensor, labels: Tensor | None = None,
               predictions: Tensor | None = None, row_index: Tensor | None = None) -> None:
        """Score a ``(b, d)`` batch; with ``labels`` (b,) and ``predictions`` ((b,) class ids or
        (b, C) logits) also record ``(q, wrong)`` pairs. ``row_index`` (b,) gives the rows'
        indices in the original batch (from the capture's subsampler). No host sync."""
        if rows.dim() != 2:
            raise ValueError(f"rows: expected a 2-D (b, d) tensor, got shape {tuple(rows.shape)}")
        b = rows.shape[0]
        if (labels is None) != (predictions is None):
            raise ValueError("labels and predictions must be given together, got "
                             f"labels={'None' if labels is None else tuple(labels.shape)}, "
                             f"predictions={'None' if predictions is None else tuple(predictions.shape)}")
        if labels is not None and predictions is not None:
            if labels.shape != (b,):
                raise ValueError(f"labels: expected shape ({b},), got {tuple(labels.shape)}")
            if predictions.shape != (b,) and not (predictions.dim() == 2
                                                   and predictions.shape[0] == b):
                raise ValueError(f"predictions: expected shape ({b},) or ({b}, C), "
                                 f"got {tuple(predictions.shape)}")
        if row_index is not None and row_index.shape != (b,):
            raise ValueError(f"row_index: expected shape ({b},), got {tuple(row_index.shape)}")
        x = rows.detach().to(self.device)
        q = qscore(x, self.form, self.eps1, self.eps2)                   # (b,) float64
        self._last_q = q
        self._last_index = (torch.arange(b, device=self.device) if row_index is None
                            else row_index.detach().to(self.device))
        if b == 0:
            return
        finite = torch.isfinite(q)                                       # (b,)
        self.hist_counts += histogram_counts(q, self.bucket_edges)
        self.hist_sum += torch.where(finite, q, torch.zeros_like(q)).sum()
        self.hist_count += finite.sum().to(torch.float64)
        self.nonfinite += (~finite).sum().to(torch.float64)
        self._write(self.ring_q, q, self._ring)

        if labels is not None and predictions is not None:
            pred = predictions.detach().to(self.device)
            if pred.dim() == 2:
                pred = pred.argmax(dim=1)                                # (b,)
            wrong = (pred != labels.detach().to(self.device)).to(torch.float64)  # (b,)
            self._write(self.eval_wrong, wrong, self._eval_ring, advance=False)
            self._write(self.eval_q, q, self._eval_ring)

    @staticmethod
    def _write(ring: Tensor, values: Tensor, cursor: RingCursor, advance: bool = True) -> None:
        """Write ``values`` into ``ring`` at ``cursor`` (wrapping), then move the cursor."""
        if values.shape[0] > cursor.size:
            values = values[-cursor.size:]
        b = values.shape[0]
        ring.index_copy_(0, cursor.slots(b, ring), values.to(ring.dtype))
        if advance:
            cursor.advance(b)

    # ------------------------------------------------------------------ publish

    def compute(self, calibrate: bool = True) -> dict[str, Tensor]:
        """Signals as 0-d float64 device tensors (no host sync; NaN where undefined).

        ``calibrate=False`` postpones the calibration (e.g. during a training warm-up, when
        the representation is not yet the healthy reference)."""
        ring = self.ring_q                                               # (window,)
        if calibrate and not self.calibrated and self._ring.filled >= self.min_calibration_samples:
            # Freeze τ_q: the calibration quantile of the window at this first chance.
            self.threshold_q = nan_quantile(ring, self.calibration_quantile)
            self.calibrated = True
        nan = torch.full((), math.nan, dtype=torch.float64, device=self.device)
        ev = torch.isfinite(self.eval_q)
        n_eval = ev.sum().to(torch.float64)
        wrong_rate = (self.eval_wrong * ev).sum() / n_eval.clamp_min(1.0)
        out = window_qscore_signals(ring, self.threshold_q)
        out["qscore_auprc"] = auprc(-self.eval_q, self.eval_wrong, ev.to(torch.float64))
        out["qscore_misclassified_ratio"] = torch.where(n_eval > 0, wrong_rate, nan)
        return out

    def histogram(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(edges (k,), cumulative counts (k+1,) with +Inf last, sum, count)`` since start,
        as device tensors (a Prometheus histogram is cumulative in both senses)."""
        return (self.bucket_edges, torch.cumsum(self.hist_counts, 0), self.hist_sum.clone(),
                self.hist_count.clone())

    def sample_scores(self) -> tuple[Tensor, Tensor]:
        """``(q, row_index)`` of the last batch (``(b,)`` each; empty before any update)."""
        return self._last_q, self._last_index

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self, compact: bool = False) -> dict[str, Tensor]:
        """Every state and the ring cursors. ``compact=True`` keeps the window's scores (``8 ·
        window`` bytes: window quantiles have no sufficient statistics, and a score is 8 bytes
        where a row is ``4d``) and leaves out the evaluation rings when no evaluation batch came
        (else keeps them, the misclassified flags as bool): the Q-Score window stays exact."""
        state = super().state_dict()
        if compact:
            state["_compact"] = torch.tensor(True)
            if self._eval_ring.filled == 0:
                del state["eval_q"], state["eval_wrong"]
            else:
                state["eval_wrong"] = state["eval_wrong"] > 0
        state["_pos"] = torch.tensor(self._ring.pos)
        state["_filled"] = torch.tensor(self._ring.filled)
        state["_eval_pos"] = torch.tensor(self._eval_ring.pos)
        state["_eval_filled"] = torch.tensor(self._eval_ring.filled)
        state["_calibrated"] = torch.tensor(self.calibrated)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load a full or a compact :meth:`state_dict`."""
        if "_compact" in state:
            state = {**state, "eval_q": state.get("eval_q", self.default("eval_q")),
                     "eval_wrong": torch.as_tensor(state.get("eval_wrong",
                                                             self.default("eval_wrong")))}
        super().load_state_dict(state)
        self._ring.load(state)
        self._eval_ring.load({"_pos": state.get("_eval_pos", 0),
                              "_filled": state.get("_eval_filled", 0)})
        self.calibrated = bool(state.get("_calibrated", torch.tensor(self.user_threshold
                                                                      is not None)))
