"""Capture: turn whatever a module emits into a (b, d) batch of rows, without touching training.

Forward hooks always return None, work on detached tensors under ``no_grad``, never use the
global RNG (row subsampling draws from the monitor's own ``torch.Generator``) and never
synchronise the device: every size used here comes from tensor shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from monitor.monitor import Monitor

Tokens = Literal["mean", "cls", "all"]
TOKEN_MODES: tuple[str, ...] = ("mean", "cls", "all")


def first_tensor(output: Any) -> Tensor | None:
    """The first floating-point tensor in a module output (tensor, tuple/list, dict, dataclass)."""
    if isinstance(output, Tensor):
        return output if output.is_floating_point() else None
    if isinstance(output, Mapping):
        items: Sequence[Any] = list(output.values())
    elif isinstance(output, (tuple, list)):
        items = output
    elif hasattr(output, "__dict__"):
        items = list(vars(output).values())
    else:
        return None
    for item in items:
        found = first_tensor(item)
        if found is not None:
            return found
    return None


def to_rows(t: Tensor, tokens: Tokens = "mean") -> Tensor:
    """Shape a captured tensor into rows ``(b, d)``.

    * ``(b, d)``: as is.
    * ``(b, T, d)``: token sequences (batch, tokens, features): mean over tokens (``"mean"``),
      the first token (``"cls"``) or every token as a row (``"all"``).
    * ``(b, C, *spatial)`` with 1–3 spatial dims after a 4-D/5-D conv output: global average
      pool over the spatial dims → ``(b, C)``.
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got dtype {t.dtype}")
    if t.dim() == 2:
        return t
    if t.dim() == 3:
        if tokens == "mean":
            return t.mean(dim=1)
        if tokens == "cls":
            return t[:, 0]
        if tokens == "all":
            return t.reshape(-1, t.shape[-1])
        raise ValueError(f"tokens must be one of {TOKEN_MODES}, got {tokens!r}")
    if t.dim() in (4, 5):
        return t.mean(dim=tuple(range(2, t.dim())))
    raise ValueError("expected rows (b, d), tokens (b, T, d) or conv maps (b, C, H, W[, D]); "
                     f"got shape {tuple(t.shape)}")


def subsample(rows: Tensor, max_rows: int, generator: torch.Generator
              ) -> tuple[Tensor, Tensor | None]:
    """At most ``max_rows`` rows drawn uniformly without replacement with ``generator``, and
    their indices in ``rows`` (None when every row is kept, in order)."""
    b = rows.shape[0]
    if b <= max_rows:
        return rows, None
    keys = torch.rand(b, generator=generator, device=rows.device)          # (b,)
    idx = keys.topk(max_rows).indices                                       # (max_rows,)
    return rows.index_select(0, idx), idx


class Capture:
    """A forward hook feeding one stream of a :class:`~monitor.monitor.Monitor`."""

    def __init__(self, monitor: Monitor, stream: str, module: nn.Module,
                 select: Callable[[Any], Tensor] | None = None, tokens: Tokens = "mean") -> None:
        if tokens not in TOKEN_MODES:
            raise ValueError(f"tokens must be one of {TOKEN_MODES}, got {tokens!r}")
        if select is not None and not callable(select):
            raise TypeError(f"select must be callable(output) -> Tensor, got {type(select).__name__}")
        self.monitor = monitor
        self.stream = stream
        self.select = select
        self.tokens: Tokens = tokens
        self.enabled = True
        self._handle = module.register_forward_hook(self)

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self.enabled:
            return None
        try:
            with torch.no_grad():
                t = self.select(output) if self.select is not None else first_tensor(output)
                if t is None:
                    raise TypeError(f"module output of type {type(output).__name__} holds no "
                                    "floating-point tensor; pass select=")
                self.monitor._ingest(self.stream, t.detach(), self.tokens, from_hook=True)
        except Exception as exc:  # never reaches training
            self.monitor._errors.record("capture", exc, key=f"capture[{self.stream}]")
            if not isinstance(exc, (ValueError, TypeError)):
                self.enabled = False  # unexpected failure: switch this hook off
            if self.monitor.strict:
                raise
        return None

    def remove(self) -> None:
        """Detach the hook from its module."""
        self._handle.remove()
        self.enabled = False


ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Softplus, nn.Tanh, nn.Sigmoid, nn.Hardtanh)
"""Modules :meth:`Monitor.watch_activations` finds by default."""


class ActivationCapture(Capture):
    """A forward hook feeding one activation layer's plasticity statistics."""

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self.enabled:
            return None
        try:
            with torch.no_grad():
                t = first_tensor(output)
                if t is None:
                    raise TypeError(f"activation output of type {type(output).__name__} holds "
                                    "no floating-point tensor")
                self.monitor._ingest_activations(self.stream, t.detach())
        except Exception as exc:  # never reaches training
            self.monitor._errors.record("activations", exc, key=f"activations[{self.stream}]")
            if not isinstance(exc, (ValueError, TypeError)):
                self.enabled = False
            if self.monitor.strict:
                raise
        return None
