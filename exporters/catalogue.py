"""Every metric repwatch exports: name, type, unit, help and labels — the one source of truth.

Names follow Prometheus conventions: ``repwatch_`` prefix, base units, ratios in 0–1, ``_total``
only on counters, bounded labels (``run``, ``stream``, ``component``, ``alertname``,
``severity``; never a step or a sample id). A per-rank publish (``Monitor(per_rank=True)``
under torch.distributed) adds a ``rank`` label to every sample. ``signal`` is the key of the value in a
:class:`monitor.snapshot.Snapshot`; ``source`` says where in the snapshot it lives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PREFIX = "repwatch_"

Source = Literal["stream", "layer", "param", "run_signal", "counter", "run", "errors", "alerts",
                 "histogram", "dropped", "sidecar"]
"""Where in a Snapshot a metric's values live (``stream``/``layer``/``param``: keyed groups)."""

KEYED_SOURCES: tuple[str, ...] = ("stream", "layer", "param")


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric."""

    name: str
    kind: Literal["gauge", "counter", "histogram"]
    help: str
    signal: str
    source: Source
    labels: tuple[str, ...] = ("run", "stream")
    unit: str = ""
    paper: str = ""

    def __post_init__(self) -> None:
        if not self.name.startswith(PREFIX):
            raise ValueError(f"metric names start with {PREFIX!r}: {self.name!r}")
        if self.kind not in ("gauge", "counter", "histogram"):
            raise ValueError(f"kind must be gauge, counter or histogram, got {self.kind!r}")
        if self.kind == "counter" and not self.name.endswith("_total"):
            raise ValueError(f"counter {self.name!r} must end in _total")
        if self.kind != "counter" and self.name.endswith("_total"):
            raise ValueError(f"only counters end in _total: {self.name!r}")


def _g(name: str, signal: str, help: str, *, unit: str = "", paper: str = "",
       source: Source = "stream", variants: tuple[str, ...] = ()) -> MetricSpec:
    """A gauge; keyed sources get their key label (``stream``, ``layer``, ``param``), then
    ``variants`` (labels carried in the signal key, e.g. ``tau``)."""
    key = (source,) if source in KEYED_SOURCES else ()
    return MetricSpec(PREFIX + name, "gauge", help, signal, source, ("run", *key, *variants),
                      unit, paper)


def _layer(name: str, help: str, paper: str = "", **kw: object) -> MetricSpec:
    return _g(name, name, help, source="layer", paper=paper, **kw)  # type: ignore[arg-type]


def _param(name: str, help: str, paper: str = "") -> MetricSpec:
    return _g(name, name, help, source="param", paper=paper)


_LYLE = "Lyle et al., ICML 2023"
_SOKAR = "Sokar et al., ICML 2023"
_DOHARE = "Dohare et al., Nature 2024"
_KALIBHAT = "Kalibhat et al., AAAI 2024 (Q-Score)"
_PAPYAN = "Papyan, Han & Donoho, PNAS 2020"
_GAN = "Arora & Zhang 2017; Odena et al. 2017"

CATALOGUE: tuple[MetricSpec, ...] = (
    _g("effective_rank", "effective_rank",
       "RankMe effective rank of the window's embeddings: exp(entropy of normalised singular "
       "values), uncentred, eps=1e-7.", paper="Garrido et al., ICML 2023"),
    _g("effective_rank_ratio", "effective_rank_ratio",
       "RankMe divided by min(window samples, embedding dimension); 0-1.", unit="ratio",
       paper="Garrido et al., ICML 2023"),
    _g("effective_rank_peak", "effective_rank_peak",
       "Highest RankMe this stream reached in this run (after the window first filled).",
       paper="Jing et al., ICLR 2022"),
    _g("effective_rank_peak_ratio", "effective_rank_peak_ratio",
       "RankMe divided by its peak in this run; 0-1. Falls when dimensions collapse.",
       unit="ratio", paper="Jing et al., ICLR 2022"),
    _g("participation_ratio", "participation_ratio",
       "Participation ratio (tr C)^2/tr(C^2) of the centred covariance, small-sample "
       "(Wishart) corrected.", paper="Gao et al. 2017; Kumar et al., ICLR 2021"),
    _g("spectrum_alpha", "spectrum_alpha",
       "alpha-ReQ power-law decay coefficient of the eigenspectrum (WLS fit, ranks 11-100).",
       paper="Agrawal et al., NeurIPS 2022"),
    _g("srank", "srank",
       "srank_0.01: number of singular values covering 99% of their sum.",
       paper="Kumar et al., ICLR 2021"),
    _g("top_eigenvalue_share", "top_eigenvalue_share",
       "Largest eigenvalue of the uncentred second moment over its trace; 0-1.", unit="ratio"),
    _g("embedding_std_ratio", "embedding_std_ratio",
       "sqrt(d) times the mean per-dimension std of L2-normalised embeddings; ~1 healthy, "
       "0 when collapsed to one vector.", unit="ratio", paper="Chen & He, CVPR 2021 (SimSiam)"),
    _g("mean_cosine_similarity", "mean_cosine_similarity",
       "Mean cosine similarity between distinct embeddings of the window; 1 when collapsed."),
    _g("embedding_variance", "embedding_variance",
       "Mean per-dimension variance of the raw (not normalised) embeddings, tr(C)/d; falls "
       "when every row shrinks to one point, which the normalised signals miss.",
       paper="Bardes et al., ICLR 2022 (VICReg variance term)"),
    _g("embedding_variance_ratio", "embedding_variance_ratio",
       "embedding_variance over its value at the stream's first full window (the run's own "
       "early level, no warm-up); -> 0 when the embeddings shrink to a point.", unit="ratio",
       paper="Bardes et al., ICLR 2022 (VICReg variance term)"),
    _g("effective_rank_baseline_ratio", "effective_rank_baseline_ratio",
       "RankMe over its value at the stream's first full window (no warm-up); catches a "
       "collapse in the first steps, before the peak is tracked.", unit="ratio",
       paper="Garrido et al., ICML 2023"),
    _g("window_samples", "window_samples",
       "Rows in the scoring window (n); spectral values are comparable only at equal n and d."),
    _g("embedding_dim", "embedding_dim", "Embedding dimension (d) of the stream."),
    _g("spectral_sketch_dim", "spectral_sketch_dim",
       "Dimension k of the seeded Gaussian projection this stream's spectral metrics are "
       "computed in (approximate large-d path, validated on synthetic spectra only); 0: exact."),
    MetricSpec(PREFIX + "samples_total", "counter", "Finite rows scored since start.",
               "samples", "counter"),
    MetricSpec(PREFIX + "nonfinite_values_total", "counter",
               "NaN/Inf values seen; rows holding them are excluded from every score.",
               "nonfinite_values", "counter"),
    MetricSpec(PREFIX + "errors_total", "counter",
               "Exceptions caught inside repwatch (training never sees them), by component.",
               "errors", "errors", ("run", "component")),
    MetricSpec(PREFIX + "dropped_samples_total", "counter",
               "Rows not scored, by reason: on the trainer, rows the sidecar sink could not "
               "deliver (queue_full, backoff, sidecar_down, ...); on the sidecar, rows received "
               "but not scored (overload, dimension, nonfinite, ...).",
               "dropped", "dropped", ("run", "reason")),
    # ---- the sidecar service's own accounting (repwatch serve; source "sidecar")
    MetricSpec(PREFIX + "received_samples_total", "counter",
               "Rows the sidecar received for a stream, each counted once it is scored or "
               "dropped: received = scored + dropped.", "received", "sidecar", ("run", "stream")),
    MetricSpec(PREFIX + "scored_samples_total", "counter", "Rows the sidecar scored for a stream.",
               "scored", "sidecar", ("run", "stream")),
    MetricSpec(PREFIX + "sidecar_queued_samples", "gauge",
               "Rows accepted (202) and waiting in the scoring queue; not yet received/scored.",
               "queued", "sidecar", ("run",)),
    MetricSpec(PREFIX + "sidecar_rejected_requests_total", "counter",
               "Batch requests refused before their rows were parsed, by reason.", "rejected",
               "sidecar", ("reason",)),
    MetricSpec(PREFIX + "sidecar_errors_total", "counter",
               "Exceptions caught in the sidecar's scoring worker, by component.", "errors",
               "sidecar", ("component",)),
    MetricSpec(PREFIX + "sidecar_ready", "gauge", "1 while the sidecar's scoring worker runs.",
               "ready", "sidecar", ()),
    _g("training_step", "training_step", "Training step of the latest publish.", source="run"),
    _g("last_publish_timestamp_seconds", "time", "Unix time of the latest publish.",
       unit="seconds", source="run"),
    _g("publish_duration_seconds", "publish_duration_seconds",
       "Wall time of the latest publish (all scorers' compute, one host sync).", unit="seconds",
       source="run"),
    _g("overhead_ratio", "overhead_ratio",
       "repwatch's own host time (hooks, step, publish) per second of training-step time, "
       "smoothed over publish windows (above 1 when repwatch costs more than training); "
       "host timers only, GPU kernel time not included.",
       unit="ratio", source="run"),
    _g("effective_cadence_steps", "effective_cadence_steps",
       "Training steps per captured step: 1 captures every step; k > 1 when the overhead "
       "budget stretched the cadence (publishes every every*k steps).", source="run"),
    MetricSpec(PREFIX + "alerts_firing", "gauge",
               "1 while the alert fires for the stream (or the layer or parameter of a "
               "layer/param-scoped rule, in the same label), else 0.",
               "alerts", "alerts", ("run", "stream", "alertname", "severity")),
    # ---- plasticity: activation layers (mon.watch_activations)
    _layer("dormant_units_ratio",
           "Fraction of units that are tau-dormant over the publish interval: "
           "E|h_i| / mean_k E|h_k| <= tau (conv channels averaged over space).",
           paper=_SOKAR, variants=("tau",), unit="ratio"),
    _layer("dormant_units_ratio_rise",
           "Dormant fraction minus its lowest value in this run after peak_warmup (rising).",
           paper=_SOKAR, variants=("tau",)),
    _layer("low_activity_units_ratio",
           "Fraction of units active (h != 0) on fewer than 1% of the interval's inputs.",
           paper=_DOHARE, unit="ratio"),
    _layer("never_active_units_ratio",
           "Fraction of units never active (h != 0) since the layer was first seen.",
           paper=_DOHARE, unit="ratio"),
    _layer("activation_units", "Units (features or conv channels) in the layer."),
    _g("activation_effective_rank", "effective_rank",
       "RankMe of the layer's activations (own window second moment; conv: channel means).",
       source="layer", paper=f"{_DOHARE}; Garrido et al. 2023"),
    _g("activation_effective_rank_peak_ratio", "effective_rank_peak_ratio",
       "Activation effective rank divided by its peak in this run (after peak_warmup); 0-1.",
       source="layer", unit="ratio", paper=_LYLE),
    _g("activation_effective_rank_baseline_ratio", "effective_rank_baseline_ratio",
       "Activation effective rank divided by its value at the layer's first full window (no "
       "warm-up); 0-1 when the layer's features collapse.", source="layer", unit="ratio",
       paper=_LYLE),
    _g("activation_srank", "srank",
       "srank_0.01 of the layer's activations (feature rank).", source="layer",
       paper="Kumar et al., ICLR 2021"),
    _g("activation_window_samples", "window_samples",
       "Rows in the layer's activation window.", source="layer"),
    # ---- parameters: weights and gradients (publish cadence)
    _param("weight_norm", "L2 norm of the parameter tensor.", paper=_LYLE),
    _param("weight_abs_mean", "Mean |w| of the parameter tensor.", paper=_DOHARE),
    _param("grad_norm", "L2 norm of the parameter's gradient at publish.", paper=_LYLE),
    _param("update_to_weight_ratio",
           "||w_now - w_last_publish|| / ||w_last_publish||: how fast the tensor moves."),
    _param("weight_rank",
           "Number of singular values of W/||W||_F above 1e-3 (conv kernels as out x in*k*k).",
           paper="Galanti et al. 2022"),
    _param("weight_stable_rank", "Stable rank ||W||_F^2 / ||W||_2^2.",
           paper="Galanti et al. 2022"),
    # ---- low-quality samples (Q-Score) on a stream
    _g("low_quality_samples_ratio", "low_quality_samples_ratio",
       "Fraction of the window's samples whose Q-Score is below the calibrated threshold "
       "(10% at calibration). Q = max within-sample z-score / L1 norm (form unverified).",
       unit="ratio", paper=_KALIBHAT),
    _g("negative_values_ratio", "negative_values_ratio",
       "Fraction of negative entries in the window; Q-Score (and its alert) assumes 0, i.e. "
       "non-negative post-ReLU features.", unit="ratio"),
    _g("qscore_threshold", "qscore_threshold",
       "Q-Score threshold (calibrated once on the first healthy window, or set).", paper=_KALIBHAT),
    _g("qscore_p10", "qscore_p10", "10th percentile of the window's Q-Scores.", paper=_KALIBHAT),
    _g("qscore_p50", "qscore_p50", "Median of the window's Q-Scores.", paper=_KALIBHAT),
    _g("qscore_auprc", "qscore_auprc",
       "AUPRC of 'low Q-Score -> misclassified' on an evaluation stream with labels and "
       "predictions.", paper=_KALIBHAT),
    _g("qscore_misclassified_ratio", "qscore_misclassified_ratio",
       "Error rate on the evaluation window: the AUPRC of a random ranking.", unit="ratio"),
    MetricSpec(PREFIX + "qscore", "histogram",
               "Per-sample Q-Scores since start (cumulative, fixed log-spaced buckets).",
               "qscore", "histogram", ("run", "stream"), paper=_KALIBHAT),
    # ---- neural collapse (labels given)
    _g("neural_collapse_nc1", "neural_collapse_nc1",
       "NC1 = tr(Sigma_W Sigma_B^+)/C: within-class variability over between-class; -> 0 "
       "in the terminal phase.", paper=_PAPYAN),
    _g("neural_collapse_nc2_equinorm", "neural_collapse_nc2_equinorm",
       "Std/mean of the centred class-mean norms.", paper=_PAPYAN),
    _g("neural_collapse_nc2_equiangularity", "neural_collapse_nc2_equiangularity",
       "Std of the cosines between centred class means.", paper=_PAPYAN),
    _g("neural_collapse_nc2_max_angle", "neural_collapse_nc2_max_angle",
       "Mean |cos + 1/(C-1)| between centred class means (0 for a simplex ETF).", paper=_PAPYAN),
    _g("neural_collapse_nc3", "neural_collapse_nc3",
       "Self-duality ||W^T/||W|| - M/||M|| ||_F^2 of classifier and class means.", paper=_PAPYAN),
    _g("neural_collapse_nc4", "neural_collapse_nc4",
       "Fraction of samples where the classifier disagrees with the nearest class mean.",
       unit="ratio", paper=_PAPYAN),
    _g("neural_collapse_classes", "neural_collapse_classes", "Classes present in the window."),
    _g("neural_collapse_effective_depth", "neural_collapse_effective_depth",
       "First watched stream (1-based, in watch order) whose NC1 is below the threshold; "
       "NaN when none.", source="run_signal", paper="Galanti et al. 2022"),
    # ---- generative models: a fake stream paired with a real one (mon.pair)
    _g("generator_diversity_ratio", "generator_diversity_ratio",
       "Mean pairwise distance of generated samples over that of real samples; << 1 when "
       "the generator collapses.", paper=_GAN),
    _g("generator_duplicate_rate", "generator_duplicate_rate",
       "Fraction of generated samples whose nearest generated neighbour is closer than the "
       "1st percentile of real nearest-neighbour distances (birthday-paradox test).", unit="ratio",
       paper="Arora & Zhang 2017"),
    _g("generator_effective_rank_ratio", "generator_effective_rank_ratio",
       "RankMe of the generated stream over RankMe of the real stream.", paper=_GAN),
    # ---- model-level, low cadence
    _g("earlybird_mask_distance", "earlybird_mask_distance",
       "Normalised Hamming distance between consecutive global magnitude-pruning masks.",
       source="run_signal", variants=("sparsity",), unit="ratio",
       paper="You et al., ICLR 2020 (early-bird tickets)"),
    _g("earlybird_ticket_found", "earlybird_ticket_found",
       "1 once the mask distance stayed below 0.1 for the tracker's patience at any sparsity.",
       source="run_signal", paper="You et al., ICLR 2020 (early-bird tickets)"),
    _g("hessian_top_eigenvalue", "hessian_top_eigenvalue",
       "Top eigenvalue of the loss Hessian (power iteration on Hessian-vector products).",
       source="run_signal", paper=_LYLE),
    _g("sgd_lyapunov_exponent", "sgd_lyapunov_exponent",
       "Sampled estimate of E log|1 - lr*h| along the top Hessian direction; > 0: unstable "
       "in probability.", source="run_signal", paper="Ziyin et al. 2023"),
)

BY_NAME: dict[str, MetricSpec] = {m.name: m for m in CATALOGUE}
STREAM_SIGNALS: frozenset[str] = frozenset(m.signal for m in CATALOGUE if m.source == "stream")
LAYER_SIGNALS: frozenset[str] = frozenset(m.signal for m in CATALOGUE if m.source == "layer")
PARAM_SIGNALS: frozenset[str] = frozenset(m.signal for m in CATALOGUE if m.source == "param")
RUN_SIGNALS: frozenset[str] = frozenset(m.signal for m in CATALOGUE if m.source == "run_signal")
SIGNALS_BY_SCOPE: dict[str, frozenset[str]] = {
    "stream": STREAM_SIGNALS, "layer": LAYER_SIGNALS, "param": PARAM_SIGNALS, "run": RUN_SIGNALS}
"""Exported signals per alert scope: every alert rule must read signals from here."""


def metric_for_signal(signal: str, source: str = "stream") -> MetricSpec:
    """The metric that exports snapshot signal ``signal`` of ``source``."""
    for m in CATALOGUE:
        if m.signal == signal and m.source == source:
            return m
    raise KeyError(f"no metric exports {source} signal {signal!r}")
