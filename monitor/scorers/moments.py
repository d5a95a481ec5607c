"""Shared sliding-window second-moment state of one stream of embedding rows.

Every spectral and collapse scorer of a stream reads this one state (DESIGN.md: "scorers that
need the same statistics share them"): the uncentred second moment ``S = Σ z zᵀ`` (d×d), the
column sum ``Σ z``, the sums of L2-normalised rows ``Σ ẑ`` and ``Σ ẑ²`` and the row count ``n``,
all in float64 (METRICS.md §1 "Streaming"), over the last ``window`` rows.

The window is exact: a ring buffer keeps the rows in float32; each update adds the new rows'
contributions and subtracts those of the rows they overwrite, in one matrix product
``[new; old]ᵀ diag(±1) [new; old]``. Products of float32 values are exact in float64, so the
only drift is float64 summation round-off; the sums are rebuilt from the ring every
``rebuild_every_wraps`` passes to keep it bounded.

Incremental updates cost ``2·b·d²`` per batch, a rebuild from the ring ``window·d²``. When more
than half a window of rows arrives between two reads, the incremental updates stop for the rest
of that interval (rows still go into the ring) and :meth:`settle`, which every reader calls
first, rebuilds the sums from the ring once. So the cost between reads is at most about twice
the cheaper of the two, whatever the publish cadence and batch size.

Rows with a NaN/Inf are counted (``nonfinite`` counts values) and stored as zero rows with a
zero validity weight, so they never reach a score. Nothing here synchronises the device:
positions in the ring are host integers derived from shapes, counts stay tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from monitor.functional.moments import clean_rows, window_delta
from monitor.functional.spectral import normalize_rows
from monitor.scorer import Scorer


class WindowMoments(Scorer):
    """Sliding-window sufficient statistics (S, Σz, Σẑ, Σẑ², n) of ``(b, d)`` row batches."""

    def __init__(self, dim: int, window: int, device: torch.device | str = "cpu",
                 rebuild_every_wraps: int = 64) -> None:
        super().__init__(device)
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if window < 2:
            raise ValueError(f"window must be >= 2 rows, got {window}")
        self.dim = dim
        self.window = window
        self.rebuild_every_wraps = rebuild_every_wraps
        # Created on the device directly: a host→device copy here would sync on first use.
        f64 = {"dtype": torch.float64, "device": self.device}
        self.add_state("s", torch.zeros(dim, dim, **f64), reduce="sum")
        self.add_state("zsum", torch.zeros(dim, **f64), reduce="sum")
        self.add_state("nsum", torch.zeros(dim, **f64), reduce="sum")
        self.add_state("nsq", torch.zeros(dim, **f64), reduce="sum")
        self.add_state("n", torch.zeros((), **f64), reduce="sum")
        self.add_state("seen", torch.zeros((), **f64), reduce="sum")
        self.add_state("nonfinite", torch.zeros((), **f64), reduce="sum")
        self.add_state("ring", torch.zeros(window, dim, dtype=torch.float32, device=self.device),
                       reduce="none")
        self.add_state("ring_valid", torch.zeros(window, **f64), reduce="none")
        self._pos = 0
        self._wraps = 0
        self._pending = 0        # rows since the last settle (host int: from shapes, no sync)
        self._stale = False      # sums lag the ring; settle() rebuilds them

    def reset(self) -> None:
        super().reset()
        self._pos = 0
        self._wraps = 0
        self._pending = 0
        self._stale = False

    def settle(self) -> None:
        """Bring the window sums up to date with the ring; call before reading them."""
        if self._stale:
            self.rebuild()
        self._stale = False
        self._pending = 0

    def update(self, rows: Tensor) -> None:
        """Add a ``(b, d)`` batch of rows (any float dtype, on this scorer's device)."""
        if rows.dim() != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"expected rows of shape (b, {self.dim}), got {tuple(rows.shape)}")
        if rows.shape[0] > self.window:
            rows = rows[-self.window:]
        b = rows.shape[0]
        if b == 0:
            return
        x, valid, nonfinite = clean_rows(rows.detach().to(self.device))     # (b, d), (b,), ()
        self.nonfinite += nonfinite
        self.seen += valid.sum()

        idx = (torch.arange(b, device=self.device) + self._pos) % self.window
        self._pending += b
        self._stale = self._stale or 2 * self._pending > self.window
        if self._stale:                                                     # settle() rebuilds
            self.ring.index_copy_(0, idx, x)
            self.ring_valid.index_copy_(0, idx, valid)
            self._advance(b, rebuild=False)
            return
        old = self.ring.index_select(0, idx)                                # (b, d)
        old_valid = self.ring_valid.index_select(0, idx)                    # (b,)
        self.ring.index_copy_(0, idx, x)
        self.ring_valid.index_copy_(0, idx, valid)

        ds, dz, dn, dnsq = window_delta(x, old)
        self.s += ds                                                        # (d, d)
        self.zsum += dz
        self.nsum += dn
        self.nsq += dnsq
        self.n += valid.sum() - old_valid.sum()
        self._advance(b, rebuild=True)

    def _advance(self, b: int, rebuild: bool) -> None:
        self._pos += b
        if self._pos >= self.window:
            self._pos -= self.window
            self._wraps += 1
            if rebuild and self.rebuild_every_wraps and self._wraps % self.rebuild_every_wraps == 0:
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

    def state_dict(self) -> dict[str, Tensor]:
        self.settle()
        state = super().state_dict()
        state["_pos"] = torch.tensor(self._pos)
        state["_wraps"] = torch.tensor(self._wraps)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        super().load_state_dict(state)
        self._pos = int(state.get("_pos", torch.tensor(0)))
        self._wraps = int(state.get("_wraps", torch.tensor(0)))
        self._pending = 0
        self._stale = False
