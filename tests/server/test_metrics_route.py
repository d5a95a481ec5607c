"""``/metrics`` of both apps (the in-process read app and the sidecar) is prometheus_client's own
ASGI app: content negotiation (OpenMetrics on ``Accept: application/openmetrics-text``), gzip on
``Accept-Encoding: gzip``, ``repwatch_build_info`` and the process collector, and the repwatch
metric names unchanged."""

from __future__ import annotations

import gzip
import importlib.metadata
import platform
import sys
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.openmetrics.parser import \
    text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from monitor._version import __version__
from monitor.server.app import SingleRunSource, create_read_app
from monitor.sidecar.service import Sidecar, SidecarConfig, create_sidecar_app
from monitor.snapshot import Alert, Histogram, SignalKey, Snapshot
from monitor.transport.wire import encode_batch

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def _snapshot() -> Snapshot:
    alert = Alert(name="RepwatchRepresentationCollapse", stream="proj", severity="critical",
                  value=0.01, signal="embedding_std_ratio", summary="s", description="d",
                  runbook_url="docs/runbooks.md#x", run="r")
    return Snapshot(run="r", step=120, time=1_700_000_000.0,
                    streams={"proj": {"effective_rank": 1.2, "embedding_std_ratio": 0.01,
                                      "window_samples": 512.0}},
                    counters={"proj": {"samples": 1024.0, "nonfinite_values": 3.0}},
                    layers={"fc1": {SignalKey.of("dormant_units_ratio", tau=0.0): 0.25}},
                    histograms={"qscore": {"proj": Histogram([0.1, 1.0, np.inf],
                                                             [2.0, 5.0, 6.0], 4.5, 6.0)}},
                    alerts=[alert], errors={"capture": 2}, publish_duration_seconds=0.004)


@pytest.fixture
def read_client() -> Iterator[TestClient]:
    snap = _snapshot()
    with TestClient(create_read_app(SingleRunSource(lambda: snap, lambda: [snap]))) as client:
        yield client


@pytest.fixture
def sidecar_client() -> Iterator[TestClient]:
    config = SidecarConfig(every=1, window=512)
    sc = Sidecar(config)
    try:
        with TestClient(create_sidecar_app(config, sc)) as client:
            rows = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
            headers, body = encode_batch(rows)
            assert client.post("/v1/runs/r/streams/s/batches", headers=headers,
                               content=body).status_code == 202
            assert sc.wait_idle(60)         # scored: the scrapes below see one state
            yield client
    finally:
        sc.close()


def _get(client: TestClient, **headers: str) -> httpx.Response:
    # TestClient (httpx) sends Accept-Encoding: gzip by default: identity unless asked
    r = client.get("/metrics", headers={"Accept-Encoding": "identity", **headers})
    assert r.status_code == 200, r.text
    return r


def _torch_version() -> str:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return ""


@pytest.mark.parametrize("which", ["read", "sidecar"])
def test_openmetrics_on_request_text_format_by_default(which: str, request: pytest.FixtureRequest
                                                       ) -> None:
    client = request.getfixturevalue(f"{which}_client")
    plain = _get(client)
    assert plain.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert not plain.text.rstrip().endswith("# EOF")
    om = _get(client, Accept="application/openmetrics-text; version=1.0.0")
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert om.text.endswith("# EOF\n")
    # Prometheus' own Accept header (it prefers OpenMetrics)
    prom = _get(client, Accept="application/openmetrics-text;version=1.0.0;q=0.5,"
                               "application/openmetrics-text;version=0.0.1;q=0.4,"
                               "text/plain;version=0.0.4;q=0.3,*/*;q=0.2")
    assert prom.headers["content-type"].startswith("application/openmetrics-text")
    # the strict OpenMetrics parser accepts it, and both formats hold the same samples
    om_samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                  for f in openmetrics_families(om.text) for s in f.samples}
    text_samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                    for f in text_string_to_metric_families(plain.text) for s in f.samples
                    if not s.name.startswith("process_")}      # CPU time moves between scrapes
    om_samples = {k: v for k, v in om_samples.items() if not k[0].startswith("process_")}
    assert om_samples == text_samples
    if which == "read":
        assert om_samples[("repwatch_effective_rank", (("run", "r"), ("stream", "proj")))] == 1.2


