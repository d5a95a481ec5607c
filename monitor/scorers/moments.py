"""Shared sliding-window second-moment state of one stream of embedding rows.

Every spectral and collapse scorer of a stream reads this one state (docs/design.md: "scorers that
need the same statistics share them"): the uncentred second moment ``S = Σ z zᵀ`` (d×d), the
column sum ``Σ z``, the sums of L2-normalised rows ``Σ ẑ`` and ``Σ ẑ²`` and the row count ``n``,
all in float64 (docs/metrics.md §1 "Streaming"), over the last ``window`` rows.

The window is exact: a ring buffer keeps the rows in float32; each update adds the new rows'
contributions and subtracts those of the rows they overwrite, with one ``b``-row matrix product
accumulated in place, ``S += (new + old)ᵀ(new − old)``, whose symmetric part is the change
(:func:`~monitor.functional.moments.add_window_delta_`; ``2·b·d²`` flops, the cost of the
batch's own GEMM). ``S`` is symmetrised once in :meth:`settle`. The drift is float64
round-off; the sums are rebuilt from the ring every ``rebuild_every_wraps`` passes to keep it
bounded.

Incremental updates cost ``2·b·d²`` flops per batch, a rebuild from the ring ``2·window·d²``.
When more than a window of rows arrives between two reads, the incremental updates stop for
the rest of that interval (rows still go into the ring) and :meth:`settle`, which every reader
calls first, rebuilds the sums from the ring once. So the cost between reads is at most about
twice the cheaper of the two, whatever the publish cadence and batch size.

A compact checkpoint (``state_dict(compact=True)``) keeps the sums and each slot's validity
but not the ring of rows (``4·window·d`` bytes); loading it restores the window as a
:class:`~monitor.scorers.state.FrozenBlock`: exact at the load, the saved rows evicted in ring
order as new rows come, each taking the saved rows' mean with it, and exact again after
``window`` new rows.

Rows with a NaN/Inf are counted (``nonfinite`` counts values) and stored as zero rows with a
zero validity weight, so they never reach a score. Nothing here synchronises the device:
positions in the ring are host integers derived from shapes, counts stay tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from monitor.engine.window import RingCursor
from monitor.validation import check_int
from monitor.functional.moments import add_window_delta_, clean_rows, symmetrize_
from monitor.functional.spectral import normalize_rows
from monitor.scorers.state import (
    FrozenBlock,
    Scorer,
    load_full_with_block,
    pack_symmetric,
    unpack_symmetric,
)

BLOCK_SUMS: tuple[str, ...] = ("s", "zsum", "nsum", "nsq")
"""The window sums a restored compact block contributes to (``n`` counts its rows through the
ring's validity instead)."""


class WindowMoments(Scorer):
    """Sliding-window sufficient statistics (S, Σz, Σẑ, Σẑ², n) of ``(b, d)`` row batches."""

    def __init__(self, dim: int, window: int, device: torch.device | str = "cpu",
                 rebuild_every_wraps: int = 64) -> None:
        super().__init__(device)
        self.dim = check_int("dim", dim, 1)
        self.window = check_int("window", window, 2, "rows")
        self.rebuild_every_wraps = rebuild_every_wraps
        # Created on the device directly: a host→device copy here would sync on first use.
        f64 = {"dtype": torch.float64, "device": self.device}
        self.add_state("s", torch.zeros(dim, dim, **f64), reduce="sum", fill=0.0)
        self.add_state("zsum", torch.zeros(dim, **f64), reduce="sum", fill=0.0)
        self.add_state("nsum", torch.zeros(dim, **f64), reduce="sum", fill=0.0)
        self.add_state("nsq", torch.zeros(dim, **f64), reduce="sum", fill=0.0)
        self.add_state("n", torch.zeros((), **f64), reduce="sum", fill=0.0)
        self.add_state("seen", torch.zeros((), **f64), reduce="sum", fill=0.0)
        self.add_state("nonfinite", torch.zeros((), **f64), reduce="sum", fill=0.0)
        self.add_state("ring", torch.zeros(window, dim, dtype=torch.float32, device=self.device),
                       reduce="none", fill=0.0)
        self.add_state("ring_valid", torch.zeros(window, **f64), reduce="none", fill=0.0)
        self._ring = RingCursor(window, rebuild_every_wraps)
        self._pending = 0        # rows since the last settle (host int: from shapes, no sync)
        self._stale = False      # sums lag the ring; settle() rebuilds them
        self._asym = False       # s holds an unsymmetrised sum; settle() symmetrises it
        self._block: FrozenBlock | None = None   # sums restored from a compact checkpoint

    def reset(self) -> None:
        super().reset()
        self._ring.reset()
        self._pending = 0
        self._stale = False
        self._asym = False
        self._block = None

    def settle(self) -> None:
        """Bring the window sums up to date with the ring; call before reading them."""
        if self._stale:
            self.rebuild()
        elif self._asym:
            symmetrize_(self.s)
        self._stale = False
        self._asym = False
        self._pending = 0

    def update(self, rows: Tensor) -> None:
        """Add a ``(b, d)`` batch of rows (any float dtype, on this scorer's device)."""
        if rows.dim() != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"expected rows of shape (b, {self.dim}), got {tuple(rows.shape)}")
        if rows.shape[0] > self.window:
            rows = rows[-self.window:]
        if rows.shape[0] == 0:
            return
        self._add_clean(*clean_rows(rows.detach().to(self.device)))        # (b, d), (b,), ()

    def _add_clean(self, x: Tensor, valid: Tensor, nonfinite: Tensor) -> None:
        """Add clean float32 rows ``x`` (b, dim) with validity ``valid`` (b,) (1 ≤ b ≤ window)."""
        b = x.shape[0]
        self.nonfinite += nonfinite
        self.seen += valid.sum()

        idx = self._ring.slots(b, self.ring)
        evicted = self._block.first_writes(b) if self._block is not None else 0  # host int
        self._pending += b
        self._stale = self._stale or self._pending > self.window
        if self._stale:                                                     # settle() rebuilds
            self.ring.index_copy_(0, idx, x)
            self.ring_valid.index_copy_(0, idx, valid)
            self._advance(b, rebuild=False)
            self._retire_block()
            return
        old = self.ring.index_select(0, idx)                                # (b, d)
        old_valid = self.ring_valid.index_select(0, idx)                    # (b,)
        self.ring.index_copy_(0, idx, x)
        self.ring_valid.index_copy_(0, idx, valid)

        add_window_delta_(self.s, self.zsum, self.nsum, self.nsq, x, old)  # one b-row GEMM
        self._asym = True                                                   # settle() symmetrises
        self.n += valid.sum() - old_valid.sum()
        if evicted and self._block is not None:     # saved rows leave: their mean share each
            share = -old_valid[:evicted].sum() / self._block.count          # ()
            for name in BLOCK_SUMS:
                getattr(self, name).addcmul_(self._block.tensors[name], share)  # no temp
        self._advance(b, rebuild=True)
        self._retire_block()

    def _retire_block(self) -> None:
        """Drop a restored block once every slot has been written since the load: the ring
        then holds new rows only, and settle() rebuilds the sums exactly from it."""
        if self._block is not None and self._block.done:
            self._block = None
            self._stale = True

    def _advance(self, b: int, rebuild: bool) -> None:
        if self._ring.advance(b) and rebuild:
            self.rebuild()

    def rebuild(self) -> None:
        """Recompute the window sums exactly from the ring (removes accumulated round-off)."""
        x = self.ring.to(torch.float64)                                     # (window, d)
        normed = normalize_rows(x)
        self.s = x.T @ x
        self.zsum = x.sum(0)
        self.nsum = normed.sum(0)
        self.nsq = (normed * normed).sum(0)
        self.n = self.ring_valid.sum()
        if self._block is not None:                  # + the share of the restored sums left
            w = self._block.weight(self.ring_valid)
            for name in BLOCK_SUMS:
                setattr(self, name, getattr(self, name) + w * self._block.tensors[name])
        self._asym = False

    def _block_negatives(self, count: Tensor) -> Tensor:
        """``count`` plus the restored block's share of its negative entries."""
        if self._block is None:
            return count
        return count + self._block.weight(self.ring_valid) * self._block.tensors["neg"]

    def negative_count(self) -> Tensor:
        """Negative entries among the window's valid rows, () float64 (Q-Score assumes
        non-negative features; docs/metrics.md §4 pitfall 2). Invalid and unfilled ring rows are
        zero rows, so one ``count_nonzero`` over the ring counts only valid entries (one pass
        at publish; no per-batch work)."""
        return self._block_negatives(torch.count_nonzero(self.ring < 0).to(torch.float64))

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self, compact: bool = False) -> dict[str, Tensor]:
        """The window state on the CPU. Full: every state, ring included (``8d² + 4·window·d +
        8·window`` bytes and scalars). ``compact=True``: the sums (``S`` as its lower triangle,
        ``4d(d+1)`` bytes), counters, the window's negative-entry count and each slot's validity
        (bool, ``window`` bytes), not the rows; :meth:`load_state_dict` restores it as a
        :class:`~monitor.scorers.state.FrozenBlock` (see the module docstring)."""
        self.settle()
        if compact:
            cpu = {name: getattr(self, name).detach().to("cpu", copy=True)
                   for name in ("zsum", "nsum", "nsq", "n", "seen", "nonfinite")}
            # sync: state_dict(compact=True) copies to the host at checkpoint time, off the hot path
            return {"_compact": torch.tensor(True), "s_packed": pack_symmetric(self.s).cpu(),
                    **cpu, "_neg": self.negative_count().cpu(),
                    "ring_valid": (self.ring_valid > 0).cpu(),
                    "_pos": torch.tensor(self._ring.pos), "_wraps": torch.tensor(self._ring.wraps)}
        state = super().state_dict()
        if self._block is not None:          # restored sums not evicted yet: keep them
            state.update(self._block.state(self.ring_valid))
            state["ring_valid"] = state["ring_valid"] * self._block.touched(state["ring_valid"])
        state["_pos"] = torch.tensor(self._ring.pos)
        state["_wraps"] = torch.tensor(self._ring.wraps)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load a full or a compact (``_compact``) :meth:`state_dict`."""
        if "_compact" in state:
            self._load_compact(state)
            return
        load_full_with_block(self, state)
        self._pending = 0
        self._stale = False
        self._asym = False

    def _load_compact(self, state: dict[str, Tensor]) -> None:
        d, w = self.dim, self.window
        f64 = {"dtype": torch.float64, "device": self.device}
        s = unpack_symmetric(torch.as_tensor(state["s_packed"]), d).to(**f64)
        sums = {}
        for name, shape in (("zsum", (d,)), ("nsum", (d,)), ("nsq", (d,)), ("n", ()),
                            ("seen", ()), ("nonfinite", ()), ("_neg", ()), ("ring_valid", (w,))):
            value = torch.as_tensor(state[name])
            if value.shape != shape:
                raise ValueError(f"{type(self).__name__}.{name}: expected shape {shape}, "
                                 f"got {tuple(value.shape)}")
            sums[name] = value.to(**f64)
        count = float(torch.as_tensor(state["ring_valid"]).sum())    # host copy: no device sync
        self.reset()                                 # zero rows in the ring
        self.s = s
        for name in ("zsum", "nsum", "nsq", "n", "seen", "nonfinite", "ring_valid"):
            setattr(self, name, sums[name])
        self._ring.load(state)
        if count > 0:
            self._block = FrozenBlock({"s": s.clone(), "zsum": sums["zsum"].clone(),
                                       "nsum": sums["nsum"].clone(), "nsq": sums["nsq"].clone(),
                                       "neg": sums["_neg"]}, count, self._ring.pos, w)
