"""Checkpoint size: the formula of ``Monitor.state_dict`` against ``torch.save``, and the
compact state (sufficient statistics without the rings of rows) with its restored window."""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch
from torch import nn

from monitor import Monitor
from monitor.scorers.moments import WindowMoments
from monitor.snapshot import Snapshot


def _saved_bytes(state: dict[str, Any]) -> int:
    buf = io.BytesIO()
    torch.save(state, buf)
    return len(buf.getvalue())


def _feed(mon: Monitor, steps: int, dims: dict[str, int], gen: torch.Generator, *,
          labels: bool = False, layer: nn.Module | None = None, evaluation: bool = False,
          rows: int = 32) -> None:
    for _ in range(steps):
        for name, d in dims.items():
            y = torch.randint(0, 5, (rows,), generator=gen) if labels else None
            mon.observe(name, torch.randn(rows, d, generator=gen).relu(), labels=y)
        if evaluation:
            name, d = next(iter(dims.items()))
            mon.observe(name, torch.randn(8, d, generator=gen).relu(),
                        labels=torch.randint(0, 5, (8,), generator=gen),
                        predictions=torch.randint(0, 5, (8,), generator=gen))
        if layer is not None:
            layer(torch.randn(rows, 10, generator=gen))
        mon.step()


CONFIGS: list[dict[str, Any]] = [
    {"window": 64, "dims": {"z": 8}},
    {"window": 1024, "dims": {"a": 32, "b": 64}, "layer": True},
    {"window": 2048, "dims": {"z": 64}, "labels": True},
    {"window": 512, "dims": {"z": 40}, "evaluation": True},
    {"window": 1024, "dims": {"big": 300}, "options": {"spectral_path": "sketch",
                                                      "sketch_dim": 64}},
    {"window": 4096, "dims": {"z": 96}, "options": {"qscore": False}},
]


def _config_id(cfg: dict[str, Any]) -> str:
    return "-".join(f"{k}{v}" for k, v in cfg["dims"].items())


@pytest.mark.parametrize("cfg", CONFIGS, ids=_config_id)
@pytest.mark.parametrize("compact", [False, True], ids=["full", "compact"])
def test_state_bytes_formula_matches_torch_save(cfg: dict[str, Any], compact: bool) -> None:
    """``Monitor.state_bytes()`` (the formula of ``state_dict``'s docstring, from shapes)
    equals the measured size of ``torch.save(state_dict())`` within 1 KiB + 1 %."""
    gen = torch.Generator().manual_seed(0)
    window = cfg["window"]
    mon = Monitor(port=None, window=window, max_rows=min(64, window), every=4,
                  **cfg.get("options", {}))
    layer = None
    if cfg.get("layer"):
        layer = nn.Sequential(nn.Linear(10, 24), nn.ReLU())
        mon.watch_activations(layer)
    _feed(mon, 12, cfg["dims"], gen, labels=cfg.get("labels", False), layer=layer,
          evaluation=cfg.get("evaluation", False))
    mon.publish()
    measured = _saved_bytes(mon.state_dict(compact=compact))
    formula = mon.state_bytes(compact=compact)
    assert abs(formula - measured) <= 1024 + 0.01 * measured, (formula, measured)
    mon.close(publish=False)


def test_compact_state_is_a_small_fraction_of_the_full_one() -> None:
    """W = 8192, d = 256, Q-Score on: the ring of rows (8 MiB) goes; compact ≈ 1/27 of full."""
    gen = torch.Generator().manual_seed(1)
    mon = Monitor(port=None, window=8192, max_rows=1024, every=100)
    for _ in range(9):
        mon.observe("z", torch.randn(1024, 256, generator=gen).relu())
        mon.step()
    full, compact = _saved_bytes(mon.state_dict()), _saved_bytes(mon.state_dict(compact=True))
    assert full > 9_000_000
    assert compact < full / 25, (full, compact)
    mon.close(publish=False)


# Window signals: what the last `window` rows decide (not the run-relative peaks, lows,
# baselines and rises, the Q-Score calibration, or counters since the start).
_WINDOW_SIGNALS = ("effective_rank", "effective_rank_ratio", "embedding_std_ratio",
                   "embedding_variance", "mean_cosine_similarity",
                   "negative_values_ratio", "participation_ratio", "qscore_p10", "qscore_p50",
                   "spectrum_alpha", "srank", "top_eigenvalue_share", "window_samples",
                   "spectral_sketch_dim", "neural_collapse_nc1",
                   "neural_collapse_nc2_equiangularity", "neural_collapse_nc2_equinorm",
                   "neural_collapse_nc2_max_angle", "neural_collapse_nc3", "neural_collapse_nc4",
                   "neural_collapse_classes", "neural_collapse_window_samples")
_LAYER_SIGNALS = ("effective_rank", "srank", "window_samples")


