"""Capture: forward hooks that feed a :class:`CaptureTarget` rows, without touching training.

Forward hooks always return None, work on detached tensors under ``no_grad`` and never
synchronise the device; the row reduction itself is :mod:`monitor.capture.rows`. Under
``torch.compile`` a hook calls the opaque custom op ``repwatch::capture`` (registry ``_LIVE``).
A hook captures according to its mode (:data:`monitor.config.CAPTURE_MODES`): by default only
while its module is in training mode, so validation passes stay out of the training windows.
"""

from __future__ import annotations

import itertools
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from monitor.capture.rows import first_tensor, to_rows
from monitor.config import CAPTURE_MODES, TOKEN_MODES, CaptureMode, Tokens
from monitor.errors import ErrorLog


_LIVE: weakref.WeakValueDictionary[int, Capture] = weakref.WeakValueDictionary()
_KEYS = itertools.count()


def _compiling() -> bool:
    """True while torch.compile (Dynamo) traces the code that calls this."""
    check = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling
    return bool(check())


if hasattr(torch.library, "custom_op"):                                 # torch >= 2.4
    @torch.library.custom_op("repwatch::capture", mutates_args=())
    def _capture_op(t: Tensor, key: int) -> None:
        """Inside a compiled graph: hand ``t`` to capture ``key`` (runs eagerly, outside the
        graph, so the hook costs no graph break and works under ``fullgraph=True``)."""
        capture = _LIVE.get(key)
        if capture is not None:
            capture._process(t, selected=True)

    @_capture_op.register_fake
    def _capture_fake(t: Tensor, key: int) -> None:
        return None

    if hasattr(torch.fx.node, "has_side_effect"):    # not dead code to the graph compilers
        torch.fx.node.has_side_effect(torch.ops.repwatch.capture.default)
    _COMPILED_CAPTURE: Callable[[Tensor, int], None] | None = torch.ops.repwatch.capture
else:  # pragma: no cover - older torch: Dynamo traces the hook itself (graph breaks)
    _COMPILED_CAPTURE = None


def graph_capturing(t: Tensor) -> bool:
    """True while ``t``'s device stream is being captured into a CUDA graph."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


@dataclass(frozen=True)
class CaptureTarget:
    """Everything a hook may use of its owner (a :class:`~monitor.monitor.Monitor` builds one):
    where rows go, whether this step is captured, where errors and host time are counted."""

    take: Callable[[str, Tensor, Tokens], None]
    """Rows of a watched stream ``(stream, tensor, tokens)``, from a hook."""
    stage: Callable[[str, Tensor], None]
    """Rows reduced inside a CUDA graph capture, into the stream's static buffer."""
    take_activations: Callable[[str, Tensor], None]
    """A watched activation layer's raw output."""
    capturing: Callable[[], bool]
    """Whether rows are captured now (the overhead budget may skip steps; ``paused()``)."""
    errors: ErrorLog
    spent: Callable[[float], None]
    """Host seconds the hook spent (the overhead budget's account)."""


