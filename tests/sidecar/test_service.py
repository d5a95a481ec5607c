"""The sidecar service: every route and error (TestClient), accounting under overload, the
worker's resilience, and a real uvicorn end to end (collapse alert on /metrics, promtool)."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from monitor.server import BackgroundServer
from monitor.sidecar import cli as sidecar_cli
from monitor.sidecar.service import Sidecar, SidecarConfig, create_sidecar_app
from monitor.snapshot import Snapshot
from monitor.transport.wire import encode_batch
from monitor.validation import check_name, is_loopback

URL = "/v1/runs/{run}/streams/{stream}/batches"


def _url(run: str = "r", stream: str = "s") -> str:
    return URL.format(run=run, stream=stream)


def _rows(b: int = 32, d: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((b, d)).astype(np.float32)


class StubBackend:
    """Records what it is fed; can block (``gate``) or raise (``fail``)."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, str, np.ndarray, np.ndarray | None, int | None]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail: Exception | None = None
        self.closed = False

    def ingest(self, run: str, stream: str, rows: np.ndarray, labels: np.ndarray | None,
               step: int | None) -> None:
        self.entered.set()
        self.gate.wait(10)
        if self.fail is not None:
            raise self.fail
        self.batches.append((run, stream, rows, labels, step))

    def snapshots(self) -> list[Snapshot]:
        return []

    def history(self, run: str) -> list[Snapshot] | None:
        return None

    def close(self) -> None:
        self.closed = True


Factory = Callable[..., tuple[TestClient, Sidecar]]


@pytest.fixture
def make() -> Iterator[Factory]:
    """``make(backend=None, **config)`` → (TestClient, Sidecar); all closed afterwards."""
    made: list[Sidecar] = []

    def factory(backend: Any = None, **kw: Any) -> tuple[TestClient, Sidecar]:
        config = SidecarConfig(**{"every": 1, "window": 512, **kw})
        sc = Sidecar(config, backend)
        made.append(sc)
        return TestClient(create_sidecar_app(config, sc)), sc

    yield factory
    for sc in made:
        sc.backend.__dict__.get("gate", threading.Event()).set()
        sc.close()


def _post(client: TestClient, rows: np.ndarray, run: str = "r", stream: str = "s",
          **kw: Any) -> httpx.Response:
    extra = kw.pop("headers", {})
    headers, body = encode_batch(rows, **kw)
    return client.post(_url(run, stream), headers={**headers, **extra}, content=body)


def _samples(text: str, name: str) -> dict[str, float]:
    """``{labels: value}`` of metric ``name`` in an exposition."""
    out = {}
    for line in text.splitlines():
        m = re.match(rf"^{name}(\{{[^}}]*\}})? (\S+)$", line)
        if m:
            out[m.group(1) or ""] = float(m.group(2))
    return out


def _balance(sc: Sidecar) -> tuple[int, int, int]:
    acc = sc.accounting()
    return (sum(acc["received"].values()), sum(acc["scored"].values()),
            sum(acc["dropped"].values()))


# ---------------------------------------------------------------------- happy paths

def test_accepted_batch_is_scored_by_the_torch_backend(make: Factory) -> None:
    client, sc = make()
    x = _rows(64, 8)
    r = _post(client, x, labels=np.arange(64) % 4, step=0)
    assert r.status_code == 202
    assert r.json() == {"run": "r", "stream": "s", "rows": 64, "step": 0}
    assert sc.wait_idle(60)
    r = _post(client, _rows(64, 8, seed=1), step=1)         # advances the run: publishes
    assert r.status_code == 202 and sc.wait_idle(60)
    runs = client.get("/v1/runs").json()
    assert [s["run"] for s in runs] == ["r"] and runs[0]["step"] == 1
    assert runs[0]["counters"]["s"]["samples"] == 64        # the step-0 batch, not the new one
    dim = runs[0]["streams"]["s"]["embedding_dim"]
    assert dim == 8
    metrics = client.get("/metrics").text
    assert _samples(metrics, "repwatch_received_samples_total") == {
        '{run="r",stream="s"}': 128.0}
    assert _samples(metrics, "repwatch_scored_samples_total") == {'{run="r",stream="s"}': 128.0}
    assert _samples(metrics, "repwatch_training_step") == {'{run="r"}': 1.0}


