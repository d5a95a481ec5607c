"""Tests of ``monitor.functional.spectral`` against slow numpy references and docs/metrics.md.

Three kinds of checks:

1. *Reference*: every metric is recomputed by a slow, obviously-correct numpy function written
   from the formulas of docs/metrics.md §1, §2, §3, §5a (never by calling the torch code) and compared
   in float64 at ~1e-9 relative on several shapes.
2. *Check values* (the check values of docs/metrics.md) on fresh draws, with tolerances sized for sampling
   noise (docs/metrics.md used other draws and, for some rows, larger n and d than a CPU test affords).
3. *Streaming*: statistics summed over row chunks give the same values as the one-shot functions,
   plus edge cases (n = 0, 1, 2, zero rows, bad input).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from monitor import functional as F
from monitor.functional import spectral

pytestmark = pytest.mark.usefixtures("single_thread")

EPS = 1e-7  # RankMe ε (docs/metrics.md §1)


REL = 1e-9  # torch vs numpy reference, float64


# ----------------------------------------------------------------------------- references
# Deliberately naive: full SVD / np.cov / explicit loops, straight from the docs/metrics.md formulas.


def ref_singular_values(z: np.ndarray) -> np.ndarray:
    """Singular values of the uncentred matrix, descending, min(n, d) of them."""
    return np.linalg.svd(z, compute_uv=False)


def ref_rankme(z: np.ndarray, eps: float = EPS) -> float:
    """docs/metrics.md §1: exp(−Σ p log p), p_k = σ_k/‖σ‖₁ + ε over the min(n, d) singular values."""
    s = ref_singular_values(z)
    assert s.shape[0] == min(z.shape)
    p = s / s.sum() + eps
    return math.exp(-float(np.sum(p * np.log(p))))


def ref_erank(z: np.ndarray) -> float:
    """Roy & Vetterli: exp(H(σ/‖σ‖₁)), no ε, 0·log 0 = 0 (zeros skipped)."""
    s = ref_singular_values(z)
    p = s / s.sum()
    h = 0.0
    for pk in p:
        if pk > 0:
            h -= pk * math.log(pk)
    return math.exp(h)


def ref_srank(z: np.ndarray, delta: float = 0.01) -> int:
    """docs/metrics.md §3: min{k : Σ_{i≤k} σ_i / Σ σ_i ≥ 1 − δ}, σ sorted descending."""
    s = np.sort(ref_singular_values(z))[::-1]
    c = np.cumsum(s) / s.sum()
    for k in range(1, len(c) + 1):
        if c[k - 1] >= 1.0 - delta:
            return k
    raise AssertionError("cumulative share never reached 1 - delta")


def ref_pr_naive(z: np.ndarray) -> float:
    """docs/metrics.md §3: (tr C)² / tr(C²) of the centred covariance."""
    c = np.cov(z, rowvar=False)
    return float(np.trace(c) ** 2 / np.trace(c @ c))


def ref_pr_corrected(z: np.ndarray) -> float:
    """docs/metrics.md §3 Wishart correction, as written: m = n − 1, W = m·Ĉ,
    â = (tr W² − (tr W)²/m) / ((m+2)(m−1)), b̂ = ((tr W)² − 2m·â)/m², PR = b̂/â."""
    n = z.shape[0]
    m = n - 1
    w = m * np.cov(z, rowvar=False)
    tr_w = np.trace(w)
    tr_w2 = np.trace(w @ w)
    a_hat = (tr_w2 - tr_w**2 / m) / ((m + 2) * (m - 1))
    b_hat = (tr_w**2 - 2 * m * a_hat) / m**2
    return float(b_hat / a_hat)


def ref_alpha(z: np.ndarray, first_rank: int = 11, last_rank: int = 100) -> float:
    """α-ReQ (docs/metrics.md §2): eigenvalues λ of the centred covariance (np.cov), weighted least squares
    of y = log λ_r on x = −log r with weights 1/r over ranks 11..100 (Stringer & Pachitariu /
    reptrix ``get_powerlaw``, but float64 weights). Ranks beyond n − 1 (λ = 0 up to round-off)
    are left out. α is the slope."""
    n, d = z.shape
    lam = np.linalg.eigvalsh(np.cov(z, rowvar=False))[::-1]
    stop = min(last_rank, d, n - 1)
    ranks = np.arange(first_rank, stop + 1, dtype=np.float64)
    y = np.log(lam[first_rank - 1:stop])
    x = np.stack([-np.log(ranks), np.ones_like(ranks)], axis=1)
    w = (1.0 / ranks)[:, None]
    coef = np.linalg.solve(x.T @ (x * w), (x * w).T @ y)
    return float(coef[0])


def ref_normalize(z: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    return z / np.maximum(norms, 1e-12)  # torch.nn.functional.normalize: zero row stays zero


def ref_l2_std(z: np.ndarray) -> float:
    """lightly ``std_of_l2_normalized``: normalise rows, per-column std (ddof=1), mean."""
    return float(np.std(ref_normalize(z), axis=0, ddof=1).mean())


def ref_mean_cosine_loop(z: np.ndarray) -> float:
    """Mean cosine over ordered pairs i != j, explicit double loop (small n only)."""
    zn = ref_normalize(z)
    n = zn.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            if i != j:
                total += float(zn[i] @ zn[j])
    return total / (n * (n - 1))


def ref_mean_cosine_gram(z: np.ndarray) -> float:
    """Same quantity from the full Gram matrix: (sum of off-diagonal entries) / (n(n−1))."""
    zn = ref_normalize(z)
    g = zn @ zn.T
    n = g.shape[0]
    return float((g.sum() - np.trace(g)) / (n * (n - 1)))


# ----------------------------------------------------------------------------- data


def _rot(rng: np.random.Generator, d: int, k: int) -> np.ndarray:
    """d×k matrix with orthonormal columns (random subspace)."""
    q, _ = np.linalg.qr(rng.standard_normal((d, k)))
    return q


def make_case(name: str) -> np.ndarray:
    rng = np.random.default_rng(sum(map(ord, name)))  # fixed seed per case
    if name == "n<d":
        return rng.standard_normal((60, 150))
    if name == "n=d":
        return rng.standard_normal((150, 150))
    if name == "n>d":
        return rng.standard_normal((400, 64))
    if name == "n>d wide-window":
        return rng.standard_normal((500, 300))
    if name == "anisotropic":
        return rng.standard_normal((300, 200)) * np.arange(1, 201) ** -0.6
    if name == "low-rank":  # rank 7 in R^200
        return rng.standard_normal((300, 7)) @ rng.standard_normal((7, 200))
    if name == "large-mean":
        return rng.standard_normal((300, 120)) + 50.0 * rng.standard_normal(120)
    if name == "relu":  # non-negative, post-ReLU-like, with some all-zero columns
        x = np.maximum(rng.standard_normal((250, 180)) + 0.3, 0.0)
        x[:, :5] = 0.0
        return x
    raise KeyError(name)


CASES = ["n<d", "n=d", "n>d", "n>d wide-window", "anisotropic", "low-rank", "large-mean", "relu"]
# α is a fit of the spectrum tail; for a rank-7 matrix ranks 11–100 are round-off noise.
ALPHA_CASES = [c for c in CASES if c != "low-rank"]


def t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


def close(a, b, rel=REL, abs_=0.0) -> bool:
    return math.isclose(float(a), float(b), rel_tol=rel, abs_tol=abs_)


# ----------------------------------------------------------------------------- 1. reference


@pytest.mark.parametrize("case", CASES)
def test_rankme_erank_srank_match_reference(case):
    z = make_case(case)
    assert close(F.rankme(t(z)), ref_rankme(z))
    assert close(F.effective_rank(t(z)), ref_erank(z))
    assert F.srank(t(z)).item() == ref_srank(z)
    assert F.srank(t(z), delta=0.1).item() == ref_srank(z, 0.1)
    assert close(F.rankme(t(z), eps=1e-5), ref_rankme(z, 1e-5))


@pytest.mark.parametrize("case", CASES)
def test_participation_ratio_matches_reference(case):
    z = make_case(case)
    assert close(F.participation_ratio(t(z), corrected=False), ref_pr_naive(z))
    ref = ref_pr_corrected(z)
    d = z.shape[1]
    if case in ("n<d", "n=d", "n>d", "n>d wide-window", "large-mean"):
        # isotropic (after centring): truth is d, so the unbiased estimate often lands just above d; the torch
        # function documents a clamp to [1, d]
        assert abs(ref - d) < 0.05 * d
        ref = min(max(ref, 1.0), float(d))
    else:
        assert 1.0 < ref < d  # the unclamped formula is exercised here
    assert close(F.participation_ratio(t(z)), ref)


@pytest.mark.parametrize("case", ALPHA_CASES)
def test_spectrum_alpha_matches_reference(case):
    z = make_case(case)
    assert close(F.spectrum_alpha(t(z)), ref_alpha(z))
    # other window (reptrix's older np.arange(5, 100): ranks 6..100)
    assert close(F.spectrum_alpha(t(z), fit_start=5), ref_alpha(z, first_rank=6))


@pytest.mark.parametrize("case", CASES)
def test_collapse_indicators_match_reference(case):
    z = make_case(case)
    assert close(F.l2_normalized_std(t(z)), ref_l2_std(z))
    # mean cosine can be ≈ 0 (centred data): relative + small absolute tolerance
    assert close(F.mean_cosine_similarity(t(z)), ref_mean_cosine_gram(z), abs_=1e-13)
    # raw scale: mean per-dimension variance (ddof 1), numpy's np.var as the reference
    assert close(F.mean_variance(t(z)), np.var(z, axis=0, ddof=1).mean())


def test_mean_variance_sees_a_collapse_to_a_point_that_normalised_signals_miss():
    """Rows shrinking onto one point (near 0) keep the normalised signals healthy-looking: the
    residual noise normalises to random directions. Only the raw variance falls."""
    rng = np.random.default_rng(3)
    healthy = rng.standard_normal((500, 32))
    point = 1e-3 * rng.standard_normal((500, 32))
    assert close(F.mean_variance(t(point)) / F.mean_variance(t(healthy)),
                 np.var(point, axis=0, ddof=1).mean() / np.var(healthy, axis=0, ddof=1).mean())
    assert F.mean_variance(t(point)) / F.mean_variance(t(healthy)) < 1e-5
    assert F.l2_normalized_std(t(point)) * math.sqrt(32) > 0.9      # looks isotropic
    assert abs(float(F.mean_cosine_similarity(t(point)))) < 0.05
    assert math.isnan(float(F.mean_variance(t(healthy[:1]))))       # one row: undefined


def test_mean_cosine_double_loop_and_zero_rows():
    rng = np.random.default_rng(7)
    z = rng.standard_normal((40, 9)) + 0.5
    z[3] = 0.0  # an all-zero row stays zero after normalisation (counts in n, adds 0)
    z[17] = 0.0
    loop = ref_mean_cosine_loop(z)
    assert close(ref_mean_cosine_gram(z), loop, rel=1e-12)
    assert close(F.mean_cosine_similarity(t(z)), loop, abs_=1e-14)
    assert close(F.l2_normalized_std(t(z)), ref_l2_std(z))


def test_srank_threshold_is_inclusive():
    """min{k : share_k ≥ 1 − δ}: a cumulative share exactly at 1 − δ stops there (exact binary
    fractions, so no round-off)."""
    assert F.srank_from_singular_values(torch.tensor([3.0, 1.0], dtype=torch.float64),
                                        delta=0.25).item() == 1
    assert F.srank_from_singular_values(torch.ones(4, dtype=torch.float64), delta=0.5).item() == 2
    z = np.diag([3.0, 1.0])
    assert F.srank(t(z), delta=0.25).item() == ref_srank(z, 0.25) == 1


def test_float32_input_is_promoted_to_float64():
    rng = np.random.default_rng(3)
    z32 = rng.standard_normal((80, 40)).astype(np.float32)
    z64 = z32.astype(np.float64)  # exactly the same values
    for fn in (F.rankme, F.effective_rank, F.participation_ratio, F.l2_normalized_std,
               F.mean_cosine_similarity):
        out = fn(t(z32))
        assert out.dtype == torch.float64
        assert close(out, fn(t(z64)), rel=1e-12)
    assert close(F.rankme(t(z32)), ref_rankme(z64))


def test_top_eigenvalue_share_matches_reference():
    z = make_case("anisotropic")
    s = z.T @ z
    lam = np.linalg.eigvalsh(s)
    want = lam.max() / lam.sum()
    got = F.top_eigenvalue_share_from_eigenvalues(F.eigenvalues_desc(t(s)))
    assert close(got, want)


def test_reference_alpha_is_a_plain_wls():
    """Sanity check of the numpy α reference itself on an exact power law."""
    r = np.arange(1, 201, dtype=np.float64)
    lam = 3.0 * r**-1.37
    got = F.spectrum_alpha_from_eigenvalues(t(lam))
    assert close(got, 1.37, rel=1e-12)


# ----------------------------------------------------------------------------- 2. check values


@pytest.fixture(scope="module")
def iid_1000x1024():
    return np.random.default_rng(0).standard_normal((1000, 1024))


def test_check_rankme_iid_1000x1024(iid_1000x1024):
    """docs/metrics.md §1 table: n=1000, d=1024 → RankMe 814.38, erank 813.87. Over seeds 0–3 this
    draw-to-draw spread is ≈ 0.8, so ± 2 (0.25 %)."""
    z = t(iid_1000x1024)
    assert abs(F.rankme(z).item() - 814.38) < 2.0
    assert abs(F.effective_rank(z).item() - 813.87) < 2.0


def test_check_pr_iid_1000x1024(iid_1000x1024):
    """docs/metrics.md §3: naive PR ≈ 506.2 measured, d/(1+d/n) = 505.9 predicted; the corrected PR
    recovers ≈ d = 1024 (the estimate is clamped at d)."""
    n, d = iid_1000x1024.shape
    naive = F.participation_ratio(t(iid_1000x1024), corrected=False).item()
    assert abs(naive - d / (1 + d / n)) < 0.005 * d / (1 + d / n)
    assert abs(naive - 506.2) < 2.5
    corr = F.participation_ratio(t(iid_1000x1024)).item()
    assert abs(corr - d) < 0.02 * d


def test_check_rank32_embedding():
    """docs/metrics.md §1/§3: rank-32 Gaussian embedding → RankMe ≈ 32.0, srank_0.01 = 32 exactly.

    docs/metrics.md used n=4096, d=2048 (RankMe 32.02, erank 31.91); here n=2048, d=512 for CPU time.
    The 32 factors have equal variance (orthonormal embedding of iid N(0,1) factors), so each
    σ_i is ≈ 1/32 of Σσ; the cumulative share is ≈ 31/32 < 0.99 at k = 31 and 1 at k = 32, hence
    srank = 32. RankMe: the MP spread of σ (aspect 32/2048) lowers it by ≈ 0.06, the ε mass of the
    480 zero σ raises it by ≈ 0.025: ≈ 31.96 measured on seeds 0–3.
    """
    rng = np.random.default_rng(1)
    z = t(rng.standard_normal((2048, 32)) @ _rot(rng, 512, 32).T)
    rm = F.rankme(z).item()
    er = F.effective_rank(z).item()
    assert abs(rm - 32.0) < 0.5
    assert 31.5 < er <= 32.0 + 1e-9  # erank ≤ rank
    assert er < rm  # the ε adds mass
    assert F.srank(z).item() == 32


def _rankme_floor(k: int, eps: float = EPS) -> float:
    """RankMe of a rank-1 matrix exactly: p = (1+ε, ε, …, ε) over K = min(n, d) values."""
    h = -(1 + eps) * math.log(1 + eps) - (k - 1) * eps * math.log(eps)
    return math.exp(h)


def test_check_complete_collapse_rankme_floor():
    """docs/metrics.md §1: identical rows → RankMe = ε floor ≈ exp(−(K−1)·ε·ln ε), erank = 1."""
    rng = np.random.default_rng(2)
    z = np.tile(rng.standard_normal((1, 256)), (512, 1))  # n = 512, d = 256 → K = 256
    floor = _rankme_floor(256)
    assert abs(floor - 1.0004) < 5e-5
    assert abs(math.exp(-255 * EPS * math.log(EPS)) - floor) < 1e-6  # docs/metrics.md's approximation
    assert close(F.rankme(t(z)), floor, rel=1e-9)
    assert close(F.effective_rank(t(z)), 1.0, rel=1e-9)
    assert F.srank(t(z)).item() == 1
    # the docs/metrics.md values for larger K, straight from singular values (1, 0, …, 0)
    for k, want in [(2048, 1.0033), (8192, 1.013)]:
        s = torch.zeros(k, dtype=torch.float64)
        s[0] = 1.0
        got = F.rankme_from_singular_values(s).item()
        assert close(got, _rankme_floor(k), rel=1e-12)
        assert abs(got - want) < 6e-4


def test_check_l2_std_iid_and_collapse():
    """docs/metrics.md §5a: iid Gaussian d=256 → std_l2 = 0.0625 = 1/√d (√d·std ≈ 1); identical rows → 0."""
    d = 256
    rng = np.random.default_rng(4)
    z = t(rng.standard_normal((4096, d)))
    std = F.l2_normalized_std(z).item()
    assert abs(std - 0.0625) < 3e-4
    assert abs(math.sqrt(d) * std - 1.0) < 0.005
    assert abs(F.mean_cosine_similarity(z).item()) < 1e-3
    same = t(np.tile(rng.standard_normal((1, d)), (512, 1)))
    # one-pass (Σẑ, Σẑ²) variance: round-off residue ~1e-9, docs/metrics.md's two-pass numpy gives 8.5e-16
    assert F.l2_normalized_std(same).item() < 1e-7
    assert close(F.mean_cosine_similarity(same), 1.0, rel=1e-12)


def _chi_mean(k: int) -> float:
    """E[sqrt(χ²_k / k)] = √(2/k)·Γ((k+1)/2)/Γ(k/2)."""
    return math.sqrt(2.0 / k) * math.exp(math.lgamma((k + 1) / 2) - math.lgamma(k / 2))


@pytest.mark.parametrize("k,metrics_value", [(1, 0.799), (4, 0.939), (32, 0.992)])
def test_check_l2_std_rank_k(k, metrics_value):
    """docs/metrics.md §5a: √d·std_l2 for an embedding confined to a random rank-k subspace.

    ẑ_i = U g_i/‖g_i‖ (U: d×k orthonormal), so per-channel var_j = ‖U_j‖²/k and
    √d·std_l2 = mean_j √(d‖U_j‖²/k) → E√(χ²_k/k): 0.7979 (k=1), 0.9400 (k=4), 0.9922 (k=32).
    docs/metrics.md (n=8192, d=2048): 0.799, 0.939, 0.992. Here n=2048, d=2048 (d sets the noise of a
    mean over channels: sd ≈ √(1−E²)/√d, 0.013 for k=1); tolerance 4 sd.
    """
    n, d = 2048, 2048
    rng = np.random.default_rng(10 + k)
    z = t(rng.standard_normal((n, k)) @ _rot(rng, d, k).T)  # k=1: a single direction, random sign
    ratio = math.sqrt(d) * F.l2_normalized_std(z).item()
    expected = _chi_mean(k)
    sd = math.sqrt(1.0 - expected**2) / math.sqrt(d)
    assert abs(expected - metrics_value) < 1.5e-3  # docs/metrics.md's numbers agree with the theory
    assert abs(ratio - expected) < 4 * sd + 2e-3


@pytest.mark.parametrize("true_alpha,metrics_value", [(0.5, 0.488), (1.0, 0.997), (2.0, 1.999)])
def test_check_alpha_power_law(true_alpha, metrics_value):
    """docs/metrics.md §2: Gaussian with covariance eigenvalues i^−α recovers α (n=25 600, d=2048:
    0.488 / 0.997 / 1.999). That size takes ~10 s per fit on this CPU, so n=8192, d=512 here;
    over seeds 0–4 this gives 0.484 ± 0.002 / 0.994 ± 0.003 / 2.000 ± 0.003 (slightly more
    downward MP bias at α=0.5 than docs/metrics.md's larger n). Tolerance 0.015 on both the true α and the
    docs/metrics.md value."""
    n, d = 8192, 512
    rng = np.random.default_rng(int(true_alpha * 10))
    lam = np.arange(1, d + 1, dtype=np.float64) ** -true_alpha
    z = t(rng.standard_normal((n, d)) * np.sqrt(lam))
    a = F.spectrum_alpha(z).item()
    assert abs(a - metrics_value) < 0.015
    assert abs(a - true_alpha) < 0.02


def _mp_alpha(n: int, d: int, first_rank: int = 11, last_rank: int = 100) -> float:
    """α fitted (same WLS as ``ref_alpha``) to the Marchenko–Pastur quantiles of an isotropic
    sample covariance with aspect y = d/n: λ_r = F⁻¹(1 − (r − ½)/d)."""
    y = d / n
    lo, hi = (1 - math.sqrt(y)) ** 2, (1 + math.sqrt(y)) ** 2
    x = np.linspace(lo, hi, 200_001)
    dens = np.sqrt(np.clip((hi - x) * (x - lo), 0, None)) / (2 * math.pi * y * x)
    cdf = np.concatenate([[0.0], np.cumsum((dens[1:] + dens[:-1]) / 2 * np.diff(x))])
    cdf /= cdf[-1]
    r = np.arange(first_rank, last_rank + 1, dtype=np.float64)
    lam = np.interp(1 - (r - 0.5) / d, cdf, x)
    xs = np.stack([-np.log(r), np.ones_like(r)], axis=1)
    w = (1.0 / r)[:, None]
    return float(np.linalg.solve(xs.T @ (xs * w), (xs * w).T @ np.log(lam))[0])


def test_check_alpha_isotropic_is_flat():
    """docs/metrics.md §2: isotropic Gaussian → α = 0.031 at n=25 600, d=2048. That value is not
    universal: it is the slope of the Marchenko–Pastur edge over ranks 11–100, which depends on
    d/n and on how far into the spectrum rank 100 is (100/d). The MP-quantile prediction gives
    0.0314 for docs/metrics.md's size (matches) and 0.0756 for n=8192, d=512 used here (seeds 0–4
    measured 0.0749–0.0766)."""
    assert abs(_mp_alpha(25_600, 2048) - 0.031) < 0.002
    n, d = 8192, 512
    z = t(np.random.default_rng(5).standard_normal((n, d)))
    a = F.spectrum_alpha(z).item()
    assert abs(a - _mp_alpha(n, d)) < 0.005


def test_check_corrected_pr_isotropic_small_n():
    """docs/metrics.md §3: isotropic d=512 at n=128 < d: naive PR ≈ d/(1+d/n) = 102.4 (101.6 with the
    n−1 of the centred covariance); the Wishart-corrected PR ≈ d = 512 (seeds 0–5: 494–512)."""
    n, d = 128, 512
    z = t(np.random.default_rng(0).standard_normal((n, d)))
    naive = F.participation_ratio(z, corrected=False).item()
    assert abs(naive - d / (1 + d / n)) < 0.02 * d / (1 + d / n)
    corr = F.participation_ratio(z).item()
    assert abs(corr - d) < 0.05 * d


def test_check_corrected_pr_spike():
    """docs/metrics.md §3 (cf. its rank-64 spike case): a non-isotropic truth, rank-32 spike + unit noise (true PR computed exactly
    from the population covariance); naive is biased low at n=512, corrected is close."""
    rng = np.random.default_rng(6)
    d, n, r = 512, 512, 32
    u = _rot(rng, d, r)
    pop = np.ones(d)  # population eigenvalues: 1 + 4 on the spike, 1 elsewhere
    pop[:r] += 4.0
    true_pr = pop.sum() ** 2 / (pop**2).sum()
    z = rng.standard_normal((n, d)) + 2.0 * rng.standard_normal((n, r)) @ u.T
    naive = F.participation_ratio(t(z), corrected=False).item()
    corr = F.participation_ratio(t(z)).item()
    assert naive < 0.7 * true_pr  # ≈ 196 vs 320
    assert abs(corr - true_pr) < 0.05 * true_pr


# ----------------------------------------------------------------------------- 3. streaming


def _chunk_stats(z: np.ndarray, bounds: list[int]):
    """Sum per-chunk sufficient statistics (S, Σz, n, Σẑ, Σẑ²) over row chunks."""
    d = z.shape[1]
    s = torch.zeros(d, d, dtype=torch.float64)
    zsum = torch.zeros(d, dtype=torch.float64)
    n = torch.zeros((), dtype=torch.float64)
    nsum = torch.zeros(d, dtype=torch.float64)
    nsq = torch.zeros(d, dtype=torch.float64)
    edges = [0, *bounds, z.shape[0]]
    for a, b in zip(edges[:-1], edges[1:]):
        chunk = t(z[a:b])  # may be empty
        cs, cz, cn = F.second_moment(chunk)
        s, zsum, n = s + cs, zsum + cz, n + cn
        x = F.normalize_rows(chunk)
        nsum, nsq = nsum + x.sum(0), nsq + (x * x).sum(0)
    return s, zsum, n, nsum, nsq


STREAM_CASES = ["n<d", "n=d", "n>d", "n>d wide-window", "anisotropic", "large-mean", "relu"]
STREAM_REL = 1e-10


@pytest.mark.parametrize("case", STREAM_CASES)
def test_streaming_sufficient_statistics_equal_one_shot(case):
    z = make_case(case)
    n_rows, d = z.shape
    bounds = [7, 7, n_rows // 3, n_rows // 2 + 1]  # includes an empty chunk
    s, zsum, n, nsum, nsq = _chunk_stats(z, bounds)
    assert n.item() == n_rows
    s_all, zsum_all, _ = F.second_moment(t(z))
    assert (s - s_all).abs().max() <= 1e-12 * s_all.abs().max()

    lam = F.eigenvalues_desc(s)
    sigma = lam.sqrt()
    k = torch.minimum(n, torch.tensor(float(d), dtype=torch.float64))  # device tensor, no sync
    assert close(F.rankme_from_singular_values(sigma, k), F.rankme(t(z)), rel=STREAM_REL)
    if n_rows >= d:  # S has full rank (or exact zero columns): erank needs no mask
        assert close(F.effective_rank_from_singular_values(sigma), F.effective_rank(t(z)),
                     rel=STREAM_REL)
    assert F.srank_from_singular_values(sigma).item() == F.srank(t(z)).item()
    assert close(F.mean_variance_from_moments(s, zsum, n), np.var(z, axis=0, ddof=1).mean(),
                 rel=STREAM_REL)
    for corrected in (False, True):
        assert close(F.participation_ratio_from_moments(s, zsum, n, corrected),
                     F.participation_ratio(t(z), corrected), rel=STREAM_REL)
    scatter = s - torch.outer(zsum, zsum) / n
    assert close(F.spectrum_alpha_from_eigenvalues(F.eigenvalues_desc(scatter), n - 1.0),
                 F.spectrum_alpha(t(z)), rel=1e-8)
    assert close(F.l2_normalized_std_from_sums(nsum, nsq, n), F.l2_normalized_std(t(z)),
                 rel=STREAM_REL)
    assert close(F.mean_cosine_similarity_from_sums(nsum, nsq, n),
                 F.mean_cosine_similarity(t(z)), rel=STREAM_REL, abs_=1e-14)


def test_streaming_rank_deficient_is_limited_by_sqrt_of_roundoff():
    """σ = √λ(S) turns the round-off of the zero eigenvalues of S (~1e-16·λ₁) into σ ~ 1e-8·σ₁.

    * Rank-7 Z (300 × 200): inside the first min(n, d) values those are counted, so streaming
      RankMe differs from the SVD one by ~1e-6 relative (measured 1.2e-6), not 1e-10. Inherent
      to the S accumulator of docs/metrics.md §1 "Streaming"; the values still agree for monitoring.
    * n < d (60 × 150): RankMe masks ranks > n (exact), but ``effective_rank_from_singular_values``
      takes no ``k``, so the d − n round-off σ enter its entropy (measured 2.3e-7 relative).
    """
    z = make_case("low-rank")
    s, _, n, _, _ = _chunk_stats(z, [50, 120])
    sigma = F.eigenvalues_desc(s).sqrt()
    assert close(F.rankme_from_singular_values(sigma, min(z.shape)), F.rankme(t(z)), rel=1e-4)
    assert F.srank_from_singular_values(sigma).item() == F.srank(t(z)).item()
    z = make_case("n<d")
    s, _, n, _, _ = _chunk_stats(z, [20])
    sigma = F.eigenvalues_desc(s).sqrt()
    assert close(F.rankme_from_singular_values(sigma, n), F.rankme(t(z)), rel=STREAM_REL)
    assert close(F.effective_rank_from_singular_values(sigma), F.effective_rank(t(z)), rel=1e-5)


def test_rankme_from_singular_values_mask_equals_truncation():
    """k masks the tail: same as passing only the first k values (k as int, float or tensor)."""
    rng = np.random.default_rng(8)
    s = torch.from_numpy(np.sort(rng.random(50))[::-1].copy())
    want = F.rankme_from_singular_values(s[:20])
    for k in (20, 20.0, torch.tensor(20.0, dtype=torch.float64)):
        assert close(F.rankme_from_singular_values(s, k), want, rel=1e-14)
    assert close(F.rankme_from_singular_values(s, 500), F.rankme_from_singular_values(s), rel=1e-14)
    # scale invariance (S or S/n give the same value)
    assert close(F.rankme_from_singular_values(3.7 * s), F.rankme_from_singular_values(s),
                 rel=1e-12)


# ----------------------------------------------------------------------------- 4. edge cases

ONE_SHOT = [F.rankme, F.effective_rank, F.srank, F.participation_ratio, F.spectrum_alpha,
            F.l2_normalized_std, F.mean_cosine_similarity]


@pytest.mark.parametrize("fn", ONE_SHOT, ids=lambda f: f.__name__)
def test_empty_input_gives_nan_not_exception(fn):
    out = fn(torch.empty(0, 16, dtype=torch.float64))
    assert out.dim() == 0 and math.isnan(out.item())


@pytest.mark.parametrize("fn", [F.participation_ratio, F.spectrum_alpha, F.l2_normalized_std,
                                F.mean_cosine_similarity], ids=lambda f: f.__name__)
def test_single_row_gives_nan(fn):
    out = fn(torch.randn(1, 16, dtype=torch.float64))
    assert math.isnan(out.item())


def test_single_row_rank_metrics():
    """One row: rank 1. RankMe = exp(−(1+ε)ln(1+ε)) (K = 1), erank = srank = 1."""
    z = torch.randn(1, 16, dtype=torch.float64)
    assert close(F.rankme(z), _rankme_floor(1), rel=1e-12)
    assert close(F.effective_rank(z), 1.0, rel=1e-12)
    assert F.srank(z).item() == 1


def test_two_rows_pr():
    """PR needs n ≥ 2 (naive; two centred rows span one direction → PR = 1) and n ≥ 3 (corrected)."""
    z = torch.randn(2, 16, dtype=torch.float64)
    assert close(F.participation_ratio(z, corrected=False), 1.0, rel=1e-12)
    assert math.isnan(F.participation_ratio(z).item())
    assert math.isfinite(F.participation_ratio(torch.randn(3, 16, dtype=torch.float64)).item())


def test_zero_rows():
    z = torch.zeros(10, 8, dtype=torch.float64)
    for fn in (F.rankme, F.effective_rank, F.srank, F.participation_ratio, F.spectrum_alpha):
        assert math.isnan(fn(z).item()), fn.__name__
    # zero rows stay zero after normalisation (lightly / F.normalize convention)
    assert F.l2_normalized_std(z).item() == 0.0
    assert F.mean_cosine_similarity(z).item() == 0.0


def test_from_statistics_empty_window_is_nan():
    d = 6
    zero_s = torch.zeros(d, d, dtype=torch.float64)
    zero_v = torch.zeros(d, dtype=torch.float64)
    n0 = torch.zeros((), dtype=torch.float64)
    assert math.isnan(F.rankme_from_singular_values(torch.zeros(0, dtype=torch.float64)).item())
    assert math.isnan(F.rankme_from_singular_values(zero_v).item())
    assert math.isnan(F.effective_rank_from_singular_values(zero_v).item())
    assert math.isnan(F.srank_from_singular_values(zero_v).item())
    assert math.isnan(F.top_eigenvalue_share_from_eigenvalues(zero_v).item())
    for corrected in (False, True):
        assert math.isnan(F.participation_ratio_from_moments(zero_s, zero_v, n0, corrected).item())
    assert math.isnan(F.l2_normalized_std_from_sums(zero_v, zero_v, n0).item())
    assert math.isnan(F.mean_cosine_similarity_from_sums(zero_v, zero_v, n0).item())
    assert math.isnan(F.spectrum_alpha_from_eigenvalues(zero_v).item())


def test_alpha_too_few_ranks_is_nan():
    rng = np.random.default_rng(9)
    assert math.isnan(F.spectrum_alpha(t(rng.standard_normal((500, 8)))).item())  # d < 11
    assert math.isnan(F.spectrum_alpha(t(rng.standard_normal((14, 64)))).item())  # n−1 = 13: 3 ranks
    assert math.isfinite(F.spectrum_alpha(t(rng.standard_normal((16, 64)))).item())  # 5 ranks
    with pytest.raises(ValueError, match="fit_start"):
        F.spectrum_alpha(t(rng.standard_normal((50, 20))), fit_start=10, fit_stop=10)


@pytest.mark.parametrize("fn", ONE_SHOT + [F.second_moment], ids=lambda f: f.__name__)
def test_bad_input_raises(fn):
    with pytest.raises(ValueError, match="2-D"):
        fn(torch.randn(16, dtype=torch.float64))
    with pytest.raises(ValueError, match="2-D"):
        fn(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="floating"):
        fn(torch.ones(8, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="floating"):
        fn(torch.ones(8, 4, dtype=torch.bool))


@pytest.mark.parametrize("delta", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_srank_delta_outside_unit_interval_raises(delta):
    z = torch.randn(8, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="delta"):
        F.srank(z, delta=delta)
    with pytest.raises(ValueError, match="delta"):
        F.srank_from_singular_values(torch.ones(4, dtype=torch.float64), delta=delta)


def test_public_api_is_the_module():
    assert F.rankme is spectral.rankme
    assert F.RANKME_EPS == spectral.RANKME_EPS == EPS
