"""Sidecar mode: ``repwatch serve`` scores embedding batches streamed by trainers.

:mod:`monitor.sidecar.protocol` (the wire format, numpy only) is what a trainer-side sink
imports; :mod:`monitor.sidecar.service` is the FastAPI service and its scoring backend.
"""

from monitor.sidecar.protocol import ProtocolError, decode_batch, encode_batch

__all__ = ["ProtocolError", "decode_batch", "encode_batch"]
