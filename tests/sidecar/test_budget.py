"""The sidecar's memory budget and its fairness between runs: a new stream whose scoring state
would pass the budget is refused with a 409 naming the budget; a run whose scoring is slow (a
publish at large d) neither stalls the other runs nor fills the queue they need."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from monitor.sidecar.config import SidecarConfig
from monitor.sidecar.service import Sidecar, create_sidecar_app
from monitor.snapshot import Snapshot
from monitor.transport.errors import Rejected
from monitor.transport.wire import encode_batch


def _rows(b: int, d: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((b, d)).astype(np.float32)


class SlowRunBackend:
    """Blocks on batches of run ``slow`` until ``gate`` is set; records the others."""

    def __init__(self, state_bytes: int = 0) -> None:
        self.gate = threading.Event()
        self.in_slow = threading.Event()
        self.scored: list[str] = []
        self.state_bytes = state_bytes

    def stream_bytes(self, dim: int, stream: str | None = None) -> int:
        return self.state_bytes

    def ingest(self, run: str, stream: str, rows: np.ndarray, labels: Any, step: Any) -> None:
        if run == "slow":
            self.in_slow.set()
            self.gate.wait(30)
        self.scored.append(run)

    def snapshots(self) -> list[Snapshot]:
        return []

    def history(self, run: str) -> list[Snapshot] | None:
        return None

    def close(self) -> None:
        self.gate.set()


@pytest.fixture
def slow() -> Iterator[tuple[Sidecar, SlowRunBackend]]:
    backend = SlowRunBackend()
    sc = Sidecar(SidecarConfig(queue_batches=8), backend)
    yield sc, backend
    backend.gate.set()
    sc.close()


def test_a_slow_run_does_not_stall_the_others(slow: tuple[Sidecar, SlowRunBackend]) -> None:
    sc, backend = slow
    sc.submit("slow", "s", _rows(4, 8), None, None)
    assert backend.in_slow.wait(10)
    for _ in range(3):
        sc.submit("fast", "s", _rows(4, 8), None, None)
    deadline = time.monotonic() + 10
    while backend.scored.count("fast") < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert backend.scored.count("fast") == 3            # scored while "slow" is stuck
    backend.gate.set()
    assert sc.wait_idle(10)


def test_a_stalled_run_holds_at_most_its_share_of_the_queue(
        slow: tuple[Sidecar, SlowRunBackend]) -> None:
    sc, backend = slow
    sc.submit("slow", "s", _rows(4, 8), None, None)
    assert backend.in_slow.wait(10)
    accepted = 0
    for _ in range(8):
        try:
            sc.submit("slow", "s", _rows(4, 8), None, None)
            accepted += 1
        except Rejected as exc:
            assert exc.status == 429 and "share" in exc.message
    assert accepted == 4                                 # half of queue_batches=8
    sc.submit("other", "s", _rows(4, 8), None, None)    # room is left for another run
    backend.gate.set()
    assert sc.wait_idle(10)
    assert backend.scored.count("other") == 1


def test_a_stream_over_the_memory_budget_is_a_409_naming_the_budget() -> None:
    backend = SlowRunBackend(state_bytes=40 << 20)       # 40 MiB per stream
    backend.gate.set()
    config = SidecarConfig(memory_budget_mb=100)
    sc = Sidecar(config, backend)
    client = TestClient(create_sidecar_app(config, sc))
    try:
        for stream in ("a", "b"):
            headers, body = encode_batch(_rows(4, 8))
            assert client.post(f"/v1/runs/r/streams/{stream}/batches", headers=headers,
                               content=body).status_code == 202
        headers, body = encode_batch(_rows(4, 8))
        r = client.post("/v1/runs/r/streams/c/batches", headers=headers, content=body)
        assert r.status_code == 409
        assert "memory budget is 100 MiB" in r.json()["detail"]
        assert sc.accounting()["rejected"] == {"memory": 1}
        headers, body = encode_batch(_rows(4, 8))          # known streams go on
        assert client.post("/v1/runs/r/streams/a/batches", headers=headers,
                           content=body).status_code == 202
        assert sc.wait_idle(10)
    finally:
        sc.close()


@pytest.mark.parametrize("backend", ["torch", pytest.param("onnx", marks=pytest.mark.skipif(
    not __import__("importlib").util.find_spec("onnxruntime"), reason="onnxruntime missing"))])
def test_backends_size_a_wide_stream_by_its_path(backend: str) -> None:
    """Above sketch_above the state is the sketch's (k = 2048), not d×d: the budget admits a
    d = 8192 stream that the exact path (512 MiB of S alone) could not hold."""
    sc = Sidecar(SidecarConfig(backend=backend))
    try:
        size = sc.backend.stream_bytes                  # type: ignore[attr-defined]
        assert size(8192) < 8 * 8192 * 8192           # less than the exact S alone (512 MiB)
        assert size(4096) > 8 * 4096 * 4096           # exact: S alone is 128 MiB
        assert size(8192) < SidecarConfig().memory_budget_bytes
    finally:
        sc.close()
