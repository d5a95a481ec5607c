"""What a :class:`~monitor.transport.sender.Sender` needs from a transport (torch-free).

The sender owns the queue, the thread, drop accounting and backoff; a transport only delivers
one encoded batch and says why when it did not (a :class:`Drop`). The sender then counts the
rows under ``Drop.reason`` and applies its policy: ``sidecar_down`` / ``sidecar_error`` pause
with backoff and log ``message`` as a warning; ``overload`` pauses for ``retry_after`` (or the
current delay); any other reason logs ``message`` (when given) once per ``key``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

DROP_REASONS: tuple[str, ...] = ("queue_full", "backoff", "sidecar_down", "sidecar_error",
                                 "overload", "rejected", "closed", "error")
"""Reasons a sink drops a batch (see :mod:`monitor.transport.sender`)."""


@dataclass(frozen=True)
class Drop:
    """A batch not delivered: ``reason`` (one of :data:`DROP_REASONS`), a ``message`` for the
    log, its log-once ``key`` (default: the reason), and ``retry_after`` seconds (overload)."""

    reason: str
    message: str = ""
    key: int | str | None = None
    retry_after: float | None = None


class Transport(Protocol):
    """One target of a sender. ``ready``, ``send`` and ``close`` run on the sender's thread,
    ``drained`` on the thread that calls ``flush()``."""

    where: str
    """The target in log lines and reprs (a URL, ``shm://NAME``)."""

    def ready(self) -> Drop | None:
        """None when a batch can go now; else why not (checked before the batch is encoded)."""
        ...

    def send(self, run: str, stream: str, headers: Mapping[str, str], body: bytes,
             deadline: float) -> Drop | None:
        """Deliver one encoded batch; None when delivered. ``deadline``: ``time.monotonic()``
        by which ``close()`` wants the sender done (inf while not closing)."""
        ...

    def drained(self) -> bool:
        """True when what was delivered has also left the transport (HTTP: at once)."""
        ...

    def close(self) -> None:
        """Release connections or mappings (when the sender's thread ends)."""
        ...


__all__ = ["DROP_REASONS", "Drop", "Transport"]
