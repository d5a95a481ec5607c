"""StreamingTester: a streaming path == the functional value == an independent numpy reference.

The torchmetrics ``MetricTester`` idea for repwatch. A :class:`Case` is one stream of rows: a kind
(isotropic, power-law spectrum, low rank, collapsed to a point; optionally post-ReLU, labelled
with class structure, with non-finite rows and out-of-range labels), a window size and a batch
schedule. For a case the tester

(a) streams the batches through a real streaming path and reads it at several points:
    the scorers themselves (:func:`stream_scorers`: ``WindowMoments`` + ``SpectrumScorer`` +
    ``CollapseScorer``, ``QScoreScorer`` with a fixed threshold, ``NeuralCollapseScorer``) or a
    ``Monitor(port=None, every=...)`` fed with ``observe`` + ``step`` (:func:`stream_monitor`),
    through window wraparound, batches larger than the window, the periodic exact rebuild and
    the lazy rebuild (more rows than the window between two reads);
(b) computes the functional values (``monitor.functional``) on the rows the window holds at each
    read, on torch tensors AND on numpy arrays: the window-set functions the scorers and the
    sidecar publish with (``window_spectral_signals`` on ``second_moment``, ...) and the one-shot
    functions on rows (``rankme``, ``srank``, ``neural_collapse``, ...);
(c) computes an independent numpy reference written here from the formulas (no monitor code);

and :func:`check` asserts that every streamed and every functional value equals the reference
within :func:`tolerance` (:data:`TOLERANCES`; the looser entries of :data:`LOOSE` say why).

With ``world = 2`` (:func:`two_rank_worker`, spawned by ``tests.engine.test_distributed.spawn``)
every rank streams its half of each batch into a Monitor with global reduction; the published
values must equal the reference on the union of the ranks' windows (the global window of
``monitor.engine.distributed``), i.e. what one process computes on those rows.

Rows are float32 (as the rings store them), so every reference sees exactly the streamed values.
"""

from __future__ import annotations

import functools
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

# ----------------------------------------------------------------------------- signals

SPECTRAL = ("effective_rank", "effective_rank_ratio", "srank", "spectrum_alpha",
            "participation_ratio", "top_eigenvalue_share", "window_samples", "embedding_dim")
COLLAPSE = ("embedding_std_ratio", "mean_cosine_similarity", "embedding_variance")
QSCORE = ("qscore_p10", "qscore_p50", "low_quality_samples_ratio", "qscore_threshold")
NC = ("neural_collapse_nc1", "neural_collapse_nc2_equinorm",
      "neural_collapse_nc2_equiangularity", "neural_collapse_nc2_max_angle",
      "neural_collapse_classes", "neural_collapse_window_samples")
COUNTERS = ("samples", "nonfinite_values")
NC_COUNTERS = ("labels_out_of_range", "nonfinite_rows")

# The reference's constants, written out here (not imported from monitor).
RANKME_EPS = 1e-7          # RankMe ε, added after normalisation (Garrido et al. 2023)
SRANK_DELTA = 0.01         # srank δ (Kumar et al. 2021)
ALPHA_RANKS = (11, 100)    # α-ReQ fit over 1-based ranks 11..100 (reptrix np.arange(10, 100))
ALPHA_FLOOR = 1e-12        # eigenvalues below this share of λ₁ are numerical zeros
ALPHA_MIN_POINTS = 5
Q_EPS = 1e-8               # Q-Score ε₁ (on ‖z‖₁) and ε₂ (on the row std)
PINV_RCOND = 1e-10         # Σ_B's round-off C-th eigenvalue (~1e-16·λ₁) is cut, real ones kept


# ----------------------------------------------------------------------------- tolerances


@dataclass(frozen=True)
class Tol:
    """``|got − want| ≤ max(rel·|want|, abs)``; NaN only equals NaN."""

    rel: float
    abs: float = 0.0

    def ok(self, got: float, want: float) -> bool:
        if math.isnan(want) or math.isnan(got):
            return math.isnan(want) and math.isnan(got)
        return abs(got - want) <= max(self.rel * abs(want), self.abs)