def _close(a: float, b: float, rel: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


def _assert_same(a: Snapshot, b: Snapshot, rel: float, *, every_signal: bool) -> None:
    assert a.streams.keys() == b.streams.keys() and a.layers.keys() == b.layers.keys()
    for name, values in a.streams.items():
        keys = values.keys() if every_signal else [k for k in _WINDOW_SIGNALS if k in values]
        assert keys
        for key in keys:
            assert _close(values[key], b.streams[name][key], rel), (name, key, values[key],
                                                                     b.streams[name][key])
        for x, y in zip(a.spectra[name], b.spectra[name], strict=True):
            assert _close(x, y, rel), (name, "spectrum")
    for name, values in a.layers.items():
        keys = values.keys() if every_signal else _LAYER_SIGNALS
        for key in keys:
            assert _close(values[key], b.layers[name][key], rel), (name, key)


def _monitor_pair(gen_seed: int) -> tuple[Any, ...]:
    def make() -> tuple[Monitor, nn.Module]:
        torch.manual_seed(5)                    # same layer and classifier weights everywhere
        mon = Monitor(port=None, window=128, max_rows=32, every=1000, peak_warmup=0,
                      spectral_path={"big": "sketch"}, sketch_dim=16)
        layer = nn.Sequential(nn.Linear(10, 14), nn.ReLU())
        fc = nn.Linear(12, 5)
        mon.watch_activations(layer)
        mon.watch_classifier(fc, stream="z")
        return mon, layer
    return make, torch.Generator().manual_seed(gen_seed)


def test_a_compact_load_publishes_what_was_saved_then_forgets_the_saved_rows() -> None:
    """Exact at the load (every signal, within float64 round-off), an exact row count while
    the saved rows are evicted, and after `window` new rows the window signals equal those of
    a Monitor that never saw the saved rows (1e-9)."""
    make, gen = _monitor_pair(2)
    dims = {"z": 12, "big": 40}
    a, layer_a = make()
    _feed(a, 10, dims, gen, labels=True, layer=layer_a)       # 320 rows: wrapped, pos 64
    state = a.state_dict(compact=True)
    assert state["compact"] is True
    assert "ring" not in state["engine"]["streams"]["z"]["moments"]
    assert "ring" not in state["engine"]["streams"]["z"]["nc"]
    b, layer_b = make()
    b.load_state_dict(state)
    assert b.step_count == a.step_count == 10
    _assert_same(a.publish(), b.publish(), 1e-10, every_signal=True)

    fresh, layer_c = make()
    gen_state = gen.get_state()
    for mon, layer in ((a, layer_a), (b, layer_b), (fresh, layer_c)):
        gen.set_state(gen_state)
        _feed(mon, 2, dims, gen, labels=True, layer=layer)   # half a window: 64 new rows
        mon.publish()
    assert b.latest is not None and a.latest is not None
    assert b.latest.get("window_samples", stream="z") == 128.0          # exact count
    assert b.latest.get("neural_collapse_window_samples", stream="z") == pytest.approx(128.0)

    gen_state = gen.get_state()
    for mon, layer in ((a, layer_a), (b, layer_b), (fresh, layer_c)):
        gen.set_state(gen_state)
        _feed(mon, 2, dims, gen, labels=True, layer=layer)   # the window is all new rows
    sa, sb, sc = a.publish(), b.publish(), fresh.publish()
    _assert_same(sc, sb, 1e-9, every_signal=False)
    _assert_same(sa, sb, 1e-9, every_signal=False)
    for mon in (a, b, fresh):
        mon.close(publish=False)


def test_a_compact_state_refuses_another_window_and_changes_nothing() -> None:
    gen = torch.Generator().manual_seed(3)
    small = Monitor(port=None, window=64, max_rows=32, every=5)
    _feed(small, 4, {"z": 8}, gen)
    mon = Monitor(port=None, window=128, max_rows=32, every=5)
    _feed(mon, 3, {"z": 8}, gen)
    before = mon.publish()
    with pytest.raises(ValueError, match="compact checkpoint window is 64 rows, this monitor's "
                                         "is 128"):
        mon.load_state_dict(small.state_dict(compact=True))
    assert mon.step_count == 3
    _assert_same(before, mon.publish(), 0.0, every_signal=False)


def _rows(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
                       ).to(torch.float32)


def test_saved_rows_leave_in_ring_order_each_with_the_saved_mean() -> None:
    """The restored block: new rows evict saved slots in ring order; each evicted valid row
    takes ``saved sums / saved valid rows`` with it; the row count stays exact."""
    old = _rows(16, 6, 0)
    old[0] = math.nan                               # slot 0: an invalid saved row
    m = WindowMoments(6, 16)
    m.update(old)
    saved = {k: v.clone() for k, v in m.state_dict().items()}
    compact = m.state_dict(compact=True)
    assert "ring" not in compact and compact["ring_valid"].dtype == torch.bool
    r = WindowMoments(6, 16)
    r.load_state_dict(compact)
    r.settle()
    assert torch.allclose(r.s, saved["s"], rtol=1e-14, atol=0)
    assert torch.equal(r.zsum, saved["zsum"]) and torch.equal(r.n, saved["n"])

    new = _rows(8, 6, 1)
    r.update(new)                                    # evicts slots 0..7: 7 valid saved rows
    r.settle()
    share = 8 / 15                                   # saved valid rows left / saved valid rows
    x = new.double()
    assert r.n.item() == 16.0
    assert torch.allclose(r.zsum, x.sum(0) + share * saved["zsum"], rtol=1e-12)
    assert torch.allclose(r.s, x.T @ x + share * saved["s"], rtol=1e-12)

    mid = WindowMoments(6, 16)                       # a full checkpoint keeps the block
    mid.load_state_dict(r.state_dict())
    assert mid.state_dict()["ring_valid"].sum().item() == 8.0      # real rows only
    more = _rows(8, 6, 2)
    for w in (r, mid):
        w.update(more)
        w.settle()
    fresh = WindowMoments(6, 16)
    fresh.update(torch.cat([new, more]))
    fresh.settle()
    for w in (r, mid):
        assert w._block is None
        for name in ("s", "zsum", "nsum", "nsq", "n"):
            assert torch.allclose(getattr(w, name), getattr(fresh, name), rtol=1e-12), name
