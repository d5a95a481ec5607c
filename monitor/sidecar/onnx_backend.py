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

**Large d: the sketched path** (APPROXIMATE, as in process: :mod:`monitor.scorers.sketch`,
docs/performance.md "Large d"). Each new stream takes its window state by the in-process rule
(:func:`monitor.functional.sketch.sketch_dim_for`) from ``monitor_options`` with
``MonitorConfig``'s keys and defaults: ``spectral_path`` (``"auto"``, ``"exact"``, ``"sketch"``,
or a mapping of stream names to one of them with ``"*"`` the default), ``sketch_above`` (4096),
``sketch_dim`` (k, 2048), ``memory_limit_bytes`` (None) and ``seed`` (0). A sketched stream of
dimension d keeps the exact window of its projected rows ``y = zΩ`` (k dims: ``S`` is k×k, the
ring ``window × k``); ``Ω`` (d, k) float32, iid N(0, 1/k), is drawn once per (d, k, seed) with
numpy's generator (:func:`~monitor.functional.sketch.gaussian_projection`; other values than the
torch generator in process, the same distribution) and shared by every stream of that d. Per
batch, on the host (:func:`sketch_rows`, in chunks of rows): the non-finite values, the
negatives per row and the per-row Q-Score of the ORIGINAL rows
(:func:`monitor.functional.qscore_window.qscore_rows`, the kernel's form), and ``y`` of the rows
with non-finite rows zeroed; a row that is non-finite, or whose float32 projection overflows,
goes to the kernel as a NaN row, so the kernel makes it invalid as any non-finite row (zeroed in
the ring, out of every sum). The kernel then runs on ``y`` as on any stream; the Q-Score ring
and histogram take the original rows' scores, ``negative_values_ratio`` the original rows'
negatives over valid rows × d. At publish: the spectral signals of the sketched window with
``participation_ratio`` the bias-corrected
:func:`~monitor.functional.sketch.sketched_participation_ratio`, ``embedding_dim`` d and
``spectral_sketch_dim`` k (0 on the exact path, as in process), the collapse signals with the
true d. A publish is one k×k ``eigvalsh``, a batch ``2bdk + 2(b+b')k²`` FLOP.

Neural collapse on a sketched stream reads the **sketched rows** (k dims: its window is aligned
with the row ring as above), not the original rows the in-process scorer reads (which needs a
d×d statistic at publish, the cost the sketch avoids). Exact: the classes, the window's rows, the
out-of-range and non-finite counts. NC2 (norms and angles of class means) is preserved up to
O(1/√k). NC1 is NOT comparable with the original rows': the projection spreads the within-class
scatter over the class-mean directions and NC1 reads about 1–2 × d/k times the original value
(measured on Gaussian classes, isotropic or low-rank within-class noise); its trend is kept,
but ``nc1_depth_threshold`` and ``neural_collapse_effective_depth`` compare a sketched stream's
inflated NC1.

Memory: :meth:`OnnxBackend.stream_bytes` estimates what a new stream will hold (for admission),
:meth:`OnnxBackend.batch_bytes` the transient of scoring one batch.

Not in this backend (use ``--backend torch``): NC3/NC4, activation layers, generator pairs and
AUPRC.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections.abc import Mapping

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
    qscore_rows,
    window_qscore_signals,
)
from monitor.engine.run import BatchClock, RunPublisher, StepJump, publish_due
from monitor.engine.tracking import RunTracker
from monitor.engine.window import RingCursor
from monitor.functional.sketch import (
    exact_state_bytes,
    gaussian_projection,
    sketch_dim_for,
    sketch_state_bytes,
    sketched_participation_ratio,
)
from monitor.functional.spectral import window_collapse_signals, window_spectral_signals
from monitor.sidecar.kernels import OnnxBatchKernel
from monitor.sidecar.config import SidecarConfig
from monitor.snapshot import Histogram, Readings, Snapshot
from monitor.validation import check_int

_EDGES = np.asarray(BUCKET_EDGES)
PATH_MODES: tuple[str, ...] = ("auto", "exact", "sketch")
"""``monitor_options["spectral_path"]`` values (as ``MonitorConfig.spectral_path``)."""
_HOST_CHUNK = 1 << 19
"""Elements of original rows a sketched stream's host step handles at once (its float64
temporaries stay a few MiB whatever the batch)."""

# Memory model of :meth:`OnnxBackend.stream_bytes` / :meth:`OnnxBackend.batch_bytes`, fitted to
# the peak RSS on the CPU execution provider (tests/sidecar/test_onnx_sketch.py; numbers in its
# docstring). ``width``: d for an exact stream, k for a sketched one.
_PUBLISH_SQUARES = 5
"""Width×width float64 matrices a stream's work adds at its peak: the batch's ``ΔS`` (kept by
ONNX Runtime's CPU arena after the call) and a publish's copies (``eigvalsh`` input and its
LAPACK copy, the participation ratio's centred scatter, its symmetrisation and square)."""
_OVERHEAD = 16 << 20
"""Bytes beside those of any size (allocator and arena granularity)."""
_BATCH_BYTES_PER_VALUE = 96
"""Kernel bytes per value of the ``(b + b') × width`` rows it processes (float64 casts,
products, normalised rows and the per-row Q-Score, as held by the arena after two batches)."""


def sketch_rows(rows: np.ndarray, omega: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, float, np.ndarray, np.ndarray]:
    """A sketched stream's host step on a ``(b, d)`` float32 batch of original rows:
    ``(y (b, k) float32, valid (b,) bool, non-finite values, negatives per row (b,), Q-Score per
    row (b,))``.

    ``y = x Ω`` of the rows with non-finite rows zeroed (as the in-process
    ``SketchedMoments``); a row is valid when it is finite and so is its projection (a float32
    overflow of ``x Ω`` makes it invalid here, not an Inf in the sums). Invalid rows of ``y`` are
    set to NaN, so the kernel treats them as it treats any non-finite row (zeroed in the ring,
    validity 0, out of every sum). Non-finite values, negatives and the Q-Score are those of the
    original rows (Q-Score: :func:`~monitor.functional.qscore_window.qscore_rows`, the paper
    form, as the kernel's); done in chunks of rows so the float64 temporaries stay small.
    """
    b, d = rows.shape
    y = np.empty((b, omega.shape[1]), np.float32)
    valid = np.empty(b, bool)
    neg = np.empty(b)
    q = np.empty(b)
    nonfinite = 0
    step = max(1, _HOST_CHUNK // d)
    for lo in range(0, b, step):
        x = rows[lo:lo + step]                                           # (c, d)
        finite_vals = np.isfinite(x)
        finite = finite_vals.all(axis=1)                                 # (c,)
        nonfinite += x.size - int(np.count_nonzero(finite_vals))
        del finite_vals
        q[lo:lo + step] = qscore_rows(x)                                 # NaN for non-finite
        if not finite.all():
            x = np.where(finite[:, None], x, np.float32(0.0))
        neg[lo:lo + step] = np.count_nonzero(x < 0, axis=1)
        with np.errstate(over="ignore", invalid="ignore"):             # overflow: invalid
            np.matmul(x, omega, out=y[lo:lo + step])                    # (c, k)
        valid[lo:lo + step] = finite
    valid &= np.isfinite(y).all(axis=1)
    y[~valid] = np.nan
    return y, valid, float(nonfinite), neg, q


class LabelWindow:
    """A labelled stream's neural-collapse window: the last ``window`` labelled rows, their
    labels and validity (out-of-range or non-finite: 0), as ``NeuralCollapseScorer`` keeps them.

    ``rows is None``: the rows are the stream's row ring and ``labels``/``valid`` are aligned
    with it (every batch since the first labelled one was labelled); slots holding rows from
    before that have ``valid = 0``. :meth:`detach` copies the row ring when an unlabelled batch
    is about to overwrite it; from then on the window has its own ring, written at ``pos``
    (``window × width`` float32 more: d, what the torch scorer always holds, or k on a sketched
    stream).
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
    """One stream's window state on the host, updated by the ONNX kernel.

    ``omega`` (d, k) float32: a sketched stream (module docstring): the window (``ring``,
    ``s``, ...) holds the projected rows, ``width`` = k; else exact, ``width`` = ``dim`` = d.
    """

    def __init__(self, dim: int, window: int, kernel: OnnxBatchKernel,
                 calibration_quantile: float = 0.1, min_calibration_samples: int = 256,
                 rebuild_every_wraps: int = 64, max_classes: int = 1000,
                 omega: np.ndarray | None = None) -> None:
        self.dim = dim
        self.window = window
        self.kernel = kernel
        if omega is not None and (omega.ndim != 2 or omega.shape[0] != dim
                                  or not 2 <= omega.shape[1] < dim):
            raise ValueError(f"omega: expected shape ({dim}, k) with 2 <= k < {dim}, got "
                             f"{omega.shape}")
        self.omega = omega
        self.sketch_dim = 0 if omega is None else int(omega.shape[1])
        width = self.sketch_dim or dim
        self.width = width
        self.ring = np.zeros((window, width), np.float32)
        self.ring_valid = np.zeros(window, np.float64)
        # negative entries per row beside the ring (of the ORIGINAL rows when sketched: the
        # ring holds projected ones); a publish then reads no (window, d) copy of the ring
        self.ring_neg = np.zeros(window, np.float64)
        self.s = np.zeros((width, width))
        self.zsum = np.zeros(width)
        self.nsum = np.zeros(width)
        self.nsq = np.zeros(width)
        # With I/O binding the sums live on the kernel's device (self.s ... then unused).
        self.device_sums = kernel.zeros(width) if kernel.io_binding else None
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
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"expected rows of shape (b, {self.dim}), got {rows.shape}")
        host = None
        if self.omega is not None:     # the kernel gets the projected rows (NaN: invalid)
            host = sketch_rows(rows, self.omega)
            rows = host[0]
        idx = self.cursor.slots(b, self.ring)
        old = self.ring[idx]
        old_valid = self.ring_valid[idx].sum()
        if self.device_sums is not None:
            r, self.device_sums = self.kernel.step(rows, old, self.device_sums)
        else:
            r = self.kernel(rows, old)
        q, nonfinite = r.q, r.nonfinite
        if host is not None:           # counts and Q-Score of the original rows
            _, _, nonfinite, neg, q = host
        else:
            neg = np.count_nonzero(r.rows < 0, axis=1)
        self.ring_neg[idx] = neg
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
        self.nonfinite += nonfinite
        self.q_ring[idx] = q
        if labels is not None:
            assert self.nc is not None
            self.nc.update(idx, r.rows, r.valid > 0, labels.astype(np.int64, copy=False))
        finite_q = q[np.isfinite(q)]
        self.hist += histogram_counts(q, _EDGES)
        self.hist_sum += float(finite_q.sum())
        self.hist_count += float(finite_q.shape[0])
        if self.cursor.advance(b):
            self.rebuild()

    def rebuild(self) -> None:
        """Recompute the sums exactly from the ring (the kernel on the whole ring)."""
        empty = np.zeros((0, self.width), np.float32)
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
        if self.omega is not None:     # as the in-process SketchedSpectrumScorer
            values["participation_ratio"] = sketched_participation_ratio(s, zsum, self.n, True,
                                                                         self.dim)
            values["embedding_dim"] = float(self.dim)
        values["spectral_sketch_dim"] = float(self.sketch_dim)
        values.update(window_collapse_signals(s, zsum, nsum, nsq, self.n, self.dim))
        if calibrate and not self.calibrated and self.cursor.filled >= self.min_calibration_samples:
            self.threshold = float(nan_quantile(self.q_ring, self.calibration_quantile))
            self.calibrated = True
        values.update(window_qscore_signals(self.q_ring, self.threshold))
        out = {key: float(v) for key, v in values.items()}
        valid = self.ring_valid > 0
        total = float(valid.sum()) * self.dim
        negatives = float(self.ring_neg[valid].sum())
        out["negative_values_ratio"] = negatives / total if total > 0 else math.nan
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
        self.clock = BatchClock(config.max_step_jump)
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
        # The window-state rule of MonitorConfig (spectral_path, sketch_above, sketch_dim,
        # memory_limit_bytes, seed; same defaults) and monitor.engine.Engine.from_config.
        paths = options.get("spectral_path", "auto")
        paths = dict(paths) if isinstance(paths, Mapping) else {"*": paths}
        for name, mode in paths.items():
            if not isinstance(name, str) or mode not in PATH_MODES:
                raise ValueError(f"spectral_path must be one of {PATH_MODES} or a mapping of "
                                 f"stream names ('*': the default) to one, got {name!r}: "
                                 f"{mode!r}")
        self.spectral_path: str = paths.pop("*", "auto")
        self.spectral_streams: dict[str, str] = paths
        self.sketch_above = check_int("sketch_above", options.get("sketch_above", 4096), 1)
        self.sketch_dim = check_int("sketch_dim", options.get("sketch_dim", 2048), 2)
        self.seed = check_int("seed", options.get("seed", 0), 0)
        limit = options.get("memory_limit_bytes")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit < 1):
            raise ValueError(f"memory_limit_bytes must be a positive int or None, got {limit!r}")
        self.memory_limit_bytes: int | None = limit
        # Ω per (d, k, seed), shared by the streams of one d; freed with its last stream.
        self._omegas: weakref.WeakValueDictionary[tuple[int, int, int], np.ndarray] = (
            weakref.WeakValueDictionary())
        self._runs: dict[str, _OnnxRun] = {}
        self._lock = threading.Lock()

    def sketch_dim_for(self, dim: int, stream: str | None = None) -> int:
        """k of a new stream of dimension ``dim`` (0: the exact path), by the in-process rule
        (:func:`monitor.functional.sketch.sketch_dim_for`); ``stream``: its name, for a
        per-stream ``spectral_path``."""
        mode = self.spectral_streams.get(stream, self.spectral_path) if stream else \
            self.spectral_path
        return sketch_dim_for(mode, dim, self.config.window, self.sketch_above, self.sketch_dim,
                              self.memory_limit_bytes)

    def omega(self, dim: int, sketch_dim: int) -> np.ndarray:
        """``Ω`` (dim, sketch_dim) float32 of this backend's seed, drawn once and shared by
        every stream of that dimension (:func:`monitor.functional.sketch.gaussian_projection`,
        numpy's generator: the same distribution as in-process, other values)."""
        key = (dim, sketch_dim, self.seed)
        with self._lock:
            omega = self._omegas.get(key)
        if omega is None:
            omega = gaussian_projection(dim, sketch_dim, self.seed, np.float32, xp=np)
            omega.setflags(write=False)
            with self._lock:
                omega = self._omegas.setdefault(key, omega)
        return omega

    def stream_bytes(self, dim: int, stream: str | None = None) -> int:
        """Estimated peak resident bytes a NEW stream of dimension ``dim`` adds to this backend,
        for memory admission (``stream``: its name, for a per-stream ``spectral_path``).

        Its window state, exact (:func:`~monitor.functional.sketch.exact_state_bytes`) or
        sketched by the rule (:func:`~monitor.functional.sketch.sketch_state_bytes`, without
        ``Ω`` when a stream of that d already shares one here), the Q-Score ring and per-row
        negatives, plus the transients of its work on a small batch: the kernel's width×width
        float64 ``ΔS`` and a publish's copies (:data:`_PUBLISH_SQUARES`), and
        :data:`_OVERHEAD`. Checked against the peak RSS of a process that fills a window and
        publishes (tests/sidecar/test_onnx_sketch.py, d 1024–8192): the measured peak was 71–96 %
        of ``stream_bytes + batch_bytes`` (an unfilled ring is not resident yet: less).

        Not counted: the rows of a batch (:meth:`batch_bytes`: proportional to its size, and
        one batch is scored at a time) and a labelled stream's neural-collapse publish (a
        float64 copy of its rows and class statistics of width×width) and own ring (``window ×
        width`` float32, once unlabelled batches follow labelled ones).
        """
        dim = check_int("dim", dim, 2)
        window = self.config.window
        k = self.sketch_dim_for(dim, stream)
        if k == 0:
            state = exact_state_bytes(dim, window)
        else:
            state = sketch_state_bytes(dim, window, k)
            with self._lock:
                if (dim, k, self.seed) in self._omegas:
                    state -= 4 * dim * k              # Ω already held by this backend
        width = k or dim
        state += 2 * 8 * window                    # the Q-Score ring, negatives per row
        return int(state + _PUBLISH_SQUARES * 8 * width * width + _OVERHEAD)

    def batch_bytes(self, rows: int, dim: int, stream: str | None = None) -> int:
        """Estimated transient bytes of scoring one batch of ``rows × dim`` values (beyond
        :meth:`stream_bytes`, and beyond the request's own float32 rows): the kernel's
        temporaries for the new and the leaving rows at the stream's width (ONNX Runtime's CPU
        arena keeps them after the call; it is shared by all streams, so it is the largest
        batch's, not a sum) and, for a sketched stream, the projected rows and the host step's
        chunk."""
        rows = min(check_int("rows", rows, 0), self.config.window)
        k = self.sketch_dim_for(check_int("dim", dim, 2), stream)
        width = k or dim
        out = _BATCH_BYTES_PER_VALUE * 2 * rows * width
        if k:
            out += 4 * rows * k + 6 * 8 * min(rows * dim, max(_HOST_CHUNK, dim))
        return int(out)

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
        latest = r.publisher.latest
        try:
            target = r.clock.target(stream, step, r.step, None if latest is None else latest.step)
        except StepJump as exc:
            r.errors.record("step", exc)
            target = r.step
        if target > r.step:
            self._advance(r, target - r.step)
        elif target < r.step:
            r.publisher.rewind(target, r.step)
            r.step = target
        s = r.streams.get(stream)
        if s is None:
            dim = rows.shape[1]
            k = self.sketch_dim_for(dim, stream)
            s = NumpyStream(dim, self.config.window, self.kernel, max_classes=self.max_classes,
                            omega=self.omega(dim, k) if k else None)
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