EXACT = Tol(0.0, 0.0)
DEFAULT = Tol(1e-9, 1e-12)
TOLERANCES: dict[str, Tol] = {
    # counts and integer-valued signals: exactly
    "srank": EXACT, "window_samples": EXACT, "embedding_dim": EXACT,
    "neural_collapse_classes": EXACT, "neural_collapse_window_samples": EXACT,
    "samples": EXACT, "nonfinite_values": EXACT, "labels_out_of_range": EXACT,
    "nonfinite_rows": EXACT, "qscore_threshold": EXACT,
    # a count ratio; exact unless a score sat within round-off of τ (τ is interpolated)
    "low_quality_samples_ratio": Tol(0.0, 1e-12),
    # quantiles of per-row float64 scores of the same float32 values: round-off only
    "qscore_p10": Tol(1e-12), "qscore_p50": Tol(1e-12),
}
"""Per signal; everything else is :data:`DEFAULT`: 1e-9 relative, with a 1e-12 absolute floor
for values ≈ 0 (the mean cosine of centred isotropic rows, NC2 max-angle of two classes)."""

LOOSE: dict[tuple[str, str], tuple[Tol, str]] = {
    ("rank-deficient", "effective_rank"): (
        Tol(1e-6), "a window of numerical rank r < K = min(n, d) (low-rank rows, all-zero "
        "post-ReLU columns): σ = √λ(S) turns the K − r round-off eigenvalues of S (~1e-16·λ₁) "
        "into σ ~ 1e-8·σ₁ inside the K values RankMe sums, in the stream and in the window "
        "functions (the SVD reference and the one-shot functions: ~1e-16·σ₁); measured up to "
        "1.6e-7 (rank 20 in d = 48) and 8.9e-9 (all-zero columns, two ranks)"),
    ("rank-deficient", "effective_rank_ratio"): (Tol(1e-6), "RankMe ÷ K, see effective_rank"),
    ("collapsed", "spectrum_alpha"): (
        Tol(2e-8), "the fitted tail eigenvalues are ~1e-7·λ₁: eigvalsh of S = ZᵀZ (stream and "
        "window functions) has ~1e-16·λ₁ absolute error, ~1e-9 relative on them (the SVD "
        "reference ~1e-12); measured up to 2.0e-9"),
    **{("collapsed", key): (
        Tol(1e-8), "rows within 1e-3 of one point: the one-pass centring (S − Σz Σzᵀ/n, "
        "Σẑ² − (Σẑ)²/n) cancels a spread ~1e-6 against a mean² ~1, leaving ~1e-10 relative "
        "round-off (the reference centres two-pass); measured up to 6.6e-10 (variance), "
        "1.9e-10 (PR), 1.3e-10 (std)")
       for key in ("embedding_variance", "participation_ratio", "embedding_std_ratio")},
}
"""(condition, signal) → looser tolerance and why. Conditions: ``"rank-deficient"`` (the
window's smallest of its min(n, d) singular values is below 1e-6·σ₁, :func:`rank_deficient`)
and a case's :attr:`Case.kind`."""


def rank_deficient(z: np.ndarray) -> bool:
    """Whether the valid rows ``z`` have numerical rank below min(n, d): σ_min < 1e-6·σ₁
    (float32 rows of a lower rank keep σ ~ 1e-7·σ₁ from their rounding; all-zero columns
    give 0)."""
    if min(z.shape) < 2:
        return False
    s = np.linalg.svd(z, compute_uv=False)
    return bool(s[-1] < 1e-6 * s[0])


