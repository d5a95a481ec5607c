"""The trainer-side HTTP sink of sidecar mode, against a real uvicorn on a free loopback port.

The test server decodes the wire format itself (numpy, from the protocol text), so these tests
check the encoder too. Servers are always torn down.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from torch import nn

from monitor import Monitor
from monitor.server import BackgroundServer
from monitor.transport import Drop, HttpSink, Sender, make_sink
from tests.toy_training import train_toy


@dataclass
class Received:
    run: str
    stream: str
    rows: np.ndarray
    labels: np.ndarray | None
    step: int | None
    auth: str | None
    time: float
    client_port: int = 0


@dataclass
class Behaviour:
    """What the test server answers: scripted (status, headers, text) first, then 202."""

    script: list[tuple[int, dict[str, str], str]] = field(default_factory=list)
    sleep: float = 0.0
    batches: list[Received] = field(default_factory=list)
    answered: list[tuple[int, float]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _decode(headers: Any, body: bytes) -> tuple[np.ndarray, np.ndarray | None]:
    """Reference decoder, written from the protocol text."""
    assert headers["content-type"] == "application/octet-stream"
    b, d = (int(v) for v in headers["x-repwatch-shape"].split(","))
    dtype = headers["x-repwatch-dtype"]
    size = {"float32": 4, "float16": 2, "bfloat16": 2}[dtype] * b * d
    raw = body[:size]
    if dtype == "float32":
        rows = np.frombuffer(raw, dtype="<f4").reshape(b, d)
    elif dtype == "float16":
        rows = np.frombuffer(raw, dtype="<f2").astype(np.float32).reshape(b, d)
    else:  # bfloat16: the high half of a float32
        rows = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        rows = rows.reshape(b, d)
    labels = None
    if "x-repwatch-labels" in headers:
        assert headers["x-repwatch-labels"] == "int64"
        labels = np.frombuffer(body[size:], dtype="<i8")
        assert labels.shape == (b,)
    else:
        assert len(body) == size
    return rows, labels


def _app(behaviour: Behaviour) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/runs/{run}/streams/{stream}/batches")
    async def batches(run: str, stream: str, request: Request) -> JSONResponse:
        body = await request.body()
        if behaviour.sleep:
            await _sleep(behaviour.sleep)
        with behaviour.lock:
            status, headers, text = (behaviour.script.pop(0) if behaviour.script
                                     else (202, {}, ""))
            behaviour.answered.append((status, time.monotonic()))
        if status != 202:
            return JSONResponse({"detail": text}, status_code=status, headers=headers)
        rows, labels = _decode(request.headers, body)
        step = request.headers.get("x-repwatch-step")
        with behaviour.lock:
            behaviour.batches.append(Received(run, stream, rows, labels,
                                              int(step) if step is not None else None,
                                              request.headers.get("authorization"),
                                              time.monotonic(),
                                              request.client.port if request.client else 0))
        return JSONResponse({"run": run, "stream": stream, "rows": rows.shape[0],
                             "step": step}, status_code=202)

    return app


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server() -> Iterator[tuple[str, Behaviour]]:
    behaviour = Behaviour()
    srv = BackgroundServer(_app(behaviour), "127.0.0.1", 0)
    srv.start()
    try:
        yield srv.url, behaviour
    finally:
        srv.stop()


@pytest.fixture
def sinks() -> Iterator[list[HttpSink]]:
    made: list[HttpSink] = []
    yield made
    for s in made:
        s.close(timeout=0.5)


def _rows(b: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, d, generator=torch.Generator().manual_seed(seed))


def _accounted(sink: HttpSink) -> int:
    return sink.sent_rows + sum(sink.counts().values())


# ---------------------------------------------------------------------------------- delivery

def test_batches_arrive_intact(server: tuple[str, Behaviour], sinks: list[HttpSink]) -> None:
    url, srv = server
    sink = HttpSink(url, "s3cret", run="exp.1:a")
    sinks.append(sink)
    x = _rows(37, 12)
    y = torch.randint(0, 10, (37,), generator=torch.Generator().manual_seed(1))
    sink.submit("enc-0", x, y, 5)
    base = _rows(12, 9, seed=2)
    sink.submit("proj", base.t(), None, 6)                     # non-contiguous (9, 12) view
    sink.submit("proj", x.double(), y.int(), 7)                # float64 / int32 in → wire types
    buf = x.clone()
    sink.submit("enc-0", buf, None, 8)
    buf.fill_(0.0)                                             # training reuses its buffer
    assert sink.flush(30)
    got = srv.batches
    assert [(r.run, r.stream, r.step) for r in got] == [
        ("exp.1:a", "enc-0", 5), ("exp.1:a", "proj", 6), ("exp.1:a", "proj", 7),
        ("exp.1:a", "enc-0", 8)]
    assert all(r.auth == "Bearer s3cret" for r in got)
    np.testing.assert_array_equal(got[0].rows, x.numpy())
    np.testing.assert_array_equal(got[0].labels, y.numpy())
    np.testing.assert_array_equal(got[1].rows, base.t().numpy())
    assert got[1].labels is None
    np.testing.assert_array_equal(got[2].rows, x.numpy())      # float64 → float32 exactly
    np.testing.assert_array_equal(got[2].labels, y.numpy())
    np.testing.assert_array_equal(got[3].rows, x.numpy())      # the copy predates fill_
    assert sink.sent_rows == 37 + 9 + 37 + 37 and sink.sent_batches == 4
    assert sink.counts() == {}


@pytest.mark.slow
def test_one_kept_alive_connection_reopened_after_the_sidecar_closes_it(
        sinks: list[HttpSink]) -> None:
    """Back-to-back batches share one connection; when the sidecar has closed it while idle
    (uvicorn's keep-alive timeout), the next batch goes on a new one and nothing is dropped."""
    behaviour = Behaviour()
    srv = BackgroundServer(_app(behaviour), "127.0.0.1", 0)
    srv.config.timeout_keep_alive = 0.3
    srv.start()
    try:
        sink = HttpSink(srv.url + "/", run="r")               # a trailing slash is fine
        sinks.append(sink)
        for step in range(3):
            sink.submit("s", _rows(4, 3, seed=step), None, step)
        assert sink.flush(30)
        time.sleep(1.0)                                       # the server drops the connection
        for step in range(3, 5):
            sink.submit("s", _rows(4, 3, seed=step), None, step)
        assert sink.flush(30)
        ports = [r.client_port for r in behaviour.batches]
        assert [r.step for r in behaviour.batches] == [0, 1, 2, 3, 4]
        assert len(set(ports[:3])) == 1 and len(set(ports[3:])) == 1
        assert ports[3] != ports[0]
        assert sink.counts() == {} and sink.sent_batches == 5
    finally:
        srv.stop()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_narrow_wire_dtypes(server: tuple[str, Behaviour], sinks: list[HttpSink],
                            dtype: str) -> None:
    url, srv = server
    sink = HttpSink(url, run="r", dtype=dtype)
    sinks.append(sink)
    x = _rows(20, 8) * 3
    x[0, 0] = float("inf")
    sink.submit("s", x, None, 1)
    assert sink.flush(30)
    want = x.to(getattr(torch, dtype)).float().numpy()         # torch's rounding to nearest even
    np.testing.assert_array_equal(srv.batches[0].rows, want)
    assert not np.array_equal(srv.batches[0].rows, x.numpy())  # it was narrowed


# ---------------------------------------------------------------------------------- never block

@pytest.mark.slow
def test_submit_returns_fast_when_the_server_is_slow(server: tuple[str, Behaviour]) -> None:
    url, srv = server
    srv.sleep = 1.0                                            # 1 s per request
    sink = HttpSink(url, run="r", queue_batches=4)
    x = _rows(64, 32)
    n = 200
    t0 = time.perf_counter()
    for i in range(n):
        sink.submit("s", x, None, i)
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.5, f"{n} submits took {elapsed:.3f} s"  # one request alone takes 1 s
    # at most the queue plus the one batch in flight got in; the rest is counted at once
    assert sink.counts()["queue_full"] >= (n - 4 - 1) * 64
    sink.close(timeout=0.3)
    sink._thread.join(5)                                       # the in-flight request ends
    assert not sink._thread.is_alive()
    assert _accounted(sink) == n * 64                          # every row sent or counted
    assert sink.sent_rows == 64 * len(srv.batches) <= 64 * 2


def test_sidecar_absent_drops_and_training_goes_on(sinks: list[HttpSink]) -> None:
    sink = HttpSink(f"http://127.0.0.1:{_free_port()}", run="r", backoff=(0.05, 0.2))
    sinks.append(sink)
    x = _rows(16, 8)
    t0 = time.perf_counter()
    for i in range(100):
        sink.submit("s", x, None, i)
        time.sleep(0.002)
    assert time.perf_counter() - t0 < 2.0
    assert sink.flush(30)
    counts = sink.counts()
    assert sink.sent_rows == 0
    assert counts.get("sidecar_down", 0) >= 16                 # at least the first one was tried
    assert counts.get("backoff", 0) > 0                        # and the pause dropped others
    assert set(counts) <= {"sidecar_down", "backoff"}
    assert sum(counts.values()) == 100 * 16


def test_delivery_resumes_when_the_sidecar_starts(sinks: list[HttpSink]) -> None:
    port = _free_port()
    sink = HttpSink(f"http://127.0.0.1:{port}", run="r", backoff=(0.05, 0.2))
    sinks.append(sink)
    x = _rows(8, 4)
    for i in range(5):
        sink.submit("s", x, None, i)
    assert sink.flush(30)
    assert sink.sent_rows == 0 and sink.counts()["sidecar_down"] >= 8
    behaviour = Behaviour()
    srv = BackgroundServer(_app(behaviour), "127.0.0.1", port)
    srv.start()
    try:
        deadline = time.monotonic() + 30
        step = 5
        while sink.sent_batches == 0 and time.monotonic() < deadline:
            sink.submit("s", x, None, step)
            step += 1
            time.sleep(0.01)
        assert sink.flush(30)
        assert sink.sent_batches > 0, sink.counts()
        assert behaviour.batches[0].step >= 5
        # after recovery nothing more is dropped
        before = sink.counts()
        for i in range(5):
            sink.submit("s", x, None, step + i)
            assert sink.flush(30)
        assert sink.counts() == before
    finally:
        sink.close(1)
        srv.stop()


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    sink = HttpSink("http://127.0.0.1:9", run="r", backoff=(0.5, 4.0), seed=3)
    try:
        pauses = [sink.next_pause() for _ in range(7)]
    finally:
        sink.close(0)
    caps = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0]
    assert all(c / 2 <= p <= c for p, c in zip(pauses, caps, strict=True)), pauses
    assert len({p / c for p, c in zip(pauses, caps, strict=True)}) == 7  # jittered, not fixed
    again = HttpSink("http://127.0.0.1:9", run="r", backoff=(0.5, 4.0), seed=3)
    try:
        assert [again.next_pause() for _ in range(7)] == pauses       # its own seeded RNG
    finally:
        again.close(0)


