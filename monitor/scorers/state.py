"""Scorer base: device-resident state declared with its cross-rank reduction.

Shaped like a torchmetrics ``Metric``: ``add_state(name, default, reduce)`` declares a tensor
that ``update()`` accumulates on the device and ``compute()`` reads; ``reset()`` restores the
defaults, ``state_dict()``/``load_state_dict()`` checkpoint it, and ``reduce`` says how
:mod:`monitor.engine.distributed` combines it across ranks (``"sum"``, ``"max"``, ``"min"``;
``"none"`` for rank-local state such as a ring buffer of raw rows).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

Reduce = Literal["sum", "max", "min", "none"]
_REDUCTIONS: frozenset[str] = frozenset({"sum", "max", "min", "none"})


class Filled(NamedTuple):
    """A state default kept as its description, not as a second copy of the tensor."""

    shape: torch.Size
    dtype: torch.dtype
    value: float


class Scorer:
    """Base class for streaming scorers with declared, reducible state."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._defaults: dict[str, Tensor | Filled] = {}
        self._reductions: dict[str, Reduce] = {}

    def add_state(self, name: str, default: Tensor, reduce: Reduce, *,
                  fill: float | None = None) -> None:
        """Declare a state tensor ``name`` with its initial value and cross-rank reduction.

        ``fill``: the value every element of ``default`` holds (``torch.zeros`` → 0.0). Then
        only the shape, dtype and value are kept for :meth:`reset` instead of a copy of the
        tensor, which for a d×d second moment or a window of rows would double the memory.
        (Not checked against ``default``'s values: that would synchronise the device.)"""
        if reduce not in _REDUCTIONS:
            raise ValueError(f"reduce must be one of {sorted(_REDUCTIONS)}, got {reduce!r}")
        if not isinstance(default, Tensor):
            raise TypeError(f"state {name!r}: default must be a tensor, got {type(default).__name__}")
        if name in self._defaults or hasattr(self, name):
            raise ValueError(f"state {name!r} is already defined on {type(self).__name__}")
        default = default.detach().to(self.device)  # create defaults on self.device: no copy
        self._defaults[name] = (default.clone() if fill is None
                                else Filled(default.shape, default.dtype, float(fill)))
        self._reductions[name] = reduce
        setattr(self, name, default)

    def default(self, name: str) -> Tensor:
        """A fresh tensor holding state ``name``'s default, on this scorer's device."""
        spec = self._defaults[name]
        if isinstance(spec, Filled):
            return torch.full(spec.shape, spec.value, dtype=spec.dtype, device=self.device)
        return spec.clone()

    @property
    def reductions(self) -> dict[str, Reduce]:
        """Every state's declared reduction (name → reduce)."""
        return dict(self._reductions)

    def reset(self) -> None:
        """Restore every state to its default."""
        for name in self._defaults:
            setattr(self, name, self.default(name))

    def state_dict(self) -> dict[str, Tensor]:
        """Copies of the states on the CPU (host transfer: call at publish/checkpoint only)."""
        return {name: getattr(self, name).detach().to("cpu", copy=True) for name in self._defaults}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load states saved by :meth:`state_dict`; shapes must match the declared ones."""
        missing = set(self._defaults) - set(state)
        if missing:
            raise KeyError(f"{type(self).__name__}: missing states {sorted(missing)}")
        for name, default in self._defaults.items():
            value = torch.as_tensor(state[name])
            if value.shape != default.shape:
                raise ValueError(f"{type(self).__name__}.{name}: expected shape "
                                 f"{tuple(default.shape)}, got {tuple(value.shape)}")
            setattr(self, name, value.to(device=self.device, dtype=default.dtype).clone())
