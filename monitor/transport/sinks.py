"""The sinks of ``Monitor(sink=...)``: a :class:`~monitor.transport.sender.Sender` on a
transport."""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from monitor.transport.http import HttpTransport
from monitor.transport.sender import Sender
from monitor.transport.shm import RingSpec, ShmTransport


class Sink(Protocol):
    """What a Monitor needs from a sink."""

    def submit(self, stream: str, rows: Tensor, labels: Tensor | None, step: int) -> None: ...
    def counts(self) -> dict[str, int]: ...
    def close(self, timeout: float = 5.0) -> None: ...


class HttpSink(Sender):
    """A sender posting to a sidecar at ``url`` (:class:`~monitor.transport.http.HttpTransport`:
    ``token``, ``timeout``); the other arguments are the :class:`Sender`'s."""

    transport: HttpTransport

    def __init__(self, url: str, token: str | None = None, *, run: str,
                 queue_batches: int = 256, timeout: float = 5.0,
                 backoff: tuple[float, float] = (0.5, 30.0), dtype: str = "float32",
                 seed: int = 0) -> None:
        super().__init__(HttpTransport(url, token, timeout=timeout), run=run,
                         queue_batches=queue_batches, backoff=backoff, dtype=dtype, seed=seed)

    @property
    def url(self) -> str:
        return self.transport.url


class ShmSink(Sender):
    """A sender writing into the shared-memory ring ``spec`` of ``repwatch serve --shm NAME``
    (:class:`~monitor.transport.shm.ShmTransport`: ``stale_after``); the other arguments are
    the :class:`Sender`'s. ``flush()`` also waits until the sidecar has read the ring empty."""

    transport: ShmTransport

    def __init__(self, spec: str, *, run: str, queue_batches: int = 256,
                 backoff: tuple[float, float] = (0.5, 30.0), dtype: str = "float32",
                 seed: int = 0, stale_after: float = 5.0) -> None:
        super().__init__(ShmTransport(spec, stale_after=stale_after), run=run,
                         queue_batches=queue_batches, backoff=backoff, dtype=dtype, seed=seed)

    @property
    def spec(self) -> RingSpec:
        return self.transport.spec


def make_sink(sink: str | Sink, *, token: str | None, run: str) -> Sink:
    """A sink from ``Monitor(sink=...)``: an ``http(s)://`` URL, a ``shm://NAME`` ring, or an
    object with ``submit`` / ``counts`` / ``close``."""
    if isinstance(sink, str):
        if sink.startswith(("http://", "https://")):
            return HttpSink(sink, token, run=run)
        if sink.startswith("shm://"):
            if token is not None:
                raise ValueError("token= applies to http(s):// sinks; a shm:// ring is guarded "
                                 "by the permissions of its shared-memory segment")
            return ShmSink(sink, run=run)
        raise ValueError(f"sink must be an http:// or https:// URL of a repwatch sidecar, or "
                         f"shm://NAME for one on this host, got {sink!r}")
    if token is not None:
        raise ValueError("token= applies to URL sinks; configure a sink object directly")
    if not all(callable(getattr(sink, m, None)) for m in ("submit", "counts", "close")):
        raise TypeError(f"sink must be a URL or an object with submit/counts/close, "
                        f"got {type(sink).__name__}")
    return sink


__all__ = ["HttpSink", "ShmSink", "Sink", "make_sink"]
