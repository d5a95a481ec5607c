"""Tests of ``monitor.functional.plasticity`` against slow numpy references and hand values.

The references below are written from docs/metrics.md §7b/§7c (Sokar et al. 2023 τ-dormant score,
Dohare et al. 2024 active rate) with explicit per-unit loops over the unit axis of each layout,
never by calling the torch code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from monitor.functional import plasticity as P

# ----------------------------------------------------------------------------- references


def ref_unit_entries(h: np.ndarray) -> list[np.ndarray]:
    """All (sample, position) values of each unit: unit = last axis (2-D/3-D), axis 1 (conv)."""
    if h.ndim in (2, 3):
        return [h[..., i].ravel() for i in range(h.shape[-1])]
    return [h[:, c].ravel() for c in range(h.shape[1])]


def ref_scores(h: np.ndarray) -> np.ndarray:
    """s_i = mean|h_i| / (mean_k mean|h_k| + 1e-9)."""
    a = np.array([np.mean(np.abs(e)) for e in ref_unit_entries(h)], dtype=np.float64)
    return a / (a.mean() + 1e-9)


def ref_dormant_fraction(h: np.ndarray, tau: float) -> float:
    s = ref_scores(h)
    return sum(1 for v in s if v <= tau) / len(s)


def ref_active_rate(h: np.ndarray) -> np.ndarray:
    return np.array([np.count_nonzero(e) / e.size for e in ref_unit_entries(h)])


def ref_low_activity(h: np.ndarray, rate: float) -> float:
    r = ref_active_rate(h)
    return sum(1 for v in r if v < rate) / len(r)


def ref_pooled_rows(h: np.ndarray) -> np.ndarray:
    if h.ndim == 2:
        return h
    if h.ndim == 3:
        b, t, u = h.shape
        return np.array([h[i, j] for i in range(b) for j in range(t)])
    out = np.zeros(h.shape[:2])
    for i in range(h.shape[0]):
        for c in range(h.shape[1]):
            out[i, c] = h[i, c].mean()
    return out


def _relu_like(shape: tuple[int, ...], seed: int, dead: tuple[int, ...] = (), unit_axis: int = -1
               ) -> torch.Tensor:
    """ReLU activations with a spread of unit scales; units in ``dead`` exactly zero."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.relu(torch.randn(shape, generator=gen, dtype=torch.float64) + 0.3)
    n_units = shape[unit_axis]
    view = [1] * len(shape)
    view[unit_axis] = n_units
    scale = torch.logspace(-3, 1, n_units, dtype=torch.float64).view(view)
    h = h * scale
    for u in dead:
        h.select(unit_axis, u).zero_()
    return h


LAYOUTS = [((64, 12), -1), ((8, 9, 12), -1), ((6, 12, 5, 4), 1), ((3, 12, 2, 3, 4), 1)]


# ----------------------------------------------------------------------------- reference tests


