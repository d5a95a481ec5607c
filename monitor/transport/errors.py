"""Refusals of an ingest request and their reasons (torch-free).

The receiving ends raise and count these: the sidecar's HTTP route and the shared-memory reader
(:mod:`monitor.transport.shm`); the transport package depends on nothing of the sidecar.
"""

from __future__ import annotations

REJECT_REASONS: tuple[str, ...] = ("unauthorized", "invalid", "unsupported", "too_large",
                                   "bad_request", "timeout", "too_many_runs", "too_many_streams",
                                   "memory")
"""Why a batch request was refused before its rows were parsed
(``repwatch_sidecar_rejected_requests_total``)."""


class Rejected(Exception):
    """A request refused with ``status`` (and counted under ``reason`` when not received)."""

    def __init__(self, status: int, reason: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.reason, self.message, self.headers = status, reason, message, headers