@pytest.mark.parametrize("which", ["read", "sidecar"])
def test_gzip_on_request(which: str, request: pytest.FixtureRequest) -> None:
    client = request.getfixturevalue(f"{which}_client")
    plain = _get(client)
    assert "content-encoding" not in plain.headers
    raw = client.get("/metrics", headers={"Accept-Encoding": "gzip"})
    assert raw.status_code == 200 and raw.headers["content-encoding"] == "gzip"
    # httpx decoded it; the bytes on the wire were gzip
    assert "repwatch_build_info" in raw.text
    with client.stream("GET", "/metrics", headers={"Accept-Encoding": "gzip"}) as r:
        wire = b"".join(r.iter_raw())
    assert wire[:2] == b"\x1f\x8b"
    assert b"repwatch_build_info" in gzip.decompress(wire)


@pytest.mark.parametrize("which", ["read", "sidecar"])
def test_build_info_and_process_metrics(which: str, request: pytest.FixtureRequest) -> None:
    client = request.getfixturevalue(f"{which}_client")
    fams = {f.name: f for f in text_string_to_metric_families(_get(client).text)}
    info = fams["repwatch_build_info"].samples
    assert len(info) == 1 and info[0].value == 1.0
    assert info[0].labels == {"version": __version__, "python": platform.python_version(),
                              "torch": _torch_version()}
    if sys.platform.startswith("linux"):
        for name in ("process_cpu_seconds", "process_resident_memory_bytes",
                     "process_open_fds", "process_start_time_seconds"):
            assert name in fams, sorted(fams)
        assert fams["process_resident_memory_bytes"].samples[0].value > 0
    om = {f.name: f for f in openmetrics_families(
        _get(client, Accept="application/openmetrics-text").text)}
    assert om["repwatch_build"].type == "info"


def test_metric_names_and_values_unchanged(read_client: TestClient) -> None:
    """The repwatch families of the text format are what exporters.prometheus renders."""
    from exporters.prometheus import make_registry, render

    text = _get(read_client).text
    expected = render(make_registry(lambda: [_snapshot()])).decode()
    repwatch = "\n".join(line for line in text.splitlines()
                         if "repwatch_" in line and "repwatch_build_info" not in line)
    assert repwatch == expected.rstrip("\n")


def test_no_publish_yet_only_build_and_process() -> None:
    client = TestClient(create_read_app(SingleRunSource(lambda: None, list)))
    fams = {f.name for f in text_string_to_metric_families(_get(client).text)}
    assert "repwatch_build_info" in fams
    assert not {f for f in fams if f.startswith("repwatch_")} - {"repwatch_build_info"}


def test_query_ignored_and_methods(read_client: TestClient) -> None:
    """Query parameters change nothing (prometheus_client's ``name[]`` filter would drop
    repwatch's collectors, which describe no names); only GET is routed (405 otherwise), and
    the route stays in the OpenAPI document."""
    def repwatch_lines(text: str) -> list[str]:   # process_* values move between scrapes
        return [line for line in text.splitlines() if "repwatch_" in line]

    everything = repwatch_lines(_get(read_client).text)
    r = read_client.get("/metrics", params={"name[]": "repwatch_effective_rank"},
                        headers={"Accept-Encoding": "identity"})
    assert repwatch_lines(r.text) == everything and len(everything) > 20
    assert read_client.post("/metrics").status_code == 405
    doc = read_client.get("/openapi.json").json()
    assert doc["paths"]["/metrics"]["get"]["summary"] == "Prometheus metrics of every run"
