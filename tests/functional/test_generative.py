"""Tests of ``monitor.functional.generative`` against slow numpy references (docs/metrics.md §9).

The references loop over pairs with explicit differences ``‖xᵢ − xⱼ‖`` (no Gram matrix), so
they share no code or trick with the torch implementation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from monitor.functional import generative as G

REL = 1e-9


def ref_dist(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            out[i, j] = math.sqrt(sum((a - b) ** 2 for a, b in zip(x[i], x[j])))
    return out


def ref_mean_pairwise(x: np.ndarray) -> float:
    d = ref_dist(x)
    n = x.shape[0]
    return sum(d[i, j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))


def ref_nn(x: np.ndarray) -> np.ndarray:
    d = ref_dist(x)
    n = x.shape[0]
    return np.array([min(d[i, j] for j in range(n) if j != i) for i in range(n)])


def ref_coverage(x: np.ndarray, modes: np.ndarray, sigma: float, min_count: int) -> tuple[int, float]:
    counts = [0] * len(modes)
    good = 0
    for p in x:
        dists = [math.dist(p, m) for m in modes]
        k = int(np.argmin(dists))
        if dists[k] <= 3 * sigma:
            counts[k] += 1
            good += 1
    return sum(c >= min_count for c in counts), good / len(x)


@pytest.mark.parametrize("shape", [(2, 1), (7, 3), (40, 5), (60, 2)])
def test_distances_match_numpy(shape: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=gen, dtype=torch.float64) * 3 + 1
    xn = x.numpy()
    np.testing.assert_allclose(G.pairwise_distances(x).numpy(), ref_dist(xn), rtol=1e-9, atol=1e-12)
    assert float(G.mean_pairwise_distance(x)) == pytest.approx(ref_mean_pairwise(xn), rel=REL)
    np.testing.assert_allclose(G.nearest_neighbour_distances(x).numpy(), ref_nn(xn), rtol=1e-9)


def test_far_from_origin_rows_keep_precision() -> None:
    """Rows offset by 1e6 with spread 1e-3: a raw Gram would lose everything; centring keeps it."""
    gen = torch.Generator().manual_seed(3)
    small = torch.randn(30, 4, generator=gen, dtype=torch.float64) * 1e-3
    x = small + 1e6
    np.testing.assert_allclose(G.nearest_neighbour_distances(x).numpy(), ref_nn(small.numpy()),
                               rtol=1e-6)


def test_ring_check_value() -> None:
    """8 points on a circle of radius 2: mean distance over distinct pairs is (1/7)Σ 4 sin(πk/8)."""
    angle = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    ring = torch.stack([2 * torch.cos(angle), 2 * torch.sin(angle)], 1)
    expected = sum(4 * math.sin(math.pi * k / 8) for k in range(1, 8)) / 7
    assert float(G.mean_pairwise_distance(ring)) == pytest.approx(expected, rel=1e-12)
    assert float(G.diversity_ratio(ring, ring)) == pytest.approx(1.0, rel=1e-12)
    assert float(G.diversity_ratio(0.25 * ring, ring)) == pytest.approx(0.25, rel=1e-12)


def test_valid_mask_equals_dropping_rows() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(25, 3, generator=gen, dtype=torch.float64)
    valid = torch.ones(25, dtype=torch.float64)
    valid[[0, 7, 24]] = 0
    x_masked = x.clone()
    x_masked[[0, 7, 24]] = 1e9                     # garbage in invalid slots must not matter
    kept = x[valid > 0]
    assert float(G.mean_pairwise_distance(x_masked, valid)) == pytest.approx(
        ref_mean_pairwise(kept.numpy()), rel=REL)
    nn = G.nearest_neighbour_distances(x_masked, valid)[valid > 0]
    np.testing.assert_allclose(nn.numpy(), ref_nn(kept.numpy()), rtol=1e-9)
    eps = 0.3
    expected = float((ref_nn(kept.numpy()) < eps).mean())
    assert float(G.duplicate_rate(x_masked, eps, valid)) == pytest.approx(expected, abs=1e-12)


def test_duplicate_threshold_and_rate_match_numpy() -> None:
    gen = torch.Generator().manual_seed(5)
    real = torch.randn(80, 2, generator=gen, dtype=torch.float64)
    fake = torch.randn(80, 2, generator=gen, dtype=torch.float64) * 0.3
    eps = G.duplicate_threshold(real, 0.1)
    nn_real = ref_nn(real.numpy())
    assert float(eps) == pytest.approx(float(np.quantile(nn_real, 0.1)), rel=REL)
    assert float(G.duplicate_rate(real, eps)) == pytest.approx(float((nn_real < float(eps)).mean()))
    nn_fake = ref_nn(fake.numpy())
    assert float(G.duplicate_rate(fake, eps)) == pytest.approx(float((nn_fake < float(eps)).mean()))
    # the real rate is ≈ the quantile by construction (here 8 of 80 rows, ±1 for the interpolation)
    assert abs(float(G.duplicate_rate(real, eps)) - 0.1) <= 1.5 / 80


def test_exact_duplicates_are_all_flagged() -> None:
    gen = torch.Generator().manual_seed(6)
    base = torch.randn(10, 5, generator=gen)
    fake = base.repeat(4, 1)                                   # every row has 3 exact copies
    real = torch.randn(40, 5, generator=gen)
    assert float(G.duplicate_rate(fake, G.duplicate_threshold(real))) == 1.0


def test_mode_coverage_matches_loop_reference() -> None:
    gen = torch.Generator().manual_seed(7)
    modes = torch.tensor([[2.0, 0.0], [0.0, 2.0], [-2.0, 0.0], [0.0, -2.0]], dtype=torch.float64)
    # 150 samples on mode 0, 8 on mode 1 (below min_count 10), 30 far off every mode
    x = torch.cat([modes[0] + 0.05 * torch.randn(150, 2, generator=gen, dtype=torch.float64),
                   modes[1] + 0.05 * torch.randn(8, 2, generator=gen, dtype=torch.float64),
                   torch.full((30, 2), 0.7, dtype=torch.float64)])
    covered, quality = G.mode_coverage(x, modes, sigma=0.05, min_count=10)
    ref_c, ref_q = ref_coverage(x.numpy(), modes.numpy(), 0.05, 10)
    assert int(covered) == ref_c
    assert float(quality) == pytest.approx(ref_q, rel=1e-12)
    assert 1 <= ref_c <= 2 and 0.6 < ref_q < 0.85             # the construction did what it says
    assert int(G.mode_coverage(x, modes, sigma=0.05, min_count=1)[0]) == 2


def test_small_inputs_give_nan() -> None:
    one = torch.zeros(1, 3)
    assert math.isnan(float(G.mean_pairwise_distance(one)))
    assert math.isnan(float(G.duplicate_rate(one, 0.1)))
    assert math.isinf(float(G.nearest_neighbour_distances(one)[0]))
    # identical real rows: the ratio has a zero denominator → inf, never a silent finite number
    spread = torch.arange(15, dtype=torch.float64).reshape(5, 3)
    assert math.isinf(float(G.diversity_ratio(spread, torch.ones(5, 3))))


def test_effective_rank_ratio() -> None:
    assert float(G.effective_rank_ratio(3.0, 12.0)) == pytest.approx(0.25)
    assert math.isnan(float(G.effective_rank_ratio(3.0, 0.0)))


def test_bad_input_is_rejected_with_clear_messages() -> None:
    with pytest.raises(ValueError, match=r"2-D \(n, d\).*got shape \(5,\)"):
        G.mean_pairwise_distance(torch.zeros(5))
    with pytest.raises(TypeError, match="floating-point.*int64"):
        G.nearest_neighbour_distances(torch.zeros(4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="same dimension, got 3 and 2"):
        G.diversity_ratio(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"quantile must be in \(0, 1\), got 1.5"):
        G.duplicate_threshold(torch.randn(5, 2), 1.5)
    with pytest.raises(ValueError, match=r"valid: expected shape \(4,\), got \(3,\)"):
        G.mean_pairwise_distance(torch.zeros(4, 2), torch.ones(3))
    with pytest.raises(ValueError, match="sigma must be > 0"):
        G.mode_coverage(torch.zeros(4, 2), torch.zeros(2, 2), sigma=0.0)
    with pytest.raises(ValueError, match="min_count must be >= 1"):
        G.mode_coverage(torch.zeros(4, 2), torch.zeros(2, 2), sigma=0.1, min_count=0)
    with pytest.raises(TypeError, match="expected a torch.Tensor, got list"):
        G.mean_pairwise_distance([[0.0, 1.0]])  # type: ignore[arg-type]
