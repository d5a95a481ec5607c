"""Rows: turn whatever a module emits into a (b, d) batch of rows, without touching training.

Every size used here comes from tensor shapes (no device synchronisation), and row subsampling
draws from the monitor's own ``torch.Generator`` (:class:`Generators`), never the global RNG.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from monitor.config import TOKEN_MODES, Tokens


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


def _reduce_dtype(t: Tensor) -> torch.dtype:
    """Accumulate a half-precision (bf16/fp16) mean in float32: a bf16 running sum over 196
    tokens or 56×56 positions would lose most of its 8 significant bits."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def to_rows(t: Tensor, tokens: Tokens = "mean") -> Tensor:
    """Shape a captured tensor into rows ``(b, d)``.

    * ``(b, d)``: as is.
    * ``(b, T, d)``: token sequences (batch, tokens, features): mean over tokens (``"mean"``),
      the first token (``"cls"``) or every token as a row (``"all"``).
    * ``(b, C, *spatial)`` with 1–3 spatial dims after a 4-D/5-D conv output: global average
      pool over the spatial dims → ``(b, C)``.

    Means of bf16/fp16 tensors (autocast) are accumulated and returned in float32.
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got dtype {t.dtype}")
    if t.dim() == 2:
        return t
    if t.dim() == 3:
        if tokens == "mean":
            return t.mean(dim=1, dtype=_reduce_dtype(t))
        if tokens == "cls":
            return t[:, 0]
        if tokens == "all":
            return t.reshape(-1, t.shape[-1])
        raise ValueError(f"tokens must be one of {TOKEN_MODES}, got {tokens!r}")
    if t.dim() in (4, 5):
        return t.mean(dim=tuple(range(2, t.dim())), dtype=_reduce_dtype(t))
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


def class_ids(kind: str, values: Tensor | None, b: int) -> Tensor | None:
    """``values`` as a 1-D integer tensor of one class id per sample (logits → argmax), or a
    clear error."""
    if values is None:
        return None
    if not isinstance(values, Tensor):
        raise TypeError(f"{kind} must be a torch.Tensor of class ids, got {type(values).__name__}")
    if values.dim() == 2 and values.is_floating_point():
        values = values.argmax(dim=1)                      # logits/probabilities → ids
    if values.dim() != 1 or values.shape[0] != b:
        raise ValueError(f"{kind} must hold one class id per sample: expected shape ({b},), "
                         f"got {tuple(values.shape)}")
    if values.is_floating_point():
        raise TypeError(f"{kind} must be integer class ids, got dtype {values.dtype}")
    return values.detach()


@dataclass
class Batch:
    """Rows of one captured batch, ready to score: ``rows`` (n, d) float32/64 after the token
    reduction and subsampling, ``index`` their indices in the batch of ``size`` samples (None:
    all, in order), with their ``labels`` and ``predictions`` (class ids) when given."""

    rows: Tensor
    index: Tensor | None
    size: int
    labels: Tensor | None = None
    predictions: Tensor | None = None

    def label(self, labels: Tensor) -> Tensor:
        """The class ids of ``labels`` (one per sample of the batch) for the kept rows."""
        lab = class_ids("labels", labels, self.size)
        assert lab is not None
        lab = lab.to(self.rows.device)
        return lab.index_select(0, self.index) if self.index is not None else lab


def prepare_batch(tensor: Any, tokens: Tokens, max_rows: int,
                  generator: Callable[[torch.device], torch.Generator],
                  labels: Tensor | None = None, predictions: Tensor | None = None
                  ) -> Batch | None:
    """Reduce ``tensor`` to rows, check the class ids, subsample with ``generator(device)``;
    None for an empty batch. Half-precision rows become float32 (exact; sums are float64)."""
    rows = to_rows(tensor, tokens)                                       # (b, d)
    b = rows.shape[0]
    if b == 0 or rows.shape[1] == 0:
        return None
    labels = class_ids("labels", labels, b)
    predictions = class_ids("predictions", predictions, b)
    if predictions is not None and labels is None:
        raise ValueError("predictions need labels too (to know which are misclassified)")
    rows, idx = subsample(rows, max_rows, generator(rows.device))
    if idx is not None:
        labels = labels.index_select(0, idx) if labels is not None else None
        predictions = predictions.index_select(0, idx) if predictions is not None else None
    if rows.dtype in (torch.float16, torch.bfloat16):
        rows = rows.float()
    return Batch(rows, idx, b, labels, predictions)


def find_activations(model: nn.Module, names: Sequence[str] | None,
                     types: tuple[type[nn.Module], ...]) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the activation layers to watch: the modules ``names`` (paths as in
    ``named_modules()``, with or without the DDP/FSDP/``torch.compile`` wrapper segments), or
    every module of ``types``; layers are named without the wrapper segments."""
    from monitor.engine.distributed import named_modules

    unwrapped = dict(named_modules(model))
    if names is None:
        found = [(n, m) for n, m in unwrapped.items() if isinstance(m, types)]
        if not found:
            raise ValueError(f"no activation modules of types {[t.__name__ for t in types]} "
                             f"in {type(model).__name__}; pass names=")
        return found
    found = []
    for n in names:
        try:
            mod = unwrapped[n] if n in unwrapped else model.get_submodule(n)
        except AttributeError:
            raise ValueError(f"no submodule {n!r} in {type(model).__name__}; modules: "
                             f"{list(unwrapped)[:20]}") from None
        found.append((next((k for k, v in unwrapped.items() if v is mod), n), mod))
    return found


def default_stream_name(module: nn.Module, taken: set[str]) -> str:
    """The module's type in lower case (DDP(model), fully_shard → the model's type), numbered
    from 2 when ``taken`` already holds it."""
    from monitor.engine.distributed import type_name

    name = base = type_name(module).lower()
    i = 1
    while name in taken:
        i += 1
        name = f"{base}{i}"
    return name


class Generators:
    """The monitor's own sampling RNG, one ``torch.Generator`` per device seeded with ``seed``
    (never the global RNG: sampling leaves training's random stream untouched)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.by_device: dict[torch.device, torch.Generator] = {}

    def __call__(self, device: torch.device) -> torch.Generator:
        gen = self.by_device.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self.by_device[device] = gen
        return gen

    def state_dict(self) -> dict[str, Tensor]:
        return {str(d): g.get_state() for d, g in self.by_device.items()}

    def load_state_dict(self, state: Mapping[str, Tensor],
                        device_map: Callable[[str], torch.device]) -> None:
        """Restore saved states; a CUDA generator mapped to the CPU starts afresh."""
        self.by_device.clear()
        for name, gstate in state.items():
            dev = device_map(name)
            if dev.type == torch.device(name).type:
                self(dev).set_state(gstate)


ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Softplus, nn.Tanh, nn.Sigmoid, nn.Hardtanh)
"""Modules :meth:`Monitor.watch_activations` finds by default."""


def unit_rows(h: Tensor, max_rows: int, generator: Callable[[torch.device], torch.Generator]
              ) -> Tensor | None:
    """An activation layer's per-sample unit rows (spatial/token positions pooled), at most
    ``max_rows`` of them drawn with ``generator(device)``; None when empty."""
    from monitor.functional.plasticity import pooled_unit_rows

    rows = pooled_unit_rows(h)                                           # (n, units)
    if rows.shape[0] == 0 or rows.shape[1] == 0:
        return None
    return subsample(rows, max_rows, generator(rows.device))[0]
