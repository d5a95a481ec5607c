"""The in-process server: a real uvicorn on a free loopback port, always torn down."""

from __future__ import annotations

import socket
import subprocess

import httpx
import pytest
import torch

from monitor import Monitor


@pytest.fixture
def mon() -> Monitor:
    m = Monitor(run="srv", port=0, window=512, max_rows=256, every=1)
    yield m
    m.close()


def _feed(mon: Monitor, collapsed: bool, steps: int = 3) -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        z = torch.ones(256, 16) if collapsed else torch.randn(256, 16, generator=gen)
        mon.observe("proj", z)
        mon.step()


def test_metrics_endpoint_passes_promtool(mon: Monitor, promtool: str) -> None:
    _feed(mon, collapsed=True)
    r = httpx.get(f"{mon.url}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert 'repwatch_alerts_firing{alertname="RepwatchRepresentationCollapse"' in r.text
    assert 'repwatch_embedding_std_ratio{run="srv",stream="proj"} 0.0' in r.text
    proc = subprocess.run([promtool, "check", "metrics"], input=r.content, capture_output=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


def test_health_status_page_and_runs(mon: Monitor) -> None:
    assert httpx.get(f"{mon.url}/healthz", timeout=10).json() == {
        "status": "ok", "published": False, "step": None}
    assert httpx.get(f"{mon.url}/metrics", timeout=10).text == ""
    _feed(mon, collapsed=True)
    page = httpx.get(f"{mon.url}/", timeout=10)
    assert page.status_code == 200 and "RepwatchRepresentationCollapse" in page.text
    runs = httpx.get(f"{mon.url}/v1/runs", timeout=10).json()
    assert runs[0]["run"] == "srv" and runs[0]["step"] == 3
    assert runs[0]["alerts"][0]["name"] == "RepwatchRepresentationCollapse"
    hist = httpx.get(f"{mon.url}/v1/runs/srv/history", params={"limit": 2}, timeout=10).json()
    assert [h["step"] for h in hist] == [2, 3]
    assert httpx.get(f"{mon.url}/v1/runs/nope/history", timeout=10).status_code == 404
    assert httpx.get(f"{mon.url}/openapi.json", timeout=10).status_code == 200


def test_port_in_use_is_a_clear_error(mon: Monitor) -> None:
    port = int(mon.url.rsplit(":", 1)[1])
    with pytest.raises(OSError, match="port=0 for a free port"):
        Monitor(port=port)


def test_close_frees_the_port() -> None:
    m = Monitor(port=0)
    port = int(m.url.rsplit(":", 1)[1])
    m.close()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_status_page_and_runs_show_activation_layers(mon: Monitor) -> None:
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU())
    with torch.no_grad():
        net[0].bias[:8] = -1e3                               # half the units dead
    mon.watch_activations(net)
    net(torch.randn(64, 8))
    mon.step()
    page = httpx.get(f"{mon.url}/", timeout=10).text
    assert "Activation layers (plasticity)" in page and "<td>1</td><td>0.5</td>" in page
    runs = httpx.get(f"{mon.url}/v1/runs", timeout=10).json()
    assert runs[0]["layers"]["1"]["dormant_units_ratio{tau=0}"] == 0.5
