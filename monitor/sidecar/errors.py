"""The sidecar's refusals and their reasons, torch-free and free of the service.

Both ingest paths raise and count these: the HTTP service (:mod:`monitor.sidecar.service`) and
the shared-memory reader (:mod:`monitor.transport.shm`), which must not import the service
(the service builds its torch backend on :class:`monitor.Monitor`, whose sinks import the shm
transport).
"""

from __future__ import annotations

REJECT_REASONS: tuple[str, ...] = ("unauthorized", "invalid", "unsupported", "too_large",
                                   "bad_request", "too_many_runs", "too_many_streams")
"""Why a batch request was refused before its rows were parsed
(``repwatch_sidecar_rejected_requests_total``)."""


class Rejected(Exception):
    """A request refused with ``status`` (and counted under ``reason`` when not received)."""

    def __init__(self, status: int, reason: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.reason, self.message, self.headers = status, reason, message, headers
