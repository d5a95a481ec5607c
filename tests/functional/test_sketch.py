"""monitor.functional.sketch: the seeded projection, the sketch-corrected PR, the Gram route
and the state-size formulas, against numpy references and Monte-Carlo expectations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monitor.functional.sketch import (
    exact_state_bytes,
    gaussian_projection,
    project_rows,
    second_moment_eigenvalues,
    sketch_state_bytes,
    sketched_participation_ratio,
)
from monitor.functional.spectral import participation_ratio_from_moments, second_moment
from monitor.scorers.moments import WindowMoments
from monitor.scorers.sketch import SketchedMoments


def test_projection_is_seeded_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = gaussian_projection(64, 16, seed=7)
    b = gaussian_projection(64, 16, seed=7)
    c = gaussian_projection(64, 16, seed=8)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert a.shape == (64, 16) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_projection_is_isotropic_in_expectation() -> None:
    """E[ΩΩᵀ] = I: entries N(0, 1/k), so ΩΩᵀ − I has entries of std ~ 1/√k."""
    d, k = 128, 4096
    omega = gaussian_projection(d, k, seed=0, dtype=torch.float64).numpy()
    gram = omega @ omega.T
    assert np.diag(gram).mean() == pytest.approx(1.0, abs=0.01)
    off = gram - np.diag(np.diag(gram))
    assert np.abs(off).max() < 6.0 / np.sqrt(k)
    assert omega.std() == pytest.approx(1.0 / np.sqrt(k), rel=0.02)


def test_numpy_projection_is_one_seeded_draw_in_blocks() -> None:
    """``xp=numpy`` (the sidecar): numpy's PCG64 seeded with ``seed``, drawn in row blocks (no
    d×k float64 temporaries) yet equal to one (d, k) draw scaled by 1/√k."""
    import math

    d, k = 3000, 700                                   # several blocks of (1 << 20) // k rows
    a = gaussian_projection(d, k, 5, xp=np)
    ref = np.random.default_rng(5).standard_normal((d, k)) / math.sqrt(k)
    assert a.dtype == np.float32 and a.shape == (d, k)
    np.testing.assert_array_equal(a, ref.astype(np.float32))
    b = gaussian_projection(40, 7, 5, np.float64, xp=np)
    np.testing.assert_array_equal(
        b, np.random.default_rng(5).standard_normal((40, 7)) / math.sqrt(7))
    assert not np.array_equal(gaussian_projection(40, 7, 6, xp=np), b.astype(np.float32))


def test_the_numpy_path_runs_without_torch() -> None:
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np\n"
            "from monitor.functional.sketch import gaussian_projection, sketch_dim_for, "
            "sketched_participation_ratio\n"
            "om = gaussian_projection(64, 16, 0, xp=np)\n"
            "y = np.random.default_rng(0).standard_normal((200, 64)) @ om\n"
            "pr = sketched_participation_ratio(y.T @ y, y.sum(0), 200, True, 64)\n"
            "assert 1 <= float(pr) <= 64 and sketch_dim_for('auto', 8192, 64, 4096, 2048) == 2048\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_project_rows_matches_numpy() -> None:
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(10, 32, generator=gen)
    omega = gaussian_projection(32, 8, seed=1)
    np.testing.assert_allclose(project_rows(rows, omega).numpy(),
                               rows.numpy() @ omega.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(b, 32\)"):
        project_rows(torch.randn(3, 31), omega)


def _power_rows(n: int, d: int, alpha: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.arange(1, d + 1, dtype=torch.float64).pow(-alpha / 2)
    return torch.randn(n, d, generator=gen, dtype=torch.float64) * scale


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_sketched_pr_is_unbiased_over_projections(alpha: float) -> None:
    """Mean over Ω draws of the corrected sketched PR ≈ the exact-path PR of the same rows;
    the naive PR of the sketched rows is biased down (towards 1/(1/PR + 1/k))."""
    n, d, k = 2048, 512, 64
    z = _power_rows(n, d, alpha, seed=0)
    s, zsum, cnt = second_moment(z)
    exact = float(participation_ratio_from_moments(s, zsum, cnt, corrected=True))
    corrected, naive = [], []
    for seed in range(24):
        y = project_rows(z, gaussian_projection(d, k, seed, dtype=torch.float64))
        sy, ysum, _ = second_moment(y)
        corrected.append(float(sketched_participation_ratio(sy, ysum, cnt, True, d)))
        naive.append(float(participation_ratio_from_moments(sy, ysum, cnt, corrected=True)))
    assert np.mean(corrected) == pytest.approx(exact, rel=0.05)
    assert np.mean(naive) < 0.8 * exact                     # what the correction removes
    assert np.mean(naive) == pytest.approx(1 / (1 / exact + 1 / k), rel=0.1)


def test_sketched_pr_uncorrected_rows_and_small_windows() -> None:
    z = _power_rows(4096, 256, 0.0, seed=1)
    y = project_rows(z, gaussian_projection(256, 128, seed=0, dtype=torch.float64))
    sy, ysum, cnt = second_moment(y)
    # isotropic, n/d = 16: the row-side bias is small, so both variants land near d = 256
    assert float(sketched_participation_ratio(sy, ysum, cnt, False, 256)) == pytest.approx(
        256 / (1 + 256 / 4096), rel=0.08)
    assert float(sketched_participation_ratio(sy, ysum, cnt, True, 256)) == pytest.approx(
        256, rel=0.08)
    two = torch.tensor(2.0, dtype=torch.float64)
    assert torch.isnan(sketched_participation_ratio(sy, ysum, two, True, 256))


@pytest.mark.parametrize("shape", [(40, 100), (100, 40), (50, 50)])
def test_second_moment_eigenvalues_match_numpy_svd(shape: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(*shape, generator=gen, dtype=torch.float64)
    lam = second_moment_eigenvalues(z).numpy()
    ref = np.linalg.svd(z.numpy(), compute_uv=False) ** 2
    assert lam.shape == (min(shape),)
    np.testing.assert_allclose(lam, ref, rtol=1e-9, atol=1e-9)


def _resident_bytes(m: WindowMoments) -> int:
    return sum(getattr(m, name).nbytes for name in m.reductions)


def test_state_size_formulas_match_the_real_states() -> None:
    d, window, k = 96, 50, 24
    exact = WindowMoments(d, window)
    assert exact_state_bytes(d, window) == _resident_bytes(exact)
    sketched = SketchedMoments(d, window, k)
    assert sketch_state_bytes(d, window, k) == _resident_bytes(sketched) + sketched.omega.nbytes