def test_steps_without_step_header_follow_the_first_stream(make: Factory) -> None:
    client, sc = make()
    for stream in ("a", "b", "a", "b", "a"):
        assert _post(client, _rows(16, 4), stream=stream).status_code == 202
        assert sc.wait_idle(60)
    runs = client.get("/v1/runs").json()
    # a1 b1 | a2 b2 | a3: two steps; the publish at step 2 holds a1, b1, a2, b2
    assert runs[0]["step"] == 2
    assert runs[0]["counters"] == {"a": {"samples": 32.0, "nonfinite_values": 0.0},
                                   "b": {"samples": 32.0, "nonfinite_values": 0.0}}
    hist = client.get("/v1/runs/r/history", params={"limit": 1}).json()
    assert [h["step"] for h in hist] == [2]
    assert len(client.get("/v1/runs/r/history").json()) == 2


def test_explicit_steps_jump_and_late_batches_do_not_move_the_clock(make: Factory) -> None:
    client, sc = make(every=5)
    for step in (0, 3, 12, 12, 13):      # a jump publishes once; the late 12 keeps the clock
        assert _post(client, _rows(8, 4), step=step).status_code == 202
        assert sc.wait_idle(60)
    hist = client.get("/v1/runs/r/history").json()
    assert [h["step"] for h in hist] == [12]                # 0→3 no publish; 3→12 publishes once
    assert hist[0]["counters"]["s"]["samples"] == 16        # batches of steps 0 and 3
    assert client.get("/v1/runs").json()[0]["step"] == 12   # no resume: nothing went below it


def test_npy_body_and_bfloat16_are_scored(make: Factory) -> None:
    backend = StubBackend()
    client, sc = make(backend)
    x = _rows(5, 3)
    buf = io.BytesIO()
    np.save(buf, x.astype(np.float16))
    r = client.post(_url(), content=buf.getvalue(),
                    headers={"Content-Type": "application/x-npy", "X-Repwatch-Step": "4"})
    assert r.status_code == 202 and r.json()["step"] == 4
    assert _post(client, x, dtype="bfloat16", stream="t").status_code == 202
    assert sc.wait_idle(60)
    (_, s1, rows1, lab1, step1), (_, s2, rows2, _, step2) = backend.batches
    np.testing.assert_array_equal(rows1, x.astype(np.float16).astype(np.float32))
    assert (s1, lab1, step1, s2, step2) == ("s", None, 4, "t", None)
    np.testing.assert_allclose(rows2, x, rtol=2**-8)


def test_nonfinite_rows_are_counted_as_dropped_and_by_the_monitor(make: Factory) -> None:
    client, sc = make()
    x = _rows(10, 4)
    x[0, 1] = np.nan
    x[3] = np.inf
    assert _post(client, x, step=0).status_code == 202
    assert _post(client, _rows(10, 4), step=1).status_code == 202
    assert sc.wait_idle(60)
    metrics = client.get("/metrics").text
    assert _samples(metrics, "repwatch_dropped_samples_total") == {
        '{reason="nonfinite",run="r"}': 2.0}
    assert _samples(metrics, "repwatch_scored_samples_total") == {'{run="r",stream="s"}': 18.0}
    assert _samples(metrics, "repwatch_nonfinite_values_total") == {
        '{run="r",stream="s"}': 5.0}                       # 1 NaN + 4 Inf values, from the monitor
    assert _samples(metrics, "repwatch_samples_total") == {'{run="r",stream="s"}': 8.0}


def test_health_ready_page_docs_and_history_404(make: Factory) -> None:
    client, sc = make()
    assert client.get("/healthz").json() == {"status": "ok", "published": False, "step": None}
    assert client.get("/readyz").json() == {"status": "ready"}
    assert client.get("/v1/runs").json() == []
    page = client.get("/")                   # the dashboard (tests/e2e renders it in Chromium)
    assert page.status_code == 200 and "<title>repwatch dashboard</title>" in page.text
    assert client.get("/ui/app.js").status_code == 200
    for step in range(3):
        _post(client, np.ones((300, 8), np.float32), step=step)
    assert sc.wait_idle(60)
    assert client.get("/v1/runs").json()[0]["alerts"][0]["name"] == "RepwatchRepresentationCollapse"
    assert client.get("/v1/runs/r/spectra").json()["s"]["eigenvalues"][0] > 0
    assert client.get("/", params={"run": "nope"}).status_code == 200
    assert client.get("/v1/runs/nope/history").status_code == 404
    assert client.get("/v1/runs/nope/spectra").status_code == 404
    assert client.get("/openapi.json").json()["info"]["title"] == "repwatch sidecar"
    assert client.get("/docs").status_code == 404            # its page needs a CDN: off
    sc.close()
    assert client.get("/readyz").status_code == 503
    assert client.get("/healthz").status_code == 200


