"""Scorer base: device-resident state declared with its cross-rank reduction.

Shaped like a torchmetrics ``Metric``: ``add_state(name, default, reduce)`` declares a tensor
that ``update()`` accumulates on the device and ``compute()`` reads; ``reset()`` restores the
defaults, ``state_dict()``/``load_state_dict()`` checkpoint it, and ``reduce`` says how
:mod:`monitor.engine.distributed` combines it across ranks (``"sum"``, ``"max"``, ``"min"``;
``"none"`` for rank-local state such as a ring buffer of raw rows).
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

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

    def state_dict(self, compact: bool = False) -> dict[str, Tensor]:
        """Copies of the states on the CPU (host transfer: call at publish/checkpoint only).
        ``compact``: a scorer holding rings of rows may leave them out (see its own
        ``state_dict``); here, and for scorers without such rings, the same state."""
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


# ---------------------------------------------------------------- compact checkpoints


def pack_symmetric(s: Tensor) -> Tensor:
    """The lower triangle of a symmetric ``(d, d)`` matrix, row by row: ``d(d+1)/2`` values
    (half the bytes of ``s`` in a checkpoint; :func:`unpack_symmetric` mirrors it back)."""
    rows, cols = torch.tril_indices(s.shape[0], s.shape[0], device=s.device)
    return s[rows, cols]


def unpack_symmetric(values: Tensor, dim: int) -> Tensor:
    """The symmetric ``(dim, dim)`` matrix whose lower triangle is ``values``
    (:func:`pack_symmetric`)."""
    if values.shape != (dim * (dim + 1) // 2,):
        raise ValueError(f"expected the {dim * (dim + 1) // 2} values of a packed ({dim}, {dim}) "
                         f"symmetric matrix, got shape {tuple(values.shape)}")
    rows, cols = torch.tril_indices(dim, dim, device=values.device)
    out = values.new_zeros(dim, dim)
    out[rows, cols] = values
    out[cols, rows] = values
    return out


class FrozenBlock:
    """A window restored from a compact checkpoint: its sums without its rows.

    A compact state keeps a window's sums and each slot's validity, not the rows. On loading, the
    ring holds zero rows where the saved rows were (with their validity, so row counts stay
    exact) and the sums equal the saved ones: the first publish after the load is the one before
    the save. Each slot then written for the first time since the load evicts its saved row, as
    the exact window would, and since that row is unknown the sums lose the saved rows' mean,
    ``tensors / count`` (``count``: the saved valid rows), per evicted valid row: the remaining
    saved rows weigh ``weight() = (saved valid rows left) / count``, proportionally. Correct in
    expectation when the saved rows are exchangeable; exact again once every slot has been
    written (``size`` rows after the load), when the block is dropped and the sums are rebuilt
    from the ring, which then holds new rows only.

    ``start``: the ring position at the load; ``written``: slots written since (host ints, from
    shapes only: no device sync).
    """

    def __init__(self, tensors: dict[str, Tensor], count: float, start: int, size: int,
                 written: int = 0) -> None:
        self.tensors = tensors
        self.count = float(count)
        self.start = int(start)
        self.size = int(size)
        self.written = int(written)

    @property
    def done(self) -> bool:
        """Whether every slot has been written since the load (no saved row is left)."""
        return self.written >= self.size

    def first_writes(self, b: int) -> int:
        """Record ``b`` more written slots; how many of them (the first ones) are written for
        the first time since the load, i.e. evict a saved row."""
        k = max(0, min(b, self.size - self.written))
        self.written += b
        return k

    def touched(self, like: Tensor) -> Tensor:
        """``(size,)`` bool on ``like``'s device: the slots written since the load."""
        slots = (torch.arange(self.size, device=like.device) - self.start) % self.size
        return slots < self.written

    def left(self, valid: Tensor) -> Tensor:
        """Saved valid rows not evicted yet, () float64 (``valid``: the ring's validity, which
        holds the saved rows' validity in the slots not written since the load)."""
        return (valid * ~self.touched(valid)).sum().to(torch.float64)

    def weight(self, valid: Tensor) -> Tensor:
        """The share of the saved sums still in the window, () float64 (1 at the load)."""
        return self.left(valid) / self.count

    def state(self, valid: Tensor) -> dict[str, Tensor]:
        """The block for a full checkpoint (``_block.*`` keys; the saved rows' validity goes
        under ``_block.valid``, so that the checkpoint's own ``ring_valid`` marks real rows
        only)."""
        out = {f"_block.{k}": v.detach().to("cpu", copy=True) for k, v in self.tensors.items()}
        out["_block.valid"] = ((valid * ~self.touched(valid)) > 0).cpu()  # sync: checkpoint time
        out["_block.count"] = torch.tensor(self.count, dtype=torch.float64)
        out["_block.start"] = torch.tensor(self.start)
        out["_block.written"] = torch.tensor(self.written)
        return out

    @classmethod
    def from_state(cls, state: dict[str, Tensor], size: int,
                   device: torch.device) -> tuple[FrozenBlock, Tensor] | None:
        """The block of a full checkpoint written by :meth:`state` and the saved rows'
        validity ``(size,)`` float64 (to add to the ring's), or None when it has none."""
        if "_block.count" not in state:
            return None
        valid = torch.as_tensor(state["_block.valid"]).to(device=device, dtype=torch.float64)
        if valid.shape != (size,):
            raise ValueError(f"_block.valid: expected shape ({size},), got {tuple(valid.shape)}")
        fixed = {"_block.valid", "_block.count", "_block.start", "_block.written"}
        tensors = {k[len("_block."):]: torch.as_tensor(v).to(device=device, dtype=torch.float64)
                   for k, v in state.items() if k.startswith("_block.") and k not in fixed}
        block = cls(tensors, float(state["_block.count"]), int(state["_block.start"]), size,
                    int(state["_block.written"]))
        return block, valid


def load_full_with_block(scorer: Any, state: dict[str, Tensor]) -> None:
    """:meth:`Scorer.load_state_dict` of a full state for a scorer with a row ring (``_ring``,
    ``ring_valid``, ``_block``, ``window``, ``device``), including the frozen block of a
    compact load still in transition (``_block.*`` keys, :meth:`FrozenBlock.from_state`)."""
    block = FrozenBlock.from_state(state, scorer.window, scorer.device)
    Scorer.load_state_dict(scorer, state)
    scorer._ring.load(state)
    scorer._block = None
    if block is not None:
        scorer._block, valid = block
        scorer.ring_valid += valid
