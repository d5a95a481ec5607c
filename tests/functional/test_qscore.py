"""Tests of ``monitor.functional.qscore`` against slow numpy references and scikit-learn.

* Every Q-Score form is recomputed per row with explicit Python loops from the docs/metrics.md §4
  formulas (never by calling the torch code) and compared at 1e-12 relative.
* ``auprc`` is compared with ``sklearn.metrics.average_precision_score`` and with a slow numpy
  reference that walks the distinct thresholds, on continuous scores, heavy ties and weights.
* ``histogram_counts`` equals ``numpy.histogram``-derived counts; ``quantile_from_histogram``
  follows PromQL's interpolation.
* The regulariser's gradient step raises Q; bad input raises ValueError naming what was wrong.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from monitor.functional.qscore import (
    QSCORE_FORMS,
    auprc,
    feature_zscores,
    qscore,
    qscore_regularizer,
)
from monitor.functional.qscore_window import (
    histogram_counts,
    nan_quantile,
    quantile_from_histogram,
)

# ----------------------------------------------------------------------------- references


def ref_qscore_row(z: np.ndarray, form: str, eps1: float = 1e-8, eps2: float = 1e-8) -> float:
    """One row, with loops: ζ_j = (z_j − mean)/(std₀ + eps2); the four forms of docs/metrics.md §4."""
    d = len(z)
    if not all(math.isfinite(v) for v in z):
        return math.nan
    mean = sum(z) / d
    std = math.sqrt(sum((v - mean) ** 2 for v in z) / d)          # ddof 0
    zmax = max((v - mean) / (std + eps2) for v in z)
    l1 = sum(abs(v) for v in z)
    l2 = math.sqrt(sum(v * v for v in z))
    if form == "linf_over_l1":
        return zmax / (l1 + eps1)
    if form == "scale_free":             # max ζ · sqrt(d) / (L1/L2), eps1 guarding L1 = 0
        return zmax * math.sqrt(d) * l2 / (l1 + eps1)
    if form == "max_z":
        return zmax
    if form == "l1":
        return 1.0 / (l1 + eps1)
    raise KeyError(form)


def ref_qscore(z: np.ndarray, form: str, **kw: float) -> np.ndarray:
    return np.array([ref_qscore_row(list(map(float, row)), form, **kw) for row in z])


def ref_average_precision(scores: np.ndarray, y: np.ndarray,
                          w: np.ndarray | None = None) -> float:
    """Walk the distinct thresholds from high to low: AP = Σ (R_k − R_{k−1}) · P_k, where at
    threshold t everything with score ≥ t is predicted positive (ties enter together)."""
    w = np.ones_like(scores) if w is None else w
    total_pos = float(np.sum(w * y))
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(scores.tolist()), reverse=True):
        sel = scores >= t
        tp = float(np.sum(w[sel] * y[sel]))
        n_sel = float(np.sum(w[sel]))
        if n_sel == 0:
            continue
        recall = tp / total_pos
        ap += (recall - prev_recall) * (tp / n_sel)
        prev_recall = recall
    return ap


def t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


def relu_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Non-negative, sparse-ish post-ReLU-like rows with varied scale."""
    scale = rng.uniform(0.2, 5.0, size=(n, 1))
    return np.maximum(rng.standard_normal((n, d)) - 0.5, 0.0) * scale


# ----------------------------------------------------------------------------- Q-Score


@pytest.mark.parametrize("form", QSCORE_FORMS)
@pytest.mark.parametrize("shape", [(50, 2), (40, 7), (30, 128)])
def test_qscore_matches_loop_reference(form: str, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    z = relu_rows(rng, *shape)
    z[0] = rng.standard_normal(shape[1])            # a signed row too
    got = qscore(t(z), form).numpy()
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, ref_qscore(z, form), rtol=1e-12, atol=0)


def test_qscore_eps_are_used() -> None:
    rng = np.random.default_rng(1)
    z = relu_rows(rng, 20, 16) * 1e-3                # small L1: eps1 = 1e-2 matters
    for form in ("linf_over_l1", "l1"):
        np.testing.assert_allclose(qscore(t(z), form, eps1=1e-2, eps2=1e-3).numpy(),
                                   ref_qscore(z, form, eps1=1e-2, eps2=1e-3), rtol=1e-12)
        assert not np.allclose(qscore(t(z), form, eps1=1e-2).numpy(),
                               qscore(t(z), form).numpy(), rtol=1e-3)


