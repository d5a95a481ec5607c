"""Sidecar mode: ``repwatch serve`` scores embedding batches streamed by trainers.

:mod:`monitor.sidecar.service` is the FastAPI service and its scoring backend; the wire format
and the shared-memory ring it reads are in :mod:`monitor.transport`.
"""
