"""NC1/NC2 on numpy arrays (the sidecar's publish) equal the same functions on torch tensors
(``monitor.functional.neural_collapse``, array API) on the edge cases (one class, duplicate rows,
rank-deficient means, two classes, a class mean at the global mean, no rows) and with ``rtol = 0``.
Regular windows (random, near collapse, absent classes, d < C, d > n, 0/1 weights) are
tests/test_streaming_parity.py's: there the stream, numpy and torch all equal one pinv reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import monitor.functional.neural_collapse as tnc

pytestmark = pytest.mark.usefixtures("single_thread")

Case = tuple[str, np.ndarray, np.ndarray, int, "np.ndarray | None"]


def _clustered(rng: np.random.Generator, n: int, d: int, c: int, spread: float,
               noise: float) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, c, n)
    means = spread * rng.standard_normal((c, d))
    return means[y] + noise * rng.standard_normal((n, d)), y


def _cases() -> list[Case]:
    rng = np.random.default_rng(7)
    out: list[Case] = []
    x, y = _clustered(rng, 600, 32, 10, 1.0, 1.0)
    out.append(("random", x, y, 10, None))
    x, y = _clustered(rng, 400, 24, 6, 3.0, 0.05)
    out.append(("near collapse", x + 5.0, y, 6, None))
    out.append(("one class", rng.standard_normal((50, 8)), np.full(50, 3), 5, None))
    x, y = _clustered(rng, 300, 16, 4, 1.0, 0.5)
    out.append(("absent classes", x, np.array([1, 4, 7, 11])[y], 12, None))
    proto = rng.standard_normal((5, 12))
    y = np.repeat(np.arange(5), 30)
    out.append(("duplicate rows", proto[y], y, 5, None))
    v = rng.standard_normal(20)
    y = rng.integers(0, 5, 250)
    out.append(("rank-deficient means", np.outer(y, v) + 0.3 * rng.standard_normal((250, 20)),
                y, 5, None))
    x, y = _clustered(rng, 200, 3, 10, 1.0, 0.3)
    out.append(("d < C", x, y, 10, None))
    x, y = _clustered(rng, 20, 64, 4, 1.0, 1.0)
    out.append(("d > n", x, y, 4, None))
    x, y = _clustered(rng, 100, 8, 2, 1.0, 1.0)
    out.append(("two classes", x, y, 2, None))
    base = rng.integers(-3, 4, (10, 6)).astype(np.float64)
    x = np.concatenate([base - 4.0, base, base + 4.0])
    out.append(("class mean at the global mean", x, np.repeat(np.arange(3), 10), 3, None))
    x, y = _clustered(rng, 64, 8, 4, 1.0, 1.0)
    out.append(("no rows (weights 0)", x, y, 4, np.zeros(64)))
    x, y = _clustered(rng, 500, 16, 8, 1.0, 0.7)
    out.append(("0/1 weights", x, y, 8, (rng.random(500) < 0.6).astype(np.float64)))
    return out


def _close(got: float, ref: float, abs_: float = 1e-12) -> bool:
    if math.isnan(ref):
        return math.isnan(got)
    return got == pytest.approx(ref, rel=1e-9, abs=abs_)


def _signals(s: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> dict[str, float]:
    return {k: float(v) for k, v in tnc.window_neural_collapse_signals(s, sums, counts).items()}


EDGE = ("one class", "duplicate rows", "rank-deficient means", "two classes",
        "class mean at the global mean", "no rows (weights 0)")


@pytest.mark.parametrize("name,x,y,c,w", [case for case in _cases() if case[0] in EDGE],
                         ids=[case[0] for case in _cases() if case[0] in EDGE])
def test_numpy_matches_torch(name: str, x: np.ndarray, y: np.ndarray, c: int,
                             w: np.ndarray | None) -> None:
    tw = None if w is None else torch.from_numpy(w)
    ts, tsums, tcounts = tnc.class_statistics(torch.from_numpy(x), torch.from_numpy(y), c, tw)
    s, sums, counts = tnc.class_statistics(x, y, c, w)
    assert isinstance(s, np.ndarray)
    np.testing.assert_allclose(s, ts.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sums, tsums.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(counts, tcounts.numpy())

    m_tilde, present = tnc.centered_class_means(tsums, tcounts)
    ref = {
        "neural_collapse_nc1": float(tnc.nc1_from_stats(ts, tsums, tcounts)),
        "neural_collapse_nc2_equinorm": float(tnc.nc2_equinorm(m_tilde, present)),
        "neural_collapse_nc2_equiangularity": float(tnc.nc2_equiangularity(m_tilde, present)),
        "neural_collapse_nc2_max_angle": float(tnc.nc2_max_angle(m_tilde, present)),
        "neural_collapse_classes": float(present.sum()),
        "neural_collapse_window_samples": float(tcounts.sum()),
    }
    got = _signals(s, sums, counts)
    assert set(got) == set(ref)
    for key, value in ref.items():
        # Duplicate rows: Σ_W is round-off (~1e-16 of S), so NC1 is too; compare absolutely.
        abs_ = 1e-10 if name == "duplicate rows" else 1e-12
        assert _close(got[key], value, abs_), (name, key, got[key], value)
    # The same numpy functions on the torch statistics (no statistics round-off in between).
    assert _close(float(tnc.nc1_from_stats(ts.numpy(), tsums.numpy(), tcounts.numpy())),
                  ref["neural_collapse_nc1"], 1e-10 if name == "duplicate rows" else 1e-12)


def test_expected_nan_and_zero_cases() -> None:
    """The cases above do reach the branches they are named after (not all-NaN parity)."""
    got = {case[0]: _signals(*tnc.class_statistics(*case[1:]))
           for case in _cases()}
    assert math.isnan(got["one class"]["neural_collapse_nc1"])
    assert got["one class"]["neural_collapse_classes"] == 1
    assert got["absent classes"]["neural_collapse_classes"] == 4
    assert abs(got["duplicate rows"]["neural_collapse_nc1"]) < 1e-10
    assert math.isnan(got["two classes"]["neural_collapse_nc2_equiangularity"])
    assert math.isfinite(got["two classes"]["neural_collapse_nc2_max_angle"])
    assert got["no rows (weights 0)"]["neural_collapse_window_samples"] == 0
    assert math.isnan(got["no rows (weights 0)"]["neural_collapse_nc1"])
    for key in ("neural_collapse_nc1", "neural_collapse_nc2_equinorm",
                "neural_collapse_nc2_equiangularity", "neural_collapse_nc2_max_angle"):
        assert math.isfinite(got["random"][key]), key


@pytest.mark.parametrize("name", ["random", "absent classes", "d > n"])
def test_only_c_minus_1_directions_without_rtol(name: str) -> None:
    """With ``rtol = 0`` only the index cut k < C − 1 drops the round-off C-th singular value
    (the centred means have rank C − 1); numpy must make the same cut as torch."""
    _, x, y, c, _ = next(case for case in _cases() if case[0] == name)
    ts, tsums, tcounts = tnc.class_statistics(torch.from_numpy(x), torch.from_numpy(y), c)
    ref = float(tnc.nc1_from_stats(ts, tsums, tcounts, rtol=0.0))
    got = float(tnc.nc1_from_stats(*tnc.class_statistics(x, y, c), rtol=0.0))
    assert got == pytest.approx(ref, rel=1e-9)
    assert ref == pytest.approx(float(tnc.nc1_from_stats(ts, tsums, tcounts)), rel=1e-9)


def test_effective_depth_rule() -> None:
    assert tnc.effective_depth([], 0.1) is None
    assert tnc.effective_depth([math.nan, math.nan], 0.1) is None
    # Streams without a finite NC1 are skipped before counting (as Monitor._effective_depth).
    assert tnc.effective_depth([math.nan, 0.5, 0.05, 0.01], 0.1) == 2.0
    assert math.isnan(tnc.effective_depth([0.5, 0.3], 0.1))  # type: ignore[arg-type]
