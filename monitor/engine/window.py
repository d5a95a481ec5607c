"""Where a sliding window's next rows go (torch-free): the ring cursor every windowed state
shares — the in-process scorers (torch) and the sidecar's ONNX streams (numpy).

A window of ``size`` rows is a ring: a batch of ``b ≤ size`` rows goes to the slots
``(pos + i) mod size``; each full pass is a wrap, and the streaming sums are rebuilt exactly from
the ring every ``rebuild_every_wraps`` wraps (float64 round-off stays bounded). Positions are
host integers derived from shapes only, so advancing never synchronises a device.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace, device


class RingCursor:
    """Slot positions, fill level and wrap count of a ring of ``size`` slots."""

    def __init__(self, size: int, rebuild_every_wraps: int = 0) -> None:
        if size < 1:
            raise ValueError(f"a ring needs at least one slot, got {size}")
        self.size = size
        self.rebuild_every_wraps = rebuild_every_wraps
        self.pos = 0          # next slot
        self.filled = 0       # slots written at least once
        self.wraps = 0        # full passes

    def reset(self) -> None:
        self.pos = self.filled = self.wraps = 0

    def slots(self, b: int, like: Any) -> Any:
        """The ``(b,)`` integer slots of the next ``b`` rows, an array of ``like``'s namespace
        and device (``b ≤ size``)."""
        xp = array_namespace(like)
        return (xp.arange(b, device=device(like)) + self.pos) % self.size

    def advance(self, b: int) -> bool:
        """Move past ``b`` written slots; True when this wrap is one that calls for an exact
        rebuild of the sums (every ``rebuild_every_wraps``-th; never with 0)."""
        self.filled = min(self.size, self.filled + b)
        self.pos += b
        if self.pos < self.size:
            return False
        self.pos -= self.size
        self.wraps += 1
        return bool(self.rebuild_every_wraps) and self.wraps % self.rebuild_every_wraps == 0

    def state(self) -> dict[str, int]:
        return {"_pos": self.pos, "_wraps": self.wraps, "_filled": self.filled}

    def load(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state` (values may be 0-d tensors from a checkpoint)."""
        self.pos = int(state.get("_pos", 0))
        self.wraps = int(state.get("_wraps", 0))
        self.filled = int(state.get("_filled", self.filled))