@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_scores_and_fractions_match_numpy(shape: tuple[int, ...], axis: int) -> None:
    h = _relu_like(shape, seed=len(shape), dead=(0, 5), unit_axis=axis)
    hn = h.numpy()
    np.testing.assert_allclose(P.dormant_scores(h).numpy(), ref_scores(hn), rtol=1e-12)
    for tau in (0.0, 0.025, 0.1, 0.5):
        assert float(P.dormant_fraction(h, tau)) == pytest.approx(ref_dormant_fraction(hn, tau))
    np.testing.assert_allclose(P.active_rate(h).numpy(), ref_active_rate(hn), rtol=1e-12)
    for rate in (0.01, 0.5, 1.0):
        assert float(P.low_activity_fraction(h, rate)) == pytest.approx(ref_low_activity(hn, rate))
    assert P.num_units(h) == 12
    assert P.unit_axis_pool(h).shape == (h.numel() // 12, 12)


@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_pooled_unit_rows_match_numpy(shape: tuple[int, ...], axis: int) -> None:
    h = _relu_like(shape, seed=7, unit_axis=axis)
    np.testing.assert_allclose(P.pooled_unit_rows(h).numpy(), ref_pooled_rows(h.numpy()),
                               rtol=1e-12, atol=1e-15)


def test_conv_score_equals_channels_last_reference() -> None:
    """dopamine (JAX, NHWC) averages over every axis but the last: NCHW here gives the same."""
    h = _relu_like((5, 7, 4, 4), seed=3, dead=(2,), unit_axis=1)
    nhwc = h.permute(0, 2, 3, 1).numpy()
    a = np.abs(nhwc).mean(axis=(0, 1, 2))
    np.testing.assert_allclose(P.dormant_scores(h).numpy(), a / (a.mean() + 1e-9), rtol=1e-12)


# ----------------------------------------------------------------------------- hand values


def test_hand_values() -> None:
    h = torch.tensor([[0.0, 1.0, 0.0, 3.0],
                      [0.0, 3.0, 0.2, 1.0]])
    # E|h| = [0, 2, 0.1, 2], mean 1.025 → s = [0, 1.951…, 0.0975…, 1.951…]
    s = P.dormant_scores(h)
    assert s[0].item() == 0.0
    assert s[2].item() == pytest.approx(0.1 / (1.025 + 1e-9), rel=1e-7)
    assert float(P.dormant_fraction(h, 0.0)) == 0.25      # s ≤ τ: the dead unit counts at τ = 0
    assert float(P.dormant_fraction(h, 0.025)) == 0.25
    assert float(P.dormant_fraction(h, 0.1)) == 0.5
    assert P.active_rate(h).tolist() == [0.0, 1.0, 0.5, 1.0]
    assert float(P.low_activity_fraction(h, 0.01)) == 0.25
    assert float(P.low_activity_fraction(h, 0.6)) == 0.5


def test_uniformly_small_layer_is_not_dormant_but_all_zero_layer_is() -> None:
    """The score is relative to the layer mean (docs/metrics.md §7b pitfall)."""
    tiny = torch.full((10, 4), 1e-6)
    assert float(P.dormant_fraction(tiny, 0.1)) == 0.0
    assert float(P.dormant_fraction(torch.zeros(10, 4), 0.0)) == 1.0


def test_negative_activations_count_by_magnitude() -> None:
    """|h| is scored (tanh/GELU units can be negative); nonzero counts sign-blind."""
    h = torch.tensor([[-2.0, 0.0], [-2.0, 0.0]])
    assert P.dormant_scores(h).tolist()[0] == pytest.approx(2.0 / (1.0 + 1e-9))
    assert P.active_rate(h).tolist() == [1.0, 0.0]


def test_weight_stats_and_update_ratio_match_numpy() -> None:
    gen = torch.Generator().manual_seed(0)
    w1 = torch.randn(5, 3, generator=gen)
    w2 = torch.randn(4, generator=gen)
    d1 = 0.01 * torch.randn(5, 3, generator=gen)
    d2 = 0.01 * torch.randn(4, generator=gen)
    flat = np.concatenate([w1.numpy().ravel(), w2.numpy().ravel()]).astype(np.float64)
    stats = P.weight_stats([w1, w2])
    assert float(stats["weight_norm"]) == pytest.approx(math.sqrt(float((flat ** 2).sum())), rel=1e-12)
    assert float(stats["weight_abs_mean"]) == pytest.approx(float(np.abs(flat).mean()), rel=1e-12)
    one = P.weight_stats(w1)
    assert float(one["weight_norm"]) == pytest.approx(float(np.linalg.norm(w1.numpy().astype(np.float64))), rel=1e-12)
    now = [w1 + d1, w2 + d2]
    dn = np.concatenate([d1.numpy().ravel(), d2.numpy().ravel()]).astype(np.float64)
    # (w+d) − w in float32 is not exactly d: compare to the float64 difference of the stored values
    diff = np.concatenate([(w1 + d1).numpy().ravel().astype(np.float64) - w1.numpy().ravel(),
                           (w2 + d2).numpy().ravel().astype(np.float64) - w2.numpy().ravel()])
    expected = np.sqrt((diff ** 2).sum()) / np.sqrt((flat ** 2).sum())
    assert float(P.update_to_weight_ratio(now, [w1, w2])) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(np.sqrt((dn ** 2).sum()) / np.sqrt((flat ** 2).sum()), rel=1e-4)
    assert math.isnan(float(P.update_to_weight_ratio(torch.ones(3), torch.zeros(3))))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [torch.zeros(5), torch.zeros(2, 3, 4, 5, 6, 7)])
def test_bad_layout_raises(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"expected activations of shape .*got shape"):
        P.dormant_scores(bad)
    with pytest.raises(ValueError, match="got shape"):
        P.pooled_unit_rows(bad)


def test_bad_dtype_and_type_raise() -> None:
    with pytest.raises(TypeError, match="floating-point"):
        P.active_rate(torch.zeros(4, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        P.dormant_fraction(np.zeros((4, 3)), 0.1)  # type: ignore[arg-type]


def test_empty_batch_and_bad_parameters_raise() -> None:
    with pytest.raises(ValueError, match="at least one .* entry, got 0"):
        P.dormant_scores(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="tau must be .*got -0.1"):
        P.dormant_fraction(torch.ones(4, 3), -0.1)
    with pytest.raises(ValueError, match="tau must be"):
        P.dormant_fraction(torch.ones(4, 3), math.nan)
    with pytest.raises(ValueError, match=r"rate must be in \(0, 1\], got 0"):
        P.low_activity_fraction(torch.ones(4, 3), 0)
    with pytest.raises(ValueError, match="same number of elements, got 3 and 4"):
        P.update_to_weight_ratio(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="empty iterable"):
        P.weight_stats([])
