"""PairScorer: streaming equals one batch, the ring holds the last rows, masks, RNG, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from monitor.scorers.generative import PairScorer

KEYS = {"generator_diversity_ratio", "generator_duplicate_rate", "real_duplicate_rate",
        "generator_samples"}


def _ref(fake: np.ndarray, real: np.ndarray, q: float) -> dict[str, float]:
    """numpy reference on explicit rows: direct differences, np.quantile."""
    def dist(x: np.ndarray) -> np.ndarray:
        return np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))

    def nn(x: np.ndarray) -> np.ndarray:
        d = dist(x)
        np.fill_diagonal(d, np.inf)
        return d.min(1)

    def mpd(x: np.ndarray) -> float:
        n = len(x)
        return float(dist(x).sum() / (n * (n - 1)))

    eps = float(np.quantile(nn(real), q))
    return {"generator_diversity_ratio": mpd(fake) / mpd(real),
            "generator_duplicate_rate": float((nn(fake) < eps).mean()),
            "real_duplicate_rate": float((nn(real) < eps).mean()),
            "generator_samples": float(len(fake))}


def _host(out: dict[str, torch.Tensor]) -> dict[str, float]:
    assert set(out) == KEYS
    assert all(v.dim() == 0 for v in out.values())
    return {k: float(v) for k, v in out.items()}


def _data(seed: int, n: int, d: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen) * 0.5, torch.randn(n, d, generator=gen)


def test_streaming_batches_equal_one_batch_and_numpy() -> None:
    fake, real = _data(0, 200)
    one = PairScorer(3, reservoir=256, dup_quantile=0.05)
    one.update_fake(fake)
    one.update_real(real)
    many = PairScorer(3, reservoir=256, dup_quantile=0.05)
    for f, r in zip(fake.split(23), real.split(23)):
        many.update_fake(f)
        many.update_real(r)
    a, b = _host(one.compute()), _host(many.compute())
    ref = _ref(fake.double().numpy(), real.double().numpy(), 0.05)
    for key in KEYS:
        assert a[key] == pytest.approx(b[key], rel=1e-12), key
        assert a[key] == pytest.approx(ref[key], rel=1e-9), key


def test_ring_keeps_the_last_rows() -> None:
    fake, real = _data(1, 700)
    sc = PairScorer(3, reservoir=128, dup_quantile=0.05)
    for f, r in zip(fake.split(50), real.split(50)):
        sc.update_fake(f)
        sc.update_real(r)
    got = _host(sc.compute())
    ref = _ref(fake[-128:].double().numpy(), real[-128:].double().numpy(), 0.05)
    for key in KEYS:
        assert got[key] == pytest.approx(ref[key], rel=1e-9), key


def test_unequal_fill_uses_equal_sample_sizes() -> None:
    """30 fake rows, 100 real rows: both sides are scored on 30 rows (NN distances depend on n)."""
    fake, real = _data(2, 100)
    sc = PairScorer(3, reservoir=128, dup_quantile=0.1)
    sc.update_fake(fake[:30])
    sc.update_real(real)
    got = _host(sc.compute())
    ref = _ref(fake[:30].double().numpy(), real[:30].double().numpy(), 0.1)
    for key in KEYS:
        assert got[key] == pytest.approx(ref[key], rel=1e-9), key


def test_nonfinite_rows_are_counted_and_excluded() -> None:
    fake, real = _data(3, 64)
    bad = fake.clone()
    bad[5, 1] = math.nan
    bad[9] = math.inf
    sc = PairScorer(3, reservoir=64, dup_quantile=0.05)
    sc.update_fake(bad)
    sc.update_real(real)
    got = _host(sc.compute())
    assert float(sc.nonfinite) == 4.0                      # values, not rows
    keep = [i for i in range(64) if i not in (5, 9)]
    ref = _ref(fake[keep].double().numpy(), real.double().numpy(), 0.05)
    assert got["generator_samples"] == 62.0
    assert got["generator_diversity_ratio"] == pytest.approx(ref["generator_diversity_ratio"], rel=1e-9)
    assert got["generator_duplicate_rate"] == pytest.approx(ref["generator_duplicate_rate"], rel=1e-9)


def test_near_duplicates_are_detected() -> None:
    """A generator that emits 16 points (plus 1e-4 jitter) vs a continuous real distribution."""
    gen = torch.Generator().manual_seed(4)
    real = torch.randn(512, 8, generator=gen)
    base = torch.randn(16, 8, generator=gen)
    fake = base[torch.randint(16, (512,), generator=gen)] + 1e-4 * torch.randn(512, 8, generator=gen)
    sc = PairScorer(8, reservoir=512, dup_quantile=0.01)
    sc.update_fake(fake)
    sc.update_real(real)
    got = _host(sc.compute())
    assert got["generator_duplicate_rate"] > 0.95
    assert got["real_duplicate_rate"] == pytest.approx(0.01, abs=0.005)   # ≈ dup_quantile
    healthy = PairScorer(8, reservoir=512, dup_quantile=0.01)
    healthy.update_fake(torch.randn(512, 8, generator=gen))
    healthy.update_real(real)
    assert float(healthy.compute()["generator_duplicate_rate"]) < 0.05


def test_large_batch_subsample_uses_own_rng_only() -> None:
    fake, real = _data(5, 1000)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = PairScorer(3, reservoir=100, seed=7)
    a.update_fake(fake)
    a.update_real(real)
    assert torch.equal(torch.get_rng_state(), before)           # global RNG untouched
    b = PairScorer(3, reservoir=100, seed=7)
    b.update_fake(fake)
    b.update_real(real)
    assert torch.equal(a.fake_rows, b.fake_rows)                # same seed, same subset
    c = PairScorer(3, reservoir=100, seed=8)
    c.update_fake(fake)
    assert not torch.equal(a.fake_rows, c.fake_rows)
    # every kept row is one of the batch's rows, no repeats
    kept = {tuple(r) for r in a.fake_rows.tolist()}
    assert len(kept) == 100 and kept <= {tuple(r) for r in fake.tolist()}


def test_empty_and_reset_and_state_dict() -> None:
    sc = PairScorer(3, reservoir=32)
    out = _host(sc.compute())
    assert math.isnan(out["generator_diversity_ratio"]) and out["generator_samples"] == 0.0
    fake, real = _data(6, 40)
    sc.update_fake(fake)
    sc.update_real(real)
    sc.update_fake(fake[:0])                                     # empty batch: no-op
    value = _host(sc.compute())
    other = PairScorer(3, reservoir=32)
    other.load_state_dict(sc.state_dict())
    assert _host(other.compute()) == value
    other.update_fake(fake[:5])                                  # ring position restored too
    sc.update_fake(fake[:5])
    assert torch.equal(other.fake_rows, sc.fake_rows)
    sc.reset()
    assert _host(sc.compute())["generator_samples"] == 0.0
    assert sc.reductions["fake_rows"] == "none" and sc.reductions["nonfinite"] == "sum"


def test_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="dim must be an int >= 1, got 0"):
        PairScorer(0)
    with pytest.raises(ValueError, match="reservoir must be an int >= 2 rows, got 1"):
        PairScorer(3, reservoir=1)
    with pytest.raises(ValueError, match=r"dup_quantile must be in \(0, 1\), got 0.0"):
        PairScorer(3, dup_quantile=0.0)
    sc = PairScorer(3)
    with pytest.raises(ValueError, match=r"fake rows: expected shape \(b, 3\), got \(4, 2\)"):
        sc.update_fake(torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"real rows: expected shape \(b, 3\), got \(3,\)"):
        sc.update_real(torch.zeros(3))
    with pytest.raises(TypeError, match="floating-point tensor, got torch.int64"):
        sc.update_real(torch.zeros(4, 3, dtype=torch.int64))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_update_and_compute_do_not_sync_on_cuda() -> None:
    fake, real = _data(7, 600)
    fake, real = fake.cuda(), real.cuda()
    sc = PairScorer(3, reservoir=256, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for f, r in zip(fake.split(100), real.split(100)):
            sc.update_fake(f)
            sc.update_real(r)
        sc.update_fake(torch.cat([fake, fake]))                  # > reservoir: RNG subsample
        out = sc.compute()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ref = _ref(sc.fake_rows.double().cpu().numpy(), sc.real_rows.double().cpu().numpy(), 0.01)
    assert float(out["generator_diversity_ratio"]) == pytest.approx(ref["generator_diversity_ratio"], rel=1e-6)