# ---------------------------------------------------------------------------------- answers

@pytest.mark.slow
def test_429_retry_after_is_honoured(server: tuple[str, Behaviour],
                                     sinks: list[HttpSink]) -> None:
    url, srv = server
    srv.script = [(429, {"Retry-After": "1"}, "queue full")]
    sink = HttpSink(url, run="r", backoff=(0.05, 30.0))
    sinks.append(sink)
    x = _rows(10, 4)
    sink.submit("s", x, None, 1)
    assert sink.flush(30)
    assert sink.counts() == {"overload": 10}
    t429 = srv.answered[0][1]
    sink.submit("s", x, None, 2)                               # inside Retry-After: no request
    assert sink.counts()["backoff"] == 10
    deadline = time.monotonic() + 30
    while sink.sent_batches == 0 and time.monotonic() < deadline:
        sink.submit("s", x, None, 3)
        time.sleep(0.02)
    assert sink.flush(30)
    assert sink.sent_batches == 1
    assert len(srv.answered) == 2                              # nothing was sent in between
    assert srv.batches[0].time - t429 >= 0.95                  # waited out the Retry-After


def test_5xx_backs_off_and_4xx_is_rejected_and_logged_once(
        server: tuple[str, Behaviour], sinks: list[HttpSink],
        caplog: pytest.LogCaptureFixture) -> None:
    url, srv = server
    srv.script = [(409, {}, "dimension 4 differs from the stream's 8"),
                  (409, {}, "dimension 4 differs from the stream's 8"),
                  (503, {}, "scoring worker stopped")]
    sink = HttpSink(url, run="r", backoff=(0.3, 1.0))
    sinks.append(sink)
    x = _rows(6, 4)
    with caplog.at_level(logging.WARNING, logger="repwatch"):
        for i in range(3):
            sink.submit("s", x, None, i)
            assert sink.flush(30)
        sink.submit("s", x, None, 3)                           # paused after the 503
        assert sink.flush(30)
    assert sink.counts() == {"rejected": 12, "sidecar_error": 6, "backoff": 6}
    assert len(srv.answered) == 3
    rejected = [r for r in caplog.records if "rejected" in r.getMessage()]
    assert len(rejected) == 1 and "HTTP 409" in rejected[0].getMessage()
    assert "differs from the stream" in rejected[0].getMessage()
    assert any("unavailable" in r.getMessage() for r in caplog.records)


