"""The sinks of ``Monitor(sink=...)``: a :class:`~monitor.transport.sender.Sender` on a
transport, and a :class:`~monitor.transport.readback.SnapshotReader` that reads the run's
snapshots (values and alerts) back from the sidecar (``readback``; None when off)."""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from monitor.transport.http import HttpTransport
from monitor.transport.readback import SnapshotReader, check_every, split_read
from monitor.transport.sender import Sender
from monitor.transport.shm import RingSpec, ShmTransport


class Sink(Protocol):
    """What a Monitor needs from a sink."""

    def submit(self, stream: str, rows: Tensor, labels: Tensor | None, step: int) -> None: ...
    def counts(self) -> dict[str, int]: ...
    def close(self, timeout: float = 5.0) -> None: ...


class _ReadingSink(Sender):
    """A sender with the read-back of the run's snapshots (``readback``, or None)."""

    readback: SnapshotReader | None = None

    def _read_back(self, url: str | None, token: str | None, every: float | None,
                   timeout: float) -> None:
        if url is not None and every is not None:
            self.readback = SnapshotReader(url, self.run, token, every=every, timeout=timeout,
                                           horizon=lambda: self.last_step)

    def close(self, timeout: float = 5.0) -> None:
        """Close the sender (see :meth:`Sender.close`), then stop the read-back."""
        super().close(timeout)
        if self.readback is not None:
            self.readback.close(min(1.0, max(0.0, timeout)))


class HttpSink(_ReadingSink):
    """A sender posting to a sidecar at ``url`` (:class:`~monitor.transport.http.HttpTransport`:
    ``token``, ``timeout``); the other arguments are the :class:`Sender`'s. Every
    ``read_every`` seconds (None: never) its ``readback`` reads the run's snapshots back from
    the same sidecar, with the same token (:mod:`monitor.transport.readback`)."""

    transport: HttpTransport

    def __init__(self, url: str, token: str | None = None, *, run: str,
                 queue_batches: int = 256, timeout: float = 5.0,
                 backoff: tuple[float, float] = (0.5, 30.0), dtype: str = "float32",
                 seed: int = 0, read_every: float | None = 1.0) -> None:
        read_every = check_every(read_every)
        super().__init__(HttpTransport(url, token, timeout=timeout), run=run,
                         queue_batches=queue_batches, backoff=backoff, dtype=dtype, seed=seed)
        self._read_back(url, token, read_every, timeout)

    @property
    def url(self) -> str:
        return self.transport.url


class ShmSink(_ReadingSink):
    """A sender writing into the shared-memory ring ``spec`` of ``repwatch serve --shm NAME``
    (:class:`~monitor.transport.shm.ShmTransport`: ``stale_after``); the other arguments are
    the :class:`Sender`'s. ``flush()`` also waits until the sidecar has read the ring empty.

    The ring has no way back: with ``read=URL`` in the spec
    (``shm://NAME?read=http://127.0.0.1:9400``, the HTTP address of the sidecar serving the
    ring) its ``readback`` reads the run's snapshots back from there every ``read_every``
    seconds, with ``token`` when given; without it, ``readback`` is None."""

    transport: ShmTransport

    def __init__(self, spec: str, *, run: str, queue_batches: int = 256,
                 backoff: tuple[float, float] = (0.5, 30.0), dtype: str = "float32",
                 seed: int = 0, stale_after: float = 5.0, token: str | None = None,
                 read_every: float | None = 1.0, timeout: float = 5.0) -> None:
        if not isinstance(spec, str):
            raise TypeError(f"shm ring must be a string like 'shm://NAME?slots=64&slot_mb=4', "
                            f"got {type(spec).__name__}")
        ring, read = split_read(spec)
        read_every = check_every(read_every)
        if token is not None and read is None:
            raise ValueError("token= applies to the reads of shm://NAME?read=URL only; the "
                             "ring itself is guarded by the permissions of its segment")
        if read is not None:
            HttpTransport(read, token, timeout=timeout)     # check read=, token and timeout
        super().__init__(ShmTransport(ring, stale_after=stale_after), run=run,
                         queue_batches=queue_batches, backoff=backoff, dtype=dtype, seed=seed)
        self._read_back(read, token, read_every, timeout)

    @property
    def spec(self) -> RingSpec:
        return self.transport.spec


def make_sink(sink: str | Sink, *, token: str | None, run: str) -> Sink:
    """A sink from ``Monitor(sink=...)``: an ``http(s)://`` URL, a ``shm://NAME`` ring
    (``?read=URL``: the sidecar's HTTP address, to read its snapshots back), or an object with
    ``submit`` / ``counts`` / ``close`` (and optionally a ``readback``)."""
    if isinstance(sink, str):
        if sink.startswith(("http://", "https://")):
            return HttpSink(sink, token, run=run)
        if sink.startswith("shm://"):
            if token is not None and split_read(sink)[1] is None:
                raise ValueError("token= applies to http(s):// sinks (and to the reads of "
                                 "shm://NAME?read=URL); a shm:// ring is guarded by the "
                                 "permissions of its shared-memory segment")
            return ShmSink(sink, run=run, token=token)
        raise ValueError(f"sink must be an http:// or https:// URL of a repwatch sidecar, or "
                         f"shm://NAME for one on this host, got {sink!r}")
    if token is not None:
        raise ValueError("token= applies to URL sinks; configure a sink object directly")
    if not all(callable(getattr(sink, m, None)) for m in ("submit", "counts", "close")):
        raise TypeError(f"sink must be a URL or an object with submit/counts/close, "
                        f"got {type(sink).__name__}")
    return sink


__all__ = ["HttpSink", "ShmSink", "Sink", "make_sink"]
