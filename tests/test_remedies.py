"""ReDo (``monitor.remedies.recycle_dormant``): the right units are recycled, exactly the touched
weights and optimizer entries change, and the network function is preserved when the recycled
units were dead."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from monitor.remedies import layer_pairs, recycle_dormant

DEAD0 = [2, 7, 11]        # units of layer 0 killed (exactly zero on every input)
DEAD1 = [4]               # units of layer 2


def _numpy_scores(model: nn.Sequential, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Post-ReLU τ-dormant scores of each hidden Linear, by numpy from the weights."""
    h = x.numpy().astype(np.float64)
    out = {}
    for i, m in enumerate(model):
        if isinstance(m, nn.Linear):
            h = h @ m.weight.detach().numpy().astype(np.float64).T + m.bias.detach().numpy()
            name = str(i)
        elif isinstance(m, nn.ReLU):
            h = np.maximum(h, 0.0)
            a = np.abs(h).mean(0)
            out[name] = a / (a.mean() + 1e-9)
    return out


def _kill(layer: nn.Linear, units: list[int]) -> None:
    with torch.no_grad():
        layer.weight[units] = 0.0
        layer.bias[units] = -1.0


def _setup(opt_kind: str = "adam") -> tuple[nn.Sequential, torch.optim.Optimizer, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
    x = torch.randn(256, 8)
    y = torch.randint(0, 3, (256,))
    if opt_kind == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    for _ in range(3):                     # populate the optimizer state
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _kill(model[0], DEAD0)
    _kill(model[2], DEAD1)
    return model, opt, x


def _state_copy(opt: torch.optim.Optimizer) -> dict:
    return {p: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in st.items()}
            for p, st in opt.state.items()}


def test_layer_pairs_skip_output_layer() -> None:
    model, _, _ = _setup()
    assert layer_pairs(model) == [("0", "2"), ("2", "4")]


@pytest.mark.parametrize("opt_kind,moments", [("adam", ("exp_avg", "exp_avg_sq")),
                                              ("sgd", ("momentum_buffer",))])
def test_recycle_dead_units_exactly(opt_kind: str, moments: tuple[str, ...]) -> None:
    model, opt, x = _setup(opt_kind)
    before = copy.deepcopy(model)
    state_before = _state_copy(opt)
    scores = _numpy_scores(model, x)
    expected0 = np.flatnonzero(scores["0"] <= 0.0).tolist()
    expected1 = np.flatnonzero(scores["2"] <= 0.0).tolist()
    assert expected0 == DEAD0 and expected1 == DEAD1          # only the killed units are dead
    with torch.no_grad():
        y_before = model(x)

    counts = recycle_dormant(model, opt, tau=0.0, inputs=x)

    assert counts == {"0": len(DEAD0), "2": len(DEAD1)}
    # function unchanged: recycled units were exactly zero and now have zero outgoing weights
    with torch.no_grad():
        torch.testing.assert_close(model(x), y_before, rtol=1e-6, atol=1e-7)
    # recycled units are alive again on the same inputs (score well above τ = 0.1 here)
    after = _numpy_scores(model, x)
    assert (after["0"][DEAD0] > 0.1).all() and (after["2"][DEAD1] > 0.1).all()

    for name, nxt, dead, dead_in in (("0", "2", DEAD0, []), ("2", "4", DEAD1, DEAD0)):
        layer, old = model.get_submodule(name), before.get_submodule(name)
        keep = [i for i in range(layer.weight.shape[0]) if i not in dead]
        live_in = [j for j in range(layer.weight.shape[1]) if j not in dead_in]  # inputs kept
        # incoming rows: fresh, inside PyTorch's default bound 1/√fan_in, not the old ones
        bound = 1 / np.sqrt(layer.weight.shape[1])
        assert (layer.weight[dead].abs() <= bound).all()
        assert (layer.weight[dead] != old.weight[dead]).any(dim=1).all()
        assert (layer.bias[dead] == 0).all()
        assert torch.equal(layer.weight[keep][:, live_in], old.weight[keep][:, live_in])
        assert torch.equal(layer.bias[keep], old.bias[keep])
        # outgoing columns zero (also in the next layer's fresh rows), the rest of the next layer
        # as before except its own recycled rows
        wn, wn_old = model.get_submodule(nxt).weight, before.get_submodule(nxt).weight
        assert (wn[:, dead] == 0).all()
        rows_next = [i for i in range(wn.shape[0]) if not (nxt == "2" and i in DEAD1)]
        cols_keep = [j for j in range(wn.shape[1]) if j not in dead]
        assert torch.equal(wn[rows_next][:, cols_keep], wn_old[rows_next][:, cols_keep])
        # optimizer moments: zero exactly where touched, bit-identical elsewhere
        for key in moments:
            st, st_old = opt.state[layer.weight][key], state_before[layer.weight][key]
            assert (st_old[dead] != 0).any()                     # there was something to reset
            assert (st[dead] == 0).all()
            assert torch.equal(st[keep][:, live_in], st_old[keep][:, live_in])
            stb, stb_old = opt.state[layer.bias][key], state_before[layer.bias][key]
            assert (stb[dead] == 0).all() and torch.equal(stb[keep], stb_old[keep])
            stn, stn_old = opt.state[wn][key], state_before[wn][key]
            assert (stn[:, dead] == 0).all()
            assert torch.equal(stn[rows_next][:, cols_keep], stn_old[rows_next][:, cols_keep])
    # the output layer's units are never recycled: its rows and bias are untouched
    assert torch.equal(model[4].bias, before[4].bias)
    if opt_kind == "adam":
        assert opt.state[model[0].weight]["step"] == state_before[model[0].weight]["step"]


