"""Tests of ``monitor.functional.weights`` against numpy references (matrix_rank, svd, a
global-threshold pruning reference written with numpy's stable argsort)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from monitor.functional import weights as W


def with_spectrum(m: int, n: int, sigma: list[float], seed: int) -> np.ndarray:
    """An m×n matrix with the given singular values (random orthogonal factors)."""
    rng = np.random.default_rng(seed)
    k = len(sigma)
    u, _ = np.linalg.qr(rng.normal(size=(m, k)))
    v, _ = np.linalg.qr(rng.normal(size=(n, k)))
    return (u * np.asarray(sigma)) @ v.T


def ref_rank(w: np.ndarray, eps: float = 1e-3) -> int:
    """Galanti et al.: matrix_rank(W/‖W‖_F, tol=ε) on the (out, rest) matrix."""
    m = w.reshape(w.shape[0], -1).astype(np.float64)
    return int(np.linalg.matrix_rank(m / np.linalg.norm(m), tol=eps))


def ref_stable_rank(w: np.ndarray) -> float:
    s = np.linalg.svd(w.reshape(w.shape[0], -1).astype(np.float64), compute_uv=False)
    return float((s**2).sum() / s[0] ** 2)


def ref_masks(weights: list[np.ndarray], s: float) -> list[np.ndarray]:
    """Global magnitude pruning: sort all |w| descending (stable: earlier position first among
    ties), keep the first n − round(s·n); non-finite weights count as the smallest."""
    flat = np.concatenate([w.reshape(-1) for w in weights]).astype(np.float64)
    mag = np.where(np.isfinite(flat), np.abs(flat), -1.0)
    order = np.argsort(-mag, kind="stable")
    keep = np.zeros(flat.size, dtype=bool)
    keep[order[: flat.size - int(round(s * flat.size))]] = True
    out, start = [], 0
    for w in weights:
        out.append(keep[start:start + w.size].reshape(w.shape))
        start += w.size
    return out


# ----------------------------------------------------------------------------- rank


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weight_rank_matches_matrix_rank_with_known_spectrum(dtype: torch.dtype) -> None:
    # σ/‖σ‖ straddle ε = 1e-3: 5 values clearly above, 3 clearly below.
    sigma = [10.0, 5.0, 2.0, 1.0, 0.1, 1e-3, 1e-4, 1e-6]
    w = with_spectrum(40, 30, sigma, seed=0)
    fro = math.sqrt(sum(x * x for x in sigma))
    expected = sum(x / fro > 1e-3 for x in sigma)
    assert expected == 5 and ref_rank(w) == expected
    got = W.weight_rank(torch.from_numpy(w).to(dtype))
    assert got.dtype == dtype and float(got) == expected
    assert float(W.weight_rank(torch.from_numpy(w), eps=1e-5)) == ref_rank(w, 1e-5) == 6
    # threshold is on σ/‖W‖_F, not σ/σ_max: 100 unit σ (‖W‖_F = 10) and σ = 5e-3 → rank 100
    flat = with_spectrum(120, 110, [1.0] * 100 + [5e-3], seed=1)
    assert ref_rank(flat) == 100
    assert float(W.weight_rank(torch.from_numpy(flat).to(dtype))) == 100.0


def test_weight_rank_and_stable_rank_of_random_and_conv_weights() -> None:
    rng = np.random.default_rng(1)
    for shape in [(20, 50), (64, 8), (16, 3, 3, 3), (8, 4, 5, 1)]:
        w = rng.normal(size=shape) * rng.uniform(0.1, 2.0, size=(shape[0],) + (1,) * (len(shape) - 1))
        t = torch.from_numpy(w)
        assert float(W.weight_rank(t)) == ref_rank(w)
        assert float(W.stable_rank(t)) == pytest.approx(ref_stable_rank(w), rel=1e-10)
    low = with_spectrum(30, 30, [3.0, 1.0], seed=2)           # rank 2
    assert float(W.weight_rank(torch.from_numpy(low))) == 2.0
    assert float(W.stable_rank(torch.from_numpy(low))) == pytest.approx(1.0 + 1.0 / 9.0, rel=1e-10)


def test_rank_edge_cases_and_bad_input() -> None:
    zero = torch.zeros(5, 4)
    assert float(W.weight_rank(zero)) == 0.0
    assert math.isnan(float(W.stable_rank(zero)))
    assert float(W.weight_rank(torch.ones(1, 7))) == 1.0
    with pytest.raises(ValueError, match=r"at least 2 dimensions, got shape \(7,\)"):
        W.weight_rank(torch.ones(7))
    with pytest.raises(TypeError, match="floating-point weight, got torch.int64"):
        W.stable_rank(torch.ones(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="eps must be > 0"):
        W.weight_rank(torch.ones(3, 3), eps=0.0)
    # half precision is upcast to float32 for the SVD
    assert float(W.weight_rank(torch.eye(4).half())) == 4.0


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 0.8, 0.9, 0.99])
def test_global_masks_match_numpy_reference(s: float) -> None:
    rng = np.random.default_rng(3)
    ws = [rng.normal(size=(6, 5)), rng.normal(size=(4, 3, 2, 2)) * 0.3, rng.normal(size=(7, 9)) * 2]
    got = W.global_magnitude_masks([torch.from_numpy(w) for w in ws], [s])[s]
    ref = ref_masks(ws, s)
    for g, r, w in zip(got, ref, ws):
        assert g.dtype == torch.bool and tuple(g.shape) == w.shape
        np.testing.assert_array_equal(g.numpy(), r)
    n = sum(w.size for w in ws)
    assert sum(int(g.sum()) for g in got) == n - int(round(s * n))
    # one global threshold: every kept magnitude ≥ every pruned magnitude
    flat_w = np.concatenate([w.reshape(-1) for w in ws])
    flat_m = np.concatenate([g.numpy().reshape(-1) for g in got])
    if 0 < flat_m.sum() < n:
        assert np.abs(flat_w[flat_m]).min() >= np.abs(flat_w[~flat_m]).max()


def test_global_masks_break_ties_deterministically_and_prune_nonfinite_first() -> None:
    rng = np.random.default_rng(4)
    ws = [rng.integers(-2, 3, size=(5, 6)).astype(np.float32),
          rng.integers(-2, 3, size=(3, 4)).astype(np.float32)]
    ws[0][0, 0] = np.nan
    ws[1][2, 3] = np.inf
    for s in (0.25, 0.5, 0.75):
        got = W.global_magnitude_masks([torch.from_numpy(w) for w in ws], [s, 0.1])
        again = W.global_magnitude_masks([torch.from_numpy(w) for w in ws], [s])
        for g, a, r in zip(got[s], again[s], ref_masks(ws, s)):
            np.testing.assert_array_equal(g.numpy(), r)
            assert torch.equal(g, a)
        assert not bool(got[s][0][0, 0]) and not bool(got[s][1][2, 3])


def test_mask_distance_matches_reference_and_rejects_bad_input() -> None:
    rng = np.random.default_rng(5)
    a = [rng.random((4, 5)) < 0.5, rng.random((3,)) < 0.3]
    b = [rng.random((4, 5)) < 0.5, rng.random((3,)) < 0.3]
    ref = (np.sum(a[0] != b[0]) + np.sum(a[1] != b[1])) / 23
    got = W.mask_distance([torch.from_numpy(x) for x in a], [torch.from_numpy(x) for x in b])
    assert float(got) == pytest.approx(ref, abs=1e-15)
    assert float(W.mask_distance([torch.from_numpy(a[0])], [torch.from_numpy(a[0])])) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        W.mask_distance([torch.zeros(2, 2, dtype=torch.bool)], [torch.zeros(4, dtype=torch.bool)])
    with pytest.raises(ValueError, match="equally long"):
        W.mask_distance([torch.zeros(2, dtype=torch.bool)], [])
    with pytest.raises(ValueError, match=r"sparsities must lie in \[0, 1\), got \[1.0\]"):
        W.global_magnitude_masks([torch.ones(3, 3)], [1.0])
    with pytest.raises(ValueError, match="at least one weight"):
        W.global_magnitude_masks([], [0.5])
