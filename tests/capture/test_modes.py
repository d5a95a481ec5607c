"""Capture modes: hooks capture in training mode by default (the hooked module's ``.training``),
``"always"`` or only in ``"eval"``; a module wrapped by DDP/DataParallel/FSDP/torch.compile counts
as in eval mode when the module it wraps is."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from monitor.capture import ActivationCapture, Capture, CaptureTarget
from monitor.errors import ErrorLog


def _target() -> tuple[CaptureTarget, dict[str, list]]:  # type: ignore[type-arg]
    got: dict[str, list] = {"take": [], "acts": []}  # type: ignore[type-arg]
    target = CaptureTarget(
        take=lambda stream, t, tokens: got["take"].append(t.shape[0]),
        stage=lambda stream, rows: None,
        take_activations=lambda stream, t: got["acts"].append(t.shape[0]),
        capturing=lambda: True, errors=ErrorLog(strict=True), spent=lambda s: None)
    return target, got


@pytest.mark.parametrize(("mode", "want"), [("train", [4]), ("always", [4, 3]), ("eval", [3])])
def test_hooks_follow_the_module_training_flag(mode: str, want: list[int]) -> None:
    target, got = _target()
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    Capture(target, "z", net[0], mode=mode)  # type: ignore[arg-type]
    ActivationCapture(target, "h", net[1], mode=mode)  # type: ignore[arg-type]
    net(torch.randn(4, 4))
    net.eval()
    with torch.no_grad():
        net(torch.randn(3, 4))
    assert got["take"] == want and got["acts"] == want


def test_default_mode_is_train_and_no_grad_alone_still_captures() -> None:
    """A training-mode forward under no_grad (an EMA teacher, say) is captured by default."""
    target, got = _target()
    lin = nn.Linear(4, 3)
    Capture(target, "z", lin)
    with torch.no_grad():
        lin(torch.randn(2, 4))
    lin.eval()
    lin(torch.randn(5, 4))
    assert got["take"] == [2]


class OptimizedModule(nn.Module):
    """A stand-in for torch.compile's wrapper (same class name, same ``_orig_mod``)."""

    def __init__(self, mod: nn.Module) -> None:
        super().__init__()
        self._orig_mod = mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._orig_mod(x)


def test_a_wrapper_is_in_eval_mode_when_its_module_is() -> None:
    target, got = _target()
    inner = nn.Linear(4, 3)
    wrapped = OptimizedModule(inner)
    Capture(target, "z", wrapped)
    wrapped(torch.randn(2, 4))
    inner.eval()                                 # the wrapper's own flag stays True
    assert wrapped.training
    wrapped(torch.randn(5, 4))
    wrapped.eval()
    wrapped(torch.randn(6, 4))
    wrapped.train()
    wrapped(torch.randn(7, 4))
    assert got["take"] == [2, 7]


def test_a_bad_mode_is_refused() -> None:
    target, _ = _target()
    with pytest.raises(ValueError, match="capture must be one of"):
        Capture(target, "z", nn.Linear(2, 2), mode="sometimes")  # type: ignore[arg-type]