def tolerance(case: Case, signal: str, deficient: bool = False) -> Tol:
    """The tolerance of ``signal`` in ``case`` (``deficient``: the window is rank-deficient)."""
    for condition in (("rank-deficient",) if deficient else ()) + (case.kind,):
        hit = LOOSE.get((condition, signal))
        if hit:
            return hit[0]
    return TOLERANCES.get(signal, DEFAULT)


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One stream: how its rows are made and how it is streamed and read."""

    name: str
    kind: str                       # "isotropic" | "power_law" | "low_rank" | "collapsed"
    dim: int
    window: int
    batches: tuple[int, ...]        # rows per batch (Monitor cases: ≤ window, ≥ 2 per rank)
    seed: int = 0
    rank: int = 8                   # low_rank: the rank
    scale: float = 1.0              # multiplies the kind's rows (with classes: the within-class
    #                                 spread)
    offset: float = 0.0             # added to every row (a mean the centred signals remove)
    relu: bool = False              # max(z, 0) last (non-negative, post-ReLU rows for Q-Score)
    classes: int = 0                # > 0: labelled rows, class centres × spread added
    spread: float = 2.0
    absent_after: int | None = None  # the middle class (classes // 2) gets no rows from this
    #                                  row index on (its rows go to class 0)
    nonfinite_every: int = 0        # every k-th row: one NaN entry or a row of +Inf (alternating)
    bad_label_every: int = 0        # every k-th row: label −1, classes, classes + 7 in turn
    read_every: int | None = 1      # scorers: read after every k-th batch and the last (None:
    #                                 the last only); Monitor: its ``every``
    rebuild_every_wraps: int = 64   # scorers: WindowMoments' periodic exact rebuild
    threshold_quantile: float = 0.3  # τ of the Q-Score: this quantile of all rows' scores
    tie_every: int = 0              # every k-th row 32·e_j (one-hot): their equal scores are τ

    def __str__(self) -> str:
        return self.name


def case_data(case: Case) -> tuple[np.ndarray, np.ndarray | None]:
    """All rows ``(N, d)`` float32 and labels ``(N,)`` int64 (None without classes)."""
    z, y = _case_data(case)
    return z.copy(), (None if y is None else y.copy())


@functools.lru_cache(maxsize=64)
def _case_data(case: Case) -> tuple[np.ndarray, np.ndarray | None]:
    rng = np.random.default_rng(case.seed)
    n, d = sum(case.batches), case.dim
    if case.kind == "isotropic":
        z = rng.standard_normal((n, d))
    elif case.kind == "power_law":                    # covariance eigenvalues i^-1.2
        z = rng.standard_normal((n, d)) * np.arange(1, d + 1) ** -0.6
    elif case.kind == "low_rank":
        z = rng.standard_normal((n, case.rank)) @ rng.standard_normal((case.rank, d))
    elif case.kind == "collapsed":                    # every row ≈ one point
        z = rng.standard_normal(d) + 1e-3 * rng.standard_normal((n, d))
    else:
        raise KeyError(case.kind)
    z = case.scale * z + case.offset
    labels = None
    if case.classes:
        labels = rng.integers(0, case.classes, n)
        if case.absent_after is not None:
            late = labels[case.absent_after:]
            late[late == case.classes // 2] = 0
        z = z + case.spread * rng.standard_normal((case.classes, d))[labels]
    if case.relu:
        z = np.maximum(z, 0.0)
    z = z.astype(np.float32)
    if case.tie_every:                     # 32·e_j rows: every step of their Q-Score is exact
        for i in range(case.tie_every - 1, n, case.tie_every):
            z[i] = 0.0
            z[i, i % d] = 32.0
    if case.nonfinite_every:
        for j, i in enumerate(range(case.nonfinite_every - 1, n, case.nonfinite_every)):
            if j % 2 == 0:
                z[i, j % d] = np.nan
            else:
                z[i] = np.inf
    if case.bad_label_every and labels is not None:
        bad = (-1, case.classes, case.classes + 7)
        for j, i in enumerate(range(case.bad_label_every - 1, n, case.bad_label_every)):
            labels[i] = bad[j % 3]
    return z, labels


def shard_batches(case: Case, rank: int = 0, world: int = 1
                  ) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Rank ``rank``'s share of every batch: the ``rank``-th of ``world`` contiguous parts."""
    z, y = case_data(case)
    out = []
    start = 0
    for b in case.batches:
        lo, hi = start + rank * b // world, start + (rank + 1) * b // world
        out.append((z[lo:hi], None if y is None else y[lo:hi]))
        start += b
    return out


@functools.lru_cache(maxsize=64)
def threshold(case: Case) -> float:
    """The case's fixed Q-Score threshold τ: the ``threshold_quantile`` of all its rows'
    reference scores, or with ``tie_every`` the score of a one-hot row, which every
    implementation computes bit for bit (sums of dyadic values, one correctly rounded sqrt):
    the rows tied at τ must not count as below it."""
    z = case_data(case)[0].astype(np.float64)
    if case.tie_every:
        return float(ref_qscore(z[case.tie_every - 1:case.tie_every])[0])
    q = ref_qscore(z)
    return float(np.quantile(q[np.isfinite(q)], case.threshold_quantile))