def test_qscore_float32_input_and_zscores() -> None:
    rng = np.random.default_rng(2)
    z32 = relu_rows(rng, 25, 33).astype(np.float32)
    np.testing.assert_allclose(qscore(t(z32)).numpy(), ref_qscore(z32.astype(np.float64),
                                                                   "linf_over_l1"), rtol=1e-12)
    z64 = z32.astype(np.float64)
    zeta = feature_zscores(t(z64)).numpy()
    ref = (z64 - z64.mean(1, keepdims=True)) / (z64.std(1, keepdims=True) + 1e-8)
    np.testing.assert_allclose(zeta, ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(zeta.mean(1), 0.0, atol=1e-12)


def test_qscore_known_values_and_edge_rows() -> None:
    # one-hot row in d = 4: mean 1/4, std sqrt(3)/4, max ζ = (3/4)/(sqrt 3/4) = sqrt 3; L1 = 1
    z = torch.tensor([[1.0, 0.0, 0.0, 0.0],
                      [2.0, 2.0, 2.0, 2.0],          # constant: ζ = 0 → q = 0
                      [0.0, 0.0, 0.0, 0.0],          # dead row: 0, not NaN
                      [1.0, math.nan, 0.0, 0.0],     # non-finite → NaN
                      [math.inf, 0.0, 0.0, 0.0]], dtype=torch.float64)
    q = qscore(z)
    assert q[0].item() == pytest.approx(math.sqrt(3.0), rel=1e-7)
    assert q[1].item() == 0.0 and q[2].item() == 0.0
    assert math.isnan(q[3].item()) and math.isnan(q[4].item())
    # with eps1 = 0 the scale-free form is exactly max ζ · sqrt(d) / (L1/L2) on nonzero rows
    rng0 = np.random.default_rng(0)
    x0 = relu_rows(rng0, 20, 9) + 0.01
    ratio = np.sqrt(9) / (np.abs(x0).sum(1) / np.linalg.norm(x0, axis=1))
    np.testing.assert_allclose(qscore(t(x0), "scale_free", eps1=0.0).numpy(),
                               qscore(t(x0), "max_z").numpy() * ratio, rtol=1e-12)
    qs = qscore(z, "scale_free")
    assert qs[0].item() == pytest.approx(math.sqrt(3.0) * 2.0, rel=1e-7)   # sqrt(d)·L2/L1 = 2
    assert qs[2].item() == 0.0 and math.isnan(qs[3].item())
    # Q is not scale-invariant; the scale-free form is (pitfall 1)
    rng = np.random.default_rng(3)
    x = t(relu_rows(rng, 10, 32))
    np.testing.assert_allclose(qscore(10 * x).numpy(), qscore(x).numpy() / 10, rtol=1e-6)
    np.testing.assert_allclose(qscore(10 * x, "scale_free").numpy(),
                               qscore(x, "scale_free").numpy(), rtol=1e-6)
    assert qscore(torch.empty(0, 5)).shape == (0,)


def test_qscore_bad_input() -> None:
    with pytest.raises(ValueError, match=r"2-D \(n, d\).*got shape \(5,\)"):
        qscore(torch.randn(5))
    with pytest.raises(ValueError, match="at least 2 features.*d = 1"):
        qscore(torch.randn(5, 1))
    with pytest.raises(TypeError, match="floating-point.*torch.int64"):
        qscore(torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"form must be one of .*got 'linf'"):
        qscore(torch.randn(3, 4), "linf")  # type: ignore[arg-type]


def test_qscore_is_array_api_numpy_equals_torch() -> None:
    """numpy rows give numpy scores (the sidecar's sketched streams), equal to the torch ones to
    round-off (reductions in another order), NaN where torch has NaN; errors alike."""
    rng = np.random.default_rng(7)
    z = relu_rows(rng, 40, 17)
    z[3, 2], z[4] = np.nan, 0.0
    for dtype in (np.float32, np.float64):
        x = z.astype(dtype)
        for form in QSCORE_FORMS:
            got = qscore(x, form)
            assert isinstance(got, np.ndarray) and got.dtype == np.float64 and got.shape == (40,)
            np.testing.assert_allclose(got, qscore(t(x), form).numpy(), rtol=1e-12, atol=0,
                                       equal_nan=True)
        zeta = feature_zscores(x)
        assert isinstance(zeta, np.ndarray) and zeta.dtype == dtype
    assert qscore(np.empty((0, 5))).shape == (0,)
    with pytest.raises(TypeError, match="floating-point.*int64"):
        qscore(np.ones((3, 4), np.int64))
    with pytest.raises(ValueError, match="at least 2 features"):
        qscore(np.ones((3, 1)))
    with pytest.raises(TypeError, match="torch.Tensor or a numpy array.*list"):
        qscore([[1.0, 2.0]])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="torch.Tensor"):
        qscore_regularizer(np.ones((3, 4)))  # type: ignore[arg-type]


