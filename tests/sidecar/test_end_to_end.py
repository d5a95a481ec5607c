"""Sidecar mode end to end: trainer with ``sink=`` → real uvicorn sidecar → ``/metrics``.

* The SimSiam collapse scenario scored by the sidecar (ONNX Runtime backend) fires the collapse
  alert on the sidecar's ``/metrics``, which promtool accepts.
* The sidecar killed mid-run: training finishes with exactly the losses of a run without
  repwatch, the sink counts the undelivered rows; a sidecar restarted on the same port receives
  the batches of the rest of the run.
* ``repwatch demo --sink`` as a user runs it (it starts its own sidecar process).
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")

from monitor import Monitor  # noqa: E402
from monitor.tools.demo import run_demo  # noqa: E402
from monitor.server import BackgroundServer  # noqa: E402
from monitor.sidecar.service import Sidecar, SidecarConfig, create_sidecar_app  # noqa: E402

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def _start(port: int = 0, backend: str = "onnx") -> tuple[BackgroundServer, Sidecar]:
    config = SidecarConfig(backend=backend, every=10, window=2048, device="cpu")
    sidecar = Sidecar(config)
    server = BackgroundServer(create_sidecar_app(config, sidecar), "127.0.0.1", port)
    server.start()
    return server, sidecar


@pytest.mark.e2e
@pytest.mark.slow
def test_collapse_scenario_through_the_sidecar(promtool: str) -> None:
    server, sidecar = _start()
    try:
        result = run_demo(steps=200, collapse_at=0, seed=0, device="cpu", every=10,
                          run="e2e", sink=server.url)
        assert sidecar.wait_idle(60)
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        firing = re.search(r'repwatch_alerts_firing\{alertname="RepwatchRepresentationCollapse",'
                           r'run="e2e",severity="critical",stream="projector"\} 1\.0', text)
        assert firing, text[:2000]
        check = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                               capture_output=True, timeout=60)
        assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
        acc = sidecar.accounting()
        received = sum(acc["received"].values())
        assert received == sum(acc["scored"].values()) + sum(acc["dropped"].values())
        assert received == 200 * 2 * 2 * 256          # steps × views × streams × rows
        assert result.snapshots[-1].dropped == {}      # the trainer delivered everything
    finally:
        server.stop()
        sidecar.close()


def _train(sink: str | None, steps: int, on_step=None) -> tuple[list[float], Monitor | None]:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                          nn.Linear(32, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mon = None
    if sink is not None:
        mon = Monitor(run="fault", every=5, max_rows=32, window=256, port=None, sink=sink)
        mon.watch(model[1], name="hidden")
    losses = []
    for step in range(1, steps + 1):
        x = torch.randn(64, 20)
        loss = nn.functional.cross_entropy(model(x), torch.randint(0, 5, (64,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if mon is not None:
            mon.step()
        if on_step is not None:
            on_step(step)
        losses.append(loss.item())
        time.sleep(0.01)                 # a training step takes time: let the sink keep up
    if mon is not None:
        mon.sink.flush(5)
    return losses, mon


def test_sidecar_killed_and_restarted_mid_run() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    first, first_sc = _start(port)
    servers = [(first, first_sc)]

    def chaos(step: int) -> None:
        if step == 40:
            first.stop()                                     # sidecar dies
        if step == 70:
            servers.append(_start(port))                     # and comes back on its port

    try:
        without, _ = _train(None, 150)
        with_sink, mon = _train(f"http://127.0.0.1:{port}", 150, chaos)
        assert with_sink == without                          # training never noticed
        assert mon is not None
        counts = mon.sink.counts()
        assert counts.get("sidecar_down", 0) + counts.get("backoff", 0) > 0, counts
        second = servers[1][1]
        assert second.wait_idle(30)
        acc = second.accounting()
        assert sum(acc["scored"].values()) > 0               # ingestion resumed
        delivered_first = sum(first_sc.accounting()["received"].values())
        delivered_second = sum(acc["received"].values())
        total = 150 * 32
        assert delivered_first + delivered_second + sum(counts.values()) == total
        mon.close()
    finally:
        for server, sc in servers:
            server.stop()
            sc.close()


@pytest.mark.e2e
@pytest.mark.slow
def test_demo_sink_cli() -> None:
    out = subprocess.run([sys.executable, "-m", "monitor.cli", "demo", "--sink", "--collapse",
                          "--steps", "200", "--port", "0"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Sidecar: " in out.stdout
    assert "ALERT RepwatchRepresentationCollapse (on the sidecar" in out.stdout


@pytest.mark.e2e
def test_serve_runs_without_torch() -> None:
    """The sidecar image has no torch: `repwatch serve` (ONNX backend) must start, score and
    export with torch unimportable."""
    import numpy as np

    from monitor.transport.wire import encode_batch
    from tests.torchless_serve import free_port, serve_without_torch

    port = free_port()
    with serve_without_torch(["--port", str(port), "--every", "1"], port) as url:
        rng = np.random.default_rng(0)
        for step in (1, 2, 3):
            headers, body = encode_batch(rng.random((64, 8), dtype=np.float32), step=step)
            r = httpx.post(f"{url}/v1/runs/notorch/streams/enc/batches", content=body,
                           headers=headers, timeout=10)
            assert r.status_code == 202, r.text
        deadline = time.monotonic() + 30
        text = ""
        while time.monotonic() < deadline and 'repwatch_effective_rank{' not in text:
            time.sleep(0.2)
            text = httpx.get(f"{url}/metrics", timeout=10).text
        assert 'repwatch_effective_rank{run="notorch",stream="enc"}' in text, text[:1500]