# ----------------------------------------------------------------------------- (c) reference
# Plain numpy from the formulas of docs/metrics.md; deliberately naive (full SVD, Gram matrix,
# two-pass covariances, pinv). Never calls monitor code.


def _nan_dict(keys: tuple[str, ...]) -> dict[str, float]:
    return dict.fromkeys(keys, math.nan)


def ref_spectral(z: np.ndarray) -> dict[str, float]:
    """Spectral set of the valid rows ``z`` (n, d) float64."""
    n, d = z.shape
    out = _nan_dict(SPECTRAL)
    out.update(window_samples=float(n), embedding_dim=float(d))
    if n < 2:
        return out
    s = np.linalg.svd(z, compute_uv=False)               # min(n, d) values, descending
    k = min(n, d)
    if s.sum() <= 0:
        return out
    p = s / s.sum() + RANKME_EPS                         # ε after normalisation
    rankme = math.exp(-float(np.sum(p * np.log(p))))
    out["effective_rank"] = rankme
    out["effective_rank_ratio"] = rankme / k
    cum = np.cumsum(s) / s.sum()
    out["srank"] = float(np.sum(cum < 1.0 - SRANK_DELTA) + 1)
    lam = s * s                                          # eigenvalues of ZᵀZ (uncentred)
    out["top_eigenvalue_share"] = float(lam[0] / lam.sum())
    first, last = ALPHA_RANKS
    ranks = np.arange(first, min(last, k) + 1)
    keep = lam[ranks - 1] > ALPHA_FLOOR * lam[0]
    r, y = ranks[keep].astype(np.float64), np.log(lam[ranks[keep] - 1])
    if r.size >= ALPHA_MIN_POINTS:                       # WLS of log λ_r = c − α log r, w = 1/r
        sw = np.sqrt(1.0 / r)
        design = np.stack([-np.log(r), np.ones_like(r)], axis=1) * sw[:, None]
        out["spectrum_alpha"] = float(np.linalg.lstsq(design, y * sw, rcond=None)[0][0])
    if n >= 3:                                           # Wishart-corrected PR of the centred rows
        zc = z - z.mean(axis=0)
        w = zc.T @ zc
        m = n - 1
        tr, tr2 = np.trace(w), np.trace(w @ w)
        a_hat = (tr2 - tr * tr / m) / ((m + 2) * (m - 1))
        b_hat = (tr * tr - 2 * m * a_hat) / (m * m)
        if a_hat > 0 and b_hat > 0:
            out["participation_ratio"] = float(min(max(b_hat / a_hat, 1.0), d))
    return out


def ref_spectrum(z: np.ndarray) -> np.ndarray:
    """Eigenvalues of ZᵀZ/n, descending, d of them (σ²/n, then zeros)."""
    n, d = z.shape
    lam = np.zeros(d)
    s = np.linalg.svd(z, compute_uv=False)
    lam[: s.shape[0]] = s * s
    return lam / max(n, 1)


def ref_collapse(z: np.ndarray) -> dict[str, float]:
    """SimSiam std × √d, mean cosine of distinct pairs, tr C / d of the valid rows (n, d)."""
    n, d = z.shape
    if n < 2:
        return _nan_dict(COLLAPSE)
    zn = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)   # zero row stays 0
    gram = zn @ zn.T
    return {
        "embedding_std_ratio": float(np.std(zn, axis=0, ddof=1).mean() * math.sqrt(d)),
        "mean_cosine_similarity": float((gram.sum() - np.trace(gram)) / (n * (n - 1))),
        "embedding_variance": float(np.var(z, axis=0, ddof=1).mean()),
    }


def ref_qscore(z: np.ndarray) -> np.ndarray:
    """Per-row Q-Score ``max_j ζ_ij / (‖z_i‖₁ + ε₁)``, ζ = (z − mean)/(std₀ + ε₂); NaN rows."""
    finite = np.isfinite(z).all(axis=1)
    x = np.where(finite[:, None], z, 0.0)
    mean = x.mean(axis=1, keepdims=True)
    std = np.sqrt(((x - mean) ** 2).mean(axis=1, keepdims=True))
    q = ((x - mean) / (std + Q_EPS)).max(axis=1) / (np.abs(x).sum(axis=1) + Q_EPS)
    return np.where(finite, q, np.nan)


