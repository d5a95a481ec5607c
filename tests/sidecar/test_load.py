"""Bounded load test: several client processes, a few hundred batches each, against a real
uvicorn sidecar (ONNX backend). Accounting stays exact, memory stays bounded, throughput is
printed (a measurement, not an assertion)."""

from __future__ import annotations

import multiprocessing as mp
import resource
import time

import httpx
import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from monitor.server import BackgroundServer  # noqa: E402
from monitor.sidecar.service import Sidecar, SidecarConfig, create_sidecar_app  # noqa: E402
from monitor.transport.wire import encode_batch  # noqa: E402

pytestmark = pytest.mark.e2e

CLIENTS, BATCHES, ROWS, DIM = 4, 250, 64, 32
DEADLINE_S = 120.0


def _client(args: tuple[str, int]) -> dict[int, int]:
    """Post BATCHES batches (no retries: 429s are part of the load); count status codes."""
    url, seed = args
    rng = np.random.default_rng(seed)
    codes: dict[int, int] = {}
    deadline = time.monotonic() + DEADLINE_S
    with httpx.Client(timeout=30) as http:
        for i in range(BATCHES):
            if time.monotonic() > deadline:
                break
            headers, body = encode_batch(rng.random((ROWS, DIM), dtype=np.float32), step=i + 1)
            r = http.post(f"{url}/v1/runs/load/streams/c{seed}/batches", content=body,
                          headers=headers)
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
    return codes


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_load_accounting_exact_and_memory_bounded() -> None:
    config = SidecarConfig(backend="onnx", device="cpu", every=20, window=1024, queue_batches=16,
                           admit_wait_seconds=0)       # 429s are part of this load
    sidecar = Sidecar(config)
    server = BackgroundServer(create_sidecar_app(config, sidecar), "127.0.0.1", 0)
    server.start()
    try:
        with mp.get_context("spawn").Pool(CLIENTS) as pool:
            rss_before = _rss_mib()
            t0 = time.perf_counter()
            results = pool.map(_client, [(server.url, k) for k in range(CLIENTS)])
        assert sidecar.wait_idle(60)
        seconds = time.perf_counter() - t0
        rss_after = _rss_mib()
        codes: dict[int, int] = {}
        for res in results:
            for code, n in res.items():
                codes[code] = codes.get(code, 0) + n
        assert set(codes) <= {202, 429}, codes
        assert sum(codes.values()) == CLIENTS * BATCHES
        acc = sidecar.accounting()
        received = sum(acc["received"].values())
        scored = sum(acc["scored"].values())
        dropped = sum(acc["dropped"].values())
        assert received == CLIENTS * BATCHES * ROWS == scored + dropped
        assert dropped == ROWS * codes.get(429, 0)
        assert scored == ROWS * codes[202]
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        assert 'repwatch_received_samples_total{run="load",stream="c0"}' in text
        # Memory: the queue holds ≤ 16 small batches; the windows are 4 × 1024 × 32 floats.
        assert rss_after - rss_before < 150, (rss_before, rss_after)
        print(f"load: {CLIENTS} client processes × {BATCHES} batches of {ROWS}×{DIM} in "
              f"{seconds:.1f} s = {CLIENTS * BATCHES / seconds:.0f} requests/s, "
              f"{scored / seconds:.0f} scored rows/s, {codes.get(429, 0)} answered 429, "
              f"RSS {rss_before:.0f} → {rss_after:.0f} MiB")
    finally:
        server.stop()
        sidecar.close()
