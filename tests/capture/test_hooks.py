"""Capture knows nothing of Monitor's insides: a hook drives any CaptureTarget."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from monitor.capture import ActivationCapture, Capture, CaptureTarget
from monitor.errors import ErrorLog


def _target(capturing: bool = True) -> tuple[CaptureTarget, dict[str, list]]:  # type: ignore[type-arg]
    got: dict[str, list] = {"take": [], "acts": [], "spent": []}  # type: ignore[type-arg]
    target = CaptureTarget(
        take=lambda stream, t, tokens: got["take"].append((stream, t, tokens)),
        stage=lambda stream, rows: got.setdefault("stage", []).append((stream, rows)),
        take_activations=lambda stream, t: got["acts"].append((stream, t)),
        capturing=lambda: capturing, errors=ErrorLog(), spent=got["spent"].append)
    return target, got


def test_a_hook_feeds_its_target_detached_and_returns_none() -> None:
    target, got = _target()
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    cap = Capture(target, "z", net[0], tokens="mean")
    act = ActivationCapture(target, "h", net[1])
    x = torch.randn(5, 4, requires_grad=True)
    out = net(x)
    out.sum().backward()                                  # training's graph untouched
    (stream, t, tokens), = got["take"]
    assert stream == "z" and tokens == "mean" and t.shape == (5, 3) and not t.requires_grad
    assert torch.equal(t, torch.nn.functional.linear(x, net[0].weight, net[0].bias).detach())
    (name, h), = got["acts"]
    assert name == "h" and torch.equal(h, out.detach())
    assert len(got["spent"]) == 2 and all(s >= 0 for s in got["spent"])
    cap.remove()
    act.remove()
    net(x)
    assert len(got["take"]) == 1                          # removed: no more rows


def test_skipped_steps_and_errors_stay_in_the_target() -> None:
    target, got = _target(capturing=False)
    lin = nn.Linear(4, 3)
    Capture(target, "z", lin)
    lin(torch.randn(2, 4))
    assert got["take"] == [] and got["spent"] == []     # not captured: nothing touched

    def boom(stream: str, t: Tensor, tokens: str) -> None:
        raise RuntimeError("scorer failed")

    errors = ErrorLog()
    failing = CaptureTarget(take=boom, stage=lambda s, r: None,
                            take_activations=lambda s, t: None, capturing=lambda: True,
                            errors=errors, spent=lambda s: None)
    lin2 = nn.Linear(4, 3)
    cap = Capture(failing, "z", lin2)
    y = lin2(torch.randn(2, 4))                           # training goes on
    assert y.shape == (2, 3)
    assert errors.counts() == {"capture": 1}
    assert cap.enabled is False                           # unexpected failure: hook switched off
