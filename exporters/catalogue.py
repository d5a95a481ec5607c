"""Every metric repwatch exports: name, type, unit, help and labels — the one source of truth.

Names follow Prometheus conventions: ``repwatch_`` prefix, base units, ratios in 0–1, ``_total``
only on counters, bounded labels (``run``, ``stream``, ``component``, ``alertname``,
``severity``; never a step or a sample id). ``signal`` is the key of the value in a
:class:`monitor.snapshot.Snapshot`; ``source`` says where in the snapshot it lives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PREFIX = "repwatch_"


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric."""

    name: str
    kind: Literal["gauge", "counter"]
    help: str
    signal: str
    source: Literal["stream", "counter", "run", "errors", "alerts"]
    labels: tuple[str, ...] = ("run", "stream")
    unit: str = ""
    paper: str = ""

    def __post_init__(self) -> None:
        if not self.name.startswith(PREFIX):
            raise ValueError(f"metric names start with {PREFIX!r}: {self.name!r}")
        if self.kind == "counter" and not self.name.endswith("_total"):
            raise ValueError(f"counter {self.name!r} must end in _total")
        if self.kind != "counter" and self.name.endswith("_total"):
            raise ValueError(f"only counters end in _total: {self.name!r}")


def _g(name: str, signal: str, help: str, *, unit: str = "", paper: str = "",
       source: Literal["stream", "run"] = "stream") -> MetricSpec:
    labels = ("run", "stream") if source == "stream" else ("run",)
    return MetricSpec(PREFIX + name, "gauge", help, signal, source, labels, unit, paper)


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
    _g("window_samples", "window_samples",
       "Rows in the scoring window (n); spectral values are comparable only at equal n and d."),
    _g("embedding_dim", "embedding_dim", "Embedding dimension (d) of the stream."),
    MetricSpec(PREFIX + "samples_total", "counter", "Finite rows scored since start.",
               "samples", "counter"),
    MetricSpec(PREFIX + "nonfinite_values_total", "counter",
               "NaN/Inf values seen; rows holding them are excluded from every score.",
               "nonfinite_values", "counter"),
    MetricSpec(PREFIX + "errors_total", "counter",
               "Exceptions caught inside repwatch (training never sees them), by component.",
               "errors", "errors", ("run", "component")),
    _g("training_step", "training_step", "Training step of the latest publish.", source="run"),
    _g("last_publish_timestamp_seconds", "time", "Unix time of the latest publish.",
       unit="seconds", source="run"),
    _g("publish_duration_seconds", "publish_duration_seconds",
       "Wall time of the latest publish (all scorers' compute, one host sync).", unit="seconds",
       source="run"),
    MetricSpec(PREFIX + "alerts_firing", "gauge",
               "1 while the alert fires for the stream, else 0 (in-process alert engine).",
               "alerts", "alerts", ("run", "stream", "alertname", "severity")),
)

BY_NAME: dict[str, MetricSpec] = {m.name: m for m in CATALOGUE}
STREAM_SIGNALS: frozenset[str] = frozenset(m.signal for m in CATALOGUE if m.source == "stream")


def metric_for_signal(signal: str) -> MetricSpec:
    """The metric that exports snapshot signal ``signal``."""
    for m in CATALOGUE:
        if m.signal == signal:
            return m
    raise KeyError(f"no metric exports signal {signal!r}")
