"""Trainer → sidecar transport of sidecar mode.

``wire`` (the format), ``http`` and ``shm`` (both ends of the ring) and ``base`` (the contract
between a sender and a transport) are torch-free: the sidecar imports them. ``sender`` (the
queue and thread) and ``sinks`` need torch; their names below load on first use, so importing
this package does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from monitor.transport.base import DROP_REASONS, Drop, Transport
    from monitor.transport.sender import WIRE_DTYPES, Sender
    from monitor.transport.sinks import HttpSink, ShmSink, Sink, make_sink


def __getattr__(name: str) -> Any:
    if name in ("HttpSink", "ShmSink", "Sink", "make_sink"):
        from monitor.transport import sinks
        return getattr(sinks, name)
    if name in ("Sender", "WIRE_DTYPES"):
        from monitor.transport import sender
        return getattr(sender, name)
    if name in ("DROP_REASONS", "Drop", "Transport"):
        from monitor.transport import base
        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DROP_REASONS", "WIRE_DTYPES", "Drop", "HttpSink", "Sender", "ShmSink", "Sink",
           "Transport", "make_sink"]