def ref_qscore_window(z: np.ndarray, tau: float) -> dict[str, float]:
    """Q-Score window signals of all window rows ``z`` (non-finite ones included, not scored)."""
    q = ref_qscore(z)
    q = q[np.isfinite(q)]
    if q.size == 0:
        return {**_nan_dict(QSCORE), "qscore_threshold": tau}
    return {"qscore_p10": float(np.quantile(q, 0.1)), "qscore_p50": float(np.quantile(q, 0.5)),
            "low_quality_samples_ratio": float(np.mean(q < tau)), "qscore_threshold": tau}


def ref_neural_collapse(h: np.ndarray, y: np.ndarray, classes: int) -> dict[str, float]:
    """NC1 = tr(Σ_W Σ_B⁺)/C (pinv) and the NC2 measures of the valid rows (finite, label in
    range); C = the classes present, μ_G the mean of the samples."""
    valid = np.isfinite(h).all(axis=1) & (y >= 0) & (y < classes)
    h, y = h[valid], y[valid]
    present = [c for c in range(classes) if np.any(y == c)]
    c = len(present)
    out = {**_nan_dict(NC), "neural_collapse_classes": float(c),
           "neural_collapse_window_samples": float(h.shape[0])}
    if c < 2:
        return out
    mus = np.stack([h[y == k].mean(axis=0) for k in present])              # (C, d)
    row_mu = mus[np.searchsorted(present, y)]                              # (N, d)
    sigma_w = (h - row_mu).T @ (h - row_mu) / h.shape[0]
    mt = mus - h.mean(axis=0)
    sigma_b = mt.T @ mt / c
    out["neural_collapse_nc1"] = float(
        np.trace(sigma_w @ np.linalg.pinv(sigma_b, rcond=PINV_RCOND, hermitian=True)) / c)
    norms = np.linalg.norm(mt, axis=1)
    out["neural_collapse_nc2_equinorm"] = float(np.std(norms, ddof=1) / np.mean(norms))
    cos = np.array([mt[i] @ mt[j] / (norms[i] * norms[j])
                    for i in range(c) for j in range(i + 1, c)])
    if cos.size >= 2:
        out["neural_collapse_nc2_equiangularity"] = float(np.std(cos, ddof=1))
    out["neural_collapse_nc2_max_angle"] = float(np.mean(np.abs(cos + 1.0 / (c - 1))))
    return out


def reference(case: Case, z: np.ndarray, y: np.ndarray | None, tau: float
              ) -> tuple[dict[str, float], np.ndarray]:
    """Every signal of a window holding rows ``z`` (float64, non-finite rows included) and the
    spectrum."""
    valid = z[np.isfinite(z).all(axis=1)]
    out = {**ref_spectral(valid), **ref_collapse(valid), **ref_qscore_window(z, tau)}
    if case.classes:
        assert y is not None
        out.update(ref_neural_collapse(z, y, case.classes))
    return out, ref_spectrum(valid)


# ----------------------------------------------------------------------------- (b) functional


