"""The in-process server: a real uvicorn on a free loopback port, always torn down."""

from __future__ import annotations

import json
import socket
import subprocess
from typing import Any

import httpx
import pytest
import torch

from monitor import Monitor
from monitor.snapshot import Snapshot


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


@pytest.mark.e2e
def test_metrics_endpoint_passes_promtool(mon: Monitor, promtool: str) -> None:
    _feed(mon, collapsed=True)
    r = httpx.get(f"{mon.url}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert 'repwatch_alerts_firing{alertname="RepwatchRepresentationCollapse"' in r.text
    assert 'repwatch_embedding_std_ratio{run="srv",stream="proj"} 0.0' in r.text
    proc = subprocess.run([promtool, "check", "metrics"], input=r.content, capture_output=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


def test_health_dashboard_and_runs(mon: Monitor) -> None:
    assert httpx.get(f"{mon.url}/healthz", timeout=10).json() == {
        "status": "ok", "published": False, "step": None}
    # before the first publish: no run's metrics, only the build info and process collector
    text = httpx.get(f"{mon.url}/metrics", timeout=10).text
    assert "repwatch_build_info{" in text and "process_cpu_seconds_total" in text
    assert not [line for line in text.splitlines()
                if line.startswith("repwatch_") and not line.startswith("repwatch_build_info")]
    page = httpx.get(f"{mon.url}/", timeout=10)          # served before the first publish too
    assert page.status_code == 200 and "<title>repwatch dashboard</title>" in page.text
    for asset, kind in (("app.js", "javascript"), ("app.css", "text/css")):
        r = httpx.get(f"{mon.url}/ui/{asset}", timeout=10)
        assert r.status_code == 200 and kind in r.headers["content-type"] and len(r.text) > 1000
    _feed(mon, collapsed=True)
    runs = httpx.get(f"{mon.url}/v1/runs", timeout=10).json()
    assert runs[0]["run"] == "srv" and runs[0]["step"] == 3
    assert runs[0]["alerts"][0]["name"] == "RepwatchRepresentationCollapse"
    hist = httpx.get(f"{mon.url}/v1/runs/srv/history", params={"limit": 2}, timeout=10).json()
    assert [h["step"] for h in hist] == [2, 3]
    assert httpx.get(f"{mon.url}/v1/runs/nope/history", timeout=10).status_code == 404
    assert httpx.get(f"{mon.url}/openapi.json", timeout=10).status_code == 200


def test_port_in_use_is_a_clear_error(mon: Monitor) -> None:
    """Counted and logged by default (tests/test_monitor.py); raised with ``strict=True``."""
    port = int(mon.url.rsplit(":", 1)[1])
    with pytest.raises(OSError, match="port=0 for a free port"):
        Monitor(port=port, strict=True)


def test_close_frees_the_port() -> None:
    m = Monitor(port=0)
    port = int(m.url.rsplit(":", 1)[1])
    m.close()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_runs_and_history_show_activation_layers(mon: Monitor) -> None:
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU())
    with torch.no_grad():
        net[0].bias[:8] = -1e3                               # half the units dead
    mon.watch_activations(net)
    net(torch.randn(64, 8))
    mon.step()
    runs = httpx.get(f"{mon.url}/v1/runs", timeout=10).json()
    assert runs[0]["layers"]["1"]["dormant_units_ratio{tau=0}"] == 0.5
    hist = httpx.get(f"{mon.url}/v1/runs/srv/history", timeout=10).json()
    assert hist[-1]["layers"]["1"]["dormant_units_ratio{tau=0}"] == 0.5


def _published(mon: Monitor, steps: int, healthy_until: int) -> list[Snapshot]:
    """Feed ``steps`` steps (healthy rows, then collapsed), return what ``step()`` published."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(steps):
        k = 16 if i < healthy_until else 2                  # rank of the rows drops to 2
        z = torch.randn(256, k, generator=gen) @ torch.randn(k, 16, generator=gen)
        mon.observe("proj", z)
        snap = mon.step()
        assert snap is not None
        out.append(snap)
    return out


def _json(snap: Snapshot) -> dict[str, Any]:
    """The snapshot after a JSON round trip (NaN → null), without its histograms (their +Inf
    bound is sent as null; they are compared by their counts)."""
    d = json.loads(json.dumps(snap.to_dict()))
    d.pop("histograms")
    return d


def _counts(h: dict[str, Any]) -> dict[str, Any]:
    return {sig: {s: (x["cumulative"], x["count"]) for s, x in per.items()}
            for sig, per in h["histograms"].items()}


def test_history_is_bounded_oldest_first_and_equal_to_the_published_snapshots() -> None:
    mon = Monitor(run="hist", port=0, window=256, max_rows=256, every=1, history=5)
    try:
        published = _published(mon, steps=8, healthy_until=4)
        url = f"{mon.url}/v1/runs/hist/history"
        full = httpx.get(url, params={"limit": 10_000}, timeout=10).json()
        # bounded by the ring (history=5), oldest first, the last five publishes exactly
        assert [h["step"] for h in full] == [s.step for s in published[-5:]] == [4, 5, 6, 7, 8]
        slim = httpx.get(url, params={"histograms": "false"}, timeout=10).json()
        assert slim == [_json(s) for s in published[-5:]]
        assert slim == [_json(s) for s in mon.history]
        assert [_counts(h) for h in full] == [
            {sig: {st: (x.cumulative, x.count) for st, x in per.items()}
             for sig, per in s.histograms.items()} for s in published[-5:]]
        ranks = [h["streams"]["proj"]["effective_rank"] for h in full]
        assert ranks == [s.streams["proj"]["effective_rank"] for s in published[-5:]]
        # limit keeps the newest; since_step the ones after a step; histograms=false drops them
        assert httpx.get(url, params={"limit": 2}, timeout=10).json() == full[-2:]
        assert httpx.get(url, timeout=10).json() == full         # default limit 200 > 5
        after = httpx.get(url, params={"since_step": 6}, timeout=10).json()
        assert [h["step"] for h in after] == [7, 8] and after == full[-2:]
        assert httpx.get(url, params={"since_step": 8}, timeout=10).json() == []
        both = httpx.get(url, params={"since_step": 4, "limit": 1}, timeout=10).json()
        assert [h["step"] for h in both] == [8]
        assert "histograms" in full[0] and all("histograms" not in h for h in slim)
        assert [{k: v for k, v in h.items() if k != "histograms"} for h in full] == slim
        for bad in ({"limit": 0}, {"limit": 10_001}, {"since_step": -2}, {"since_step": "x"}):
            assert httpx.get(url, params=bad, timeout=10).status_code == 422, bad
    finally:
        mon.close()


def test_spectra_endpoint_gives_latest_and_peak_spectrum() -> None:
    mon = Monitor(run="spec", port=0, window=256, max_rows=256, every=1, history=16,
                  peak_warmup=0)
    try:
        published = _published(mon, steps=6, healthy_until=3)
        got = httpx.get(f"{mon.url}/v1/runs/spec/spectra", timeout=10).json()
        assert set(got) == {"proj"}
        last = published[-1]
        assert got["proj"]["step"] == last.step
        assert got["proj"]["eigenvalues"] == pytest.approx(last.spectra["proj"])
        peak = max(published, key=lambda s: s.streams["proj"]["effective_rank"])
        assert peak.step <= 3                               # the healthy phase, before the drop
        # the alerts' peak: the publish whose rank set effective_rank_peak
        assert peak.streams["proj"]["effective_rank"] == last.streams["proj"]["effective_rank_peak"]
        assert got["proj"]["peak"]["step"] == peak.step
        assert got["proj"]["peak"]["eigenvalues"] == pytest.approx(peak.spectra["proj"])
        # the cliff: after the drop to rank 2, the third eigenvalue is far below the peak's
        assert got["proj"]["eigenvalues"][2] < 1e-3 * got["proj"]["peak"]["eigenvalues"][2]
        assert httpx.get(f"{mon.url}/v1/runs/nope/spectra", timeout=10).status_code == 404
    finally:
        mon.close()


def test_runbooks_page_has_an_anchor_for_every_alert() -> None:
    """The alerts' default runbook links (docs/runbooks.md#anchor) resolve on /runbooks,
    whose heading ids are GitHub's anchors of docs/runbooks.md's headings."""
    import re

    from fastapi.testclient import TestClient

    from monitor.alerts import DEFAULT_RULES
    from monitor.server import create_app

    page = TestClient(create_app(lambda: None, lambda: [], DEFAULT_RULES)).get("/runbooks")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    ids = set(re.findall(r'<h2 id="([^"]+)"', page.text))
    for rule in DEFAULT_RULES:
        anchor = rule.runbook_url.split("#", 1)[1]
        assert anchor in ids, (rule.name, anchor, sorted(ids))


def test_the_peak_spectrum_is_the_alerts_peak_not_the_random_init() -> None:
    """Before ``peak_warmup`` no peak is tracked, so none is drawn, even though the first
    publishes (random init) had the highest rank."""
    mon = Monitor(run="warm", port=0, window=256, max_rows=256, every=1, history=16,
                  peak_warmup=4)
    try:
        published = _published(mon, steps=6, healthy_until=3)
        got = httpx.get(f"{mon.url}/v1/runs/warm/spectra", timeout=10).json()["proj"]
        tracked = published[-1].streams["proj"]["effective_rank_peak"]
        assert max(s.streams["proj"]["effective_rank"] for s in published) > tracked
        assert got["peak"] is not None and got["peak"]["step"] >= 4
        assert got["peak"]["effective_rank"] == pytest.approx(tracked)
    finally:
        mon.close()
