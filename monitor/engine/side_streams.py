"""repwatch's own CUDA streams: scoring queues behind training without blocking it.

The training stream only records an event (``wait_stream``); the window update, Q-Score and
neural-collapse sums queue on a side stream behind it, and each publish runs there after
waiting for the training stream. Tensors made on the training stream and read on the side
stream are kept from reuse until the side stream is done (``record_stream``). Nothing here
synchronises the host. On the CPU, or when disabled, every block runs as is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor


class SideStreams:
    """One side CUDA stream per device, created on first use."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = bool(enabled)
        self.streams: dict[torch.device, Any] = {}

    def side(self, device: torch.device) -> Any:
        """The side stream of ``device`` (None on the CPU or when disabled)."""
        if device.type != "cuda" or not self.enabled:
            return None
        side = self.streams.get(device)
        if side is None:
            side = torch.cuda.Stream(device=device)
            self.streams[device] = side
        return side

    @contextlib.contextmanager
    def scoring(self, device: torch.device, *handed: Tensor | None) -> Iterator[None]:
        """Run the block's device work on ``device``'s side stream, after the work the
        current (training) stream queued so far; ``handed`` tensors are read there."""
        side = self.side(device)
        if side is None:
            yield
            return
        side.wait_stream(torch.cuda.current_stream(device))
        for t in handed:
            if t is not None and t.is_cuda:
                t.record_stream(side)
        with torch.cuda.stream(side):
            yield

    def scoring_all(self) -> contextlib.ExitStack:
        """Enter :meth:`scoring` on every device with a side stream (a publish's block)."""
        stack = contextlib.ExitStack()
        for device in list(self.streams):
            stack.enter_context(self.scoring(device))
        return stack

    def join(self) -> None:
        """Make each device's current stream wait for the side stream (an event, no host
        sync): before the host or the training stream reads or replaces repwatch's state."""
        for device, side in self.streams.items():
            torch.cuda.current_stream(device).wait_stream(side)

    def hand(self, device: torch.device, tensors: Iterable[Tensor]) -> None:
        """Tensors made on the current stream that now live on the side stream (loaded
        checkpoint states): keep their memory from reuse until the side stream is done."""
        side = self.side(device)
        if side is not None:
            for t in tensors:
                t.record_stream(side)