class Capture:
    """A forward hook feeding one stream of a :class:`CaptureTarget` (a Monitor's).

    Under ``torch.compile`` the hook only picks the tensor and calls the opaque custom op
    ``repwatch::capture``, which does the work at run time: the compiled graph keeps one node
    for it, with no graph break (``fullgraph=True`` works) and the same rows as eager mode.

    ``mode``: ``"train"`` captures only while ``module`` (and the module a DDP, DataParallel,
    FSDP or ``torch.compile`` wrapper wraps) is in training mode, ``"eval"`` only while it is
    not, ``"always"`` whatever its mode.
    """

    component = "capture"

    def __init__(self, target: CaptureTarget, stream: str, module: nn.Module,
                 select: Callable[[Any], Tensor] | None = None, tokens: Tokens = "mean",
                 mode: CaptureMode = "train") -> None:
        if tokens not in TOKEN_MODES:
            raise ValueError(f"tokens must be one of {TOKEN_MODES}, got {tokens!r}")
        if mode not in CAPTURE_MODES:
            raise ValueError(f"capture must be one of {CAPTURE_MODES}, got {mode!r}")
        if select is not None and not callable(select):
            raise TypeError(f"select must be callable(output) -> Tensor, got {type(select).__name__}")
        self.target = target
        self.stream = stream
        self.select = select
        self.tokens: Tokens = tokens
        self.mode: CaptureMode = mode
        self.enabled = True
        self._inner = _wrapped(module)
        self._guard = target.errors.guard(self.component, key=f"{self.component}[{stream}]",
                                          on_error=self._switch_off)
        self._key = next(_KEYS)
        _LIVE[self._key] = self
        self._handle = module.register_forward_hook(self)

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.mode != "always" and self._training(module) != (self.mode == "train"):
            return None                  # e.g. a validation pass under model.eval()
        if _COMPILED_CAPTURE is not None and _compiling():
            t = self._tensor(output)
            if t is not None:
                _COMPILED_CAPTURE(t.detach(), self._key)
            return None
        self._process(output, selected=False)
        return None

    def _training(self, module: nn.Module) -> bool:
        """Whether ``module`` runs in training mode: its flag, and the wrapped module's for a
        wrapper (``inner.eval()`` leaves a DDP/compile wrapper's own flag True). Under
        torch.compile Dynamo reads (and guards on) the flag while tracing."""
        if not module.training:
            return False
        inner = self._inner() if self._inner is not None else None
        return inner is None or bool(inner.training)

    def _tensor(self, output: Any) -> Tensor | None:
        return self.select(output) if self.select is not None else first_tensor(output)

    def _take(self, t: Tensor) -> None:
        self.target.take(self.stream, t, self.tokens)

    def _stage(self, t: Tensor) -> None:
        """During CUDA graph capture: put the row reduction and a copy into a static buffer
        into the graph; every replay refreshes the buffer and ``Monitor.step()`` scores it."""
        self.target.stage(self.stream, to_rows(t, self.tokens))

    def _process(self, output: Any, selected: bool) -> None:
        """Capture ``output`` (the module's output, or the picked tensor when ``selected``);
        errors are counted, never raised into training (unless ``strict``). Steps that the
        overhead budget skips return at once, without touching ``output``."""
        if not self.enabled or not self.target.capturing():
            return
        t0 = time.perf_counter()
        try:
            with self._guard, torch.no_grad():
                t = output if selected else self._tensor(output)
                if t is None:
                    raise TypeError(f"module output of type {type(output).__name__} holds no "
                                    "floating-point tensor"
                                    + ("; pass select=" if self.component == "capture" else ""))
                if graph_capturing(t):
                    self._stage(t.detach())
                else:
                    self._take(t.detach())
        finally:
            self.target.spent(time.perf_counter() - t0)

    def _switch_off(self, exc: Exception) -> None:
        """An unexpected failure (not a bad-input ValueError/TypeError) switches this hook off."""
        if not isinstance(exc, (ValueError, TypeError)):
            self.enabled = False

    def remove(self) -> None:
        """Detach the hook from its module."""
        self._handle.remove()
        self.enabled = False
        _LIVE.pop(self._key, None)


def _wrapped(module: nn.Module) -> weakref.ref[nn.Module] | None:
    """A weak reference to the module a DDP/DataParallel/FSDP/``torch.compile`` wrapper wraps
    (None for a plain module): its training flag decides too."""
    from monitor.engine.distributed import unwrap

    inner = unwrap(module)
    return weakref.ref(inner) if inner is not module else None


class ActivationCapture(Capture):
    """A forward hook feeding one activation layer's plasticity statistics."""

    component = "activations"

    def _tensor(self, output: Any) -> Tensor | None:
        return first_tensor(output)

    def _take(self, t: Tensor) -> None:
        self.target.take_activations(self.stream, t)

    def _stage(self, t: Tensor) -> None:
        raise ValueError("activation layers are not watched inside CUDA graphs (their per-unit "
                         "sums need the whole activation tensor); watch() streams are")