def test_close_flushes_then_counts_closed(server: tuple[str, Behaviour]) -> None:
    url, srv = server
    sink = HttpSink(url, run="r")
    x = _rows(5, 3)
    for i in range(20):
        sink.submit("s", x, None, i)
    sink.close(timeout=5)
    assert not sink._thread.is_alive()
    assert len(srv.batches) == 20 and [r.step for r in srv.batches] == list(range(20))
    sink.submit("s", x, None, 21)
    assert sink.counts() == {"closed": 5}
    sink.close()                                               # idempotent


@pytest.mark.slow
def test_close_is_bounded_when_the_server_hangs(server: tuple[str, Behaviour]) -> None:
    url, srv = server
    srv.sleep = 1.0
    sink = HttpSink(url, run="r", queue_batches=8)
    x = _rows(5, 3)
    for i in range(8):
        sink.submit("s", x, None, i)
    t0 = time.perf_counter()
    sink.close(timeout=0.2)
    assert time.perf_counter() - t0 < 1.0
    assert sink.counts()["closed"] >= 6 * 5                    # queued ones not reached
    sink._thread.join(5)
    assert _accounted(sink) == 8 * 5


# ---------------------------------------------------------------------------------- any transport

class _Scripted:
    """A transport answering from a script (None: delivered), recording what it was given."""

    where = "scripted"

    def __init__(self, *answers: Drop | None) -> None:
        self.answers = list(answers)
        self.sent: list[tuple[str, str, str]] = []
        self.pending = 0
        self.closed = False

    def ready(self) -> Drop | None:
        return None

    def send(self, run: str, stream: str, headers: Any, body: bytes,
             deadline: float) -> Drop | None:
        self.sent.append((run, stream, headers["X-Repwatch-Step"]))
        return self.answers.pop(0) if self.answers else None

    def drained(self) -> bool:
        return self.pending == 0

    def close(self) -> None:
        self.closed = True