@pytest.mark.e2e
def test_two_runs_share_one_exposition_without_duplicate_families(make: Factory,
                                                                 promtool: str) -> None:
    client, sc = make()
    for run in ("r1", "r2"):
        for step in range(2):
            _post(client, _rows(64, 8, seed=step), run=run, step=step)
    assert sc.wait_idle(60)
    text = client.get("/metrics").text
    helps = [line for line in text.splitlines() if line.startswith("# HELP")]
    assert len(helps) == len(set(helps))
    assert set(_samples(text, "repwatch_effective_rank")) == {'{run="r1",stream="s"}',
                                                              '{run="r2",stream="s"}'}
    proc = subprocess.run([promtool, "check", "metrics"], check=False, input=text.encode(),
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


# ---------------------------------------------------------------------- errors

def test_token_guards_writes_only(make: Factory) -> None:
    backend = StubBackend()
    client, sc = make(backend, token="s3cret")
    x = _rows(4, 2)
    r = _post(client, x)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer <token>" in r.json()["detail"]
    assert _post(client, x, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert _post(client, x, headers={"Authorization": "Basic s3cret"}).status_code == 401
    assert _post(client, x, headers={"Authorization": "Bearer s3cret"}).status_code == 202
    assert client.get("/v1/runs").status_code == 200 and client.get("/metrics").status_code == 200
    assert sc.wait_idle(60)
    assert len(backend.batches) == 1
    acc = sc.accounting()
    assert acc["rejected"] == {"unauthorized": 3} and acc["received"] == {("r", "s"): 4}
    sec = client.get("/openapi.json").json()["components"]["securitySchemes"]
    assert sec["HTTPBearer"]["scheme"] == "bearer"


def test_no_token_documents_no_security(make: Factory) -> None:
    client, _ = make(StubBackend())
    doc = client.get("/openapi.json").json()
    assert "securitySchemes" not in doc.get("components", {})
    assert "401" not in doc["paths"][URL]["post"]["responses"]


def test_bad_names_are_422(make: Factory) -> None:
    client, sc = make(StubBackend())
    r = _post(client, _rows(2, 2), run="bad name")
    assert r.status_code == 422 and r.json()["detail"].startswith("run must be 1–128 characters")
    assert _post(client, _rows(2, 2), stream="x" * 129).status_code == 422
    assert _post(client, _rows(2, 2), run="a%2Fb").status_code in (404, 422)
    assert _post(client, _rows(2, 2), run="ok:run.1-x_y", stream="s").status_code == 202
    assert sc.accounting()["rejected"] == {"invalid": 2}


def test_body_size_is_checked_before_and_while_reading(make: Factory) -> None:
    backend = StubBackend()
    client, sc = make(backend, max_body_bytes=1024)
    headers, body = encode_batch(_rows(4, 4))
    # declared too long: refused from Content-Length alone (the body sent is small)
    r = client.post(_url(), headers={**headers, "Content-Length": "5000"}, content=body)
    assert r.status_code == 413 and "5000 bytes is over the limit of 1024" in r.json()["detail"]
    # the shape alone needs more than the limit
    big_headers, _ = encode_batch(_rows(64, 8))
    r = client.post(_url(), headers=big_headers, content=b"")
    assert r.status_code == 413 and "needs 2048 bytes" in r.json()["detail"]
    # chunked (no Content-Length) and over the limit: stopped while streaming
    npy = io.BytesIO()
    np.save(npy, _rows(64, 8))
    data = npy.getvalue()

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(data), 256):
            yield data[i:i + 256]

    r = client.post(_url(), headers={"Content-Type": "application/x-npy"}, content=chunks())
    assert r.status_code == 413 and "body over the limit of 1024" in r.json()["detail"]
    r = client.post(_url(), headers={**headers, "Content-Length": "abc"}, content=body)
    assert r.status_code == 400 and "Content-Length must be an integer" in r.json()["detail"]
    assert sc.accounting()["rejected"] == {"too_large": 3, "bad_request": 1}
    assert sc.accounting()["received"] == {} and backend.batches == []


@pytest.mark.parametrize("headers,status,needle", [
    ({"Content-Type": "text/plain"}, 415, "got 'text/plain'"),
    ({"Content-Type": "application/octet-stream", "X-Repwatch-Dtype": "float64",
      "X-Repwatch-Shape": "4,2"}, 415, "got 'float64'"),
    ({"Content-Type": "application/octet-stream", "X-Repwatch-Dtype": "float32"}, 400,
     "X-Repwatch-Shape is required"),
    ({"Content-Type": "application/octet-stream", "X-Repwatch-Dtype": "float32",
      "X-Repwatch-Shape": "4;2"}, 400, "got '4;2'"),
    ({"Content-Type": "application/octet-stream", "X-Repwatch-Dtype": "float32",
      "X-Repwatch-Shape": "4,3"}, 400, "Content-Length 32 does not match X-Repwatch-Shape 4,3: "
                                        "the body must be 48 bytes (4×3 float32 rows)"),
    ({"Content-Type": "application/octet-stream", "X-Repwatch-Dtype": "float32",
      "X-Repwatch-Shape": "4,2", "X-Repwatch-Step": "soon"}, 400, "got 'soon'"),
    ({"Content-Type": "application/octet-stream", "X-Repwatch-Dtype": "float32",
      "X-Repwatch-Shape": "4,2", "X-Repwatch-Labels": "int64"}, 400, "64 bytes"),
    ({"Content-Type": "application/x-npy"}, 400, "not a .npy file"),
])
def test_malformed_requests(make: Factory, headers: dict[str, str], status: int,
                            needle: str) -> None:
    client, sc = make(StubBackend())
    r = client.post(_url(), headers=headers, content=bytes(32))
    assert r.status_code == status and needle in r.json()["detail"], r.text
    assert sc.accounting()["received"] == {}                 # refused before parsing


def test_row_and_dimension_limits_are_400(make: Factory) -> None:
    client, _ = make(StubBackend(), max_rows_per_batch=8, max_dim=4)
    r = _post(client, _rows(9, 4))
    assert r.status_code == 400 and "at most 8 rows per batch, got 9" in r.json()["detail"]
    r = _post(client, _rows(8, 5))
    assert r.status_code == 400 and "at most 4 dimensions per row, got 5" in r.json()["detail"]
    assert _post(client, _rows(8, 4)).status_code == 202


def test_dimension_change_is_409_and_counted(make: Factory) -> None:
    client, sc = make(StubBackend())
    assert _post(client, _rows(4, 8)).status_code == 202
    r = _post(client, _rows(6, 16))
    assert r.status_code == 409
    assert "has dimension 8 (from its first batch); got rows of dimension 16" in r.json()["detail"]
    assert _post(client, _rows(6, 16), stream="other").status_code == 202
    assert sc.wait_idle(60)
    acc = sc.accounting()
    assert acc["received"] == {("r", "s"): 10, ("r", "other"): 6}
    assert acc["dropped"] == {("r", "dimension"): 6}


def test_cardinality_limits_are_409(make: Factory) -> None:
    client, sc = make(StubBackend(), max_streams_per_run=2, max_runs=2)
    assert _post(client, _rows(2, 2), stream="a").status_code == 202
    assert _post(client, _rows(2, 2), stream="b").status_code == 202
    r = _post(client, _rows(2, 2), stream="c")
    assert r.status_code == 409 and "too many streams for run 'r': at most 2" in r.json()["detail"]
    assert _post(client, _rows(2, 2), stream="a").status_code == 202   # known streams go on
    assert _post(client, _rows(2, 2), run="r2").status_code == 202
    r = _post(client, _rows(2, 2), run="r3")
    assert r.status_code == 409 and "too many runs" in r.json()["detail"]
    assert sc.wait_idle(60)
    acc = sc.accounting()
    assert acc["rejected"] == {"too_many_streams": 1, "too_many_runs": 1}
    assert set(acc["received"]) == {("r", "a"), ("r", "b"), ("r2", "s")}  # no series for c/r3


def test_full_queue_answers_429_with_retry_after(make: Factory) -> None:
    backend = StubBackend()
    backend.gate.clear()
    client, sc = make(backend, queue_batches=1, retry_after_seconds=3, admit_wait_seconds=0.05)
    assert _post(client, _rows(5, 2)).status_code == 202        # taken by the (blocked) worker
    assert backend.entered.wait(30)
    assert _post(client, _rows(6, 2)).status_code == 202        # waits in the queue
    r = _post(client, _rows(7, 2))
    assert r.status_code == 429 and r.headers["retry-after"] == "3"
    assert "scoring queue full (1 batches)" in r.json()["detail"]
    text = client.get("/metrics").text
    assert _samples(text, "repwatch_sidecar_queued_samples") == {'{run="r"}': 11.0}
    assert _samples(text, "repwatch_received_samples_total") == {'{run="r",stream="s"}': 7.0}
    assert _samples(text, "repwatch_dropped_samples_total") == {'{reason="overload",run="r"}': 7.0}
    backend.gate.set()
    assert sc.wait_idle(60)
    assert _balance(sc) == (18, 11, 7)
    assert [b[2].shape[0] for b in backend.batches] == [5, 6]


def test_a_full_queue_is_waited_on_briefly_before_429(make: Factory) -> None:
    """A POST arriving at a full queue waits (up to ``admit_wait_seconds``, before reading its
    body) for the worker to make room: a short stall of the scorer costs no batch."""
    backend = StubBackend()
    backend.gate.clear()
    client, sc = make(backend, queue_batches=1, admit_wait_seconds=5.0)
    assert _post(client, _rows(5, 2)).status_code == 202
    assert backend.entered.wait(30)
    assert _post(client, _rows(6, 2)).status_code == 202        # fills the queue
    threading.Timer(0.3, backend.gate.set).start()               # the scorer resumes in 0.3 s
    t0 = time.perf_counter()
    r = _post(client, _rows(7, 2))
    waited = time.perf_counter() - t0
    assert r.status_code == 202, r.text
    assert 0.2 < waited < 4.0
    assert sc.wait_idle(60)
    assert _balance(sc) == (18, 18, 0)
    assert not sc.saturated and sc._reserved == 0               # every reservation returned


def test_reservations_are_returned_on_every_path(make: Factory) -> None:
    """A reserved place comes back whether the request is queued, refused after its body was
    read (409 dimension, 400 bad body) or its queue place was never needed."""
    client, sc = make(StubBackend(), queue_batches=2, admit_wait_seconds=1.0)
    assert _post(client, _rows(3, 4)).status_code == 202
    assert _post(client, _rows(3, 5)).status_code == 409            # dimension change
    headers, body = encode_batch(_rows(3, 4))
    r = client.post(_url(), headers=headers, content=body[:-4])    # body shorter than its shape
    assert r.status_code == 400
    assert sc.wait_idle(60)
    assert sc._reserved == 0 and not sc.saturated
    for _ in range(5):                                               # places still all usable
        assert _post(client, _rows(3, 4)).status_code == 202
        assert sc.wait_idle(60)


def _batch_requests() -> list[tuple[str, dict[str, str], Any]]:
    """(path, headers, body) covering the answers of the batch route."""
    x, lab = _rows(6, 4, seed=1), np.arange(6, dtype=np.int64)
    raw = encode_batch(x, labels=lab, step=7)
    npy = io.BytesIO()
    np.save(npy, _rows(5, 4, seed=2))
    bf16 = encode_batch(_rows(3, 4, seed=3), dtype="bfloat16", step=9)
    return [
        (_url(), *raw),
        (_url(), {"Content-Type": "application/x-npy"}, npy.getvalue()),
        (_url("r", "t"), *bf16),
        (_url(), {"Content-Type": "text/plain"}, b"x"),                      # 415
        (_url(), {**raw[0], "X-Repwatch-Shape": "6;4"}, raw[1]),              # 400 header
        (_url(), raw[0], raw[1][:-8]),                                         # 400 length
        (_url(), {**raw[0], "X-Repwatch-Shape": "6000,4"}, raw[1]),           # 413 shape
        (_url(), *encode_batch(_rows(2, 5))),                                  # 409 dimension
        (_url("r", "u"), *encode_batch(_rows(2, 2))),                          # 409 streams
        (_url("r2"), *encode_batch(_rows(2, 2))),                              # 409 runs
        (_url("bad name"), *encode_batch(_rows(2, 2))),                        # 422
        ("/v1/runs/r/streams/s/batches/x", *encode_batch(_rows(2, 2))),        # 404
    ]


@pytest.mark.parametrize("token", [None, "s3cret"])
def test_batch_route_answers_every_kind_of_request(make: Factory, token: str | None) -> None:
    """Each batch request gets its documented status and body (BatchAccepted or ErrorBody),
    refusals are counted once by reason, chunked bodies without Content-Length are read, and
    the backend gets the accepted rows."""
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    client, sc = make(StubBackend(), max_body_bytes=4096, max_streams_per_run=2, max_runs=1,
                      token=token)
    requests = _batch_requests()
    statuses = [202, 202, 202, 415, 400, 400, 413, 409, 409, 409, 422, 404]
    if token:
        headers, body = encode_batch(_rows(2, 4))
        requests.append((_url(), {**headers, "Authorization": "Bearer no"}, body))
        statuses.append(401)
    for (path, headers, body), status in zip(requests, statuses, strict=True):
        r = client.post(path, headers={**auth, **headers}, content=body)
        assert r.status_code == status, (path, r.text)
        if status == 202:
            assert set(r.json()) == {"run", "stream", "rows", "step"}
        elif status != 404:
            assert isinstance(r.json()["detail"], str) and r.json()["detail"], path
    if token:
        assert r.headers["www-authenticate"] == "Bearer"
    headers, body = encode_batch(_rows(4, 4, seed=4))
    r = client.post(_url(), headers={**auth, **headers},
                    content=iter([body[:10], body[10:50], body[50:]]))
    assert r.status_code == 202 and r.json()["rows"] == 4
    assert sc.wait_idle(60)
    assert sc.accounting()["rejected"] == {
        "unsupported": 1, "bad_request": 2, "too_large": 1, "too_many_streams": 1,
        "too_many_runs": 1, "invalid": 1, **({"unauthorized": 1} if token else {})}
    fed = sc.backend.batches
    assert [(run, stream, rows.shape, step) for run, stream, rows, _, step in fed] == [
        ("r", "s", (6, 4), 7), ("r", "s", (5, 4), None), ("r", "t", (3, 4), 9),
        ("r", "s", (4, 4), None)]
    np.testing.assert_array_equal(fed[0][3], np.arange(6))


def test_worker_survives_backend_errors(make: Factory) -> None:
    backend = StubBackend()
    backend.fail = RuntimeError("scorer exploded")
    client, sc = make(backend)
    assert _post(client, _rows(3, 2)).status_code == 202
    assert sc.wait_idle(60)
    assert sc.ready and client.get("/readyz").status_code == 200
    backend.fail = None
    assert _post(client, _rows(4, 2)).status_code == 202
    assert sc.wait_idle(60)
    acc = sc.accounting()
    assert acc["dropped"] == {("r", "error"): 3} and acc["scored"] == {("r", "s"): 4}
    assert acc["errors"] == {"ingest": 1}
    assert 'repwatch_sidecar_errors_total{component="ingest"} 1.0' in client.get("/metrics").text


def test_close_counts_queued_batches_as_shutdown_drops(make: Factory) -> None:
    backend = StubBackend()
    backend.gate.clear()
    client, sc = make(backend, queue_batches=4)
    for _ in range(3):
        assert _post(client, _rows(5, 2)).status_code == 202
    assert backend.entered.wait(30)
    threading.Timer(0.2, backend.gate.set).start()
    sc.close()
    acc = sc.accounting()
    assert acc["dropped"] == {("r", "shutdown"): 10} and acc["scored"] == {("r", "s"): 5}
    assert _balance(sc) == (15, 5, 10) and backend.closed and not sc.ready


@pytest.mark.e2e
def test_service_imports_without_torch() -> None:
    """The ONNX Runtime sidecar image has no torch: the service module must not need it."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from monitor.sidecar.service import SidecarConfig, create_sidecar_app\n"
            "from monitor.sidecar import cli\n"
            "assert sys.modules['torch'] is None\n")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="queue_batches must be an int >= 1, got 0"):
        SidecarConfig(queue_batches=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        SidecarConfig(backend="tensorrt")
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N"):
        SidecarConfig(device="tpu")
    with pytest.raises(ValueError, match="token must be a non-empty string"):
        SidecarConfig(token="  ")


# ---------------------------------------------------------------------- load and end to end

@pytest.fixture
def served() -> Iterator[Callable[..., tuple[str, Sidecar]]]:
    """``serve(backend=None, **config)`` → (base URL, Sidecar) on a real uvicorn."""
    started: list[tuple[BackgroundServer, Sidecar]] = []

    def serve(backend: Any = None, **kw: Any) -> tuple[str, Sidecar]:
        config = SidecarConfig(**{"every": 1, "window": 512, **kw})
        sc = Sidecar(config, backend)
        server = BackgroundServer(create_sidecar_app(config, sc), "127.0.0.1", 0)
        server.start()
        started.append((server, sc))
        return server.url, sc

    yield serve
    for server, sc in started:
        server.stop()
        sc.close()


class SlowTorch:
    """The torch backend, slowed down so that a burst overruns the queue; records the peak
    number of queued rows the service reported while it worked."""

    def __init__(self, inner: Any, delay: float) -> None:
        self.inner, self.delay, self.sidecar, self.peak = inner, delay, None, 0

    def ingest(self, *args: Any) -> None:
        time.sleep(self.delay)
        acc = self.sidecar.accounting()  # type: ignore[union-attr]
        self.peak = max(self.peak, acc["queue_batches"])
        self.inner.ingest(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_burst_from_four_clients_keeps_exact_accounting(served: Any) -> None:
    from monitor.sidecar.service import TorchBackend

    config = SidecarConfig(every=1, window=512, queue_batches=2)
    backend = SlowTorch(TorchBackend(config), delay=0.01)
    url, sc = served(backend, queue_batches=2, admit_wait_seconds=0)
    backend.sidecar = sc
    codes: list[int] = []
    lock = threading.Lock()

    def client(seed: int) -> None:
        with httpx.Client(base_url=url, timeout=10) as http:
            for i in range(13 if seed < 2 else 12):                     # 50 posts in all
                headers, body = encode_batch(_rows(16, 8, seed=seed * 100 + i))
                r = http.post(_url(stream=f"s{seed}"), headers=headers, content=body)
                with lock:
                    codes.append(r.status_code)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    elapsed = time.perf_counter() - t0
    assert sc.wait_idle(60)
    assert len(codes) == 50 and set(codes) <= {202, 429}
    received, scored, dropped = _balance(sc)
    assert received == 50 * 16 and received == scored + dropped
    assert dropped == 16 * codes.count(429) > 0 and scored == 16 * codes.count(202)
    assert backend.peak <= 2                                   # the queue bound held
    text = httpx.get(f"{url}/metrics", timeout=10).text
    assert sum(_samples(text, "repwatch_received_samples_total").values()) == received
    assert sum(_samples(text, "repwatch_dropped_samples_total").values()) == dropped
    print(f"burst: 50 posts in {elapsed:.2f} s, {codes.count(429)} answered 429")


@pytest.mark.e2e
def test_end_to_end_collapse_alert_over_real_http(served: Any, promtool: str) -> None:
    url, sc = served(token="tok", every=1)
    auth = {"Authorization": "Bearer tok"}
    with httpx.Client(base_url=url, timeout=10, headers=auth) as http:
        assert http.get("/readyz").json() == {"status": "ready"}
        gen = np.random.default_rng(0)
        for step in range(5):                                  # a collapsed projector stream
            z = np.ones((256, 16), np.float32) + 1e-6 * gen.standard_normal((256, 16))
            headers, body = encode_batch(z.astype(np.float32), step=step)
            assert http.post(_url("exp", "proj"), headers=headers, content=body).status_code == 202
        assert sc.wait_idle(60)
        r = http.get("/metrics")
    assert re.search(r'repwatch_alerts_firing\{alertname="RepwatchRepresentationCollapse",'
                     r'run="exp",severity="critical",stream="proj"\} 1\.0', r.text)
    assert 'repwatch_received_samples_total{run="exp",stream="proj"} 1280.0' in r.text
    proc = subprocess.run([promtool, "check", "metrics"], check=False, input=r.content, capture_output=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    assert httpx.post(f"{url}{_url('exp', 'proj')}", content=b"", timeout=10).status_code == 401


# ---------------------------------------------------------------------- CLI

def _parse(argv: list[str]) -> Any:
    import argparse

    parser = argparse.ArgumentParser(prog="repwatch")
    sidecar_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_refuses_public_host_without_token(capsys: pytest.CaptureFixture[str]) -> None:
    args = _parse(["serve", "--host", "0.0.0.0"])
    assert args.func(args) == 2
    assert "refusing to serve on non-loopback address '0.0.0.0' without a token" in (
        capsys.readouterr().err)


def test_cli_token_file_errors(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    assert sidecar_cli.run(_parse(["serve", "--token-file", str(empty)])) == 2
    assert "is empty" in capsys.readouterr().err
    assert sidecar_cli.run(_parse(["serve", "--token-file", str(tmp_path / "missing")])) == 2
    assert "cannot read token file" in capsys.readouterr().err


def test_cli_builds_the_config(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    token = tmp_path / "token"
    token.write_text("abc123\n")
    seen: list[SidecarConfig] = []
    monkeypatch.setattr(sidecar_cli, "serve", lambda config: seen.append(config) or 0)
    args = _parse(["serve", "--host", "0.0.0.0", "--port", "0", "--token-file", str(token),
                   "--max-body-mb", "0.5", "--queue-batches", "3", "--every", "7",
                   "--max-streams-per-run", "5", "--max-runs", "6", "--device", "cpu",
                   "--admit-wait", "0.5", "--io-binding", "on"])
    assert sidecar_cli.run(args) == 0
    (config,) = seen
    assert (config.token, config.host, config.max_body_bytes, config.queue_batches,
            config.every, config.max_streams_per_run, config.max_runs, config.device,
            config.admit_wait_seconds, config.io_binding) == (
        "abc123", "0.0.0.0", 524288, 3, 7, 5, 6, "cpu", 0.5, True)
    assert sidecar_cli.run(_parse(["serve", "--admit-wait", "-1"])) == 2     # clear error
    with pytest.raises(SystemExit):
        _parse(["serve", "--port", "70000"])


def test_cli_serve_runs_uvicorn_and_closes(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    ran: list[Any] = []

    def fake_run(self: uvicorn.Server, sockets: Any = None) -> None:
        ran.append(self.config)
        self.started = True

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    assert sidecar_cli.serve(SidecarConfig(port=0, device="cpu")) == 0
    assert ran and ran[0].host == "127.0.0.1" and ran[0].port == 0


@pytest.mark.parametrize("host,expected", [("127.0.0.1", True), ("127.5.0.1", True),
                                           ("::1", True), ("[::1]", True), ("localhost", True),
                                           ("0.0.0.0", False), ("10.0.0.1", False),
                                           ("example.com", False), ("::", False)])
def test_is_loopback(host: str, expected: bool) -> None:
    assert is_loopback(host) is expected


@pytest.mark.parametrize("name", [".", "..", "a/..", "../b", "a/./b", "/a", "a/", "a//b"])
def test_names_a_url_path_would_normalise_are_422(make: Factory, name: str) -> None:
    """A run or stream named ``..`` (or with a ``.``/``..``/empty path segment) would be rewritten
    by a browser's URL normalisation (``/v1/runs/../history``): refused at the POST."""
    backend = StubBackend()
    client, sc = make(backend)
    quoted = name.replace(".", "%2E").replace("/", "%2F")
    for kind in ("run", "stream"):
        r = _post(client, _rows(2, 2), **{kind: quoted})
        assert r.status_code in (404, 422), (kind, name, r.status_code)
    assert sc.wait_idle(5) and backend.batches == []
    with pytest.raises(ValueError, match="path segment"):
        check_name("run", name)
