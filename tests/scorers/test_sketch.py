"""SketchedMoments / SketchedSpectrumScorer / SpectralPath: the sketched window equals numpy
on the projected rows, its errors stay within the bounds measured in docs/performance.md
(generous margins, small sizes), the path is picked automatically and overridable, and it
keeps the monitor's rules (own RNG, no host sync on update, checkpoints)."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from monitor import Monitor
from monitor.scorers import CollapseScorer, SpectrumScorer, WindowMoments
from monitor.scorers.sketch import SketchedMoments, SpectralPath
from monitor.scorers.sketch_spectrum import SketchedSpectrumScorer, spectrum_scorer_for
from tests.tester import ref_collapse, ref_spectral


def _signals(m: WindowMoments) -> dict[str, float]:
    out = {k: float(v) for k, v in spectrum_scorer_for(m).compute(m).items() if k != "spectrum"}
    out.update({k: float(v) for k, v in CollapseScorer().compute(m).items()})
    return out


def test_window_equals_numpy_on_the_projected_last_rows() -> None:
    """Streamed batches wrap the window; the sums are those of the last rows, projected."""
    d, k, window = 48, 12, 100
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(b, d, generator=gen) + 0.3 for b in (30, 45, 17, 60, 33)]
    m = SketchedMoments(d, window, k, seed=5)
    for batch in batches:
        m.update(batch)
    m.settle()
    last = torch.cat(batches)[-window:].numpy().astype(np.float64)
    y = last @ m.omega.numpy().astype(np.float64)                      # (window, k)
    yn = y / np.linalg.norm(y, axis=1, keepdims=True)
    np.testing.assert_allclose(m.s.numpy(), y.T @ y, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(m.zsum.numpy(), y.sum(0), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(m.nsum.numpy(), yn.sum(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(m.nsq.numpy(), (yn * yn).sum(0), rtol=1e-4, atol=1e-4)
    assert float(m.n) == window and float(m.seen) == sum(b.shape[0] for b in batches)
    out = _signals(m)
    ref = {**ref_spectral(y), **ref_collapse(y)}
    for key in ("effective_rank", "embedding_std_ratio", "mean_cosine_similarity", "srank",
                "window_samples"):
        value = ref[key]
        assert out[key] == pytest.approx(value, rel=1e-5), key
    assert out["embedding_dim"] == d and out["spectral_sketch_dim"] == k
    assert m.negative_count() == float((last < 0).sum())             # original rows, exact


def test_nonfinite_rows_counted_on_the_original_values_and_excluded() -> None:
    d, k = 40, 8
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(30, d, generator=gen)
    rows[3, :5] = float("nan")
    rows[7, 2] = float("inf")
    m = SketchedMoments(d, 64, k)
    m.update(rows)
    clean = torch.cat([rows[:3], rows[4:7], rows[8:]]).double()
    y = clean @ m.omega.double()
    assert float(m.nonfinite) == 6.0 and float(m.n) == 28.0 and float(m.seen) == 28.0
    np.testing.assert_allclose(m.s.numpy(), (y.T @ y).numpy(), rtol=1e-5, atol=1e-4)


def _window(kind: str, n: int, d: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "rank32":
        return torch.randn(n, 32, generator=gen) @ torch.randn(32, d, generator=gen)
    if kind == "collapse":
        return torch.randn(1, d, generator=gen).expand(n, d).contiguous()
    alpha = {"isotropic": 0.0, "power1": 1.0, "power2": 2.0}[kind]
    return torch.randn(n, d, generator=gen) * torch.arange(1, d + 1).pow(-alpha / 2)


@functools.cache
def _both(kind: str, n: int = 2048, d: int = 1024, k: int = 256
          ) -> tuple[dict[str, float], dict[str, float]]:
    rows = _window(kind, n, d)
    exact, sketched = WindowMoments(d, n), SketchedMoments(d, n, k, seed=0)
    exact.update(rows)
    sketched.update(rows)
    return _signals(exact), _signals(sketched)


@pytest.mark.slow
def test_collapse_is_preserved_rank32_and_complete() -> None:
    """The alerting cases: a rank-32 window reads ≈ 32, a complete collapse ≈ 1, std → 0."""
    exact, sk = _both("rank32")
    assert sk["effective_rank"] == pytest.approx(exact["effective_rank"], rel=0.06)
    assert abs(sk["srank"] - exact["srank"]) <= 1
    assert sk["participation_ratio"] == pytest.approx(exact["participation_ratio"], rel=0.06)
    wide = SketchedMoments(2048, 2048, 1024)          # RankMe / min(n, k) under the 0.05 floor
    wide.update(_window("rank32", 2048, 2048))
    assert _signals(wide)["effective_rank_ratio"] < 0.05
    exact, sk = _both("collapse")
    assert sk["effective_rank"] < 1.05 and sk["srank"] == 1.0
    assert sk["embedding_std_ratio"] < 1e-3 and sk["mean_cosine_similarity"] > 0.999
    assert sk["top_eigenvalue_share"] > 0.999


@pytest.mark.parametrize("kind", ["isotropic", "power1", "rank32"])
def test_raw_variance_is_kept_by_the_sketch(kind: str) -> None:
    """tr(ΩᵀCΩ) ≈ tr C (E ΩΩᵀ = I): the sketch reads the mean per-dimension variance of the
    original rows (÷ the true d), so collapse to a point is seen on the large-d path too."""
    exact, sk = _both(kind)
    assert sk["embedding_variance"] == pytest.approx(exact["embedding_variance"], rel=0.15)


@pytest.mark.parametrize("kind,rel", [("isotropic", 0.03), ("power1", 0.15), ("power2", 0.1)])
def test_participation_ratio_close_to_exact(kind: str, rel: float) -> None:
    exact, sk = _both(kind)
    assert sk["participation_ratio"] == pytest.approx(exact["participation_ratio"], rel=rel)


def test_full_rank_spectra_are_capped_by_k_and_steep_alpha_survives() -> None:
    """A spectrum over more than k directions reads as at most k (documented); the α of a
    steep power law (α = 2) and its top share survive the sketch."""
    exact, sk = _both("isotropic")
    assert exact["effective_rank"] > 800 and sk["effective_rank"] <= 256
    assert 0.85 < sk["effective_rank_ratio"] <= 1.0
    exact, sk = _both("power2")
    assert sk["spectrum_alpha"] == pytest.approx(exact["spectrum_alpha"], rel=0.1)
    assert sk["top_eigenvalue_share"] == pytest.approx(exact["top_eigenvalue_share"], rel=0.1)


def test_scorer_rejects_the_exact_state_and_factory_matches() -> None:
    with pytest.raises(TypeError, match="SketchedMoments"):
        SketchedSpectrumScorer().compute(WindowMoments(4, 8))
    assert type(spectrum_scorer_for(WindowMoments(4, 8))) is SpectrumScorer
    assert type(spectrum_scorer_for(SketchedMoments(8, 8, 4))) is SketchedSpectrumScorer


# ------------------------------------------------------------------ choice of the path


def test_spectral_path_rules() -> None:
    p = SpectralPath(sketch_above=100, sketch_dim=32)
    assert p.sketch_dim_for("a", 100, 1000) == 0 and p.sketch_dim_for("a", 101, 1000) == 32
    assert SpectralPath("sketch", sketch_dim=32).sketch_dim_for("a", 64, 10) == 32
    assert SpectralPath("sketch", sketch_dim=32).sketch_dim_for("a", 32, 10) == 0  # d ≤ k
    assert SpectralPath("exact", sketch_above=10).sketch_dim_for("a", 10_000, 10) == 0
    limited = SpectralPath(sketch_dim=32, memory_limit_bytes=8 * 64 * 64 + 4 * 1000 * 64)
    assert limited.sketch_dim_for("a", 64, 100) == 0           # fits
    assert limited.sketch_dim_for("a", 64, 1000) == 32         # the ring pushes it over
    per = SpectralPath(sketch_above=10, sketch_dim=4, streams={"keep": "exact"})
    assert per.sketch_dim_for("keep", 64, 10) == 0 and per.sketch_dim_for("x", 64, 10) == 4


@pytest.mark.parametrize("kwargs,match", [
    ({"spectral_path": "fast"}, "spectral_path"),
    ({"spectral_path": {"a": "fast"}}, "overrides"),
    ({"sketch_dim": 1}, "sketch_dim"),
    ({"sketch_above": 0}, "sketch_above"),
    ({"memory_limit_bytes": 0}, "memory_limit_bytes"),
    ({"sketch_dim": 2.5}, "sketch_dim"),
])
def test_monitor_rejects_bad_options(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Monitor(port=None, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def monitor() -> Iterator[Monitor]:
    mon = Monitor(port=None, window=256, max_rows=128, every=1, qscore=False,
                  sketch_above=64, sketch_dim=16,
                  spectral_path={"*": "auto", "pinned": "exact"})
    yield mon
    mon.close()


def test_monitor_picks_the_path_per_stream(monitor: Monitor) -> None:
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        monitor.observe("wide", torch.randn(128, 80, generator=gen))
        monitor.observe("narrow", torch.randn(128, 48, generator=gen))
        monitor.observe("pinned", torch.randn(128, 80, generator=gen))
        snap = monitor.step()
    assert snap is not None and snap.errors == {}
    streams = monitor._engine.streams
    assert isinstance(streams["wide"].moments, SketchedMoments)
    assert type(streams["narrow"].moments) is WindowMoments
    assert type(streams["pinned"].moments) is WindowMoments
    assert snap.get("spectral_sketch_dim", "wide") == 16
    assert snap.get("spectral_sketch_dim", "narrow") == 0
    assert snap.get("embedding_dim", "wide") == 80
    assert snap.get("effective_rank", "wide") <= 16


def test_memory_limit_picks_the_sketch() -> None:
    mon = Monitor(port=None, window=256, max_rows=64, qscore=False, sketch_dim=16,
                  memory_limit_bytes=20_000)
    try:
        mon.observe("a", torch.randn(64, 40))           # exact: 8·40² + 4·256·40 > 20 000
        mon.observe("b", torch.randn(64, 10))           # d ≤ k: exact
        assert isinstance(mon._engine.streams["a"].moments, SketchedMoments)
        assert type(mon._engine.streams["b"].moments) is WindowMoments
    finally:
        mon.close()


def test_activation_layers_follow_the_policy() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(8, 96), torch.nn.ReLU())
    mon = Monitor(port=None, window=128, max_rows=64, qscore=False, sketch_above=64,
                  sketch_dim=16, every=1)
    try:
        mon.watch_activations(net)
        for _ in range(3):
            net(torch.randn(64, 8))
            snap = mon.step()
        assert snap is not None and snap.errors == {}
        layer = next(iter(mon._engine.layers.values()))
        assert isinstance(layer.moments, SketchedMoments)
        assert 1.0 <= next(iter(snap.layers.values()))["effective_rank"] <= 16
    finally:
        mon.close()


# ------------------------------------------------------------------ the monitor's rules


def test_global_rng_untouched(monitor: Monitor) -> None:
    torch.manual_seed(99)
    before = torch.random.get_rng_state()
    rows = torch.ones(128, 80).cumsum(1)               # made before the check: no RNG
    monitor.observe("wide", rows)
    monitor.step()
    assert torch.equal(torch.random.get_rng_state(), before)


def test_update_path_never_reads_a_tensor_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU stand-in for the CUDA sync check: no .item(), float(t), int(t), bool(t), .tolist()
    or .cpu()/.numpy() while updating (positions come from shapes)."""
    m = SketchedMoments(64, 50, 16)
    _ = m.omega
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randn(b, 64, generator=gen) for b in (20, 20, 20, 40)]

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("host read on the update path")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy",
                 "cpu"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for batch in rows:                                 # incremental, then the lazy path
        m.update(batch)
    monkeypatch.undo()
    m.settle()
    assert float(m.n) == 50


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.cuda
def test_cuda_update_path_has_no_host_sync() -> None:
    dev = torch.device("cuda")
    rows = torch.randn(64, 512, device=dev)
    m = SketchedMoments(512, 256, 64, dev)             # Ω drawn inside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(10):
            m.update(rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = SketchedMoments(512, 256, 64)
    for _ in range(10):
        cpu.update(rows.cpu())
    assert torch.allclose(m.omega.cpu(), cpu.omega)
    assert _signals(m)["effective_rank"] == pytest.approx(_signals(cpu)["effective_rank"],
                                                          rel=1e-4)


def test_state_dict_roundtrip_continues_identically() -> None:
    gen = torch.Generator().manual_seed(4)
    a = SketchedMoments(32, 64, 8, seed=3)
    for _ in range(5):
        a.update(torch.randn(20, 32, generator=gen) - 0.2)
    b = SketchedMoments(32, 64, 8, seed=3)
    b.load_state_dict(a.state_dict())
    nxt = torch.randn(30, 32, generator=gen)
    a.update(nxt)
    b.update(nxt)
    assert torch.equal(a.s, b.s) and torch.equal(a.n, b.n)
    assert torch.equal(a.negative_count(), b.negative_count())
    with pytest.raises(ValueError, match="sketch"):
        SketchedMoments(32, 64, 8, seed=4).load_state_dict(a.state_dict())


def test_monitor_checkpoint_keeps_the_sketch(monitor: Monitor) -> None:
    """A restored monitor continues the saved sketch, even under other options."""
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        monitor.observe("wide", torch.randn(128, 80, generator=gen))
        monitor.step()
    state = monitor.state_dict()
    other = Monitor(port=None, window=256, max_rows=128, every=1, qscore=False,
                    spectral_path="exact")
    try:
        other.load_state_dict(state)
        assert isinstance(other._engine.streams["wide"].moments, SketchedMoments)
        nxt = torch.randn(128, 80, generator=gen)
        monitor.observe("wide", nxt)
        other.observe("wide", nxt)
        a, b = monitor.step(), other.step()
        assert a is not None and b is not None
        for key in ("effective_rank", "participation_ratio", "spectral_sketch_dim"):
            va, vb = a.get(key, "wide"), b.get(key, "wide")
            assert va == vb or (math.isnan(va) and math.isnan(vb)), key
    finally:
        other.close()


@pytest.mark.e2e
def test_distributed_sketch_equals_one_process(tmp_path: Path) -> None:
    """Two gloo ranks with sketched streams (one on rank 0 only) and a sketched activation
    layer: the all-reduced sketch equals one process on all rows (same seed, same Ω)."""
    from tests.scorers import sketch_dist_worker as sw
    from tests.engine.test_distributed import assert_same, spawn

    ranks = spawn(sw.worker, tmp_path)
    ref = sw.make_monitor()
    net = sw.model()
    ref.watch_activations(net)
    try:
        sw.feed(ref, net, [0, 1])
        want = ref.step()
        assert want is not None
        assert isinstance(ref._engine.streams["emb"].moments, SketchedMoments)
        assert isinstance(next(iter(ref._engine.layers.values())).moments, SketchedMoments)
    finally:
        ref.close()
    keys = ["effective_rank", "participation_ratio", "embedding_std_ratio", "window_samples",
            "negative_values_ratio", "spectral_sketch_dim", "embedding_dim"]
    for res in ranks:
        assert not res["errors"], res["errors"]
        assert_same(res["streams"]["emb"], want.streams["emb"], keys)
        assert_same(res["streams"]["only0"], want.streams["only0"], keys[:4])
        layer = next(iter(want.layers))
        assert_same(res["layers"][layer], want.layers[layer], ["effective_rank", "srank"])
    assert want.streams["emb"]["spectral_sketch_dim"] == sw.SKETCH