def functional(case: Case, z: np.ndarray, y: np.ndarray | None, tau: float
               ) -> dict[str, tuple[dict[str, float], np.ndarray | None]]:
    """``monitor.functional`` on the window rows, per route: ``window/torch``, ``window/numpy``
    (the window-set functions on statistics of the rows, as the scorers and the sidecar call
    them) and ``one-shot/torch``, ``one-shot/numpy`` (the functions on rows); each with the
    spectrum where the route has one."""
    from monitor import functional as F
    from monitor.functional.neural_collapse import (
        class_statistics,
        neural_collapse,
        window_neural_collapse_signals,
    )
    from monitor.functional.qscore import qscore
    from monitor.functional.qscore_window import (
        low_quality_ratio,
        nan_quantile,
        window_qscore_signals,
    )
    from monitor.functional.spectral import (
        window_collapse_signals,
        window_spectral_signals,
    )

    finite = np.isfinite(z).all(axis=1)
    valid = np.ascontiguousarray(z[finite])
    n, d = valid.shape
    q_torch = qscore(torch.from_numpy(z))                               # (n,) torch only
    out: dict[str, tuple[dict[str, float], np.ndarray | None]] = {}
    for lib in ("torch", "numpy"):
        arr = torch.from_numpy if lib == "torch" else np.asarray
        x = arr(valid)
        q = q_torch if lib == "torch" else q_torch.numpy()

        # the window set, from the statistics (what the scorers and the sidecar publish)
        s, zsum, cnt = F.second_moment(x)
        normed = F.normalize_rows(x)
        win = dict(window_spectral_signals(s, zsum, cnt))
        spectrum = np.asarray(win.pop("spectrum"), dtype=np.float64)
        win.update(window_collapse_signals(s, zsum, normed.sum(0), (normed * normed).sum(0),
                                           cnt))
        win.update(window_qscore_signals(q, tau))
        # the one-shot functions on rows
        k = float(min(n, d))
        rank = F.rankme(x)
        lam = F.eigenvalues_desc(s)
        one = {
            "effective_rank": rank, "effective_rank_ratio": rank / k, "srank": F.srank(x),
            "spectrum_alpha": F.spectrum_alpha(x, centered=False),
            "participation_ratio": F.participation_ratio(x),
            "top_eigenvalue_share": F.top_eigenvalue_share_from_eigenvalues(lam),
            "window_samples": float(n), "embedding_dim": float(d),
            "embedding_std_ratio": F.l2_normalized_std(x) * math.sqrt(d),
            "mean_cosine_similarity": F.mean_cosine_similarity(x),
            "embedding_variance": F.mean_variance(x),
            "qscore_p10": nan_quantile(q, 0.1), "qscore_p50": nan_quantile(q, 0.5),
            "low_quality_samples_ratio": low_quality_ratio(q, tau),
            "qscore_threshold": tau,
        }
        if case.classes:
            assert y is not None
            # window route: all window rows, invalid ones zeroed with weight 0 (as the scorer)
            ok = finite & (y >= 0) & (y < case.classes)
            h = arr(np.where(ok[:, None], z, 0.0))
            lab = arr(np.where(ok, y, 0).astype(np.int64))
            win.update(window_neural_collapse_signals(
                *class_statistics(h, lab, case.classes, arr(ok.astype(np.float64)))))
            # one-shot route: the valid rows only
            nc = neural_collapse(arr(np.ascontiguousarray(z[ok])), arr(y[ok]), case.classes)
            one.update({f"neural_collapse_{key}": v for key, v in nc.items()})
            # (the one-shot dict has no counts: the valid rows' own)
            one["neural_collapse_classes"] = float(np.unique(y[ok]).size)
            one["neural_collapse_window_samples"] = float(ok.sum())
        out[f"window/{lib}"] = ({key: float(v) for key, v in win.items()}, spectrum)
        out[f"one-shot/{lib}"] = ({key: float(v) for key, v in one.items()}, None)
    return out


# ----------------------------------------------------------------------------- (a) streaming


@dataclass
class Reading:
    """What a streaming path published after its first ``upto`` batches."""

    upto: int
    values: dict[str, float]
    spectrum: list[float]
    counters: dict[str, float]


def _reads(case: Case) -> list[int]:
    last = len(case.batches)
    if case.read_every is None:
        return [last]
    return sorted({i for i in range(1, last + 1) if i % case.read_every == 0} | {last})


