"""linear CKA vs a numpy HSIC reference, its invariances, and the two rankings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from monitor.functional.selection import centrality_ranking, cka_matrix, linear_cka, rankme_ranking


def ref_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. 2019 via HSIC with an explicit centring matrix H = I − 11ᵀ/n."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T

    def hsic(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.trace(a @ h @ b @ h))

    return hsic(k, l_) / math.sqrt(hsic(k, k) * hsic(l_, l_))


def _orth(d: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q


@pytest.mark.parametrize("n,d1,d2", [(50, 4, 7), (20, 60, 30), (12, 12, 3)])   # both code paths
def test_linear_cka_matches_numpy(n: int, d1: int, d2: int) -> None:
    gen = torch.Generator().manual_seed(n + d1)
    x = torch.randn(n, d1, generator=gen, dtype=torch.float64) + 2.0
    y = x[:, :1] * torch.randn(1, d2, generator=gen, dtype=torch.float64) + \
        torch.randn(n, d2, generator=gen, dtype=torch.float64)
    assert float(linear_cka(x, y)) == pytest.approx(ref_cka(x.numpy(), y.numpy()), rel=1e-10)
    assert float(linear_cka(x, y)) == pytest.approx(float(linear_cka(y, x)), rel=1e-12)


def test_invariances_and_independence() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(400, 16, generator=gen, dtype=torch.float64)
    assert float(linear_cka(x, x @ _orth(16, gen))) == pytest.approx(1.0, abs=1e-12)
    assert float(linear_cka(x, 7.5 * x + 3.0)) == pytest.approx(1.0, abs=1e-12)  # scale + shift
    # not invariant to an anisotropic (non-orthogonal) linear map
    assert float(linear_cka(x, x * torch.logspace(0, 3, 16, dtype=torch.float64))) < 0.9
    # independent random representations: small (E ≈ √(d₁d₂)/n scale); n = 2000, d = 8
    a = torch.randn(2000, 8, generator=gen, dtype=torch.float64)
    b = torch.randn(2000, 8, generator=gen, dtype=torch.float64)
    assert float(linear_cka(a, b)) < 0.02
    assert math.isnan(float(linear_cka(x, torch.ones(400, 3, dtype=torch.float64))))


def test_centrality_picks_the_copies_of_the_shared_representation() -> None:
    """3 rotated noisy copies of one ground truth + 2 unrelated models: the copies are central."""
    gen = torch.Generator().manual_seed(2)
    truth = torch.randn(300, 12, generator=gen, dtype=torch.float64)
    reps = {f"copy{i}": truth @ _orth(12, gen) + s * torch.randn(300, 12, generator=gen, dtype=torch.float64)
            for i, s in enumerate([0.2, 0.5, 1.0])}
    reps["random_a"] = torch.randn(300, 12, generator=gen, dtype=torch.float64)
    reps["random_b"] = torch.randn(300, 20, generator=gen, dtype=torch.float64)
    ranking = centrality_ranking(reps)
    names = [n for n, _ in ranking]
    assert set(names[:3]) == {"copy0", "copy1", "copy2"}
    assert names[0] == "copy0"                      # least noisy copy = the medoid
    values = [v for _, v in ranking]
    assert values == sorted(values, reverse=True)
    # centrality = mean CKA to the others (checked against the numpy reference)
    np_reps = {k: v.numpy() for k, v in reps.items()}
    expected = np.mean([ref_cka(np_reps["copy1"], np_reps[k]) for k in np_reps if k != "copy1"])
    assert dict(ranking)["copy1"] == pytest.approx(expected, rel=1e-9)
    names_m, mat = cka_matrix(reps)
    assert torch.allclose(mat, mat.T) and torch.allclose(mat.diagonal(), torch.ones(5, dtype=torch.float64))


def test_rankme_ranks_a_collapsed_representation_last() -> None:
    gen = torch.Generator().manual_seed(3)
    healthy = torch.randn(500, 32, generator=gen)
    low = torch.randn(500, 4, generator=gen) @ torch.randn(4, 32, generator=gen)
    collapsed = torch.randn(1, 32, generator=gen).repeat(500, 1) + 1e-3 * torch.randn(500, 32, generator=gen)
    ranking = rankme_ranking({"collapsed": collapsed, "healthy": healthy, "low_rank": low})
    assert [n for n, _ in ranking] == ["healthy", "low_rank", "collapsed"]
    s = np.linalg.svd(healthy.double().numpy(), compute_uv=False)
    p = s / s.sum() + 1e-7
    assert ranking[0][1] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-9)
    assert ranking[2][1] < 2.0


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="same inputs.*got 5 and 6 rows"):
        linear_cka(torch.zeros(5, 2), torch.zeros(6, 2))
    with pytest.raises(ValueError, match="at least 2 rows, got 1"):
        linear_cka(torch.zeros(1, 2), torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"2-D \(n, d\).*got shape \(5,\)"):
        linear_cka(torch.zeros(5), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="at least 2 representation"):
        centrality_ranking({"a": torch.randn(5, 2)})
    with pytest.raises(ValueError, match="same probe inputs; got row counts"):
        centrality_ranking({"a": torch.randn(5, 2), "b": torch.randn(6, 2)})
    with pytest.raises(TypeError, match="mapping"):
        rankme_ranking([torch.randn(5, 2)])  # type: ignore[arg-type]
