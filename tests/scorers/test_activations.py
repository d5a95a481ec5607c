"""ActivationScorer: streaming equals one batch (vs the one-shot functions and numpy), interval
reset, never-active units, non-finite rows, rank merging, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from monitor.functional import plasticity as P
from monitor.scorers.activations import ActivationScorer
from monitor.snapshot import SignalKey

KEYS = ("dormant_units_ratio{tau=0}", "dormant_units_ratio{tau=0.025}",
        "dormant_units_ratio{tau=0.1}", "low_activity_units_ratio", "never_active_units_ratio",
        "activation_units")


def _numpy_signals(h: np.ndarray, taus=(0.0, 0.025, 0.1), rate: float = 0.01) -> dict[str, float]:
    """Slow reference: per-unit loops over the unit axis (last for 2-D/3-D, 1 for conv)."""
    if h.ndim >= 4:
        entries = [h[:, c].ravel() for c in range(h.shape[1])]
    else:
        entries = [h[..., i].ravel() for i in range(h.shape[-1])]
    a = np.array([np.abs(e).mean() for e in entries])
    s = a / (a.mean() + 1e-9)
    r = np.array([np.count_nonzero(e) / e.size for e in entries])
    out = {SignalKey.of("dormant_units_ratio", tau=float(t)): float(np.mean(s <= t)) for t in taus}
    out["low_activity_units_ratio"] = float(np.mean(r < rate))
    out["never_active_units_ratio"] = float(np.mean([not np.any(e != 0) for e in entries]))
    out["activation_units"] = float(len(entries))
    return out


def _activations(shape: tuple[int, ...], unit_axis: int, seed: int) -> torch.Tensor:
    """ReLU-like activations: some dead units, some rare ones, some tiny ones."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.relu(torch.randn(shape, generator=gen) + 0.2)
    u = shape[unit_axis]
    view = [1] * len(shape)
    view[unit_axis] = u
    scale = torch.ones(u)
    scale[1] = 0.01          # τ = 0.025 dormant
    scale[2] = 0.05          # τ = 0.1 dormant only
    h = h * scale.view(view)
    h.select(unit_axis, 0).zero_()                                  # dead
    rare = h.select(unit_axis, 3)                                   # active on one entry only
    rare.zero_()
    rare[(0,) * rare.dim()] = 1.0
    return h


LAYOUTS = [((256, 16), -1), ((16, 20, 16), -1), ((32, 16, 3, 3), 1)]


def _floats(d: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items()}


@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_streaming_equals_one_batch_functional_and_numpy(shape: tuple[int, ...], axis: int) -> None:
    h = _activations(shape, axis, seed=0)
    one = ActivationScorer(16)
    one.update(h)
    many = ActivationScorer(16)
    for chunk in h.split(5):
        many.update(chunk)
    a, b = _floats(one.compute()), _floats(many.compute())
    assert set(a) == set(KEYS)
    for key in KEYS:
        assert a[key] == pytest.approx(b[key], abs=1e-12), key
    ref = _numpy_signals(h.numpy().astype(np.float64))
    for key in KEYS:
        assert a[key] == pytest.approx(ref[key], abs=1e-12), key
    # the same numbers from the one-shot functions, and the scores themselves
    for tau in (0.0, 0.025, 0.1):
        assert a[SignalKey.of("dormant_units_ratio", tau=float(tau))] == float(P.dormant_fraction(h, tau))
    assert a["low_activity_units_ratio"] == float(P.low_activity_fraction(h, 0.01))
    torch.testing.assert_close(many.dormant_scores(), P.dormant_scores(h), rtol=1e-12, atol=0)
    # the fixture really spans the cases (the test would be vacuous otherwise)
    assert 0 < ref["dormant_units_ratio{tau=0}"] < ref["dormant_units_ratio{tau=0.025}"] \
        < ref["dormant_units_ratio{tau=0.1}"]
    assert ref["low_activity_units_ratio"] > ref["never_active_units_ratio"] > 0


def test_dormant_units_mask_matches_numpy() -> None:
    h = _activations((300, 16), -1, seed=1)
    sc = ActivationScorer(16)
    sc.update(h[:100])
    sc.update(h[100:])
    hn = h.numpy().astype(np.float64)
    a = np.abs(hn).mean(0)
    for tau in (0.0, 0.025, 0.1):
        expected = (a / (a.mean() + 1e-9)) <= tau
        mask = sc.dormant_units(tau)
        assert mask.dtype == torch.bool
        assert mask.numpy().tolist() == expected.tolist()
    with pytest.raises(ValueError, match="tau must be .*got -1"):
        sc.dormant_units(-1)