def test_sender_applies_the_policy_of_each_drop_reason(
        caplog: pytest.LogCaptureFixture) -> None:
    transport = _Scripted(None, Drop("rejected", "no", key=400), Drop("rejected", "no", key=400),
                          Drop("overload", "busy", retry_after=0.2))
    sink = Sender(transport, run="r", backoff=(0.05, 1.0))
    try:
        with caplog.at_level(logging.WARNING, logger="repwatch"):
            for i in range(4):
                sink.submit("s", _rows(3, 2), None, i)
                assert sink.flush(5)
            sink.submit("s", _rows(3, 2), None, 4)             # inside the Retry-After pause
        assert transport.sent == [("r", "s", str(i)) for i in range(4)]
        assert sink.sent_rows == 3 and sink.counts() == {"rejected": 6, "overload": 3,
                                                         "backoff": 3}
        assert [r.getMessage() for r in caplog.records] == ["no", "busy"]   # once per key
        transport.pending = 1                                  # delivered, not yet consumed
        assert not sink.flush(0.05)
        transport.pending = 0
        assert sink.flush(1) and "'scripted', run='r'" in repr(sink)
    finally:
        sink.close(1)
    assert transport.closed and not sink._thread.is_alive()


# ---------------------------------------------------------------------------------- bad input