def test_per_row_qscore_runs_without_torch() -> None:
    """The implementation (monitor.functional.qscore_window.qscore_rows) imports no torch."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np\n"
            "from monitor.functional.qscore_window import qscore_rows\n"
            "q = qscore_rows(np.array([[0.0, 1.0, 3.0], [np.nan, 1.0, 1.0]]))\n"
            "assert q.shape == (2,) and np.isfinite(q[0]) and np.isnan(q[1]), q\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert proc.returncode == 0, proc.stderr


# ----------------------------------------------------------------------------- regulariser


@pytest.mark.parametrize("form", ["linf_over_l1", "scale_free"])
def test_regularizer_gradient_step_raises_q(form: str) -> None:
    rng = np.random.default_rng(4)
    z0 = t(relu_rows(rng, 64, 48) + 0.05)            # strictly positive (sign(z) defined)
    z = z0.clone().requires_grad_(True)
    loss = qscore_regularizer(z, lambda1=1e-2, lambda2=1e-1, form=form)  # type: ignore[arg-type]
    loss.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    z1 = (z0 - 1.0 * z.grad).detach()               # grad is λ/n per sample: step 1 is small
    before, after = qscore(z0, form).mean().item(), qscore(z1, form).mean().item()
    assert after - before > 1e-4 * before, (before, after)     # ≫ round-off (~1e-15)
    # the value is the documented mean over the batch
    x = z0.numpy()
    l1 = np.abs(x).sum(1)
    sparsity = l1 if form == "linf_over_l1" else l1 / np.linalg.norm(x, axis=1)
    zmax = ((x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + 1e-8)).max(1)
    assert loss.item() == pytest.approx(float(np.mean(1e-2 * sparsity - 1e-1 * zmax)), rel=1e-9)


def test_regularizer_threshold_masks_high_q_samples() -> None:
    rng = np.random.default_rng(5)
    z0 = t(relu_rows(rng, 40, 24) + 0.05)
    q = qscore(z0)
    thr = q.median()
    z = z0.clone().requires_grad_(True)
    qscore_regularizer(z, threshold=thr).backward()
    low = (q < thr).numpy()
    grad_norm = z.grad.norm(dim=1).numpy()
    assert np.all(grad_norm[~low] == 0.0) and np.all(grad_norm[low] > 0.0)
    with pytest.raises(ValueError, match="lambda1 and lambda2 must be >= 0, got -1"):
        qscore_regularizer(z0, lambda1=-1.0)
    with pytest.raises(ValueError, match="form must be 'linf_over_l1' or 'scale_free', got 'l1'"):
        qscore_regularizer(z0, form="l1")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- AUPRC


@pytest.mark.parametrize("seed", range(6))
def test_auprc_matches_sklearn_and_reference(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(5, 400))
    y = (rng.random(n) < rng.uniform(0.05, 0.6)).astype(np.float64)
    y[0] = 1.0
    if seed % 2:
        scores = rng.integers(0, 6, size=n).astype(np.float64)   # heavy ties
    else:
        scores = rng.standard_normal(n) + 0.8 * y
    got = auprc(t(scores), t(y)).item()
    assert got == pytest.approx(average_precision_score(y, scores), rel=1e-12, abs=1e-15)
    assert got == pytest.approx(ref_average_precision(scores, y), rel=1e-12)
    # boolean positives and float32 scores are accepted
    assert auprc(t(scores.astype(np.float32)), t(y.astype(bool))).item() == pytest.approx(got)


def test_auprc_weights_and_nonfinite_scores() -> None:
    rng = np.random.default_rng(7)
    n = 300
    y = (rng.random(n) < 0.2).astype(np.float64)
    scores = np.round(rng.standard_normal(n) + y, 1)                  # some ties
    w = (rng.random(n) < 0.7).astype(np.float64)
    got = auprc(t(scores), t(y), t(w)).item()
    assert got == pytest.approx(average_precision_score(y, scores, sample_weight=w), rel=1e-12)
    keep = w > 0
    assert got == pytest.approx(ref_average_precision(scores[keep], y[keep]), rel=1e-12)
    # NaN scores are excluded (as if their weight were 0)
    s_nan = scores.copy()
    s_nan[~keep] = np.nan
    assert auprc(t(s_nan), t(y)).item() == pytest.approx(got, rel=1e-12)


def test_auprc_known_values_and_edges() -> None:
    one = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert auprc(torch.tensor([4.0, 3.0, 2.0, 1.0]), one).item() == 1.0
    assert auprc(torch.tensor([1.0, 2.0, 3.0, 4.0]), one).item() == 0.25
    assert auprc(torch.ones(4), one).item() == 0.25                 # all tied: base rate
    assert math.isnan(auprc(torch.rand(4), torch.zeros(4)).item())   # no positives
    assert math.isnan(auprc(torch.empty(0), torch.empty(0)).item())
    with pytest.raises(ValueError, match=r"same length, got shapes \(3,\) and \(4,\)"):
        auprc(torch.rand(3), torch.rand(4))
    with pytest.raises(ValueError, match=r"weights: expected shape \(3,\), got \(2,\)"):
        auprc(torch.rand(3), torch.ones(3), torch.ones(2))


# ----------------------------------------------------------------------------- histogram


def test_histogram_counts_match_numpy() -> None:
    rng = np.random.default_rng(8)
    edges = np.logspace(-6, 4, 41)
    v = 10 ** rng.uniform(-7, 5, size=5000)                         # some below/above all edges
    got = histogram_counts(t(v), t(edges)).numpy()
    ref, _ = np.histogram(v, bins=np.concatenate([[-np.inf], edges, [np.inf]]))
    assert got.shape == (42,)
    np.testing.assert_array_equal(got, ref.astype(np.float64))
    np.testing.assert_array_equal(np.cumsum(got)[:-1], [np.sum(v <= e) for e in edges])


def test_histogram_counts_le_boundaries_weights_nonfinite() -> None:
    edges = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    v = torch.tensor([0.0, 1.0, 1.5, 2.0, 4.0, 4.5, math.nan, math.inf, -math.inf],
                     dtype=torch.float64)
    # le buckets: ≤1 → {0, 1}; (1, 2] → {1.5, 2}; (2, 4] → {4}; +Inf → {4.5}; non-finite dropped
    assert histogram_counts(v, edges).tolist() == [2.0, 2.0, 1.0, 1.0]
    w = torch.tensor([1.0, 0.5, 2.0, 0.0, 1.0, 3.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    assert histogram_counts(v, edges, w).tolist() == [1.5, 2.0, 1.0, 3.0]
    with pytest.raises(ValueError, match=r"non-empty 1-D array, got shape \(0,\)"):
        histogram_counts(v, torch.empty(0))


def test_quantile_from_histogram_promql_interpolation() -> None:
    edges = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    counts = torch.tensor([2.0, 2.0, 4.0, 2.0], dtype=torch.float64)   # N = 10
    # rank 5 lies in (2, 4] holding ranks 4..8: 2 + 2·(5−4)/4 = 2.5
    assert quantile_from_histogram(counts, edges, 0.5).item() == pytest.approx(2.5)
    # rank 1 in the first bucket [0, 1] holding 2: 0.5
    assert quantile_from_histogram(counts, edges, 0.1).item() == pytest.approx(0.5)
    # rank 9.5 in +Inf bucket: last finite edge
    assert quantile_from_histogram(counts, edges, 0.95).item() == 4.0
    assert math.isnan(quantile_from_histogram(torch.zeros(4), edges, 0.5).item())
    # against numpy quantiles of fine-bucketed data: within one bucket width
    rng = np.random.default_rng(9)
    v = rng.uniform(0, 10, 20000)
    fine = np.linspace(0.1, 10, 100)
    c = histogram_counts(t(v), t(fine))
    for q in (0.1, 0.5, 0.9):
        assert quantile_from_histogram(c, t(fine), q).item() == pytest.approx(
            np.quantile(v, q), abs=0.1)
    with pytest.raises(ValueError, match=r"expected 4 buckets for 3 edges, got 3"):
        quantile_from_histogram(torch.ones(3), edges, 0.5)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 257])
def test_nan_quantile_matches_numpy(n: int) -> None:
    rng = np.random.default_rng(n)
    v = rng.standard_normal(n + 5)
    v[rng.choice(n + 5, 5, replace=False)] = [np.nan, np.inf, -np.inf, np.nan, np.nan]
    finite = v[np.isfinite(v)]
    assert finite.shape == (n,)
    for q in (0.0, 0.1, 0.25, 0.5, 0.9, 1.0):
        assert nan_quantile(t(v), q).item() == pytest.approx(np.quantile(finite, q), rel=1e-14)
    assert math.isnan(nan_quantile(torch.full((4,), math.nan), 0.5).item())
    assert math.isnan(nan_quantile(torch.empty(0), 0.5).item())
    with pytest.raises(ValueError, match="q must be in \\[0, 1\\], got 2"):
        nan_quantile(t(v), 2)
