"""The sidecar throughput harness (``monitor/tools/throughput.py``, ``repwatch bench`` figure 5
and ``benchmarks/sidecar_throughput.py``): every client kind delivers every batch, the
accounting is exact, a failing load generator is reported instead of hanging."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from monitor.sidecar.service import SidecarConfig
from monitor.tools.throughput import ingest_and_score, make_batches, parse_cores

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def _config() -> SidecarConfig:
    return SidecarConfig(backend="onnx", device="cpu", every=50, window=256, queue_batches=4)


@pytest.mark.parametrize("client,clients", [("sink", 2), ("raw", 2), ("shm", 1)])
def test_every_batch_is_delivered_and_scored_once(client: str, clients: int) -> None:
    batches = make_batches(24, 16, 8)
    res = ingest_and_score(_config(), batches, clients, client)
    assert res.scored == 24 * 16 and res.dropped == 0
    assert res.rows_per_second > 0 and res.cpu_ms_per_batch > 0
    assert res.client_cpu_ms_per_batch > 0                 # the clients' own CPU, measured there
    body = 16 * 8 * 4
    assert res.body_bytes_per_second == pytest.approx(
        24 * body * res.rows_per_second / (24 * 16), rel=1e-9)


def test_a_failing_client_is_reported_not_waited_for() -> None:
    """A batch the sidecar refuses (409: the stream's dimension changed) makes the raw client
    raise; the harness names the failure instead of waiting for batches that never come."""
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((8, 4)).astype(np.float32),
               rng.standard_normal((8, 5)).astype(np.float32)]
    with pytest.raises(RuntimeError, match="load-generator process failed.*409"):
        ingest_and_score(_config(), batches, 1, "raw")


def test_make_batches_is_deterministic_and_nonnegative() -> None:
    a, b = make_batches(3, 5, 4), make_batches(3, 5, 4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert all(x.dtype == np.float32 and x.shape == (5, 4) and (x >= 0).all() for x in a)


def test_parse_cores() -> None:
    assert parse_cores(None) is None and parse_cores("") is None
    assert parse_cores("0,1") == {0, 1}
    assert parse_cores("2-4,7") == {2, 3, 4, 7}


@pytest.mark.e2e
def test_transport_only_benchmark_script() -> None:
    out = subprocess.run(
        [sys.executable, "benchmarks/sidecar_throughput.py", "--transport-only", "--batches",
         "40", "--rows", "16", "--dim", "8", "--client", "raw", "--clients", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True).stdout
    m = re.search(r"([\d,]+) batches/s, sidecar ([\d.]+) CPU ms per batch.*scored (\d+) \+ "
                  r"dropped (\d+)", out)
    assert m, out
    assert float(m[1].replace(",", "")) > 0 and float(m[2]) > 0
    assert (int(m[3]), int(m[4])) == (40 * 16, 0)