def stream_scorers(case: Case) -> list[Reading]:
    """The scorers themselves, read after the batches :func:`_reads` names (every read
    settles the window; between reads more rows than the window make it rebuild lazily)."""
    from monitor.scorers import CollapseScorer, SpectrumScorer, WindowMoments
    from monitor.scorers.neural_collapse import NeuralCollapseScorer
    from monitor.scorers.qscore import QScoreScorer

    m = WindowMoments(case.dim, case.window, rebuild_every_wraps=case.rebuild_every_wraps)
    spectrum_scorer, collapse_scorer = SpectrumScorer(), CollapseScorer()
    q = QScoreScorer(window=case.window, threshold=threshold(case))
    nc = NeuralCollapseScorer(case.dim, case.classes, case.window) if case.classes else None
    reads = set(_reads(case))
    out = []
    for i, (rows, labels) in enumerate(shard_batches(case), 1):
        x = torch.from_numpy(rows)
        m.update(x)
        q.update(x)
        if nc is not None:
            assert labels is not None
            nc.update(x, torch.from_numpy(labels))
        if i not in reads:
            continue
        values = dict(spectrum_scorer.compute(m))
        spectrum = values.pop("spectrum")
        values.update(collapse_scorer.compute(m))
        values.update(q.compute())
        counters = {"samples": float(m.seen), "nonfinite_values": float(m.nonfinite)}
        if nc is not None:
            got = nc.compute()
            counters.update(labels_out_of_range=float(got.pop("labels_out_of_range")),
                            nonfinite_rows=float(got.pop("nonfinite_rows")))
            values.update(got)
        out.append(Reading(i, {k: float(v) for k, v in values.items()}, spectrum.tolist(),
                           counters))
    # the incrementally updated sums equal a rebuild from the ring (float64 round-off only)
    m.settle()
    incremental = m.s.clone()
    m.rebuild()
    assert torch.allclose(incremental, m.s, rtol=1e-10, atol=1e-10 * float(m.s.abs().max())), \
        (case.name, float((incremental - m.s).abs().max()))
    return out


def _monitor(case: Case, window: int, every: int) -> Any:
    from monitor import Monitor

    return Monitor(run="parity", every=every, window=window, max_rows=window, port=None,
                   peak_warmup=0, rules=(), qscore={"threshold": threshold(case)},
                   max_classes=max(case.classes, 2))


def _monitor_reading(upto: int, snap: Any) -> Reading:
    values = dict(snap.streams["z"])
    counters = dict(snap.counters["z"])
    for key in NC_COUNTERS:
        if key in values:
            counters[key] = values.pop(key)
    return Reading(upto, values, list(snap.spectra["z"]), counters)


def stream_monitor(case: Case, rank: int = 0, world: int = 1) -> list[Reading]:
    """A ``Monitor(port=None, every=case.read_every)`` fed ``observe`` + ``step`` with rank
    ``rank``'s share of every batch (under torch.distributed: global reduction at publish)."""
    every = case.read_every or len(case.batches)
    mon = _monitor(case, case.window, every)
    out = []
    try:
        for i, (rows, labels) in enumerate(shard_batches(case, rank, world), 1):
            mon.observe("z", torch.from_numpy(rows),
                        labels=None if labels is None else torch.from_numpy(labels))
            snap = mon.step()
            if snap is not None:
                assert not snap.errors, snap.errors
                out.append(_monitor_reading(i, snap))
    finally:
        mon.close()
    return out


def publish_once(case: Case, z: np.ndarray, y: np.ndarray | None, window: int) -> Reading:
    """One process: a Monitor of window ``window`` fed ``z`` (in batches ≤ ``window``), one
    publish (the single-process values on a union of rank windows)."""
    mon = _monitor(case, window, 1)
    try:
        for lo in range(0, z.shape[0], window):
            mon.observe("z", torch.from_numpy(np.ascontiguousarray(z[lo:lo + window])),
                        labels=None if y is None else torch.from_numpy(y[lo:lo + window]))
        snap = mon.publish()
        assert not snap.errors, snap.errors
        return _monitor_reading(0, snap)
    finally:
        mon.close()


# ----------------------------------------------------------------------------- windows, check


def window_rows(case: Case, upto: int, world: int = 1
                ) -> tuple[np.ndarray, np.ndarray | None, dict[str, float]]:
    """The union over ranks of what each rank's window holds after ``upto`` batches (rows as
    float64, labels) and the counters summed over ranks (a batch larger than the window enters
    with its last ``window`` rows only)."""
    zs, ys = [], []
    counters = dict.fromkeys(COUNTERS + (NC_COUNTERS if case.classes else ()), 0.0)
    for rank in range(world):
        parts = shard_batches(case, rank, world)[:upto]
        for rows, labels in parts:
            entered = rows[-case.window:]
            finite = np.isfinite(entered).all(axis=1)
            counters["samples"] += float(finite.sum())
            counters["nonfinite_values"] += float((~np.isfinite(entered)).sum())
            if case.classes:
                assert labels is not None
                lab = labels[-case.window:]
                in_range = (lab >= 0) & (lab < case.classes)
                counters["labels_out_of_range"] += float((~in_range).sum())
                counters["nonfinite_rows"] += float((in_range & ~finite).sum())
        zs.append(np.concatenate([r for r, _ in parts])[-case.window:])
        if case.classes:
            ys.append(np.concatenate([lab for _, lab in parts])[-case.window:])
    z = np.concatenate(zs).astype(np.float64)
    return z, (np.concatenate(ys) if case.classes else None), counters