def test_given_scores_and_masks() -> None:
    model, opt, x = _setup()
    before = copy.deepcopy(model)
    mask = torch.zeros(16, dtype=torch.bool)
    mask[[1, 5]] = True
    scores = {"2": torch.linspace(0.0, 2.0, 12)}                # units 0 and 1 ≤ 0.1 + 1 more ≤ 0.2
    counts = recycle_dormant(model, opt, tau=0.2, scores={"0": mask, **scores})
    assert counts == {"0": 2, "2": 2}
    assert (model[2].weight[:, [1, 5]] == 0).all()
    assert (model[4].weight[:, [0, 1]] == 0).all()
    assert torch.equal(model[0].weight[[0, 2, 3]], before[0].weight[[0, 2, 3]])
    # a layer not named in scores is left alone
    model2, opt2, _ = _setup()
    ref = copy.deepcopy(model2)
    assert recycle_dormant(model2, opt2, scores={"2": torch.ones(12, dtype=torch.bool)}) == {"0": 0, "2": 12}
    assert torch.equal(model2[0].weight, ref[0].weight)


def test_output_layer_never_recycled_even_if_dead() -> None:
    model, opt, x = _setup()
    with torch.no_grad():
        model[4].weight[1] = 0.0
        model[4].bias[1] = 0.0
    before = copy.deepcopy(model[4])
    counts = recycle_dormant(model, opt, tau=0.1, inputs=x)
    assert "4" not in counts
    assert torch.equal(model[4].weight[1], before.weight[1])


def test_conv_then_linear_pairs_channels_with_column_blocks() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(5 * 6 * 6, 3))
    x = torch.randn(32, 1, 6, 6)
    with torch.no_grad():
        model[0].weight[1] = 0.0
        model[0].bias[1] = -1.0
        model[2].weight[3] = 0.0
        model[2].bias[3] = -1.0
        y_before = model(x)
    before = copy.deepcopy(model)
    counts = recycle_dormant(model, None, tau=0.0, inputs=x, init="xavier")
    assert counts == {"0": 1, "2": 1}
    assert (model[2].weight[:, 1] == 0).all()
    assert (model[5].weight[:, 3 * 36:4 * 36] == 0).all()
    assert torch.equal(model[5].weight[:, :3 * 36], before[5].weight[:, :3 * 36])
    assert torch.equal(model[0].weight[[0, 2, 3]], before[0].weight[[0, 2, 3]])
    fan_in, fan_out = 9, 4 * 9
    assert (model[0].weight[1].abs() <= np.sqrt(6 / (fan_in + fan_out))).all()
    with torch.no_grad():
        torch.testing.assert_close(model(x), y_before, rtol=1e-6, atol=1e-7)
        h = torch.relu(model[0](x))
    assert h[:, 1].abs().mean() > 0


def test_explicit_pairs_and_bad_input() -> None:
    model, opt, x = _setup()
    assert recycle_dormant(model, opt, tau=0.0, inputs=x, pairs=[(model[0], model[2])]) == {"0": 3}
    assert (model[2].weight[:, DEAD0] == 0).all()
    assert (model[2].weight[DEAD1] == 0).all()                    # layer 2 itself not recycled
    with pytest.raises(ValueError, match="needs scores= .* or inputs="):
        recycle_dormant(model, opt)
    with pytest.raises(ValueError, match="tau must be a finite number >= 0, got -1"):
        recycle_dormant(model, opt, tau=-1, inputs=x)
    with pytest.raises(ValueError, match=r"scores\['0'\]: expected shape \(16,\), got \(15,\)"):
        recycle_dormant(model, opt, scores={"0": torch.zeros(15)})
    with pytest.raises(ValueError, match="init must be"):
        recycle_dormant(model, opt, inputs=x, init="orthogonal")
    with pytest.raises(ValueError, match="no submodule named 'nope'"):
        recycle_dormant(model, opt, inputs=x, pairs=[("nope", "2")])
    with pytest.raises(ValueError, match="expected Linear or Conv.*got ReLU"):
        recycle_dormant(model, opt, inputs=x, pairs=[("1", "2")])
    with pytest.raises(ValueError, match=r"cannot pair Linear\(16 outputs\) with Linear\(12 inputs\)"):
        recycle_dormant(model, opt, inputs=x, pairs=[("0", "4")])


def test_masks_from_activation_scorer_match_the_inputs_path() -> None:
    """The streaming scorer's ``dormant_units(τ)`` (fed by forward hooks over several batches)
    selects the same units as scoring the whole batch inside ``recycle_dormant``."""
    from monitor.scorers.activations import ActivationScorer

    model, opt, x = _setup()
    scorers = {"0": ActivationScorer(16), "2": ActivationScorer(12)}
    hooks = [model[1].register_forward_hook(lambda m, i, o: scorers["0"].update(o)),
             model[3].register_forward_hook(lambda m, i, o: scorers["2"].update(o))]
    with torch.no_grad():
        for chunk in x.split(50):
            model(chunk)
    for h in hooks:
        h.remove()
    masks = {name: sc.dormant_units(0.0) for name, sc in scorers.items()}
    twin = copy.deepcopy(model)
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    counts_a = recycle_dormant(model, None, scores=masks, generator=gen_a)
    counts_b = recycle_dormant(twin, None, tau=0.0, inputs=x, generator=gen_b)
    assert counts_a == counts_b == {"0": len(DEAD0), "2": len(DEAD1)}
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
