"""WindowMoments: lazy rebuilds, state, reductions and α's centring. That streamed windows (one
batch or many, wraparound, incremental / lazy / periodic rebuilds, non-finite rows) equal the
reference on the last rows is tests/test_streaming_parity.py's."""

from __future__ import annotations

import pytest
import torch

from monitor import functional as F
from monitor.scorers import SpectrumScorer, WindowMoments


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
