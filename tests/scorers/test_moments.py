"""WindowMoments: streaming equals one big batch; the sliding window holds exactly the last rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from monitor import functional as F
from monitor.scorers import CollapseScorer, SpectrumScorer, WindowMoments


def _reference_stats(rows: np.ndarray) -> dict[str, float]:
    """Slow numpy values of the exported signals on an explicit matrix of rows."""
    z = rows.astype(np.float64)
    n, d = z.shape
    s = np.linalg.svd(z, compute_uv=False)
    k = min(n, d)
    p = s[:k] / s[:k].sum() + 1e-7
    rankme = float(np.exp(-(p * np.log(p)).sum()))
    zn = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    std = float(np.std(zn, axis=0, ddof=1).mean() * math.sqrt(d))
    gram = zn @ zn.T
    cos = float((gram.sum() - np.trace(gram)) / (n * (n - 1)))
    c = np.cumsum(s) / s.sum()
    return {"effective_rank": rankme, "embedding_std_ratio": std,
            "mean_cosine_similarity": cos, "srank": float((c < 0.99).sum() + 1),
            "window_samples": float(n)}


def _signals(m: WindowMoments) -> dict[str, float]:
    out = {k: float(v) for k, v in SpectrumScorer().compute(m).items() if k != "spectrum"}
    out.update({k: float(v) for k, v in CollapseScorer().compute(m).items()})
    return out


def test_streaming_batches_equal_one_batch() -> None:
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(600, 24, generator=gen) @ torch.randn(24, 24, generator=gen) + 0.5
    one = WindowMoments(24, window=1000)
    one.update(z)
    many = WindowMoments(24, window=1000)
    for chunk in z.split(37):
        many.update(chunk)
    a, b = _signals(one), _signals(many)
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-10, abs=1e-12), key
    ref = _reference_stats(z.numpy())
    for key, value in ref.items():
        assert a[key] == pytest.approx(value, rel=1e-9), key


@pytest.mark.parametrize("read_every", [1, 3, None])
def test_sliding_window_equals_last_rows(read_every: int | None) -> None:
    """Read after every batch (incremental sums), every 3rd (mixed) or only at the end (rows
    overrun the window between reads, so settle() rebuilds from the ring): all exact."""
    gen = torch.Generator().manual_seed(1)
    window = 256
    m = WindowMoments(16, window=window, rebuild_every_wraps=0)
    batches = [torch.randn(40, 16, generator=gen) * (1 + i % 3) for i in range(30)]
    for i, b in enumerate(batches, 1):
        m.update(b)
        if read_every and i % read_every == 0:
            got = _signals(m)
            ref = _reference_stats(torch.cat(batches[:i])[-window:].numpy())
            assert got["effective_rank"] == pytest.approx(ref["effective_rank"], rel=1e-8)
    last = torch.cat(batches)[-window:]
    ref = _reference_stats(last.numpy())
    got = _signals(m)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-8), key
    # the sums match a rebuild from the ring to round-off
    s_incremental = m.s.clone()
    m.rebuild()
    assert torch.allclose(s_incremental, m.s, rtol=1e-10, atol=1e-9)


def test_lazy_rebuild_skips_incremental_work_when_rows_overrun_the_window() -> None:
    """More than half a window between reads: the sums go stale (no per-batch products) and
    the first read rebuilds them, equal to the always-incremental path."""
    gen = torch.Generator().manual_seed(9)
    lazy, eager = WindowMoments(8, window=64), WindowMoments(8, window=64)
    for _ in range(12):
        b = torch.randn(16, 8, generator=gen)
        lazy.update(b)
        eager.update(b)
        eager.settle()                       # a read after every batch keeps it incremental
    assert not torch.allclose(lazy.s, eager.s)   # stale until read
    lazy.settle()
    assert torch.allclose(lazy.s, eager.s, rtol=1e-12) and torch.equal(lazy.n, eager.n)


def test_nonfinite_rows_are_counted_and_excluded() -> None:
    gen = torch.Generator().manual_seed(2)
    clean = torch.randn(100, 8, generator=gen)
    dirty = clean.clone()
    dirty[3, 1] = float("nan")
    dirty[7] = float("inf")
    m = WindowMoments(8, window=512)
    m.update(dirty)
    assert float(m.nonfinite) == 1 + 8
    assert float(m.n) == 98
    keep = torch.ones(100, dtype=torch.bool)
    keep[[3, 7]] = False
    ref = _reference_stats(clean[keep].numpy())
    got = _signals(m)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-9), key


def test_rejects_wrong_dimension() -> None:
    m = WindowMoments(8, window=64)
    with pytest.raises(ValueError, match=r"\(b, 8\)"):
        m.update(torch.randn(4, 9))


def test_state_dict_roundtrip_continues_identically() -> None:
    gen = torch.Generator().manual_seed(3)
    a = WindowMoments(8, window=64)
    for _ in range(5):
        a.update(torch.randn(20, 8, generator=gen))
    b = WindowMoments(8, window=64)
    b.load_state_dict(a.state_dict())
    nxt = torch.randn(30, 8, generator=gen)
    a.update(nxt)
    b.update(nxt)
    assert torch.equal(a.s, b.s) and torch.equal(a.n, b.n)


def test_reductions_declared() -> None:
    m = WindowMoments(4, window=8)
    red = m.reductions
    assert red["s"] == "sum" and red["n"] == "sum" and red["ring"] == "none"


def test_alpha_uncentred_close_to_centred_reference() -> None:
    """Default α (uncentred S, one eigensolve) stays close to the centred reference fit."""
    gen = torch.Generator().manual_seed(4)
    d, n = 256, 4096
    scales = torch.arange(1, d + 1, dtype=torch.float64) ** -0.5        # λ_i ∝ i^-1
    z = torch.randn(n, d, generator=gen, dtype=torch.float64) * scales + 3.0 * scales
    m = WindowMoments(d, window=n)
    m.update(z)
    default = float(SpectrumScorer().compute(m)["spectrum_alpha"])
    centred = float(SpectrumScorer(alpha_centered=True).compute(m)["spectrum_alpha"])
    ref = float(F.spectrum_alpha(z, centered=True))
    assert centred == pytest.approx(ref, rel=1e-6)
    assert default == pytest.approx(ref, abs=0.05)
