"""The sidecar's ONNX Runtime backend: the same windows, signals, alerts and Snapshot as the
in-process monitor, with no torch in the process.

Per stream, a sliding window of the last ``window`` rows: a float32 ring on the host and the
float64 sums ``S``, ``Σz``, ``Σẑ``, ``Σẑ²``, ``n`` updated by the ONNX kernel
(:mod:`monitor.sidecar.kernels`: the torch scorers' per-batch code, exported), rebuilt exactly
from the ring every 64 wraps. Q-Score: a ring of per-row scores from the same kernel, a
threshold calibrated once after the warm-up (10th percentile), a cumulative ``le`` histogram
with the in-process buckets. At publish the same functions as the in-process scorers
(:mod:`monitor.functional`, written once for numpy and torch) compute the spectral, collapse,
Q-Score and neural-collapse signals; :class:`monitor.engine.tracking.RunTracker` the run-relative
ones; :class:`monitor.alerts.AlertEngine` the alerts.

Labels (neural collapse): a stream's first labelled batch starts its NC window, the last
``window`` labelled rows as in the torch ``NeuralCollapseScorer`` (:class:`LabelWindow`): rows
with a label outside ``[0, max_classes)`` (``monitor_options["max_classes"]``, default 1000) are
counted in ``labels_out_of_range``, non-finite rows in ``nonfinite_rows``, and both excluded. While
every batch of the stream is labelled, the window is a label ring aligned with the row ring (no
copy of the rows); an unlabelled batch after labelled ones gives it its own ring (then it keeps,
as the torch scorer, the last labelled rows). At publish
:func:`monitor.functional.neural_collapse.window_neural_collapse_signals` computes NC1, the NC2
measures, the classes and rows of the window from float64 statistics rebuilt from the ring, and
the run signal
``neural_collapse_effective_depth`` (``monitor_options["nc1_depth_threshold"]``, default 0.1).
NC3 and NC4 need the classifier's weights, which the sidecar does not receive: not exported.

Not in this backend (use ``--backend torch``): NC3/NC4, activation layers, generator pairs and
AUPRC.
"""

from __future__ import annotations

import math
import threading
import time

import numpy as np

from monitor.errors import ErrorLog
from monitor.functional.neural_collapse import (
    class_statistics_unchecked,
    window_neural_collapse_signals,
)
from monitor.functional.qscore_window import (
    BUCKET_EDGES,
    histogram_counts,
    nan_quantile,
    window_qscore_signals,
)
from monitor.engine.run import BatchClock, RunPublisher, publish_due
from monitor.engine.tracking import RunTracker
from monitor.engine.window import RingCursor
from monitor.functional.spectral import window_collapse_signals, window_spectral_signals
from monitor.sidecar.kernels import OnnxBatchKernel
from monitor.sidecar.config import SidecarConfig
from monitor.snapshot import Histogram, Readings, Snapshot
from monitor.validation import check_int

_EDGES = np.asarray(BUCKET_EDGES)


class LabelWindow:
    """A labelled stream's neural-collapse window: the last ``window`` labelled rows, their
    labels and validity (out-of-range or non-finite: 0), as ``NeuralCollapseScorer`` keeps them.

    ``rows is None``: the rows are the stream's row ring and ``labels``/``valid`` are aligned
    with it (every batch since the first labelled one was labelled); slots holding rows from
    before that have ``valid = 0``. :meth:`detach` copies the row ring when an unlabelled batch
    is about to overwrite it; from then on the window has its own ring, written at ``pos``
    (``window × d`` float32 more, what the torch scorer always holds).
    """

    def __init__(self, window: int, max_classes: int) -> None:
        self.window = window
        self.max_classes = max_classes
        self.labels = np.zeros(window, np.int64)
        self.valid = np.zeros(window, np.float64)
        self.rows: np.ndarray | None = None
        self.cursor = RingCursor(window)      # the own ring's (after detach)
        self.out_of_range = 0.0
        self.nonfinite = 0.0

    def detach(self, ring: np.ndarray, ring_pos: int) -> None:
        """Own a copy of the row ring; the next write goes where the row ring's would (its
        oldest rows), so labelled rows leave in the torch scorer's order."""
        self.rows = ring.copy()
        self.cursor.pos = ring_pos

    def update(self, idx: np.ndarray, rows: np.ndarray, finite: np.ndarray,
               labels: np.ndarray) -> None:
        """Record a batch: ``rows`` (b, d) the kernel's clean rows, ``finite`` (b,) their
        validity, ``labels`` (b,); ``idx`` (b,) their slots in the row ring."""
        in_range = (labels >= 0) & (labels < self.max_classes)             # (b,)
        self.out_of_range += float((~in_range).sum())
        self.nonfinite += float((in_range & ~finite).sum())
        valid = in_range & finite                                          # (b,)
        slots = idx
        if self.rows is not None:                      # own ring: its own next slots
            slots = self.cursor.slots(rows.shape[0], self.rows)
            self.rows[slots] = np.where(valid[:, None], rows, 0.0)
            self.cursor.advance(rows.shape[0])
        self.labels[slots] = np.where(valid, labels, 0)
        self.valid[slots] = valid

    def compute(self, ring: np.ndarray) -> dict[str, float]:
        """The window's NC signals (``ring``: the stream's row ring, used while aligned)."""
        keep = self.valid > 0
        x = (ring if self.rows is None else self.rows)[keep].astype(np.float64)  # (n, d)
        s, sums, counts = class_statistics_unchecked(x, self.labels[keep], self.max_classes,
                                                     None)
        out = {k: float(v) for k, v in window_neural_collapse_signals(s, sums, counts).items()}
        out["labels_out_of_range"] = self.out_of_range
        out["nonfinite_rows"] = self.nonfinite
        return out