def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="http:// or https://"):
        HttpSink("ftp://x", run="r")
    with pytest.raises(ValueError, match="token must be"):
        HttpSink("http://127.0.0.1:9", "a b", run="r")
    with pytest.raises(ValueError, match="run must be"):
        HttpSink("http://127.0.0.1:9", run="bad run")
    with pytest.raises(ValueError, match="queue_batches must be an int >= 1, got 0"):
        HttpSink("http://127.0.0.1:9", run="r", queue_batches=0)
    with pytest.raises(ValueError, match="dtype must be one of"):
        HttpSink("http://127.0.0.1:9", run="r", dtype="float64")
    with pytest.raises(ValueError, match="backoff must be"):
        HttpSink("http://127.0.0.1:9", run="r", backoff=(2.0, 1.0))
    with pytest.raises(ValueError, match="token"):
        make_sink("shm://ring", token="t", run="r")     # a ring has no bearer token
    with pytest.raises(ValueError, match="token= is only used together with sink="):
        Monitor(port=None, token="t")
    sink = HttpSink("http://127.0.0.1:9", run="r")
    try:
        with pytest.raises(ValueError, match=r"2-D floating-point tensor \(rows, dim\), got shape \(4,\)"):
            sink.submit("s", torch.zeros(4), None, 0)
        with pytest.raises(ValueError, match=r"shape \(4,\), got shape \(3,\)"):
            sink.submit("s", torch.zeros(4, 2), torch.zeros(3, dtype=torch.long), 0)
        with pytest.raises(ValueError, match="stream must be"):
            sink.submit("a b", torch.zeros(4, 2), None, 0)
        with pytest.raises(ValueError, match="step must be an int >= 0, got -1"):
            sink.submit("s", torch.zeros(4, 2), None, -1)
    finally:
        sink.close(0)


# ---------------------------------------------------------------------------------- Monitor

def _train(seed: int, sink: str | None, steps: int = 20) -> tuple[list[float], Monitor | None]:
    def monitor(model: nn.Sequential) -> Monitor:
        mon = Monitor(run="bitwise", every=5, max_rows=16, window=256, port=None, seed=123,
                      sink=sink, token="tok")
        mon.watch(model[1], name="hidden")     # subsamples 64 → 16 rows with its own RNG
        mon.watch(model[4], name="penultimate")
        return mon

    def step(mon: Monitor, logits: torch.Tensor, y: torch.Tensor) -> None:
        mon.observe("logits", logits, labels=y)
        mon.step(labels=y)

    losses, mon = train_toy(seed, steps, monitor if sink is not None else None, step)
    if mon is not None:
        mon.close()
    return losses, mon


