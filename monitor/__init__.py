"""repwatch: a streaming representation-health monitor for PyTorch training.

``from monitor import Monitor`` — see :class:`monitor.monitor.Monitor`. ``Snapshot`` and
``Alert`` are plain data; importing them (or :mod:`exporters`) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from monitor._version import __version__
from monitor.snapshot import Alert, Snapshot

if TYPE_CHECKING:
    from monitor.monitor import Monitor

__all__ = ["Alert", "Monitor", "Snapshot", "__version__"]


def __getattr__(name: str) -> Any:
    # Monitor needs torch; load it on first use so torch-free readers stay torch-free.
    if name == "Monitor":
        from monitor.monitor import Monitor

        return Monitor
    raise AttributeError(f"module 'monitor' has no attribute {name!r}")
