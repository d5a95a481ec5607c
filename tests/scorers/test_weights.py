"""EarlyBirdTracker: the patience logic on
controlled weight sequences, and masks stabilising while an MLP trains on digits with SGD."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from monitor.tools.demo_model import load_digits_tensor
from monitor.scorers.weights import EarlyBirdTracker, prunable_weights

pytestmark = pytest.mark.usefixtures("single_thread")


def _weights(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(10, 10, generator=g), torch.randn(5, 20, generator=g)]


def test_tracker_distances_and_patience_on_controlled_sequence() -> None:
    eb = EarlyBirdTracker(sparsities=(0.5, 0.9), patience=3, threshold=0.1)
    # checks 1–4: fresh random weights (distance ≫ 0.1); 5–9: fixed weights (distance 0 from 6)
    seq = [_weights(i) for i in range(4)] + [_weights(99)] * 5
    outs = [eb.check(ws) for ws in seq]
    key = "earlybird_mask_distance{sparsity=0.5}"
    assert set(outs[0]) == {key, "earlybird_mask_distance{sparsity=0.9}"}
    assert math.isnan(float(outs[0][key]))
    flat = [torch.cat([w.reshape(-1) for w in ws]) for ws in seq]
    for t in range(1, len(seq)):
        # reference: numpy global threshold at 50 %: keep the 100 largest |w| of 200
        a = np.zeros(200, bool)
        a[np.argsort(-flat[t - 1].abs().numpy(), kind="stable")[:100]] = True
        b = np.zeros(200, bool)
        b[np.argsort(-flat[t].abs().numpy(), kind="stable")[:100]] = True
        assert float(outs[t][key]) == pytest.approx(np.mean(a != b), abs=1e-15)
    assert eb.distances(0.5)[:4] == pytest.approx([float(o[key]) for o in outs[1:5]])
    assert all(d > 0.1 for d in eb.distances(0.5)[:4])
    assert eb.found_at(0.5) == 8 and eb.ticket_found(0.5)         # distances 0 at checks 6, 7, 8
    assert eb.found_at(0.9) == 8
    np.testing.assert_array_equal(eb.masks(0.5)[0].numpy(),
                                  (seq[-1][0].abs() >= torch.cat([w.abs().reshape(-1) for w in seq[-1]])
                                   .sort(descending=True).values[99]).numpy())


def test_tracker_streak_resets_when_distance_jumps() -> None:
    eb = EarlyBirdTracker(sparsities=(0.5,), patience=3, threshold=0.1)
    seq = [_weights(1), _weights(1), _weights(1), _weights(2), _weights(2), _weights(2)]
    for i, ws in enumerate(seq, 1):
        eb.check(ws)
        if i == 3:
            assert not eb.ticket_found(0.5)                        # only 2 small distances
    assert not eb.ticket_found(0.5)                                # the jump at check 4 reset it
    eb.check(_weights(2))
    assert eb.found_at(0.5) == 7
    eb.reset()
    assert eb.checks == 0 and not eb.ticket_found(0.5)


def test_tracker_bad_input() -> None:
    with pytest.raises(ValueError, match=r"sparsities must be a non-empty list of values in \[0, 1\)"):
        EarlyBirdTracker(sparsities=(0.5, 1.2))
    with pytest.raises(ValueError, match="patience must be >= 1, got 0"):
        EarlyBirdTracker(patience=0)
    with pytest.raises(ValueError, match="threshold must be in"):
        EarlyBirdTracker(threshold=0.0)
    eb = EarlyBirdTracker()
    eb.check(_weights(0))
    with pytest.raises(ValueError, match="weights changed shape between checks"):
        eb.check([torch.randn(3, 3)])
    with pytest.raises(KeyError, match="sparsity 0.7 is not tracked"):
        eb.ticket_found(0.7)


def test_masks_stabilise_while_sgd_trains_an_mlp_on_digits() -> None:
    """You et al. 2020: the pruning mask stops changing early in training. An MLP trained with
    SGD on scikit-learn digits: the mask distance between checks 30 steps apart falls several-fold,
    and the ticket (5 consecutive distances < 0.1) is found before training ends."""
    torch.manual_seed(0)
    x = load_digits_tensor()
    y = torch.as_tensor(load_digits().target)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                          nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)
    eb = EarlyBirdTracker()
    assert len(prunable_weights(model)) == 3
    for step in range(421):
        if step % 30 == 0:
            eb.check(model)
        idx = torch.randint(0, len(y), (64,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for s in eb.sparsities:
        d = eb.distances(s)
        assert len(d) == 14
        assert np.mean(d[:2]) > 3.0 * np.mean(d[-3:]), (s, d)
        assert eb.ticket_found(s), (s, d)
    assert float(loss.detach()) < 0.2                                         # it really trained