def _spectrum_ok(got: np.ndarray, want: np.ndarray) -> bool:
    """Eigenvalues agree to 1e-9 relative, or 1e-11·λ₁ absolute (the numerical zeros)."""
    if got.shape != want.shape:
        return False
    return bool(np.all(np.abs(got - want) <= np.maximum(1e-9 * np.abs(want),
                                                        1e-11 * max(want.max(initial=0), 0))))


def signals(case: Case) -> tuple[str, ...]:
    return SPECTRAL + COLLAPSE + QSCORE + (NC if case.classes else ())


def check(case: Case, readings: list[Reading], world: int = 1,
          functional_every: int | None = 1) -> list[str]:
    """Compare every reading with the reference, and the functional values of the window of
    every ``functional_every``-th reading and the last (None: none); returns the mismatches
    (empty: all agree). Counters and the spectrum too."""
    assert readings, f"{case.name}: nothing was published"
    tau = threshold(case)
    bad: list[str] = []

    def compare(source: str, upto: int, got: dict[str, float], want: dict[str, float],
                deficient: bool) -> None:
        for key in signals(case):
            if key not in got:
                bad.append(f"{source} after {upto}: {key} missing")
                continue
            tol = tolerance(case, key, deficient)
            if not tol.ok(got[key], want[key]):
                rel = abs(got[key] - want[key]) / abs(want[key]) if want[key] else math.inf
                bad.append(f"{source} after {upto}: {key} = {got[key]!r}, reference "
                           f"{want[key]!r} (rel {rel:.2e}, tol {tol})")

    for i, reading in enumerate(readings):
        z, y, counters = window_rows(case, reading.upto, world)
        want, spectrum = reference(case, z, y, tau)
        deficient = rank_deficient(z[np.isfinite(z).all(axis=1)])
        compare("stream", reading.upto, reading.values, want, deficient)
        if not _spectrum_ok(np.asarray(reading.spectrum), spectrum):
            bad.append(f"stream after {reading.upto}: spectrum differs, max abs "
                       f"{np.max(np.abs(np.asarray(reading.spectrum) - spectrum)):.2e}")
        for key, value in counters.items():
            if reading.counters.get(key) != value:
                bad.append(f"stream after {reading.upto}: counter {key} = "
                           f"{reading.counters.get(key)}, reference {value}")
        if functional_every is None or (i % functional_every and i != len(readings) - 1):
            continue
        for route, (got, got_spectrum) in functional(case, z, y, tau).items():
            compare(route, reading.upto, got, want, deficient)
            if got_spectrum is not None and not _spectrum_ok(got_spectrum, spectrum):
                bad.append(f"{route} after {reading.upto}: spectrum differs")
    return bad


def assert_agree(case: Case, readings: list[Reading], world: int = 1,
                 functional_every: int | None = 1) -> None:
    bad = check(case, readings, world, functional_every)
    assert not bad, f"{case.name}: {len(bad)} mismatches:\n" + "\n".join(bad[:40])


# ----------------------------------------------------------------------------- two ranks


def write_cases(cases: list[Case], out: Path) -> None:
    (out / "cases.pkl").write_bytes(pickle.dumps(cases))


def two_rank_worker(rank: int, world: int, port: int, out: str) -> None:
    """Spawned per rank (``tests.engine.test_distributed.spawn``): every case of ``out/cases.pkl``
    through a Monitor on this rank's half of each batch, global reduction at every publish."""
    from tests.dist_workers import _finish, _init

    _init(rank, world, port)
    cases: list[Case] = pickle.loads((Path(out) / "cases.pkl").read_bytes())
    result = {case.name: stream_monitor(case, rank, world) for case in cases}
    _finish(Path(out), rank, result)
