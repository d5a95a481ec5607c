"""Run-relative signals (monitor/engine/tracking.py): peaks after the warm-up, early baselines
before it."""

from __future__ import annotations

import math

import pytest

from monitor.engine.tracking import RunTracker


def _stream(rank: float, var: float, n: float = 512.0, d: float = 64.0) -> dict[str, float]:
    return {"effective_rank": rank, "embedding_variance": var, "window_samples": n,
            "embedding_dim": d}


def test_baseline_is_the_first_full_window_with_no_warm_up() -> None:
    tr = RunTracker(window=1024, warmup=100)
    first = _stream(40.0, 2.0, n=64)             # 64 rows < min(window, 2d) = 128: not full
    tr.derive({"z": first}, None, step=10)
    assert math.isnan(first["embedding_variance_ratio"])
    assert math.isnan(first["effective_rank_baseline_ratio"])
    full = _stream(32.0, 4.0, n=128)             # full enough: the baseline, long before warm-up
    tr.derive({"z": full}, None, step=20)
    assert full["embedding_variance_ratio"] == 1.0
    assert full["effective_rank_baseline_ratio"] == 1.0
    assert math.isnan(full["effective_rank_peak_ratio"])        # peaks wait for the warm-up
    later = _stream(4.0, 0.01)
    tr.derive({"z": later}, None, step=30)
    assert later["embedding_variance_ratio"] == 0.01 / 4.0     # kept, not re-taken
    assert later["effective_rank_baseline_ratio"] == 4.0 / 32.0


def test_zero_or_nan_baselines_are_not_kept_and_state_round_trips() -> None:
    tr = RunTracker(window=256)
    zero = _stream(math.nan, 0.0)
    tr.derive({"z": zero}, None, step=0)
    assert math.isnan(zero["embedding_variance_ratio"])
    ok = _stream(10.0, 2.0)
    tr.derive({"z": ok}, None, step=1)
    assert ok["embedding_variance_ratio"] == 1.0
    restored = RunTracker(window=256)
    restored.load_state_dict(tr.state_dict())
    after = _stream(5.0, 1.0)
    restored.derive({"z": after}, None, step=2)
    assert after["embedding_variance_ratio"] == 0.5
    assert after["effective_rank_baseline_ratio"] == 0.5


def test_layers_get_rank_baselines_peaks_and_rises_streams_and_layers_apart() -> None:
    tr = RunTracker(window=256, warmup=0)
    layer = {"effective_rank": 20.0, "window_samples": 256.0, "activation_units": 64.0,
             "dormant_units_ratio{tau=0.1}": 0.1}
    stream = _stream(5.0, 1.0)
    tr.derive({"h": stream}, {"h": layer}, step=0)
    assert layer["effective_rank_baseline_ratio"] == 1.0
    assert "embedding_variance_ratio" not in layer             # a layer has no raw variance
    layer2 = {"effective_rank": 5.0, "window_samples": 256.0, "activation_units": 64.0,
              "dormant_units_ratio{tau=0.1}": 0.5}
    stream2 = _stream(5.0, 1.0)
    tr.derive({"h": stream2}, {"h": layer2}, step=1)
    assert layer2["effective_rank_baseline_ratio"] == 0.25     # its own baseline, not the stream's
    assert stream2["effective_rank_baseline_ratio"] == 1.0
    assert layer2["effective_rank_peak_ratio"] == 0.25
    assert layer2["dormant_units_ratio_rise{tau=0.1}"] == 0.5 - 0.1


def test_state_keeps_streams_and_layers_apart_and_reads_the_old_flat_form() -> None:
    tr = RunTracker(window=256, warmup=0)
    layer = {"effective_rank": 20.0, "window_samples": 256.0, "activation_units": 64.0,
             "dormant_units_ratio{tau=0.1}": 0.1}
    tr.derive({"layer:h": _stream(8.0, 2.0)}, {"h": layer}, step=0)
    state = tr.state_dict()
    assert state["peaks"] == {"stream": {"layer:h": 8.0}, "layer": {"h": 20.0}}
    assert state["lows"] == {"layer": {"h": {"dormant_units_ratio{tau=0.1}": 0.1}}}
    assert state["baselines"]["layer"] == {"h": {"effective_rank": 20.0}}
    old = {"peaks": {"z": 8.0, "layer:h": 20.0},
           "lows": {"layer:h|dormant_units_ratio{tau=0.1}": 0.1},
           "baselines": {"z|embedding_variance": 2.0, "z|effective_rank": 8.0,
                         "layer:h|effective_rank": 20.0}}
    for saved in (state, old):
        restored = RunTracker(window=256, warmup=0)
        restored.load_state_dict(saved)
        later = {"effective_rank": 5.0, "window_samples": 256.0, "activation_units": 64.0,
                 "dormant_units_ratio{tau=0.1}": 0.4}
        restored.derive({}, {"h": later}, step=1)
        assert later["effective_rank_peak_ratio"] == 0.25
        assert later["effective_rank_baseline_ratio"] == 0.25
        assert later["dormant_units_ratio_rise{tau=0.1}"] == pytest.approx(0.3)
    restored.derive({"z": (z := _stream(4.0, 1.0))}, None, step=2)
    assert z["effective_rank_peak_ratio"] == 0.5 and z["embedding_variance_ratio"] == 0.5