def test_monitor_with_sink_gives_bit_identical_losses(server: tuple[str, Behaviour]) -> None:
    url, srv = server
    without, _ = _train(0, None)
    with_sink, mon = _train(0, url)
    assert without == with_sink                                # exact equality of every loss
    assert _train(1, None)[0] != without                       # the comparison can fail
    assert mon is not None
    got = srv.batches
    assert {r.stream for r in got} == {"hidden", "penultimate", "logits"}
    assert len(got) == 3 * 20 and all(r.auth == "Bearer tok" for r in got)
    dims = {r.stream: r.rows.shape for r in got}
    assert dims == {"hidden": (16, 64), "penultimate": (16, 32), "logits": (16, 5)}
    assert all(r.labels is not None and r.labels.shape == (16,) for r in got)
    assert [r.step for r in got if r.stream == "hidden"] == list(range(1, 21))
    assert all((r.rows >= 0).all() for r in got if r.stream == "hidden")  # ReLU outputs
    snap = mon.latest
    assert snap is not None and snap.streams == {} and snap.errors == {}  # no local scoring
    assert mon.sink.counts() == {} and mon.sink.sent_rows == 3 * 20 * 16


def test_monitor_sink_labels_follow_the_subsample(server: tuple[str, Behaviour]) -> None:
    url, srv = server
    with Monitor(run="lab", port=None, max_rows=8, window=64, sink=url) as mon:
        enc = nn.Identity()
        mon.watch(enc, name="enc")
        x = torch.arange(32, dtype=torch.float32).repeat(3, 1).t().contiguous()  # row i = i
        enc(x)
        mon.step(labels=torch.arange(32) + 100)
        mon.observe("obs", x, labels=torch.arange(32) + 200)
        mon.step()
        assert mon.sink.flush(30)
    enc_batch, obs_batch = srv.batches
    assert enc_batch.rows.shape == (8, 3) and enc_batch.step == 1
    np.testing.assert_array_equal(enc_batch.labels, enc_batch.rows[:, 0].astype(np.int64) + 100)
    np.testing.assert_array_equal(obs_batch.labels, obs_batch.rows[:, 0].astype(np.int64) + 200)
    assert obs_batch.step == 2 and len(set(enc_batch.rows[:, 0].tolist())) == 8


def test_monitor_keeps_training_when_the_sidecar_is_absent() -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    without, _ = _train(0, None, steps=10)
    t0 = time.perf_counter()
    with_sink, mon = _train(0, url, steps=10)
    assert time.perf_counter() - t0 < 10
    assert with_sink == without
    assert mon is not None and mon.sink.sent_rows == 0
    counts = mon.sink.counts()
    assert set(counts) <= {"sidecar_down", "backoff", "closed"} and counts.get("sidecar_down")
    assert sum(counts.values()) == 3 * 10 * 16


# ---------------------------------------------------------------------------------- CUDA

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_submit_does_not_sync(server: tuple[str, Behaviour],
                                   sinks: list[HttpSink]) -> None:
    url, srv = server
    sink = HttpSink(url, run="gpu", dtype="bfloat16")
    sinks.append(sink)
    dev = torch.device("cuda")
    xs = [torch.randn(64, 32, device=dev) for _ in range(5)]
    ys = [torch.randint(0, 10, (64,), device=dev) for _ in range(5)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
            z = x * 2.0                                        # pending work the copy follows
            sink.submit("s", z, y, i)
            z.fill_(math.nan)                                  # later work must not leak in
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sink.flush(30)
    assert len(srv.batches) == 5
    for got, x, y in zip(srv.batches, xs, ys, strict=True):
        want = (x * 2.0).to(torch.bfloat16).float().cpu().numpy()
        np.testing.assert_array_equal(got.rows, want)
        np.testing.assert_array_equal(got.labels, y.cpu().numpy())