class NumpyStream:
    """One stream's window state on the host, updated by the ONNX kernel."""

    def __init__(self, dim: int, window: int, kernel: OnnxBatchKernel,
                 calibration_quantile: float = 0.1, min_calibration_samples: int = 256,
                 rebuild_every_wraps: int = 64, max_classes: int = 1000) -> None:
        self.dim = dim
        self.window = window
        self.kernel = kernel
        self.ring = np.zeros((window, dim), np.float32)
        self.ring_valid = np.zeros(window, np.float64)
        self.s = np.zeros((dim, dim))
        self.zsum = np.zeros(dim)
        self.nsum = np.zeros(dim)
        self.nsq = np.zeros(dim)
        # With I/O binding the sums live on the kernel's device (self.s ... then unused).
        self.device_sums = kernel.zeros(dim) if kernel.io_binding else None
        self.n = 0.0
        self.seen = 0.0
        self.nonfinite = 0.0
        self.cursor = RingCursor(window, rebuild_every_wraps)   # rows and Q-Score share it
        self.q_ring = np.full(window, math.nan)
        self.hist = np.zeros(_EDGES.shape[0] + 1)
        self.hist_sum = 0.0
        self.hist_count = 0.0
        self.threshold = math.nan
        self.calibrated = False
        self.calibration_quantile = calibration_quantile
        self.min_calibration_samples = min(min_calibration_samples, window)
        self.max_classes = max_classes
        self.nc: LabelWindow | None = None      # from the first labelled batch on

    def update(self, rows: np.ndarray, labels: np.ndarray | None = None) -> None:
        """Add a ``(b, d)`` float32 batch, with ``(b,)`` integer labels or None."""
        if labels is not None:
            if labels.ndim != 1 or labels.shape[0] != rows.shape[0]:
                raise ValueError(f"expected labels of shape ({rows.shape[0]},), got "
                                 f"{labels.shape}")
            if not np.issubdtype(labels.dtype, np.integer):
                raise TypeError(f"expected integer labels, got {labels.dtype}")
        if rows.shape[0] > self.window:
            rows = rows[-self.window:]
            labels = labels[-self.window:] if labels is not None else None
        b = rows.shape[0]
        if b == 0:
            return
        idx = self.cursor.slots(b, self.ring)
        old = self.ring[idx]
        old_valid = self.ring_valid[idx].sum()
        if self.device_sums is not None:
            r, self.device_sums = self.kernel.step(rows, old, self.device_sums)
        else:
            r = self.kernel(rows, old)
        if labels is not None and self.nc is None:
            self.nc = LabelWindow(self.window, self.max_classes)
        if labels is None and self.nc is not None and self.nc.rows is None:
            self.nc.detach(self.ring, self.cursor.pos)   # before the ring loses labelled rows
        self.ring[idx] = r.rows
        self.ring_valid[idx] = r.valid
        if self.device_sums is None:
            self.s += r.ds
            self.zsum += r.dz
            self.nsum += r.dn
            self.nsq += r.dnsq
        valid = float(r.valid.sum())
        self.n += valid - old_valid
        self.seen += valid
        self.nonfinite += r.nonfinite
        self.q_ring[idx] = r.q
        if labels is not None:
            assert self.nc is not None
            self.nc.update(idx, r.rows, r.valid > 0, labels.astype(np.int64, copy=False))
        finite_q = r.q[np.isfinite(r.q)]
        self.hist += histogram_counts(r.q, _EDGES)
        self.hist_sum += float(finite_q.sum())
        self.hist_count += float(finite_q.shape[0])
        if self.cursor.advance(b):
            self.rebuild()

    def rebuild(self) -> None:
        """Recompute the sums exactly from the ring (the kernel on the whole ring)."""
        empty = np.zeros((0, self.dim), np.float32)
        if self.device_sums is not None:
            _, self.device_sums = self.kernel.step(self.ring, empty, None)
        else:
            r = self.kernel(self.ring, empty)
            self.s, self.zsum, self.nsum, self.nsq = r.ds, r.dz, r.dn, r.dnsq
        self.n = float(self.ring_valid.sum())

    def sums(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``S, Σz, Σẑ, Σẑ²`` on the host (from the device with I/O binding: one copy each)."""
        if self.device_sums is not None:
            s, z, n, nsq = self.device_sums.numpy()
            return s, z, n, nsq
        return self.s, self.zsum, self.nsum, self.nsq

    def compute(self, calibrate: bool) -> tuple[dict[str, float], list[float], Histogram]:
        """The stream's signals, spectrum and Q-Score histogram."""
        s, zsum, nsum, nsq = self.sums()
        values = window_spectral_signals(s, zsum, self.n)
        spectrum = values.pop("spectrum")
        values.update(window_collapse_signals(s, zsum, nsum, nsq, self.n))
        if calibrate and not self.calibrated and self.cursor.filled >= self.min_calibration_samples:
            self.threshold = float(nan_quantile(self.q_ring, self.calibration_quantile))
            self.calibrated = True
        values.update(window_qscore_signals(self.q_ring, self.threshold))
        out = {key: float(v) for key, v in values.items()}
        valid = self.ring_valid > 0
        total = float(valid.sum()) * self.dim
        out["negative_values_ratio"] = (float((self.ring[valid] < 0).sum()) / total
                                        if total > 0 else math.nan)
        if self.nc is not None:
            out.update(self.nc.compute(self.ring))
        hist = Histogram(bounds=[*BUCKET_EDGES, math.inf],
                         cumulative=np.cumsum(self.hist).tolist(), sum=self.hist_sum,
                         count=self.hist_count)
        return out, spectrum.tolist(), hist


class _OnnxRun:
    def __init__(self, run: str, backend: OnnxBackend) -> None:
        config = backend.config
        self.run = run
        self.streams: dict[str, NumpyStream] = {}
        self.step = 0
        self.clock = BatchClock()
        self.warmup = int(config.monitor_options.get("peak_warmup", 100))
        self.errors = ErrorLog()
        self.publisher = RunPublisher(run, config.rules, RunTracker(config.window, self.warmup),
                                      self.errors, config.history, backend.nc1_depth_threshold)


class OnnxBackend:
    """Sidecar scoring on ONNX Runtime (CUDA execution provider when available)."""

    def __init__(self, config: SidecarConfig) -> None:
        self.config = config
        # One intra-op thread: a sidecar shares its pod's cores with the training job, and the
        # HTTP side needs a core (on 2 cores this gave 43k vs 26k ingested rows/s).
        self.kernel = OnnxBatchKernel(device="cpu" if config.device == "cpu" else "auto",
                                      threads=config.threads,
                                      io_binding=getattr(config, "io_binding", None))
        self.device = "onnxruntime:" + ",".join(self.kernel.providers)
        options = config.monitor_options
        self.max_classes = check_int("max_classes", options.get("max_classes", 1000), 2)
        self.nc1_depth_threshold = float(options.get("nc1_depth_threshold", 0.1))
        self._runs: dict[str, _OnnxRun] = {}
        self._lock = threading.Lock()

    @property
    def providers(self) -> list[str]:
        """ONNX Runtime execution providers in use."""
        return self.kernel.providers

    def ingest(self, run: str, stream: str, rows: np.ndarray, labels: np.ndarray | None,
               step: int | None) -> None:
        """Score ``rows`` of ``stream``; advance and publish the run like the torch backend."""
        r = self._runs.get(run)
        if r is None:
            r = _OnnxRun(run, self)
            with self._lock:
                self._runs[run] = r
        steps = r.clock.advance(stream, step, r.step)
        if steps:
            self._advance(r, steps)
        s = r.streams.get(stream)
        if s is None:
            s = NumpyStream(rows.shape[1], self.config.window, self.kernel,
                            max_classes=self.max_classes)
            r.streams[stream] = s
        if rows.shape[1] != s.dim:
            raise ValueError(f"stream {stream!r} has dimension {s.dim}; got rows of dimension "
                             f"{rows.shape[1]}")
        s.update(np.ascontiguousarray(rows, dtype=np.float32), labels)
        r.clock.scored(stream)

    def _advance(self, r: _OnnxRun, steps: int) -> None:
        before = r.step
        r.step += steps
        if publish_due(before, r.step, self.config.every):
            self.publish(r)

    def publish(self, r: _OnnxRun) -> Snapshot:
        """Compute every stream of run ``r`` and publish it (alerts, snapshot, history)."""
        t0 = time.perf_counter()
        readings = Readings(histograms={"qscore": {}})
        for name, s in r.streams.items():
            try:
                values, spectrum, hist = s.compute(calibrate=r.step >= r.warmup)
            except Exception as exc:
                r.errors.record("scorer", exc, key=f"scorer[{name}]")
                continue
            readings.streams[name] = values
            readings.counters[name] = {"samples": s.seen, "nonfinite_values": s.nonfinite}
            readings.spectra[name] = spectrum
            readings.histograms["qscore"][name] = hist
        snap, _, _ = r.publisher.publish(readings, r.step, t0)
        return snap

    def snapshots(self) -> list[Snapshot]:
        with self._lock:
            runs = sorted(self._runs.items())
        return [r.publisher.latest for _, r in runs if r.publisher.latest is not None]

    def history(self, run: str) -> list[Snapshot] | None:
        with self._lock:
            r = self._runs.get(run)
        return None if r is None else list(r.publisher.history)

    def close(self) -> None:
        with self._lock:
            self._runs.clear()