def test_tau_keys_use_the_shortest_form() -> None:
    sc = ActivationScorer(4, taus=(0, 0.025, 0.1, 1.0, 1e-5))
    sc.update(torch.ones(2, 4))
    keys = [k for k in sc.compute() if k.startswith("dormant")]
    assert keys == ["dormant_units_ratio{tau=0}", "dormant_units_ratio{tau=0.025}",
                    "dormant_units_ratio{tau=0.1}", "dormant_units_ratio{tau=1}",
                    "dormant_units_ratio{tau=1e-05}"]


def test_reset_interval_keeps_ever_active() -> None:
    sc = ActivationScorer(3)
    sc.update(torch.tensor([[1.0, 0.0, 2.0]]))       # unit 0 active, unit 1 never
    sc.reset_interval()
    out = _floats(sc.compute())
    assert math.isnan(out["dormant_units_ratio{tau=0}"])       # empty interval: no score
    assert math.isnan(out["low_activity_units_ratio"])
    assert out["never_active_units_ratio"] == pytest.approx(1 / 3)
    sc.update(torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, 1.0]]))
    out = _floats(sc.compute())
    assert out["dormant_units_ratio{tau=0}"] == pytest.approx(2 / 3)   # only this interval counts
    assert out["never_active_units_ratio"] == pytest.approx(1 / 3)     # unit 0 was active before
    sc.reset()
    assert math.isnan(float(sc.compute()["never_active_units_ratio"]))


def test_nonfinite_rows_are_counted_and_left_out() -> None:
    h = _activations((64, 16), -1, seed=2)
    bad = h.clone()
    bad[3, 5] = math.nan
    bad[10, 0] = math.inf
    sc = ActivationScorer(16)
    sc.update(bad)
    clean = ActivationScorer(16)
    clean.update(torch.cat([h[:3], h[4:10], h[11:]]))
    assert _floats(sc.compute()) == _floats(clean.compute())
    assert float(sc.nonfinite) == 2.0
    assert float(sc.count) == 62.0


def test_states_merge_across_ranks_with_their_reductions() -> None:
    """Two 'ranks' on halves of the data, states combined by their declared reductions, give the
    one-process values (never-active needs ``max``, not ``sum``, to stay a 0/1 mask)."""
    h = _activations((200, 16), -1, seed=3)
    r0, r1, full = ActivationScorer(16), ActivationScorer(16), ActivationScorer(16)
    for chunk in h[:80].split(20):
        r0.update(chunk)
    for chunk in h[80:].split(30):
        r1.update(chunk)
    full.update(h)
    merged = ActivationScorer(16)
    ops = {"sum": lambda x, y: x + y, "max": torch.maximum, "min": torch.minimum}
    s0, s1 = r0.state_dict(), r1.state_dict()
    merged.load_state_dict({k: ops[red](s0[k], s1[k]) for k, red in merged.reductions.items()})
    assert _floats(merged.compute()) == pytest.approx(_floats(full.compute()), abs=1e-12)
    assert set(merged.ever_active.tolist()) == {0.0, 1.0}            # still a 0/1 mask


def test_unit_count_mismatch_and_bad_layout_raise() -> None:
    sc = ActivationScorer(8)
    with pytest.raises(ValueError, match=r"expected activations with 8 units, got shape \(4, 7\)"):
        sc.update(torch.zeros(4, 7))
    with pytest.raises(ValueError, match=r"expected activations with 8 units, got shape \(2, 3, 4, 4\)"):
        sc.update(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="got shape"):
        sc.update(torch.zeros(8))
    sc.update(torch.zeros(0, 8))                       # empty batch: nothing happens
    assert math.isnan(float(sc.compute()["dormant_units_ratio{tau=0.1}"]))


@pytest.mark.parametrize("kwargs,match", [
    ({"units": 0}, "units must be an int >= 1, got 0"),
    ({"units": 4.0}, "units must be an int >= 1, got 4.0"),
    ({"units": 4, "taus": ()}, "at least one threshold"),
    ({"units": 4, "taus": (0.1, -0.1)}, "finite number >= 0, got -0.1"),
    ({"units": 4, "taus": (0.1, 0.1)}, "distinct"),
    ({"units": 4, "low_activity_rate": 0.0}, r"low_activity_rate must be in \(0, 1\], got 0.0"),
])
def test_constructor_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ActivationScorer(**kwargs)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_update_and_compute_do_not_sync_cuda() -> None:
    h = _activations((128, 16, 3, 3), 1, seed=4).cuda()
    sc = ActivationScorer(16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for chunk in h.split(32):
            sc.update(chunk)
        out = sc.compute()
        mask = sc.dormant_units(0.1)
        sc.reset_interval()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ref = _numpy_signals(h.cpu().numpy().astype(np.float64))
    for key, value in out.items():
        assert value.device.type == "cuda"
        assert float(value) == pytest.approx(ref[key], abs=1e-12), key
    assert mask.device.type == "cuda"
